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
mod tests;
