//! Decoded pgoutput changes → Kafka records in the change-event format. Pure: the stream feeds it
//! messages in order and it returns what to publish.
//!
//! It keeps what a change needs but does not carry: the latest Relation of each table (pgoutput
//! sends it before a table's first change in a session and again after the table changes shape),
//! the transaction the change belongs to (from Begin), and the change's index in it.

use std::collections::HashMap;
use std::sync::Arc;

use change_event::{Envelope, Op, Source};
use serde_json::Value;

use crate::connect::TableSchemas;
use crate::decode::{Lsn, Message, OldTuple, Relation, Tuple};
use crate::values;
use write::{cells, key_cell, At, Cell, Layout};

/// Milliseconds since the Unix epoch now (an event's `ts_ms`).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `source.version` and `source.connector` of every event.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const CONNECTOR: &str = "postgresql";

/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One record to publish: topic, key (JSON) and value (JSON, `None` for a tombstone).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// True for records every partition must see in order with its rows (truncate).
    pub all_partitions: bool,
    /// Where the record stands in the stream (see [`RecordPosition`]).
    pub position: RecordPosition,
}

pub use change_event::RecordPosition;

/// A change that cannot be turned into an event. Each means PostgreSQL sent something this reader
/// does not understand; the stream stops rather than skip a change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("row change outside a transaction (no Begin)")]
    NoTransaction,
    #[error("relation {relation}: tuple has {got} values but the relation has {want} columns")]
    ColumnCount {
        relation: String,
        got: usize,
        want: usize,
    },
    #[error("relation {relation}: column {column} is not valid UTF-8 text")]
    NotUtf8 { relation: String, column: String },
    #[error("relation {relation}: binary values are not supported (the stream must use text)")]
    Binary { relation: String },
}

/// Settings that shape every event.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `source.name`.
    pub server_name: String,
    /// `source.db`.
    pub database: String,
    /// `schema.table` → topic; tables not listed go to `schema.table`.
    pub topics: HashMap<String, String>,
    /// Keys and values with Connect schemas (see [`crate::connect`]).
    pub schemas: bool,
}

impl Settings {
    /// The source block of an event of `schema.table`, with what every event's has; the caller
    /// sets where it stands (LSNs, transaction, index, time, snapshot marker).
    pub fn source(&self, schema: &str, table: &str) -> Source {
        Source {
            version: VERSION.to_owned(),
            connector: CONNECTOR.to_owned(),
            name: self.server_name.clone(),
            db: self.database.clone(),
            schema: schema.to_owned(),
            table: table.to_owned(),
            tx_id: None,
            lsn: None,
            sequence: None,
            ts_ms: 0,
            snapshot: "false".to_owned(),
            commit_lsn: 0,
            event_index: 0,
        }
    }

    /// A column value as this reader writes it.
    pub fn value(&self, type_oid: u32, text: &str) -> Value {
        if self.schemas {
            values::to_connect_json(type_oid, text)
        } else {
            values::to_json(type_oid, text)
        }
    }

    /// The schemas of a table's records, when records carry them.
    pub fn table_schemas(
        &self,
        schema: &str,
        table: &str,
        columns: &[(String, u32)],
        key: &[String],
    ) -> Option<Arc<TableSchemas>> {
        self.schemas.then(|| {
            Arc::new(TableSchemas::new(
                &self.server_name,
                schema,
                table,
                columns,
                key,
            ))
        })
    }
}

/// The records of one change event, made here for every path (streamed, initial snapshot,
/// on-demand snapshot): the event under `key` (plain JSON; `None` for a truncate, which every
/// partition of the topic gets), with the schemas when records carry them, and after a delete its
/// tombstone, which lets compaction forget the key. Each carries the event's position.
pub fn records(
    topic: String,
    key: Option<Vec<u8>>,
    envelope: &Envelope,
    schemas: Option<&TableSchemas>,
) -> impl Iterator<Item = Record> {
    event_records(
        topic,
        key,
        to_json_bytes(envelope),
        envelope.op,
        RecordPosition::of(&envelope.source, 0),
        schemas,
    )
}

/// [`records`] of an event already written as plain JSON (`value`).
fn event_records(
    topic: String,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    op: Op,
    position: RecordPosition,
    schemas: Option<&TableSchemas>,
) -> impl Iterator<Item = Record> {
    let key = key.map(|plain| match schemas {
        Some(s) => s.key(&plain),
        None => plain,
    });
    let value = match schemas {
        Some(s) => s.value(&value),
        None => value,
    };
    let tombstone = (op == Op::Delete).then(|| Record {
        topic: topic.clone(),
        key: key.clone(),
        value: None,
        all_partitions: false,
        position: RecordPosition { sub: 1, ..position },
    });
    let event = Record {
        topic,
        key,
        value: Some(value),
        all_partitions: op == Op::Truncate,
        position,
    };
    std::iter::once(event).chain(tombstone)
}

