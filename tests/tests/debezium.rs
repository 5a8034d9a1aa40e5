//! Our reader beside Debezium itself (its PostgreSQL connector in Kafka Connect, on the same
//! PostgreSQL and the same Kafka): the same changes, compared field by field; and Debezium's JDBC
//! sink reading our topic.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::connect::{postgres_source, Connect};
use e2e::{read_topic, unique_suffix, Reader, Received, Stack, TestDb};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// How one of our fields may differ from Debezium's, on purpose.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Both have it; the values differ (processing times, versions).
    Differs,
    /// Only Debezium's records have it.
    OnlyDebezium,
    /// Only ours have it.
    OnlyOurs,
    /// Debezium: a string holding the JSON text; ours: that JSON value itself.
    JsonText,
    /// Debezium's ISO string has a `Z` appended to a value that has no zone.
    ZoneAppended,
    /// Debezium: the placeholder `__debezium_unavailable_value`; ours: the column is left out
    /// (and named in `unchanged_toast`).
    ToastPlaceholder,
    /// Both mark snapshot records, with different words for the first and per-table last ones.
    SnapshotMarker,
    /// Debezium: null; ours: left out, as the value is not known (a column outside the replica
    /// identity in a delete's old row).
    UnknownAsNull,
}

/// The written list of intended differences (docs/debezium.md has it as a table).
/// `path` is `key.<column>`, `value.<field>` or `value.<before|after|source>.<field>`, a `*` standing
/// for `before` and `after`; `ops` limits an entry to records of those operations (empty: all).
struct Intended {
    path: &'static str,
    ops: &'static [&'static str],
    expect: Expect,
}

const INTENDED: &[Intended] = &[
    // Envelope and source block.
    Intended {
        path: "value.ts_ms",
        ops: &[],
        expect: Expect::Differs,
    },
    Intended {
        path: "value.ts_us",
        ops: &[],
        expect: Expect::OnlyDebezium,
    },
    Intended {
        path: "value.ts_ns",
        ops: &[],
        expect: Expect::OnlyDebezium,
    },
    Intended {
        path: "value.transaction",
        ops: &[],
        expect: Expect::OnlyDebezium,
    },
    Intended {
        path: "value.unchanged_toast",
        ops: &[],
        expect: Expect::OnlyOurs,
    },
    Intended {
        path: "value.source.version",
        ops: &[],
        expect: Expect::Differs,
    },
    Intended {
        path: "value.source.ts_us",
        ops: &[],
        expect: Expect::OnlyDebezium,
    },
    Intended {
        path: "value.source.ts_ns",
        ops: &[],
        expect: Expect::OnlyDebezium,
    },
    Intended {
        path: "value.source.xmin",
        ops: &[],
        expect: Expect::OnlyDebezium,
    },
    Intended {
        path: "value.source.origin",
        ops: &[],
        expect: Expect::OnlyDebezium,
    },
    Intended {
        path: "value.source.origin_lsn",
        ops: &[],
        expect: Expect::OnlyDebezium,
    },
    Intended {
        path: "value.source.commit_lsn",
        ops: &[],
        expect: Expect::OnlyOurs,
    },
    Intended {
        path: "value.source.event_index",
        ops: &[],
        expect: Expect::OnlyOurs,
    },
    Intended {
        path: "value.source.snapshot",
        ops: &["r"],
        expect: Expect::SnapshotMarker,
    },
    // Snapshot records: each reader has its own slot, so its own consistent point and snapshot
    // transaction.
    Intended {
        path: "value.source.lsn",
        ops: &["r"],
        expect: Expect::Differs,
    },
    Intended {
        path: "value.source.txId",
        ops: &["r"],
        expect: Expect::Differs,
    },
    Intended {
        path: "value.source.sequence",
        ops: &["r"],
        expect: Expect::Differs,
    },
    Intended {
        path: "value.source.ts_ms",
        ops: &["r"],
        expect: Expect::Differs,
    },
    // Column values.
    Intended {
        path: "value.*.ts",
        ops: &[],
        expect: Expect::ZoneAppended,
    },
    Intended {
        path: "value.*.d",
        ops: &[],
        expect: Expect::ZoneAppended,
    },
    Intended {
        path: "value.*.t",
        ops: &[],
        expect: Expect::ZoneAppended,
    },
    Intended {
        path: "value.*.j",
        ops: &[],
        expect: Expect::JsonText,
    },
    Intended {
        path: "value.*.jb",
        ops: &[],
        expect: Expect::JsonText,
    },
    Intended {
        path: "value.after.big",
        ops: &["u"],
        expect: Expect::ToastPlaceholder,
    },
    Intended {
        path: "value.before.*",
        ops: &["d"],
        expect: Expect::UnknownAsNull,
    },
];

