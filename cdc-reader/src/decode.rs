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

/// A WAL position.
pub type Lsn = u64;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    Message(LogicalMessage<'a>),
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
pub struct Insert<'a> {
    pub relation_id: u32,
    pub new: Tuple<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update<'a> {
    pub relation_id: u32,
    /// Present when the key changed (`Key`) or the table has replica identity full (`Full`).
    pub old: Option<OldTuple<'a>>,
    pub new: Tuple<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete<'a> {
    pub relation_id: u32,
    pub old: OldTuple<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple<'a> {
    /// Only the replica identity columns are meaningful; the others are null.
    Key(Tuple<'a>),
    /// The whole old row (replica identity full).
    Full(Tuple<'a>),
}

impl<'a> OldTuple<'a> {
    pub fn tuple(&self) -> &Tuple<'a> {
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
pub struct LogicalMessage<'a> {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: &'a [u8],
}

/// Column values of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple<'a>(pub Vec<Value<'a>>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// A TOASTed value that did not change; its bytes are not in the WAL record.
    UnchangedToast,
    /// Text output form of the type.
    Text(&'a [u8]),
    /// Binary send form of the type.
    Binary(&'a [u8]),
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
pub fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
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

fn tuple<'a>(r: &mut Reader<'a>) -> Result<Tuple<'a>, DecodeError> {
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
    data: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
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

    fn bytes(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
                at: self.pos,
                need: len,
                have: self.remaining(),
            });
        }
        let out = &self.data[self.pos..self.pos + len];
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
mod tests;