#[derive(Debug)]
struct Table {
    relation: Relation,
    topic: String,
    /// Indexes of the key columns (see [`event_key`]).
    key: Vec<usize>,
    schemas: Option<Arc<TableSchemas>>,
    layout: Layout,
}

#[derive(Debug, Clone, Copy)]
struct Transaction {
    xid: u32,
    commit_lsn: Lsn,
    commit_time_ms: i64,
    next_index: u64,
}

/// The columns an event of `relation` is keyed by: its primary key, when its replica identity
/// covers it (DEFAULT, FULL, or an index over the key's columns), so that deletes carry the key.
/// When the identity is an index that leaves out a primary key column, a delete carries only that
/// index's columns: the table is keyed by them instead, for every event, so that each row keeps
/// one key. Without a primary key, the identity's columns.
fn event_key(relation: &Relation, primary_key: Option<Vec<String>>) -> Vec<usize> {
    let identity: Vec<usize> = (0..relation.columns.len())
        .filter(|&i| relation.columns[i].key)
        .collect();
    let Some(names) = primary_key else {
        return identity;
    };
    let key: Vec<usize> = names
        .iter()
        .filter_map(|n| relation.columns.iter().position(|c| &c.name == n))
        .collect();
    if identity.is_empty() || key.iter().all(|i| identity.contains(i)) {
        return key;
    }
    // Once per Relation message: at the start of a session and after DDL.
    tracing::warn!(
        table = %format!("{}.{}", relation.namespace, relation.name),
        key = ?identity.iter().map(|&i| &relation.columns[i].name).collect::<Vec<_>>(),
        "the table's REPLICA IDENTITY is an index without its primary key: its deletes do not \
         carry the primary key, so its events are keyed by the identity's columns (ALTER TABLE \
         ... REPLICA IDENTITY DEFAULT or FULL keys them by the primary key)"
    );
    identity
}

/// Turns the decoded stream into records.
#[derive(Debug)]
pub struct Builder {
    settings: Settings,
    tables: HashMap<u32, Table>,
    tx: Option<Transaction>,
    /// End LSN of the last commit seen, for `source.sequence` (0: none yet in this session).
    last_commit: Lsn,
    /// LSN of the WAL record the message being applied came from (0: not known).
    message_lsn: Lsn,
    /// Length of the last event written, to size the next one's buffer.
    last_len: usize,
}

/// What a message means for the caller.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Records of a row change or truncate, to publish in this order.
    Records(Vec<Record>),
    /// The transaction ended; once everything before is acknowledged, `end_lsn` may be confirmed.
    Commit { end_lsn: Lsn },
    /// Nothing to publish (Begin, Relation, Type, Origin, logical messages).
    Nothing,
}

impl Builder {
    pub fn new(settings: Settings) -> Self {
        Builder {
            settings,
            tables: HashMap::new(),
            tx: None,
            last_commit: 0,
            message_lsn: 0,
            last_len: 0,
        }
    }

    /// A fresh replication session resends Relation messages; forget the old ones.
    pub fn reset_session(&mut self) {
        self.tables.clear();
        self.tx = None;
    }

    /// True while a transaction's Begin was seen but not its Commit.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// `wal_lsn` is the LSN of the WAL record `message` came from (the XLogData's start; 0 when not
    /// known): a row change's `source.lsn`, as Debezium's. `primary_key` gives, for a relation, the
    /// names of its primary key columns (looked up by the caller in the catalog); `None` when the
    /// table has none.
    pub fn apply(
        &mut self,
        message: Message<'_>,
        wal_lsn: Lsn,
        now_ms: i64,
        primary_key: impl FnOnce(&Relation) -> Option<Vec<String>>,
    ) -> Result<Step, EnvelopeError> {
        self.message_lsn = wal_lsn;
        match message {
            Message::Begin(b) => {
                self.tx = Some(Transaction {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_time_ms: (b.commit_time + PG_EPOCH_OFFSET_MICROS).div_euclid(1000),
                    next_index: 0,
                });
                Ok(Step::Nothing)
            }
            Message::Commit(c) => {
                self.tx = None;
                self.last_commit = c.end_lsn;
                Ok(Step::Commit { end_lsn: c.end_lsn })
            }
            Message::Relation(relation) => {
                let qualified = format!("{}.{}", relation.namespace, relation.name);
                let topic = self
                    .settings
                    .topics
                    .get(&qualified)
                    .cloned()
                    .unwrap_or(qualified);
                let key = event_key(&relation, primary_key(&relation));
                let schemas = self.settings.table_schemas(
                    &relation.namespace,
                    &relation.name,
                    &relation
                        .columns
                        .iter()
                        .map(|c| (c.name.clone(), c.type_oid))
                        .collect::<Vec<_>>(),
                    &key.iter()
                        .map(|&i| relation.columns[i].name.clone())
                        .collect::<Vec<_>>(),
                );
                let layout = Layout::new(&self.settings, &relation, &key);
                self.tables.insert(
                    relation.id,
                    Table {
                        relation,
                        topic,
                        key,
                        schemas,
                        layout,
                    },
                );
                Ok(Step::Nothing)
            }
            Message::Insert(i) => self.row(i.relation_id, Op::Create, None, Some(i.new), now_ms),
            Message::Update(u) => self.row(u.relation_id, Op::Update, u.old, Some(u.new), now_ms),
            Message::Delete(d) => self.row(d.relation_id, Op::Delete, Some(d.old), None, now_ms),
            Message::Truncate(t) => {
                let mut records = Vec::with_capacity(t.relation_ids.len());
                for id in t.relation_ids {
                    let (source, topic) = self.source(id)?;
                    let schemas = self.tables.get(&id).and_then(|t| t.schemas.clone());
                    let envelope = Envelope {
                        before: None,
                        after: None,
                        source,
                        op: Op::Truncate,
                        ts_ms: now_ms,
                        unchanged_toast: Vec::new(),
                    };
                    records.extend(self::records(topic, None, &envelope, schemas.as_deref()));
                }
                Ok(Step::Records(records))
            }
            Message::Origin(_) | Message::Type(_) | Message::Message(_) => Ok(Step::Nothing),
        }
    }