/// `record`'s fields by path: `key.<column>`, `value.<field>`, and one level down in `before`,
/// `after` and `source`.
fn fields(record: &Received) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Some(Value::Object(key)) = &record.key {
        for (k, v) in key {
            out.insert(format!("key.{k}"), v.clone());
        }
    }
    if let Some(Value::Object(value)) = &record.value {
        for (k, v) in value {
            match (k.as_str(), v) {
                ("before" | "after" | "source", Value::Object(inner)) => {
                    for (c, cv) in inner {
                        out.insert(format!("value.{k}.{c}"), cv.clone());
                    }
                }
                _ => {
                    out.insert(format!("value.{k}"), v.clone());
                }
            }
        }
    }
    out
}

/// Equal JSON, numbers compared by value (`1.7976931348623157E308` and `…e308` are the same).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn matches(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix(".*") {
        return path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'));
    }
    match pattern.split_once(".*.") {
        Some((head, tail)) => ["before", "after"]
            .iter()
            .any(|side| path == format!("{head}.{side}.{tail}")),
        None => pattern == path,
    }
}

/// Whether `ours` and `theirs` (either may be absent) differ as `expect` allows.
fn allowed(expect: Expect, ours: Option<&Value>, theirs: Option<&Value>) -> bool {
    match (expect, ours, theirs) {
        (Expect::Differs, Some(_), Some(_)) => true,
        (Expect::OnlyDebezium, None, Some(_)) | (Expect::OnlyOurs, Some(_), None) => true,
        (Expect::UnknownAsNull, None, Some(Value::Null)) => true,
        (Expect::JsonText, Some(o), Some(Value::String(t))) => {
            serde_json::from_str::<Value>(t).is_ok_and(|t| same(o, &t))
        }
        (Expect::ZoneAppended, Some(Value::String(o)), Some(Value::String(t))) => {
            t.strip_suffix('Z') == Some(o)
        }
        (Expect::ToastPlaceholder, None, Some(Value::String(t))) => {
            t == "__debezium_unavailable_value"
        }
        (Expect::SnapshotMarker, Some(Value::String(o)), Some(Value::String(t))) => {
            let last = |s: &str| s == "last";
            last(o) == last(t)
                && ["true", "last"].contains(&o.as_str())
                && [
                    "true",
                    "first",
                    "first_in_data_collection",
                    "last_in_data_collection",
                    "last",
                ]
                .contains(&t.as_str())
        }
        _ => false,
    }
}

/// Compares two topics record by record. Returns the differences not on the list, and the list
/// entries each record pair used (to print).
fn compare(ours: &[Received], theirs: &[Received]) -> (Vec<String>, BTreeMap<&'static str, usize>) {
    let mut unexpected = Vec::new();
    let mut used = BTreeMap::new();
    if ours.len() != theirs.len() {
        unexpected.push(format!(
            "{} records from our reader, {} from Debezium",
            ours.len(),
            theirs.len()
        ));
    }
    for (i, (o, t)) in ours.iter().zip(theirs).enumerate() {
        let op = o
            .value
            .as_ref()
            .and_then(|v| v["op"].as_str())
            .unwrap_or("tombstone")
            .to_owned();
        let (of, tf) = (fields(o), fields(t));
        let paths: std::collections::BTreeSet<&String> = of.keys().chain(tf.keys()).collect();
        if o.value.is_none() != t.value.is_none() {
            unexpected.push(format!("record {i}: a tombstone on one side only"));
            continue;
        }
        for path in paths {
            let (ov, tv) = (of.get(path), tf.get(path));
            if let (Some(a), Some(b)) = (ov, tv) {
                if same(a, b) {
                    continue;
                }
            }
            let entry = INTENDED.iter().find(|e| {
                matches(e.path, path)
                    && (e.ops.is_empty() || e.ops.contains(&op.as_str()))
                    && allowed(e.expect, ov, tv)
            });
            match entry {
                Some(e) => *used.entry(e.path).or_insert(0) += 1,
                None => unexpected.push(format!(
                    "record {i} ({op}, key {}): {path}: ours {}, Debezium {}",
                    o.key.as_ref().map_or("none".to_owned(), Value::to_string),
                    ov.map_or("(absent)".to_owned(), Value::to_string),
                    tv.map_or("(absent)".to_owned(), Value::to_string),
                )),
            }
        }
    }
    (unexpected, used)
}

