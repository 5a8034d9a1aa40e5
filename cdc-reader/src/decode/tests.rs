//! Unit tests of `decode`.

use super::*;
use crate::testdata::captured;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn decoded() -> Vec<Message<'static>> {
    captured()
        .iter()
        .map(|(lsn, b)| decode(b).unwrap_or_else(|e| panic!("{lsn}: {e}")))
        .collect()
}

fn text(s: &str) -> Value<'_> {
    Value::Text(s.as_bytes())
}

fn lsn(s: &str) -> Lsn {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[test]
fn every_captured_message_decodes() {
    let msgs = decoded();
    assert_eq!(msgs.len(), 40);
    let begins = msgs
        .iter()
        .filter(|m| matches!(m, Message::Begin(_)))
        .count();
    let commits = msgs
        .iter()
        .filter(|m| matches!(m, Message::Commit(_)))
        .count();
    assert_eq!((begins, commits), (11, 11));
}

#[test]
fn begin_and_commit() {
    let msgs = decoded();
    let Message::Begin(b) = &msgs[0] else {
        panic!("{:?}", msgs[0])
    };
    assert_eq!(b.xid, 756);
    // Begin's final LSN is the commit record's, which Commit repeats.
    let Message::Commit(c) = &msgs[3] else {
        panic!("{:?}", msgs[3])
    };
    assert_eq!(c.commit_lsn, b.final_lsn);
    assert_eq!(c.end_lsn, lsn("0/2200038"));
    assert_eq!(c.commit_time, b.commit_time);
    assert!(c.end_lsn > c.commit_lsn);
}

#[test]
fn relation_lists_columns_with_key_and_types() {
    let Message::Relation(r) = &decoded()[1] else {
        panic!()
    };
    assert_eq!((r.namespace.as_str(), r.name.as_str()), ("public", "t"));
    assert_eq!(r.replica_identity, ReplicaIdentity::Default);
    let cols: Vec<(&str, bool, u32)> = r
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.key, c.type_oid))
        .collect();
    assert_eq!(
        cols,
        [
            ("id", true, 20),
            ("name", false, 25),
            ("n", false, 1700),
            ("flag", false, 16),
            ("at", false, 1184),
            ("big", false, 25),
            ("tags", false, 1009),
            ("doc", false, 3802)
        ]
    );
    assert_eq!(r.columns[0].type_modifier, -1);
}

#[test]
fn insert_carries_text_values_and_nulls() {
    let msgs = decoded();
    let Message::Insert(i) = &msgs[2] else {
        panic!()
    };
    let v = &i.new.0;
    assert_eq!(v.len(), 8);
    assert_eq!(v[0], text("1"));
    assert_eq!(v[2], text("12.50"));
    assert_eq!(v[3], text("t"));
    assert_eq!(v[4], text("2026-01-02 03:04:05.123456+00"));
    assert_eq!(v[5], text(&"x".repeat(5000)));
    assert_eq!(v[6], text("{a,\"b c\",NULL}"));
    assert_eq!(v[7], text("{\"k\": [1, 2]}"));
    let Message::Insert(i2) = &msgs[5] else {
        panic!()
    };
    assert_eq!(i2.new.0[0], text("2"));
    assert!(i2.new.0[1..].iter().all(|v| *v == Value::Null));
}

#[test]
fn update_marks_unchanged_toast() {
    let Message::Update(u) = &decoded()[8] else {
        panic!()
    };
    assert_eq!(u.old, None);
    assert_eq!(u.new.0[1], text("Ann B"));
    assert_eq!(u.new.0[5], Value::UnchangedToast);
}

#[test]
fn key_change_sends_old_key_and_full_identity_sends_old_row() {
    let msgs = decoded();
    let Message::Update(u) = &msgs[11] else {
        panic!()
    };
    let Some(OldTuple::Key(old)) = &u.old else {
        panic!("{u:?}")
    };
    assert_eq!(old.0[0], text("2"));
    assert_eq!(u.new.0[0], text("3"));

    let Message::Delete(d) = &msgs[14] else {
        panic!()
    };
    assert!(matches!(&d.old, OldTuple::Key(t) if t.0[0] == text("3")));

    let Message::Update(u) = &msgs[21] else {
        panic!()
    };
    let Some(OldTuple::Full(old)) = &u.old else {
        panic!("{u:?}")
    };
    assert_eq!(old.0, vec![text("1"), text("one")]);
    assert_eq!(u.new.0, vec![text("1"), text("uno")]);
    let Message::Relation(f) = &msgs[17] else {
        panic!()
    };
    assert_eq!(f.replica_identity, ReplicaIdentity::Full);
}

