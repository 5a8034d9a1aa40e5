//! Change events → what to write to the views. Pure: no I/O.
//!
//! [`decode`] turns one Kafka record into a [`Change`] (or says precisely why it is a bad event);
//! [`fold`] plays a run of changes, in order, over the current state of the rows they touch and
//! returns the final writes and the `department_stats` deltas. Playing the whole run in memory and
//! writing only the outcome is what lets one transaction apply thousands of events with a handful of
//! statements, and it gives exactly the result of applying them one by one:
//!
//! - an event at or below the position a row (or its deletion, or a truncate) already reflects is
//!   ignored, so re-delivered and re-snapshotted events are harmless;
//! - columns an event marks as unchanged TOAST keep the value the row has at that point.

use std::collections::{BTreeMap, HashMap};

use change_event::{Envelope, Op, Position};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// One user as `user_view` holds it (without its position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub department: String,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Active,
    Inactive,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "ACTIVE",
            Status::Inactive => "INACTIVE",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "ACTIVE" => Some(Status::Active),
            "INACTIVE" => Some(Status::Inactive),
            _ => None,
        }
    }
}

/// A row image from an event: `None` for a column sent as unchanged TOAST (keep the current value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialRow {
    pub id: i64,
    pub name: Option<String>,
    pub email: Option<String>,
    pub department: Option<String>,
    pub status: Option<Status>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl PartialRow {
    /// The full row, taking unchanged columns from `current`; the first column that has no value
    /// either way otherwise.
    fn complete(self, current: Option<&UserRow>) -> Result<UserRow, &'static str> {
        fn pick<T: Clone>(
            new: Option<T>,
            current: Option<&UserRow>,
            get: impl Fn(&UserRow) -> &T,
            column: &'static str,
        ) -> Result<T, &'static str> {
            match (new, current) {
                (Some(v), _) => Ok(v),
                (None, Some(row)) => Ok(get(row).clone()),
                (None, None) => Err(column),
            }
        }
        Ok(UserRow {
            id: self.id,
            name: pick(self.name, current, |r| &r.name, "name")?,
            email: pick(self.email, current, |r| &r.email, "email")?,
            department: pick(self.department, current, |r| &r.department, "department")?,
            status: pick(self.status, current, |r| &r.status, "status")?,
            created_at: pick(self.created_at, current, |r| &r.created_at, "created_at")?,
            updated_at: pick(self.updated_at, current, |r| &r.updated_at, "updated_at")?,
        })
    }
}

/// What one record asks of the views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `c`, `u`, `r`: the row as of `position`.
    Upsert { row: PartialRow, position: Position },
    /// `d`.
    Delete { id: i64, position: Position },
    /// `t`: every row at or below `position` goes.
    Truncate { position: Position },
    /// The null-valued record that follows a delete (for compaction); nothing to do.
    Tombstone,
}

impl Change {
    pub fn position(&self) -> Option<Position> {
        match self {
            Change::Upsert { position, .. }
            | Change::Delete { position, .. }
            | Change::Truncate { position } => Some(*position),
            Change::Tombstone => None,
        }
    }
}

/// Why a record cannot be applied. It goes to the dead-letter topic with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEvent {
    #[error("record has neither key nor value")]
    Empty,
    #[error("value is not a change event: {0}")]
    NotAnEvent(String),
    #[error("key is not JSON of the form {{\"id\": <integer>}}: {0}")]
    Key(String),
    #[error("event comes from {0}, this projector applies {1}")]
    WrongTable(String, String),
    #[error("op {0:?} carries no {1} row image")]
    MissingImage(&'static str, &'static str),
    #[error("column {0:?} is missing")]
    MissingColumn(&'static str),
    #[error("column {0:?} has the wrong type or value: {1}")]
    BadColumn(&'static str, String),
    #[error("the key says id {key} but the row image says {row}")]
    KeyMismatch { key: i64, row: i64 },
    #[error("column {0:?} is unchanged TOAST and the view has no row to keep it from")]
    ToastWithoutRow(&'static str),
}

impl BadEvent {
    /// A short stable name for headers and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BadEvent::Empty => "empty_record",
            BadEvent::NotAnEvent(_) => "not_an_event",
            BadEvent::Key(_) => "bad_key",
            BadEvent::WrongTable(..) => "wrong_table",
            BadEvent::MissingImage(..) => "missing_image",
            BadEvent::MissingColumn(_) => "missing_column",
            BadEvent::BadColumn(..) => "bad_column",
            BadEvent::KeyMismatch { .. } => "key_mismatch",
            BadEvent::ToastWithoutRow(_) => "toast_without_row",
        }
    }
}

