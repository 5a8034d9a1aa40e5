//! Initial snapshot: the rows that existed before the slot, emitted as `op: "r"` events, with
//! nothing lost or doubled at the seam with streaming.
//!
//! ```text
//!  replication conn: CREATE_REPLICATION_SLOT s LOGICAL pgoutput (SNAPSHOT 'export')
//!                      └─► consistent point C, snapshot name N   (N lives while this conn waits)
//!  SQL conn:         BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT 'N'; read every table
//!                      └─► one "r" record per row, position (C - 1, row number)
//!  after Kafka acknowledged all of them: record the slot in cdc_reader_snapshots, then stream from C
//! ```
//!
//! The exported snapshot sees exactly the transactions committed before C and the slot streams
//! exactly those committed after, so the two meet without a gap or an overlap. Snapshot positions
//! sit just below C, so any streamed change to the same row orders after its snapshot row.
//!
//! A slot without a row in `cdc_reader_snapshots` had its snapshot interrupted (a crash, a lost
//! connection, a shutdown: the exported snapshot died with the connection). The caller drops that
//! slot and the next attempt takes a new snapshot, at a new consistent point. So that the result is
//! the same as one uninterrupted snapshot, the first attempt records (`cdc_reader_snapshot_attempts`,
//! before its first record is sent) where each partition ended; a later attempt reads back what
//! the earlier ones published from there and
//! - does not send a row again whose content Kafka already has (same key, same `after`),
//! - sends rows that are new or changed since (as `r`, at the new, later position),
//! - sends a delete and its tombstone for a row published earlier that is gone now,
//!
//! so consumers end with exactly the table as of the final consistent point, each row once unless
//! it changed between attempts. The read-back holds one hash per published row in memory.
//!
//! Only the columns the publication sends are read (its column list; generated columns only when
//! the publication publishes them), and only the rows its row filter passes, so that snapshot rows
//! have the shape of streamed ones.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use change_event::{Envelope, Op, Row, Source};
use pgwire_replication::ReplicationClient;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::connect::TableSchemas;
use crate::decode::Lsn;
use crate::envelope::{self, to_json_bytes, RecordPosition, Settings};
use crate::publish::{self, KafkaSettings, PublishError, Publisher};
use crate::setup::{self, SetupError};
use crate::telemetry::Metrics;

/// Rows fetched per round trip.
const FETCH: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("creating the slot with an exported snapshot failed")]
    CreateSlot(#[source] pgwire_replication::PgWireError),
    #[error("CREATE_REPLICATION_SLOT answered {0:?}; expected consistent point and snapshot name")]
    Reply(String),
    #[error("reading under the exported snapshot failed ({what})")]
    Postgres {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("the record of an earlier snapshot attempt is unreadable: {0}")]
    Attempt(String),
}

impl SnapshotError {
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Reply(_) | SnapshotError::Attempt(_) => false,
            SnapshotError::Setup(e) => e.is_transient(),
            SnapshotError::Publish(e) => crate::publish::is_transient(e),
            SnapshotError::CreateSlot(_) => true,
            SnapshotError::Postgres { source, .. } => service::is_transient_pg(source),
        }
    }
}

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
    move |source| SnapshotError::Postgres { what, source }
}

/// True when the slot's snapshot finished earlier.
pub async fn completed(db: &Client, slot: &str) -> Result<bool, SnapshotError> {
    Ok(db
        .query_opt(
            "SELECT 1 FROM cdc_reader_snapshots WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(pg(
            "looking up finished snapshots (are the user_db migrations applied?)",
        ))?
        .is_some())
}

/// Drops a slot whose snapshot never finished.
pub async fn drop_unfinished(db: &Client, slot: &str) -> Result<(), SnapshotError> {
    tracing::warn!(
        slot,
        "the slot's initial snapshot did not finish; dropping the slot to take it again"
    );
    db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(pg("dropping the unfinished slot"))?;
    Ok(())
}

/// Where the snapshot reads and what it publishes to.
#[derive(Debug)]
pub struct Target<'a> {
    pub slot: &'a str,
    pub publication: &'a str,
    pub tables: &'a [String],
    pub settings: &'a Settings,
    pub kafka: &'a KafkaSettings,
    pub max_in_flight: usize,
    /// Acknowledged snapshot records count as published events.
    pub metrics: &'a Metrics,
}