#[test]
fn truncate_of_two_tables_after_fresh_relations() {
    let msgs = decoded();
    assert!(matches!(&msgs[27], Message::Relation(r) if r.name == "t"));
    assert!(matches!(&msgs[28], Message::Relation(r) if r.name == "f"));
    let Message::Truncate(t) = &msgs[29] else {
        panic!()
    };
    let (Message::Relation(rt), Message::Relation(rf)) = (&msgs[27], &msgs[28]) else {
        panic!()
    };
    assert_eq!(t.relation_ids, vec![rt.id, rf.id]);
    assert!(!t.cascade && !t.restart_identity);
}

#[test]
fn logical_messages_and_types() {
    let msgs = decoded();
    let Message::Message(m) = &msgs[32] else {
        panic!()
    };
    assert!(m.transactional);
    assert_eq!((m.prefix.as_str(), m.content), ("cap.test", &b"hello"[..]));
    let Message::Message(m) = &msgs[34] else {
        panic!()
    };
    assert!(!m.transactional);
    assert_eq!((m.prefix.as_str(), m.content), ("cap.nt", &[0u8, 0xff][..]));
    let Message::Type(ty) = &msgs[36] else {
        panic!()
    };
    assert_eq!(
        (ty.namespace.as_str(), ty.name.as_str()),
        ("public", "mood")
    );
    let Message::Relation(e) = &msgs[37] else {
        panic!()
    };
    assert_eq!(e.columns[1].type_oid, ty.id);
}

#[test]
fn origin_and_binary_values() {
    let mut origin = vec![b'O'];
    origin.extend_from_slice(&0x1234_u64.to_be_bytes());
    origin.extend_from_slice(b"node_a\0");
    assert_eq!(
        decode(&origin),
        Ok(Message::Origin(Origin {
            commit_lsn: 0x1234,
            name: "node_a".into()
        }))
    );
    let mut insert = vec![b'I'];
    insert.extend_from_slice(&7_u32.to_be_bytes());
    insert.extend_from_slice(b"N\x00\x02b\x00\x00\x00\x02\x01\x02u");
    assert_eq!(
        decode(&insert),
        Ok(Message::Insert(Insert {
            relation_id: 7,
            new: Tuple(vec![Value::Binary(&[1, 2]), Value::UnchangedToast])
        }))
    );
}

#[test]
fn every_truncation_of_every_captured_message_is_an_error() {
    for (lsn, msg) in captured() {
        for len in 0..msg.len() {
            let cut = &msg[..len];
            assert!(decode(cut).is_err(), "{lsn}: prefix of {len} bytes decoded");
        }
    }
}

#[test]
fn specific_malformations_are_typed() {
    assert_eq!(decode(&[]), Err(DecodeError::Empty));
    assert_eq!(decode(b"Z"), Err(DecodeError::UnknownTag { tag: b'Z' }));
    // A text value claiming a negative length.
    let mut m = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
    m.extend_from_slice(&(-5_i32).to_be_bytes());
    assert!(matches!(decode(&m), Err(DecodeError::Negative { .. })));
    // A huge claimed length is a truncation, not an allocation.
    let mut m = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
    m.extend_from_slice(&i32::MAX.to_be_bytes());
    assert!(matches!(decode(&m), Err(DecodeError::Truncated { .. })));
    // Bytes after a complete message.
    let (_, begin) = &captured()[0];
    let mut m = begin.to_vec();
    m.push(0);
    assert!(matches!(
        decode(&m),
        Err(DecodeError::TrailingBytes { extra: 1, .. })
    ));
    // Invalid UTF-8 in a relation name.
    let m = b"R\x00\x00\x00\x01public\x00\xff\xfe\x00d\x00\x00".to_vec();
    assert!(matches!(decode(&m), Err(DecodeError::InvalidUtf8 { .. })));
}

/// Property: for arbitrary bytes, and for captured messages with random bytes changed, decode
/// returns (never panics, never loops, never allocates beyond the input's size).
#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let tags = b"BCORYIUDTMZ";
    let (mut ok, mut failed) = (0, 0);
    let mut tally = |r: Result<Message, DecodeError>| match r {
        Ok(_) => ok += 1,
        Err(_) => failed += 1,
    };
    for _ in 0..20_000 {
        let len = rng.random_range(0..64);
        let mut m: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if let Some(first) = m.first_mut() {
            *first = tags[rng.random_range(0..tags.len())];
        }
        tally(decode(&m));
    }
    let captured = captured();
    for _ in 0..20_000 {
        let (_, msg) = &captured[rng.random_range(0..captured.len())];
        let mut m = msg.to_vec();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..m.len());
            m[i] = rng.random();
        }
        tally(decode(&m));
    }
    // Both outcomes occur: mutations in values still decode, mutations in structure do not.
    assert!(ok > 1000 && failed > 1000, "ok {ok}, failed {failed}");
}