/// Decodes one record of the users topic. `table` is the `(schema, table)` events must come from.
pub fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    table: (&str, &str),
) -> Result<Change, BadEvent> {
    let value = match (key, value) {
        (None, None) => return Err(BadEvent::Empty),
        (Some(_), None) => return Ok(Change::Tombstone),
        (_, Some(v)) => v,
    };
    let event: Envelope =
        change_event::parse(value).map_err(|e| BadEvent::NotAnEvent(e.to_string()))?;
    if (event.source.schema.as_str(), event.source.table.as_str()) != table {
        return Err(BadEvent::WrongTable(
            format!("{}.{}", event.source.schema, event.source.table),
            format!("{}.{}", table.0, table.1),
        ));
    }
    let position = event.source.position();
    if event.op == Op::Truncate {
        return Ok(Change::Truncate { position });
    }
    let id = key_id(key)?;
    match event.op {
        Op::Create | Op::Update | Op::Read => {
            let op = match event.op {
                Op::Create => "c",
                Op::Update => "u",
                _ => "r",
            };
            let after = event.after.ok_or(BadEvent::MissingImage(op, "after"))?;
            let row = partial_row(&after, &event.unchanged_toast)?;
            if row.id != id {
                return Err(BadEvent::KeyMismatch {
                    key: id,
                    row: row.id,
                });
            }
            Ok(Change::Upsert { row, position })
        }
        Op::Delete => {
            if let Some(before) = &event.before {
                if let Some(v) = before.get("id") {
                    let row = as_id("id", v)?;
                    if row != id {
                        return Err(BadEvent::KeyMismatch { key: id, row });
                    }
                }
            }
            Ok(Change::Delete { id, position })
        }
        Op::Truncate => Ok(Change::Truncate { position }),
    }
}

fn key_id(key: Option<&[u8]>) -> Result<i64, BadEvent> {
    let key = key.ok_or_else(|| BadEvent::Key("no key".to_owned()))?;
    let key: Value = change_event::parse(key).map_err(|e| BadEvent::Key(e.to_string()))?;
    let id = key
        .get("id")
        .ok_or_else(|| BadEvent::Key(format!("no \"id\" in {key}")))?;
    id.as_i64()
        .ok_or_else(|| BadEvent::Key(format!("\"id\" is {id}, not an integer")))
}

fn as_id(column: &'static str, v: &Value) -> Result<i64, BadEvent> {
    v.as_i64()
        .ok_or_else(|| BadEvent::BadColumn(column, format!("{v} is not an integer")))
}

fn partial_row(after: &Map<String, Value>, unchanged: &[String]) -> Result<PartialRow, BadEvent> {
    // A column is optional only when the event says its value was not sent.
    let get = |column: &'static str| -> Result<Option<&Value>, BadEvent> {
        match after.get(column) {
            Some(v) => Ok(Some(v)),
            None if unchanged.iter().any(|c| c == column) => Ok(None),
            None => Err(BadEvent::MissingColumn(column)),
        }
    };
    let text = |column: &'static str| -> Result<Option<String>, BadEvent> {
        get(column)?
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(BadEvent::BadColumn(
                    column,
                    format!("{other} is not a string"),
                )),
            })
            .transpose()
    };
    let time = |column: &'static str| -> Result<Option<DateTime<Utc>>, BadEvent> {
        text(column)?
            .map(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| BadEvent::BadColumn(column, format!("{s:?}: {e}")))
            })
            .transpose()
    };
    let id = match get("id")? {
        Some(v) => as_id("id", v)?,
        // The key column is never TOASTed; an event that says so is wrong.
        None => return Err(BadEvent::MissingColumn("id")),
    };
    let status = text("status")?
        .map(|s| {
            Status::parse(&s).ok_or_else(|| {
                BadEvent::BadColumn("status", format!("{s:?} is not ACTIVE or INACTIVE"))
            })
        })
        .transpose()?;
    Ok(PartialRow {
        id,
        name: text("name")?,
        email: text("email")?,
        department: text("department")?,
        status,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
    })
}

