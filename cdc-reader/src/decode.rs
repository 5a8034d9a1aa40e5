//! pgoutput decoder: the bytes of one logical replication message (protocol version 1) → a typed
//! [`Message`]. Pure: no I/O, no allocation beyond the message's own strings and vectors, and column
//! values are zero-copy slices of the input. Never panics; malformed or truncated input is a
//! [`DecodeError`] saying what was being read and where.
//!
//! Message formats: PostgreSQL documentation, "Logical Replication Message Formats". Version 1 has
//! no streaming of in-progress transactions, so no message carries an xid after its tag.
//!
//! ```text
//! 'B' Begin     final_lsn:u64 commit_time:i64 xid:u32
//! 'C' Commit    flags:u8 commit_lsn:u64 end_lsn:u64 commit_time:i64
//! 'O' Origin    commit_lsn:u64 name:cstr
//! 'R' Relation  oid:u32 namespace:cstr name:cstr replica_identity:u8 ncols:i16
//!               (flags:u8 name:cstr type_oid:u32 type_modifier:i32)*
//! 'Y' Type      oid:u32 namespace:cstr name:cstr
//! 'I' Insert    oid:u32 'N' tuple
//! 'U' Update    oid:u32 [('K'|'O') tuple] 'N' tuple
//! 'D' Delete    oid:u32 ('K'|'O') tuple
//! 'T' Truncate  nrels:i32 options:u8 oid:u32*
//! 'M' Message   flags:u8 lsn:u64 prefix:cstr len:i32 content
//! tuple:        ncols:i16 (kind:u8 ['t'|'b' len:i32 bytes])*   kind: 'n' null, 'u' unchanged TOAST,
//!                                                             't' text, 'b' binary
//! ```

use bytes::Bytes;

/// A WAL position.
pub type Lsn = u64;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: where streaming resumes after this transaction.
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// The shape of a table, sent before its first change in a session and again after it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key.
    Default,
    Nothing,
    /// Every column.
    Full,
    /// A chosen unique index.
    Index,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A non-built-in type used by a column (e.g. an enum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    pub id: u32,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_id: u32,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation_id: u32,
    /// Present when the key changed (`Key`) or the table has replica identity full (`Full`).
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation_id: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity columns are meaningful; the others are null.
    Key(Tuple),
    /// The whole old row (replica identity full).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<u32>,
}

/// `pg_logical_emit_message` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Column values of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<Value>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change; its bytes are not in the WAL record.
    UnchangedToast,
    /// Text output form of the type.
    Text(Bytes),
    /// Binary send form of the type.
    Binary(Bytes),
}

/// Why a message could not be decoded. Offsets count from the start of the message (its tag).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown message tag {tag:#04x}")]
    UnknownTag { tag: u8 },
    #[error("{message} message truncated at byte {at} while reading {field}: {need} bytes needed, {have} left")]
    Truncated {
        message: &'static str,
        field: &'static str,
        at: usize,
        need: usize,
        have: usize,
    },
    #[error("{message} message: {field} at byte {at} has no NUL terminator")]
    UnterminatedString {
        message: &'static str,
        field: &'static str,
        at: usize,
    },
    #[error("{message} message: {field} at byte {at} is not UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
        at: usize,
    },
    #[error("{message} message: {field} at byte {at} is negative ({value})")]
    Negative {
        message: &'static str,
        field: &'static str,
        at: usize,
        value: i64,
    },
    #[error("{message} message: expected {expected} at byte {at}, found {found:#04x}")]
    UnexpectedByte {
        message: &'static str,
        expected: &'static str,
        at: usize,
        found: u8,
    },
    #[error("{message} message has {extra} unread bytes after its end")]
    TrailingBytes { message: &'static str, extra: usize },
}