const SCHEMA: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TABLE kinds (
      id bigint PRIMARY KEY, i2 smallint, i4 integer, i8 bigint, num numeric(14,4), num_free numeric,
      f4 real, f8 double precision, flag boolean, txt text, vc varchar(40), tstz timestamptz,
      ts timestamp, d date, t time, u uuid, j json, jb jsonb, b bytea, ia integer[], ta text[],
      m mood, big text);
    CREATE TABLE kinds_full (LIKE kinds INCLUDING ALL);
    ALTER TABLE kinds_full REPLICA IDENTITY FULL;";

/// A row with a value in every column; `big` is large and incompressible, so stored out of line
/// (TOASTed).
fn full_row(table: &str, id: i64) -> String {
    format!(
        "INSERT INTO {table} VALUES ({id}, -32768, 2147483647, 9007199254740993, -12345678.1234,
           0.000000000000000000001, 0.1, 1.7976931348623157e308, true, 'text ü \"q\"', 'varchar',
           '2026-01-02 03:04:05.123456+02', '2026-01-02 03:04:05.5', '2026-01-02', '03:04:05.123',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"a\": [1, 2.5, \"x\"], \"b\": null}}',
           '{{\"b\": {{\"c\": true}}}}', '\\xdeadbeef', '{{1,NULL,3}}', '{{\"a b\",\"c,d\",NULL}}',
           'happy', (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 700)))"
    )
}

#[tokio::test]
async fn the_same_changes_read_by_debezium_match_ours_field_by_field() {
    let stack = Stack::from_env();
    let connect = Connect::from_env();
    e2e::init_logs();
    // user_db's migrations: the reader records its snapshots there.
    let db = TestDb::create(&stack, "dbz_compat", Some(schema::Database::UserDb))
        .await
        .unwrap();
    let client = db.client().await.unwrap();
    client.batch_execute(SCHEMA).await.unwrap();
    // Rows both readers take in their initial snapshots.
    client
        .batch_execute(&format!(
            "{}; INSERT INTO kinds (id) VALUES (2); {};",
            full_row("kinds", 1),
            full_row("kinds_full", 1)
        ))
        .await
        .unwrap();

    // The same name in `source.name` on both sides; the topics apart.
    let server = format!("c{}", unique_suffix());
    let tables = ["public.kinds", "public.kinds_full"];
    let ours_topic = |table: &str| format!("ours.{server}.{table}");
    let theirs_topic = |table: &str| format!("{server}.{table}");
    let mut config = Reader::config(
        &stack,
        &db,
        &tables,
        &tables
            .iter()
            .map(|t| format!("{t}={}", ours_topic(t)))
            .collect::<Vec<_>>(),
    );
    config.server_name = server.clone();
    let reader = Reader::start(config).await.unwrap();
    reader.wait_streaming().await.unwrap();
    e2e::wait_snapshot_done(&client, &db.name).await.unwrap();

    let source = postgres_source(&db.url, &format!("dbz_{}", db.name), &server, &tables).unwrap();
    let debezium = connect
        .create(&format!("dbz-{server}"), source)
        .await
        .unwrap();
    // Its snapshot is in Kafka: what follows is streamed.
    read_topic(&stack, &theirs_topic("public.kinds_full"), 1, WAIT)
        .await
        .unwrap();

    let statements = [
        full_row("kinds", 10),
        "INSERT INTO kinds (id) VALUES (11)".to_owned(),
        // `big` unchanged: under the default replica identity it is not in the WAL record.
        "UPDATE kinds SET i4 = 42, txt = 'changed' WHERE id = 10".to_owned(),
        "UPDATE kinds SET big = 'small now', f4 = 'NaN', f8 = '-Infinity' WHERE id = 10".to_owned(),
        // A primary key change: delete + tombstone of the old key, create of the new one.
        "UPDATE kinds SET id = 12 WHERE id = 11".to_owned(),
        "DELETE FROM kinds WHERE id = 12".to_owned(),
        // Several changes in one transaction.
        "BEGIN; INSERT INTO kinds (id, txt) VALUES (13, NULL); UPDATE kinds SET vc = NULL WHERE id = 1;
         DELETE FROM kinds WHERE id = 2; COMMIT"
            .to_owned(),
        full_row("kinds_full", 10),
        // Under FULL identity the unchanged TOASTed value comes with the old row.
        "UPDATE kinds_full SET i4 = 43 WHERE id = 10".to_owned(),
        "DELETE FROM kinds_full WHERE id = 10".to_owned(),
        "TRUNCATE kinds_full".to_owned(),
        "TRUNCATE kinds".to_owned(),
    ];
    for sql in &statements {
        client.batch_execute(sql).await.unwrap();
    }

    // Records per table: snapshot rows + each statement's events (tombstones included).
    let expected = [
        ("public.kinds", 2 + 1 + 1 + 1 + 1 + 3 + 2 + 4 + 1),
        ("public.kinds_full", 1 + 1 + 1 + 2 + 1),
    ];
    let mut unexpected = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (table, n) in expected {
        let ours = read_topic(&stack, &ours_topic(table), n, WAIT)
            .await
            .unwrap();
        let theirs = read_topic(&stack, &theirs_topic(table), n, WAIT)
            .await
            .unwrap();
        let (differences, used) = compare(&ours, &theirs);
        eprintln!("{table}: intended differences seen (path: records): {used:?}");
        seen.extend(used.into_keys());
        unexpected.extend(differences.into_iter().map(|d| format!("{table}: {d}")));
    }
    debezium.status().await.unwrap();
    drop(debezium);
    reader.stop().await.unwrap();
    assert!(
        unexpected.is_empty(),
        "differences from Debezium that are not on the list:\n{}",
        unexpected.join("\n")
    );
    // The list holds only differences that exist.
    let never: Vec<&str> = INTENDED
        .iter()
        .map(|e| e.path)
        .filter(|p| !seen.contains(p))
        .collect();
    assert!(
        never.is_empty(),
        "listed differences that did not occur: {never:?}"
    );
}

