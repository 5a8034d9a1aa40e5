//! Unit tests of `envelope`.

use super::*;
use crate::decode;
use crate::testdata;
use change_event::Row;
use serde_json::json;

fn settings() -> Settings {
    Settings {
        server_name: "cdc".into(),
        database: "capture".into(),
        topics: [("public.t".to_owned(), "t-events".to_owned())].into(),
        schemas: false,
    }
}

/// Every record of the captured stream, as (topic, key, value) JSON.
fn records() -> Vec<(String, Value, Value, bool)> {
    let mut b = Builder::new(settings());
    let mut out = Vec::new();
    for (lsn, bytes) in testdata::captured() {
        let msg = decode::decode(bytes).unwrap();
        let step = b
            .apply(msg, 0, 1, |r| {
                (r.name == "f").then(|| vec!["id".to_owned()])
            })
            .unwrap_or_else(|e| panic!("{lsn}: {e}"));
        if let Step::Records(rs) = step {
            for r in rs {
                let parse = |b: &Option<Vec<u8>>| {
                    b.as_ref()
                        .map_or(Value::Null, |b| serde_json::from_slice(b).unwrap())
                };
                out.push((
                    r.topic.clone(),
                    parse(&r.key),
                    parse(&r.value),
                    r.all_partitions,
                ));
            }
        }
    }
    out
}

#[test]
fn inserts_updates_deletes_and_tombstones() {
    let rs = records();
    let (topic, key, v, _) = &rs[0];
    assert_eq!((topic.as_str(), key), ("t-events", &json!({"id": 1})));
    assert_eq!(v["op"], "c");
    assert_eq!(v["before"], Value::Null);
    assert_eq!(
        v["after"],
        json!({"id": 1, "name": "Ann", "n": "12.50", "flag": true,
               "at": "2026-01-02T03:04:05.123456Z", "big": "x".repeat(5000),
               "tags": ["a", "b c", null], "doc": {"k": [1, 2]}})
    );
    assert_eq!(v["source"]["table"], "t");
    assert_eq!(v["source"]["txId"], 756);
    assert_eq!(v["source"]["snapshot"], "false");
    assert_eq!(v["source"]["event_index"], 0);

    // Unchanged TOAST under default identity: left out and listed, never a placeholder.
    let (_, _, v, _) = &rs[2];
    assert_eq!(v["op"], "u");
    assert_eq!(v["after"]["name"], "Ann B");
    assert!(v["after"].get("big").is_none(), "{v}");
    assert_eq!(v["unchanged_toast"], json!(["big"]));

    // A key change: the old key deleted and tombstoned, the new key created.
    let (_, key, v, _) = &rs[3];
    assert_eq!((key, &v["op"]), (&json!({"id": 2}), &json!("d")));
    assert_eq!(
        (&v["before"], &v["after"]),
        (&json!({"id": 2}), &Value::Null)
    );
    assert_eq!((&rs[4].1, &rs[4].2), (&json!({"id": 2}), &Value::Null));
    let (_, key, v, _) = &rs[5];
    assert_eq!((key, &v["op"]), (&json!({"id": 3}), &json!("c")));
    assert_eq!((&v["before"], &v["after"]["id"]), (&Value::Null, &json!(3)));

    // Delete, then its tombstone with the same key.
    let (_, key, v, _) = &rs[6];
    assert_eq!((key, &v["op"]), (&json!({"id": 3}), &json!("d")));
    assert_eq!(v["before"], json!({"id": 3}));
    assert_eq!(v["after"], Value::Null);
    let (_, tkey, tomb, _) = &rs[7];
    assert_eq!((tkey, tomb), (&json!({"id": 3}), &Value::Null));
}