/// What the views hold for one user before a run of changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Current {
    Row(UserRow, Position),
    /// Deleted at that position (`user_view_deletions`).
    Deleted(Position),
}

/// The final state of one user after a run of changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    Row(UserRow, Position),
    Deleted(Position),
}

/// Change of one department's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsDelta {
    pub users: i64,
    pub active: i64,
    pub inactive: i64,
}

impl StatsDelta {
    fn add(&mut self, status: Status, sign: i64) {
        self.users += sign;
        match status {
            Status::Active => self.active += sign,
            Status::Inactive => self.inactive += sign,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == StatsDelta::default()
    }
}

/// The outcome of [`fold`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Folded {
    /// Users whose state changed, by id.
    pub writes: BTreeMap<i64, Final>,
    /// Non-zero deltas by department.
    pub stats: BTreeMap<String, StatsDelta>,
    /// Events at or below the position their row already reflected.
    pub ignored: usize,
    /// Events that turned out inapplicable against the current state: (index in `changes`, why).
    pub bad: Vec<(usize, BadEvent)>,
}

/// Plays `changes` (no truncates among them) in order over `current` (the state of every user they
/// touch; absent = never seen) and `floor` (the last truncate's position).
pub fn fold(
    current: &HashMap<i64, Current>,
    floor: Option<Position>,
    changes: &[Change],
) -> Folded {
    let mut out = Folded::default();
    let mut state: HashMap<i64, Option<Current>> = HashMap::new();
    for (index, change) in changes.iter().enumerate() {
        let (id, position) = match change {
            Change::Upsert { row, position } => (row.id, *position),
            Change::Delete { id, position } => (*id, *position),
            Change::Truncate { .. } | Change::Tombstone => continue,
        };
        let now = state.entry(id).or_insert_with(|| current.get(&id).cloned());
        let reflected = match now {
            Some(Current::Row(_, p) | Current::Deleted(p)) => Some(*p),
            None => None,
        }
        .max(floor);
        if reflected.is_some_and(|r| position <= r) {
            out.ignored += 1;
            continue;
        }
        match change {
            Change::Upsert { row, .. } => {
                let existing = match now {
                    Some(Current::Row(r, _)) => Some(&*r),
                    _ => None,
                };
                match row.clone().complete(existing) {
                    Ok(full) => *now = Some(Current::Row(full, position)),
                    Err(column) => out.bad.push((index, BadEvent::ToastWithoutRow(column))),
                }
            }
            Change::Delete { .. } => *now = Some(Current::Deleted(position)),
            Change::Truncate { .. } | Change::Tombstone => {}
        }
    }
    for (id, end) in state {
        let start = current.get(&id);
        if start == end.as_ref() {
            continue;
        }
        let Some(end) = end else { continue };
        if let Some(Current::Row(old, _)) = start {
            out.stats
                .entry(old.department.clone())
                .or_default()
                .add(old.status, -1);
        }
        let fin = match end {
            Current::Row(new, p) => {
                out.stats
                    .entry(new.department.clone())
                    .or_default()
                    .add(new.status, 1);
                Final::Row(new, p)
            }
            Current::Deleted(p) => Final::Deleted(p),
        };
        out.writes.insert(id, fin);
    }
    out.stats.retain(|_, d| !d.is_zero());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TABLE: (&str, &str) = ("public", "users");

    fn pos(commit_lsn: u64, event_index: u64) -> Position {
        Position {
            commit_lsn,
            event_index,
        }
    }

    fn time(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn user(id: i64, department: &str, status: Status) -> UserRow {
        UserRow {
            id,
            name: format!("user {id}"),
            email: format!("u{id}@example.org"),
            department: department.to_owned(),
            status,
            created_at: time("2026-01-02T03:04:05Z"),
            updated_at: time("2026-01-02T03:04:05.123456Z"),
        }
    }

    fn full(row: &UserRow) -> PartialRow {
        PartialRow {
            id: row.id,
            name: Some(row.name.clone()),
            email: Some(row.email.clone()),
            department: Some(row.department.clone()),
            status: Some(row.status),
            created_at: Some(row.created_at),
            updated_at: Some(row.updated_at),
        }
    }

    fn upsert(row: &UserRow, p: Position) -> Change {
        Change::Upsert {
            row: full(row),
            position: p,
        }
    }

    fn event(op: &str, before: Value, after: Value) -> Value {
        json!({
            "before": before, "after": after, "op": op, "ts_ms": 1,
            "source": {"version": "0.1.0", "connector": "postgresql", "name": "cdc",
                       "db": "user_db", "schema": "public", "table": "users", "txId": 7,
                       "lsn": 100, "sequence": null, "ts_ms": 1, "snapshot": "false",
                       "commit_lsn": 200, "event_index": 3}
        })
    }

    fn after_json() -> Value {
        json!({"id": 42, "name": "홍길동", "email": "hong@example.org", "department": "Engineering",
               "status": "ACTIVE", "created_at": "2026-01-02T03:04:05.123456Z",
               "updated_at": "2026-01-02T03:04:05+09:00", "extra": [1, 2]})
    }

    fn decode_json(key: Option<Value>, value: Option<Value>) -> Result<Change, BadEvent> {
        let key = key.map(|k| serde_json::to_vec(&k).unwrap());
        let value = value.map(|v| serde_json::to_vec(&v).unwrap());
        decode(key.as_deref(), value.as_deref(), TABLE)
    }

    #[test]
    fn decodes_every_op() {
        let key = Some(json!({"id": 42}));
        for op in ["c", "u", "r"] {
            let change = decode_json(key.clone(), Some(event(op, json!(null), after_json())));
            let Ok(Change::Upsert { row, position }) = change else {
                panic!("{op}: {change:?}")
            };
            assert_eq!(position, pos(200, 3));
            assert_eq!(row.id, 42);
            assert_eq!(row.name.as_deref(), Some("홍길동"));
            assert_eq!(row.status, Some(Status::Active));
            assert_eq!(row.updated_at, Some(time("2026-01-01T18:04:05Z")));
        }
        assert_eq!(
            decode_json(
                key.clone(),
                Some(event("d", json!({"id": 42}), json!(null)))
            ),
            Ok(Change::Delete {
                id: 42,
                position: pos(200, 3)
            })
        );
        assert_eq!(
            decode_json(None, Some(event("t", json!(null), json!(null)))),
            Ok(Change::Truncate {
                position: pos(200, 3)
            })
        );
        assert_eq!(decode_json(key, None), Ok(Change::Tombstone));
    }

    #[test]
    fn unchanged_toast_columns_may_be_absent_and_only_they() {
        let mut after = after_json();
        after.as_object_mut().unwrap().remove("name");
        let mut e = event("u", json!(null), after);
        assert_eq!(
            decode_json(Some(json!({"id": 42})), Some(e.clone())),
            Err(BadEvent::MissingColumn("name"))
        );
        e["unchanged_toast"] = json!(["name"]);
        let Ok(Change::Upsert { row, .. }) = decode_json(Some(json!({"id": 42})), Some(e)) else {
            panic!()
        };
        assert_eq!(row.name, None);
        assert_eq!(row.email.as_deref(), Some("hong@example.org"));
    }

    #[test]
    fn bad_events_say_why() {
        let key = || Some(json!({"id": 42}));
        let cases: Vec<(Option<Value>, Option<Value>, &str)> = vec![
            (None, None, "empty_record"),
            (key(), Some(json!("just a string")), "not_an_event"),
            (key(), Some(json!({"op": "c"})), "not_an_event"),
            (
                key(),
                Some(event("x", json!(null), after_json())),
                "not_an_event",
            ),
            (None, Some(event("c", json!(null), after_json())), "bad_key"),
            (
                Some(json!({"id": "42"})),
                Some(event("c", json!(null), after_json())),
                "bad_key",
            ),
            (
                Some(json!([42])),
                Some(event("c", json!(null), after_json())),
                "bad_key",
            ),
            (
                key(),
                Some(event("c", json!(null), json!(null))),
                "missing_image",
            ),
            (
                Some(json!({"id": 7})),
                Some(event("c", json!(null), after_json())),
                "key_mismatch",
            ),
            (
                Some(json!({"id": 7})),
                Some(event("d", json!({"id": 42}), json!(null))),
                "key_mismatch",
            ),
        ];
        for (k, v, kind) in cases {
            let err = decode_json(k.clone(), v.clone()).unwrap_err();
            assert_eq!(err.kind(), kind, "{k:?} {v:?}: {err}");
        }
        let mut wrong_table = event("c", json!(null), after_json());
        wrong_table["source"]["table"] = json!("orders");
        assert_eq!(
            decode_json(key(), Some(wrong_table)).unwrap_err().kind(),
            "wrong_table"
        );
        for (column, value) in [
            ("id", json!("42")),
            ("name", json!(1)),
            ("status", json!("ON_LEAVE")),
            ("created_at", json!("yesterday")),
            ("updated_at", json!(null)),
        ] {
            let mut after = after_json();
            after[column] = value;
            let err = decode_json(key(), Some(event("u", json!(null), after))).unwrap_err();
            assert!(
                matches!(err, BadEvent::BadColumn(c, _) if c == column),
                "{column}: {err}"
            );
        }
        // Never panics on arbitrary bytes.
        for bytes in [&b""[..], b"\xff\xfe", b"{\"before\":", b"null"] {
            assert!(decode(Some(b"{\"id\":1}"), Some(bytes), TABLE).is_err());
        }
    }

    #[test]
    fn fold_keeps_the_last_state_and_counts_departments() {
        let a = user(1, "Eng", Status::Active);
        let mut a2 = a.clone();
        a2.department = "Ops".into();
        a2.status = Status::Inactive;
        let b = user(2, "Eng", Status::Active);
        let changes = [
            upsert(&a, pos(10, 0)),
            upsert(&b, pos(10, 1)),
            upsert(&a2, pos(11, 0)),
            Change::Tombstone,
            Change::Delete {
                id: 2,
                position: pos(12, 0),
            },
        ];
        let out = fold(&HashMap::new(), None, &changes);
        assert_eq!(out.ignored, 0);
        assert_eq!(
            out.writes,
            BTreeMap::from([
                (1, Final::Row(a2, pos(11, 0))),
                (2, Final::Deleted(pos(12, 0))),
            ])
        );
        // b came and went inside the run: Eng nets to zero and is left out.
        assert_eq!(
            out.stats,
            BTreeMap::from([(
                "Ops".to_owned(),
                StatsDelta {
                    users: 1,
                    active: 0,
                    inactive: 1
                }
            )])
        );
    }

    #[test]
    fn fold_ignores_what_the_views_already_reflect() {
        let a = user(1, "Eng", Status::Active);
        let mut newer = a.clone();
        newer.name = "newer".into();
        let current = HashMap::from([
            (1, Current::Row(newer.clone(), pos(20, 0))),
            (2, Current::Deleted(pos(20, 1))),
        ]);
        let changes = [
            upsert(&a, pos(19, 0)),
            upsert(&a, pos(20, 0)),
            upsert(&user(2, "Eng", Status::Active), pos(20, 1)),
            upsert(&user(3, "Eng", Status::Active), pos(5, 0)),
        ];
        let out = fold(&current, Some(pos(6, 0)), &changes);
        assert_eq!(out.ignored, 4);
        assert!(out.writes.is_empty() && out.stats.is_empty());

        // A later delete of a row moves it out of its department.
        let out = fold(
            &current,
            None,
            &[Change::Delete {
                id: 1,
                position: pos(21, 0),
            }],
        );
        assert_eq!(
            out.writes,
            BTreeMap::from([(1, Final::Deleted(pos(21, 0)))])
        );
        assert_eq!(
            out.stats,
            BTreeMap::from([(
                "Eng".to_owned(),
                StatsDelta {
                    users: -1,
                    active: -1,
                    inactive: 0
                }
            )])
        );
    }

    #[test]
    fn unchanged_toast_keeps_the_value_the_row_has_at_that_point() {
        let a = user(1, "Eng", Status::Active);
        let mut renamed = a.clone();
        renamed.name = "renamed".into();
        let mut toast = full(&a);
        toast.name = None;
        toast.department = Some("Ops".into());
        let current = HashMap::from([(1, Current::Row(a.clone(), pos(10, 0)))]);
        // The name comes from the event before it in the same run, not from the stored row.
        let out = fold(
            &current,
            None,
            &[
                upsert(&renamed, pos(11, 0)),
                Change::Upsert {
                    row: toast.clone(),
                    position: pos(12, 0),
                },
            ],
        );
        let Some(Final::Row(row, _)) = out.writes.get(&1) else {
            panic!("{out:?}")
        };
        assert_eq!(
            (row.name.as_str(), row.department.as_str()),
            ("renamed", "Ops")
        );

        // Without a row to take it from, the event is bad and nothing is written.
        let out = fold(
            &HashMap::new(),
            None,
            &[Change::Upsert {
                row: toast,
                position: pos(12, 0),
            }],
        );
        assert_eq!(out.bad, vec![(0, BadEvent::ToastWithoutRow("name"))]);
        assert!(out.writes.is_empty());
    }

    #[test]
    fn fold_equals_one_by_one_application() {
        // Random runs with re-deliveries, against applying each event alone to a model.
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let mut seed = 0u64;
        let mut next = |n: u64| {
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            seed += 1;
            h.finish() % n
        };
        for _ in 0..300 {
            let mut changes = Vec::new();
            let mut lsn = 100;
            for _ in 0..next(30) {
                lsn += 1 + next(3);
                let id = 1 + next(4) as i64;
                let position = if next(5) == 0 {
                    pos(next(lsn), 0)
                } else {
                    pos(lsn, 0)
                };
                changes.push(if next(3) == 0 {
                    Change::Delete { id, position }
                } else {
                    let dept = ["A", "B", "C"][next(3) as usize];
                    let status = if next(2) == 0 {
                        Status::Active
                    } else {
                        Status::Inactive
                    };
                    upsert(&user(id, dept, status), position)
                });
            }
            let current = HashMap::from([
                (1, Current::Row(user(1, "A", Status::Active), pos(50, 0))),
                (2, Current::Deleted(pos(102, 0))),
            ]);
            let mut model = current.clone();
            for c in &changes {
                let one = fold(&model, None, std::slice::from_ref(c));
                for (id, f) in one.writes {
                    model.insert(
                        id,
                        match f {
                            Final::Row(r, p) => Current::Row(r, p),
                            Final::Deleted(p) => Current::Deleted(p),
                        },
                    );
                }
            }
            let out = fold(&current, None, &changes);
            let mut folded = current.clone();
            for (id, f) in out.writes {
                folded.insert(
                    id,
                    match f {
                        Final::Row(r, p) => Current::Row(r, p),
                        Final::Deleted(p) => Current::Deleted(p),
                    },
                );
            }
            assert_eq!(folded, model, "{changes:?}");
            let count = |m: &HashMap<i64, Current>, d: &str| {
                m.values()
                    .filter(|c| matches!(c, Current::Row(r, _) if r.department == d))
                    .count() as i64
            };
            for d in ["A", "B", "C"] {
                let delta = out.stats.get(d).map_or(0, |s| s.users);
                assert_eq!(count(&current, d) + delta, count(&model, d), "{d}");
            }
        }
    }
}