/// Creates the slot on the gated `repl` connection, publishes every row of the captured tables
/// under its snapshot (less what earlier, interrupted attempts already published), waits for
/// Kafka, and records completion. Returns the consistent point, or `None` when `shutdown` stopped
/// it (the next start takes it again).
pub async fn take(
    repl: &mut ReplicationClient,
    db: &mut Client,
    target: &Target<'_>,
    publisher: &mut Publisher,
    shutdown: &CancellationToken,
) -> Result<Option<Lsn>, SnapshotError> {
    let slot = target.slot;
    let rows = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT 'export')"
        ))
        .await
        .map_err(SnapshotError::CreateSlot)?;
    let text = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i))
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let (Some(point), Some(snapshot)) = (text(1), text(2)) else {
        return Err(SnapshotError::Reply(format!("{rows:?}")));
    };
    let consistent_point =
        change_event::parse_lsn(&point).ok_or_else(|| SnapshotError::Reply(point.clone()))?;
    tracing::info!(slot, consistent_point = %point, snapshot = %snapshot, "created slot; taking the initial snapshot");
    let mut earlier = earlier_attempts(db, target, consistent_point, publisher).await?;

    let tx = db
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg("starting the snapshot transaction"))?;
    tx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT '{}'; SET LOCAL DateStyle = ISO; SET LOCAL TimeZone = UTC; \
         SET LOCAL IntervalStyle = iso_8601; SET LOCAL extra_float_digits = 3; \
         SET LOCAL bytea_output = hex",
        snapshot.replace('\'', "''")
    ))
    .await
    .map_err(pg("adopting the exported snapshot"))?;

    let started = Instant::now();
    let mut out = Out {
        publisher,
        metrics: target.metrics,
        max_in_flight: target.max_in_flight,
        pending: None,
        rows: 0,
        sent: 0,
        unchanged: 0,
        next_index: 0,
    };
    let source = |schema: &str, table: &str, index: u64| {
        let now = envelope::now_ms();
        Source {
            lsn: Some(consistent_point),
            ts_ms: now,
            snapshot: "true".to_owned(),
            commit_lsn: consistent_point.saturating_sub(1),
            event_index: index,
            ..target.settings.source(schema, table)
        }
    };
    for table in target.tables {
        let (schema, name) = setup::split_table(table)?;
        let oid: u32 = tx
            .query_one("SELECT $1::text::regclass::oid", &[table])
            .await
            .map_err(pg("resolving a captured table"))?
            .get(0);
        let (columns, row_filter) = published_columns(&tx, oid, target.publication).await?;
        let names: Vec<String> = columns.iter().map(|(c, _)| c.clone()).collect();
        let key_names = setup::event_key_columns(&tx, oid, &names).await?;
        let schemas = target
            .settings
            .table_schemas(schema, name, &columns, &key_names);
        let estimate: f32 = tx
            .query_one(
                "SELECT greatest(reltuples, 0)::real FROM pg_class WHERE oid = $1",
                &[&oid],
            )
            .await
            .map_err(pg("estimating a table's size"))?
            .get(0);
        let topic = target
            .settings
            .topics
            .get(table)
            .cloned()
            .unwrap_or_else(|| table.clone());
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let select = columns
            .iter()
            .map(|(c, _)| format!("{}::text", quote(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let filter = row_filter
            .map(|f| format!(" WHERE ({f})"))
            .unwrap_or_default();
        tx.batch_execute(&format!(
            "DECLARE cdc_snapshot NO SCROLL CURSOR FOR SELECT {select} FROM {}.{}{filter}",
            quote(schema),
            quote(name)
        ))
        .await
        .map_err(pg("opening the snapshot cursor"))?;
        let mut done: u64 = 0;
        loop {
            let batch = tx
                .query(&format!("FETCH {FETCH} FROM cdc_snapshot"), &[])
                .await
                .map_err(pg("reading snapshot rows"))?;
            if batch.is_empty() {
                break;
            }
            for row in &batch {
                if shutdown.is_cancelled() {
                    tracing::info!(slot, table = %table, "shutdown: the snapshot stops here; the next start takes it again");
                    return Ok(None);
                }
                let mut after = Row::new();
                for (i, (column, type_oid)) in columns.iter().enumerate() {
                    let text: Option<&str> = row.get(i);
                    after.insert(
                        column.clone(),
                        text.map_or(serde_json::Value::Null, |t| {
                            target.settings.value(*type_oid, t)
                        }),
                    );
                }
                let mut key = Row::new();
                for k in &key_names {
                    let value = after.get(k).cloned().ok_or_else(|| {
                        SetupError::Unsupported(format!(
                            "key column {k} missing from the snapshot of {schema}.{name}"
                        ))
                    })?;
                    key.insert(k.clone(), value);
                }
                let key = to_json_bytes(&key);
                if earlier.take(table, &key) == Some(content_hash(&after)) {
                    out.unchanged += 1;
                    continue;
                }
                let now = envelope::now_ms();
                let envelope = Envelope {
                    before: None,
                    after: Some(after),
                    source: source(schema, name, out.next_index),
                    op: Op::Read,
                    ts_ms: now,
                    unchanged_toast: Vec::new(),
                };
                out.push(topic.clone(), key, envelope, schemas.clone())
                    .await?;
            }
            done += batch.len() as u64;
            out.rows += batch.len() as u64;
            tracing::info!(table = %table, rows = done, estimated = estimate as u64, "snapshot progress");
        }
        tx.batch_execute("CLOSE cdc_snapshot")
            .await
            .map_err(pg("closing the snapshot cursor"))?;
        // Rows an earlier attempt published that are gone now: a delete and its tombstone.
        for key in earlier.remaining(table) {
            let before: Row = serde_json::from_slice(&key).map_err(|e| {
                SnapshotError::Attempt(format!("a key it published is not a JSON object ({e})"))
            })?;
            let envelope = Envelope {
                before: Some(before),
                after: None,
                source: source(schema, name, out.next_index),
                op: Op::Delete,
                ts_ms: envelope::now_ms(),
                unchanged_toast: Vec::new(),
            };
            out.push(topic.clone(), key, envelope, schemas.clone())
                .await?;
        }
    }
    out.finish().await?;
    tx.commit()
        .await
        .map_err(pg("ending the snapshot transaction"))?;
    let recorded = db
        .transaction()
        .await
        .map_err(pg("recording the finished snapshot"))?;
    recorded
        .execute(
            "INSERT INTO cdc_reader_snapshots (slot, consistent_point, rows) \
             VALUES ($1, $2::text::pg_lsn, $3) ON CONFLICT (slot) DO UPDATE \
             SET consistent_point = excluded.consistent_point, rows = excluded.rows, completed_at = now()",
            &[&slot, &point, &i64::try_from(out.rows).unwrap_or(i64::MAX)],
        )
        .await
        .map_err(pg("recording the finished snapshot"))?;
    recorded
        .execute(
            "DELETE FROM cdc_reader_snapshot_attempts WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(pg("recording the finished snapshot"))?;
    recorded
        .commit()
        .await
        .map_err(pg("recording the finished snapshot"))?;
    tracing::info!(
        slot,
        rows = out.rows,
        records_sent = out.sent,
        unchanged_since_an_earlier_attempt = out.unchanged,
        seconds = started.elapsed().as_secs_f64(),
        "initial snapshot finished"
    );
    Ok(Some(consistent_point))
}

/// The columns the publication sends for table `oid` (name, type), and its row filter. Generated
/// columns only when the publication names them in a column list or publishes them (PG 18's
/// `publish_generated_columns`); PostgreSQL before 18 never sends them.
pub(crate) async fn published_columns(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
    publication: &str,
) -> Result<(Vec<(String, u32)>, Option<String>), SetupError> {
    // to_jsonb: the columns of pg_publication_tables and pg_publication differ across versions.
    let row = tx
        .query_one(
            "SELECT (SELECT array_agg(n) FROM jsonb_array_elements_text(to_jsonb(pt) -> 'attnames') n), \
                    to_jsonb(pt) ->> 'rowfilter', \
                    EXISTS (SELECT FROM pg_publication_rel r WHERE r.prpubid = p.oid \
                            AND r.prrelid = $1 AND to_jsonb(r) -> 'prattrs' <> 'null'::jsonb) \
                    OR coalesce(to_jsonb(p) ->> 'pubgencols', '') = 's' \
               FROM pg_publication p \
               JOIN pg_publication_tables pt ON pt.pubname = p.pubname \
               JOIN pg_class c ON c.oid = $1 AND c.relname = pt.tablename \
               JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = pt.schemaname \
              WHERE p.pubname = $2",
            &[&oid, &publication],
        )
        .await
        .map_err(setup::pg("reading what the publication sends of a captured table"))?;
    let listed: Option<Vec<String>> = row.get(0);
    let row_filter: Option<String> = row.get(1);
    let generated_sent: bool = row.get(2);
    let columns = tx
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped \
               AND ($2::text[] IS NULL OR attname::text = ANY($2)) \
               AND (attgenerated = '' OR $3) \
             ORDER BY attnum",
            &[&oid, &listed, &generated_sent],
        )
        .await
        .map_err(setup::pg("reading the columns of a captured table"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok((columns, row_filter))
}

/// What earlier, interrupted attempts of this slot's snapshot published, per (table, key): the
/// hash of the row's content. Records the first attempt when there was none.
async fn earlier_attempts(
    db: &Client,
    target: &Target<'_>,
    consistent_point: Lsn,
    publisher: &mut Publisher,
) -> Result<Published, SnapshotError> {
    let row = db
        .query_opt(
            "SELECT first_point::text, start_offsets::text FROM cdc_reader_snapshot_attempts \
             WHERE slot = $1",
            &[&target.slot],
        )
        .await
        .map_err(pg("reading the record of earlier snapshot attempts"))?;
    let Some(row) = row else {
        let mut topics: Vec<String> = target
            .tables
            .iter()
            .map(|t| {
                target
                    .settings
                    .topics
                    .get(t)
                    .cloned()
                    .unwrap_or_else(|| t.clone())
            })
            .collect();
        topics.sort();
        topics.dedup();
        let ends = publisher.end_offsets(target.kafka, &topics).await?;
        let mut offsets: HashMap<String, HashMap<String, i64>> = HashMap::new();
        for (topic, partition, offset) in ends {
            offsets
                .entry(topic)
                .or_default()
                .insert(partition.to_string(), offset);
        }
        let offsets = String::from_utf8_lossy(&to_json_bytes(&offsets)).into_owned();
        db.execute(
            "INSERT INTO cdc_reader_snapshot_attempts (slot, first_point, start_offsets) \
             VALUES ($1, $2::text::pg_lsn, $3::text::jsonb)",
            &[
                &target.slot,
                &crate::setup::lsn_text(consistent_point),
                &offsets,
            ],
        )
        .await
        .map_err(pg("recording the snapshot attempt"))?;
        return Ok(Published::default());
    };
    let first_point: &str = row.get(0);
    let offsets: &str = row.get(1);
    let first_point = change_event::parse_lsn(first_point)
        .ok_or_else(|| SnapshotError::Attempt(first_point.to_owned()))?;
    let offsets: HashMap<String, HashMap<String, i64>> =
        serde_json::from_str(offsets).map_err(|e| SnapshotError::Attempt(e.to_string()))?;
    let mut starts = Vec::new();
    for (topic, partitions) in offsets {
        for (partition, offset) in partitions {
            let partition = partition
                .parse()
                .map_err(|_| SnapshotError::Attempt(format!("partition {partition:?}")))?;
            starts.push((topic.clone(), partition, offset));
        }
    }
    let started = Instant::now();
    let published = publish::read_back(
        target.kafka,
        starts,
        Published {
            since: first_point.saturating_sub(1),
            ..Published::default()
        },
        |p, _topic, key, value, position| p.add(key, value, position),
    )
    .await?;
    tracing::warn!(
        slot = target.slot,
        published_rows = published.rows.len(),
        seconds = started.elapsed().as_secs_f64(),
        "an earlier attempt of this snapshot was interrupted; sending only rows that changed since, and deletes for rows gone since"
    );
    Ok(published)
}
/// What earlier attempts published: per (schema.table, key JSON), the hash of the row's `after`.
#[derive(Debug, Default)]
struct Published {
    /// Records below this position predate the first attempt.
    since: Lsn,
    rows: HashMap<(String, Vec<u8>), u64>,
}

impl Published {
    /// Folds one record read back from the topic.
    fn add(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, position: Option<RecordPosition>) {
        let (Some(key), Some(value), Some(position)) = (key, value, position) else {
            // Tombstones follow their delete, which already removed the row.
            return;
        };
        if position.commit_lsn < self.since {
            return;
        }
        // Keys and values as plain JSON, whether they were written with schemas or not.
        let (Ok(event), Ok(key)) = (
            change_event::parse::<serde_json::Value>(value),
            change_event::parse::<Row>(key),
        ) else {
            return;
        };
        let source = &event["source"];
        let (Some(schema), Some(table)) = (source["schema"].as_str(), source["table"].as_str())
        else {
            return;
        };
        let id = (format!("{schema}.{table}"), to_json_bytes(&key));
        match (event["op"].as_str(), event["after"].as_object()) {
            (Some("r" | "c" | "u"), Some(after)) => {
                self.rows.insert(id, content_hash(after));
            }
            (Some("d"), _) => {
                self.rows.remove(&id);
            }
            _ => {}
        }
    }

    /// The content hash published for this row, removing it.
    fn take(&mut self, table: &str, key: &[u8]) -> Option<u64> {
        if self.rows.is_empty() {
            return None;
        }
        self.rows.remove(&(table.to_owned(), key.to_vec()))
    }

    /// The keys of `table` published earlier and not seen since, removing them.
    fn remaining(&mut self, table: &str) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        self.rows.retain(|(t, key), _| {
            let gone = t == table;
            if gone {
                keys.push(key.clone());
            }
            !gone
        });
        keys.sort();
        keys
    }
}

/// A row's content, for comparing what this attempt reads with what an earlier one published
/// (serde_json's maps are ordered by key, so equal rows serialize alike).
fn content_hash(after: &Row) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    to_json_bytes(after).hash(&mut hasher);
    hasher.finish()
}

/// A record of the snapshot: topic, plain JSON key, envelope, and the table's schemas when records
/// carry them.
type Pending = (String, Vec<u8>, Envelope, Option<Arc<TableSchemas>>);

/// The snapshot's records on their way out. One is held back so that the final one can be marked
/// `snapshot: "last"`; a delete is followed by its tombstone.
struct Out<'a> {
    publisher: &'a mut Publisher,
    metrics: &'a Metrics,
    max_in_flight: usize,
    pending: Option<Pending>,
    /// Rows read; records sent; rows left out because an earlier attempt published them unchanged.
    rows: u64,
    sent: u64,
    unchanged: u64,
    /// `source.event_index` of the next event.
    next_index: u64,
}

impl Out<'_> {
    async fn push(
        &mut self,
        topic: String,
        key: Vec<u8>,
        envelope: Envelope,
        schemas: Option<Arc<TableSchemas>>,
    ) -> Result<(), PublishError> {
        self.next_index += 1;
        if let Some(previous) = self.pending.replace((topic, key, envelope, schemas)) {
            self.send(previous).await?;
        }
        Ok(())
    }

    /// Sends the held-back record as the last one and commits everything to Kafka.
    async fn finish(&mut self) -> Result<(), PublishError> {
        if let Some((topic, key, mut envelope, schemas)) = self.pending.take() {
            envelope.source.snapshot = "last".to_owned();
            self.send((topic, key, envelope, schemas)).await?;
        }
        self.commit().await
    }

    /// Commits the open Kafka transaction. No resume position goes with it: an interrupted
    /// snapshot is taken again, leaving out what earlier attempts committed (see
    /// [`earlier_attempts`]).
    async fn commit(&mut self) -> Result<(), PublishError> {
        let records = self.publisher.commit(None).await?;
        self.metrics
            .events_published
            .fetch_add(records as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn send(&mut self, (topic, key, envelope, schemas): Pending) -> Result<(), PublishError> {
        for record in envelope::records(topic, Some(key), &envelope, schemas.as_deref()) {
            if self.publisher.open_records() >= self.max_in_flight {
                self.commit().await?;
            }
            self.publisher.send(record).await?;
            self.sent += 1;
        }
        Ok(())
    }
}