/// Streamed events are written straight from the pgoutput text: byte for byte what `serde_json`
/// writes for the same envelope and key (the form snapshot events take).
#[test]
fn streamed_events_are_written_as_serde_writes_them() {
    let mut b = Builder::new(settings());
    let mut seen = 0;
    for (n, (_, bytes)) in testdata::captured().iter().enumerate() {
        let msg = decode::decode(bytes).unwrap();
        // Non-zero WAL positions, so that the sequences carry both LSNs.
        let wal_lsn = 40 * (n as u64 + 1);
        let step = b.apply(msg, wal_lsn, 1, |r| {
            (r.name == "f").then(|| vec!["id".to_owned()])
        });
        let Ok(Step::Records(rs)) = step else {
            continue;
        };
        for r in rs {
            if let Some(key) = r.key.as_deref() {
                let parsed: Row = serde_json::from_slice(key).unwrap();
                assert_eq!(to_json_bytes(&parsed), key);
            }
            if let Some(value) = r.value.as_deref() {
                let parsed: Envelope = serde_json::from_slice(value).unwrap();
                assert_eq!(
                    String::from_utf8(to_json_bytes(&parsed)).unwrap(),
                    String::from_utf8(value.to_vec()).unwrap()
                );
                seen += 1;
            }
        }
    }
    assert!(seen >= 10, "{seen} events");
}

#[test]
fn events_are_keyed_by_the_primary_key_unless_the_identity_leaves_it_out() {
    let relation = |flags: [bool; 3]| Relation {
        id: 1,
        namespace: "public".to_owned(),
        name: "u".to_owned(),
        replica_identity: decode::ReplicaIdentity::Index,
        columns: ["id", "email", "name"]
            .iter()
            .zip(flags)
            .map(|(n, key)| decode::Column {
                key,
                name: (*n).to_owned(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    };
    let pk = || Some(vec!["id".to_owned()]);
    // DEFAULT (the key), an index over the key and more, FULL: the primary key.
    assert_eq!(event_key(&relation([true, false, false]), pk()), [0]);
    assert_eq!(event_key(&relation([true, true, false]), pk()), [0]);
    assert_eq!(event_key(&relation([true, true, true]), pk()), [0]);
    // An index on email alone: deletes carry only email, so email keys every event.
    assert_eq!(event_key(&relation([false, true, false]), pk()), [1]);
    // No primary key: the identity.
    assert_eq!(event_key(&relation([false, true, true]), None), [1, 2]);
}

#[test]
fn full_identity_keys_by_primary_key_and_carries_old_rows() {
    let rs = records();
    let f: Vec<_> = rs.iter().filter(|r| r.0 == "public.f").collect();
    let (_, key, v, _) = f[1];
    assert_eq!(
        key,
        &json!({"id": 1}),
        "keyed by the primary key, not every column"
    );
    assert_eq!(v["before"], json!({"id": 1, "v": "one"}));
    assert_eq!(v["after"], json!({"id": 1, "v": "uno"}));
    let (_, _, v, _) = f[2];
    assert_eq!(v["before"], json!({"id": 1, "v": "uno"}));
}

#[test]
fn truncate_goes_to_every_partition_of_each_table() {
    let rs = records();
    let t: Vec<_> = rs.iter().filter(|r| r.2["op"] == "t").collect();
    assert_eq!(t.len(), 2);
    assert!(t.iter().all(|r| r.3 && r.1 == Value::Null));
    assert_eq!((t[0].0.as_str(), t[1].0.as_str()), ("t-events", "public.f"));
    assert_eq!(t[0].2["source"]["event_index"], 0);
    assert_eq!(t[1].2["source"]["event_index"], 1);
}

#[test]
fn positions_increase_in_stream_order() {
    let positions: Vec<(u64, u64)> = records()
        .iter()
        .filter(|r| !r.2.is_null())
        .map(|r| {
            let s = &r.2["source"];
            (
                s["commit_lsn"].as_u64().unwrap(),
                s["event_index"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
}

#[test]
fn changes_need_a_relation_and_a_transaction() {
    let mut b = Builder::new(settings());
    let insert = Message::Insert(decode::Insert {
        relation_id: 9,
        new: Tuple(vec![]),
    });
    assert_eq!(
        b.apply(insert.clone(), 0, 0, |_| None),
        Err(EnvelopeError::NoTransaction)
    );
    let begin = Message::Begin(decode::Begin {
        final_lsn: 1,
        commit_time: 0,
        xid: 1,
    });
    b.apply(begin, 0, 0, |_| None).unwrap();
    assert_eq!(
        b.apply(insert, 0, 0, |_| None),
        Err(EnvelopeError::UnknownRelation(9))
    );
}
