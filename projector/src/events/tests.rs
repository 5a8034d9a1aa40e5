//! Unit tests of `events`.

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