/// Decodes one pgoutput message. `data` is the payload of one XLogData (or one row of
/// `pg_logical_slot_get_binary_changes`).
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError::Empty);
    };
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        tag => return Err(DecodeError::UnknownTag { tag }),
    };
    let mut r = Reader {
        data,
        pos: 1,
        message,
    };
    let decoded = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.u64("final_lsn")?,
            commit_time: r.i64("commit_time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit_lsn")?,
            end_lsn: r.u64("end_lsn")?,
            commit_time: r.i64("commit_time")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: r.u64("commit_lsn")?,
            name: r.cstr("name")?,
        }),
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type(Type {
            id: r.u32("type oid")?,
            namespace: r.cstr("namespace")?,
            name: r.cstr("name")?,
        }),
        b'I' => {
            let relation_id = r.u32("relation oid")?;
            r.expect(b'N', "'N' (new tuple)")?;
            Message::Insert(Insert {
                relation_id,
                new: tuple(&mut r)?,
            })
        }
        b'U' => {
            let relation_id = r.u32("relation oid")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'K' => Some(OldTuple::Key(tuple(&mut r)?)),
                b'O' => Some(OldTuple::Full(tuple(&mut r)?)),
                b'N' => None,
                found => {
                    return Err(DecodeError::UnexpectedByte {
                        message,
                        expected: "'K', 'O' or 'N'",
                        at,
                        found,
                    })
                }
            };
            if old.is_some() {
                r.expect(b'N', "'N' (new tuple)")?;
            }
            Message::Update(Update {
                relation_id,
                old,
                new: tuple(&mut r)?,
            })
        }
        b'D' => {
            let relation_id = r.u32("relation oid")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'K' => OldTuple::Key(tuple(&mut r)?),
                b'O' => OldTuple::Full(tuple(&mut r)?),
                found => {
                    return Err(DecodeError::UnexpectedByte {
                        message,
                        expected: "'K' or 'O'",
                        at,
                        found,
                    })
                }
            };
            Message::Delete(Delete { relation_id, old })
        }
        b'T' => {
            let n = r.count_i32("relation count")?;
            let options = r.u8("options")?;
            // Bound the allocation by what the input can hold, not by what it claims.
            let mut relation_ids = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                relation_ids.push(r.u32("relation oid")?);
            }
            Message::Truncate(Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_ids,
            })
        }
        b'M' => {
            let transactional = r.u8("flags")? & 1 != 0;
            let lsn = r.u64("lsn")?;
            let prefix = r.cstr("prefix")?;
            let len = r.count_i32("content length")?;
            Message::Message(LogicalMessage {
                transactional,
                lsn,
                prefix,
                content: r.bytes(len, "content")?,
            })
        }
        tag => return Err(DecodeError::UnknownTag { tag }),
    };
    if r.remaining() > 0 {
        return Err(DecodeError::TrailingBytes {
            message,
            extra: r.remaining(),
        });
    }
    Ok(decoded)
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation oid")?;
    let namespace = r.cstr("namespace")?;
    let name = r.cstr("name")?;
    let at = r.pos;
    let replica_identity = match r.u8("replica identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        found => {
            return Err(DecodeError::UnexpectedByte {
                message: r.message,
                expected: "replica identity 'd', 'n', 'f' or 'i'",
                at,
                found,
            })
        }
    };
    let n = r.count_i16("column count")?;
    // A column takes at least 10 bytes (flags, empty name, oid, modifier).
    let mut columns = Vec::with_capacity(n.min(r.remaining() / 10));
    for _ in 0..n {
        columns.push(Column {
            key: r.u8("column flags")? & 1 != 0,
            name: r.cstr("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let n = r.count_i16("tuple column count")?;
    let mut values = Vec::with_capacity(n.min(r.remaining()));
    for _ in 0..n {
        let at = r.pos;
        let value = match r.u8("value kind")? {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' => {
                let len = r.count_i32("text value length")?;
                Value::Text(r.bytes(len, "text value")?)
            }
            b'b' => {
                let len = r.count_i32("binary value length")?;
                Value::Binary(r.bytes(len, "binary value")?)
            }
            found => {
                return Err(DecodeError::UnexpectedByte {
                    message: r.message,
                    expected: "value kind 'n', 'u', 't' or 'b'",
                    at,
                    found,
                })
            }
        };
        values.push(value);
    }
    Ok(Tuple(values))
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self
            .data
            .get(self.pos..self.pos + N)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or(DecodeError::Truncated {
                message: self.message,
                field,
                at: self.pos,
                need: N,
                have: self.remaining(),
            })?;
        self.pos += N;
        Ok(bytes)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(field)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(field)?))
    }

    fn count_i16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = i16::from_be_bytes(self.take(field)?);
        usize::try_from(n).map_err(|_| self.negative(field, at, n.into()))
    }

    fn count_i32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| self.negative(field, at, n.into()))
    }

    fn negative(&self, field: &'static str, at: usize, value: i64) -> DecodeError {
        DecodeError::Negative {
            message: self.message,
            field,
            at,
            value,
        }
    }

    fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
                at: self.pos,
                need: len,
                have: self.remaining(),
            });
        }
        let out = self.data.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let at = self.pos;
        let rest = self.data.get(at..).unwrap_or_default();
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                message: self.message,
                field,
                at,
            });
        };
        let s = std::str::from_utf8(&rest[..len]).map_err(|_| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
            at,
        })?;
        self.pos += len + 1;
        Ok(s.to_owned())
    }

    fn expect(&mut self, want: u8, expected: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        let found = self.u8(expected)?;
        if found == want {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedByte {
                message: self.message,
                expected,
                at,
                found,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::captured;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn decoded() -> Vec<Message> {
        captured()
            .iter()
            .map(|(lsn, b)| decode(b).unwrap_or_else(|e| panic!("{lsn}: {e}")))
            .collect()
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
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
        assert_eq!(
            (m.prefix.as_str(), &m.content[..]),
            ("cap.test", &b"hello"[..])
        );
        let Message::Message(m) = &msgs[34] else {
            panic!()
        };
        assert!(!m.transactional);
        assert_eq!(
            (m.prefix.as_str(), &m.content[..]),
            ("cap.nt", &[0u8, 0xff][..])
        );
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
            decode(&Bytes::from(origin)),
            Ok(Message::Origin(Origin {
                commit_lsn: 0x1234,
                name: "node_a".into()
            }))
        );
        let mut insert = vec![b'I'];
        insert.extend_from_slice(&7_u32.to_be_bytes());
        insert.extend_from_slice(b"N\x00\x02b\x00\x00\x00\x02\x01\x02u");
        assert_eq!(
            decode(&Bytes::from(insert)),
            Ok(Message::Insert(Insert {
                relation_id: 7,
                new: Tuple(vec![
                    Value::Binary(Bytes::from_static(&[1, 2])),
                    Value::UnchangedToast
                ])
            }))
        );
    }

    #[test]
    fn every_truncation_of_every_captured_message_is_an_error() {
        for (lsn, msg) in captured() {
            for len in 0..msg.len() {
                let cut = msg.slice(..len);
                assert!(
                    decode(&cut).is_err(),
                    "{lsn}: prefix of {len} bytes decoded"
                );
            }
        }
    }

    #[test]
    fn specific_malformations_are_typed() {
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            decode(&Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownTag { tag: b'Z' })
        );
        // A text value claiming a negative length.
        let mut m = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        m.extend_from_slice(&(-5_i32).to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(m)),
            Err(DecodeError::Negative { .. })
        ));
        // A huge claimed length is a truncation, not an allocation.
        let mut m = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        m.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(m)),
            Err(DecodeError::Truncated { .. })
        ));
        // Bytes after a complete message.
        let (_, begin) = &captured()[0];
        let mut m = begin.to_vec();
        m.push(0);
        assert!(matches!(
            decode(&Bytes::from(m)),
            Err(DecodeError::TrailingBytes { extra: 1, .. })
        ));
        // Invalid UTF-8 in a relation name.
        let m = b"R\x00\x00\x00\x01public\x00\xff\xfe\x00d\x00\x00".to_vec();
        assert!(matches!(
            decode(&Bytes::from(m)),
            Err(DecodeError::InvalidUtf8 { .. })
        ));
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
            tally(decode(&Bytes::from(m)));
        }
        let captured = captured();
        for _ in 0..20_000 {
            let (_, msg) = &captured[rng.random_range(0..captured.len())];
            let mut m = msg.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..m.len());
                m[i] = rng.random();
            }
            tally(decode(&Bytes::from(m)));
        }
        // Both outcomes occur: mutations in values still decode, mutations in structure do not.
        assert!(ok > 1000 && failed > 1000, "ok {ok}, failed {failed}");
    }
}