    /// Where the next event of relation `id` in the current transaction stands.
    fn next_event(&mut self, id: u32) -> Result<At, EnvelopeError> {
        let tx = self.tx.as_mut().ok_or(EnvelopeError::NoTransaction)?;
        if !self.tables.contains_key(&id) {
            return Err(EnvelopeError::UnknownRelation(id));
        }
        let index = tx.next_index;
        tx.next_index += 1;
        Ok(At {
            xid: tx.xid,
            // Debezium: the change's own WAL position.
            lsn: match self.message_lsn {
                0 => tx.commit_lsn,
                lsn => lsn,
            },
            last_commit: self.last_commit,
            commit_time_ms: tx.commit_time_ms,
            commit_lsn: tx.commit_lsn,
            index,
        })
    }

    /// Source block of the next event of relation `id` in the current transaction.
    fn source(&mut self, id: u32) -> Result<(Source, String), EnvelopeError> {
        let at = self.next_event(id)?;
        let table = &self.tables[&id];
        let source = Source {
            tx_id: Some(i64::from(at.xid)),
            lsn: Some(at.lsn),
            sequence: Some(at.sequence()),
            ts_ms: at.commit_time_ms,
            commit_lsn: at.commit_lsn,
            event_index: at.index,
            ..self
                .settings
                .source(&table.relation.namespace, &table.relation.name)
        };
        Ok((source, table.topic.clone()))
    }

    fn row(
        &mut self,
        id: u32,
        op: Op,
        old: Option<OldTuple<'_>>,
        new: Option<Tuple<'_>>,
        now_ms: i64,
    ) -> Result<Step, EnvelopeError> {
        if self.tx.is_none() {
            return Err(EnvelopeError::NoTransaction);
        }
        let table = self
            .tables
            .get(&id)
            .ok_or(EnvelopeError::UnknownRelation(id))?;
        let old_full = matches!(old, Some(OldTuple::Full(_)));
        let before = match &old {
            Some(OldTuple::Full(t)) => Some(cells(table, t, None)?.0),
            // Only the key columns of a key image carry values.
            Some(OldTuple::Key(t)) => Some(cells(table, t, Some(&table.key))?.0),
            None => None,
        };
        let (after, unchanged_toast) = match &new {
            Some(t) => {
                let (mut after, missing) = cells(table, t, None)?;
                let mut unchanged = Vec::new();
                for i in missing {
                    // A full old image has the value; otherwise the consumer keeps what it has.
                    match before.as_ref().map(|b| b[i]) {
                        Some(c) if old_full && c != Cell::Absent => after[i] = c,
                        _ => unchanged.push(i),
                    }
                }
                (Some(after), unchanged)
            }
            None => (None, Vec::new()),
        };
        let key_changed = match (&before, &after) {
            (Some(b), Some(a)) => table.key.iter().any(|&i| key_cell(b[i]) != key_cell(a[i])),
            _ => false,
        };

        let (before, after) = (before.as_deref(), after.as_deref());
        let mut records = Vec::with_capacity(3);
        if op == Op::Update && key_changed {
            // A key change is, as Debezium has it, the old key deleted (with its tombstone) and
            // the new key created: consumers keyed by the primary key then forget the old key.
            records.extend(self.event(id, Op::Delete, before, None, &[], now_ms)?);
            records.extend(self.event(id, Op::Create, None, after, &unchanged_toast, now_ms)?);
        } else {
            records.extend(self.event(id, op, before, after, &unchanged_toast, now_ms)?);
        }
        Ok(Step::Records(records))
    }
}

pub(crate) fn to_json_bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Only string-keyed maps of JSON values get here, and those always serialize.
    serde_json::to_vec(value).expect("an envelope always serializes")
}

mod write;

#[cfg(test)]
mod tests;