/// users and the sink's copy, row for row, as text.
async fn users_differ(
    users: &tokio_postgres::Client,
    copy: &tokio_postgres::Client,
) -> anyhow::Result<Option<String>> {
    let columns = "id, name, email, department, status, created_at, updated_at";
    let ours = e2e::rows(users, &format!("SELECT {columns} FROM users ORDER BY id")).await?;
    let sql = format!("SELECT {columns} FROM users_copy ORDER BY id");
    let theirs = match e2e::rows(copy, &sql).await {
        Ok(rows) => rows,
        // Not created yet: the sink creates it with its first record.
        Err(e) => return Ok(Some(format!("users_copy: {e:#}"))),
    };
    if ours == theirs {
        return Ok(None);
    }
    let first = ours
        .iter()
        .zip(&theirs)
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("users {a:?}, copy {b:?}"));
    Ok(Some(format!(
        "{} rows in users, {} in the copy; first difference: {}",
        ours.len(),
        theirs.len(),
        first.unwrap_or_else(|| "(one is a prefix of the other)".to_owned())
    )))
}

#[tokio::test]
async fn debeziums_jdbc_sink_reads_our_topic_with_schemas_into_an_equal_table() {
    let stack = Stack::from_env();
    let connect = Connect::from_env();
    let pipeline = e2e::Pipeline::start_configured(stack.clone(), "dbz_sink", 1, |c| {
        c.schemas = true;
    })
    .await
    .unwrap();
    let copy_db = TestDb::create(&stack, "dbz_sink_copy", None).await.unwrap();
    let users = pipeline.user_db.client().await.unwrap();
    // Rows before the sink starts, and changes while it runs.
    e2e::random_workload(&users, 100, 5).await.unwrap();
    let sink = e2e::connect::jdbc_sink(&copy_db.url, &pipeline.topic, "users_copy").unwrap();
    let sink = connect
        .create(&format!("sink-{}", copy_db.name), sink)
        .await
        .unwrap();
    e2e::random_workload(&users, 300, 5).await.unwrap();

    // The projector reads the same topic (keys and values with their schemas).
    let projector = e2e::Projector::start(pipeline.projector_config())
        .await
        .unwrap();
    pipeline.converged(WAIT).await.unwrap();

    let copy = copy_db.client().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        sink.status().await.unwrap();
        match users_differ(&users, &copy).await.unwrap() {
            None => break,
            Some(difference) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the sink's table did not become equal to users within {WAIT:?}: {difference}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let deleted: i64 = users
        .query_one("SELECT max(id) - count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert!(deleted > 0, "the workload deleted rows");
    drop(sink);
    projector.stop().await.unwrap();
}
