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
//! A slot without a row in `cdc_reader_snapshots` had its snapshot interrupted (the exported
//! snapshot died with the connection): the caller drops that slot and starts over, which gives the
//! same result.

use std::time::Instant;

use change_event::{Envelope, Op, Row, Source};
use pgwire_replication::ReplicationClient;
use tokio_postgres::Client;

use crate::decode::Lsn;
use crate::envelope::{to_json_bytes, Record, RecordPosition, Settings};
use crate::publish::{PublishError, Publisher};
use crate::setup::{self, SetupError};
use crate::values;

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
}

impl SnapshotError {
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Reply(_) => false,
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

/// Creates the slot on the gated `repl` connection, publishes every row of `tables` under its
/// snapshot, waits for Kafka, and records completion. Returns the consistent point.
pub async fn take(
    repl: &mut ReplicationClient,
    db: &mut Client,
    slot: &str,
    tables: &[String],
    settings: &Settings,
    publisher: &mut Publisher,
    max_in_flight: usize,
) -> Result<Lsn, SnapshotError> {
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
    let mut index: u64 = 0;
    // One row is held back so that the last one can be marked `snapshot: "last"`.
    let mut pending: Option<Pending> = None;
    for table in tables {
        let (schema, name) = setup::split_table(table)?;
        let oid: u32 = tx
            .query_one("SELECT $1::text::regclass::oid", &[table])
            .await
            .map_err(pg("resolving a captured table"))?
            .get(0);
        let columns: Vec<(String, u32)> = tx
            .query(
                "SELECT attname::text, atttypid FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(pg("reading the columns of a captured table"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let key_names = setup::primary_key(&tx, oid).await?.unwrap_or_default();
        let estimate: f32 = tx
            .query_one(
                "SELECT greatest(reltuples, 0)::real FROM pg_class WHERE oid = $1",
                &[&oid],
            )
            .await
            .map_err(pg("estimating a table's size"))?
            .get(0);
        let topic = settings
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
        tx.batch_execute(&format!(
            "DECLARE cdc_snapshot NO SCROLL CURSOR FOR SELECT {select} FROM {}.{}",
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
                let mut after = Row::new();
                for (i, (column, type_oid)) in columns.iter().enumerate() {
                    let text: Option<&str> = row.get(i);
                    after.insert(
                        column.clone(),
                        text.map_or(serde_json::Value::Null, |t| values::to_json(*type_oid, t)),
                    );
                }
                let mut key = Row::new();
                for k in &key_names {
                    key.insert(k.clone(), after.get(k).cloned().unwrap_or_default());
                }
                let now = crate::stream::now_ms();
                let envelope = Envelope {
                    before: None,
                    after: Some(after),
                    source: Source {
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        connector: "postgresql".to_owned(),
                        name: settings.server_name.clone(),
                        db: settings.database.clone(),
                        schema: schema.to_owned(),
                        table: name.to_owned(),
                        tx_id: None,
                        lsn: Some(consistent_point),
                        sequence: None,
                        ts_ms: now,
                        snapshot: "true".to_owned(),
                        commit_lsn: consistent_point.saturating_sub(1),
                        event_index: index,
                    },
                    op: Op::Read,
                    ts_ms: now,
                    unchanged_toast: Vec::new(),
                };
                index += 1;
                if let Some(previous) = pending.take() {
                    send(publisher, previous, max_in_flight).await?;
                }
                pending = Some(Pending {
                    topic: topic.clone(),
                    key,
                    envelope,
                });
            }
            done += batch.len() as u64;
            tracing::info!(table = %table, rows = done, estimated = estimate as u64, "snapshot progress");
        }
        tx.batch_execute("CLOSE cdc_snapshot")
            .await
            .map_err(pg("closing the snapshot cursor"))?;
    }
    if let Some(mut last) = pending.take() {
        last.envelope.source.snapshot = "last".to_owned();
        send(publisher, last, max_in_flight).await?;
    }
    publisher.commit(consistent_point);
    while !publisher.is_idle() {
        publisher.next_ack().await?;
    }
    tx.commit()
        .await
        .map_err(pg("ending the snapshot transaction"))?;
    db.execute(
        "INSERT INTO cdc_reader_snapshots (slot, consistent_point, rows) \
         VALUES ($1, $2::text::pg_lsn, $3) ON CONFLICT (slot) DO UPDATE \
         SET consistent_point = excluded.consistent_point, rows = excluded.rows, completed_at = now()",
        &[&slot, &point, &i64::try_from(index).unwrap_or(i64::MAX)],
    )
    .await
    .map_err(pg("recording the finished snapshot"))?;
    tracing::info!(
        slot,
        rows = index,
        seconds = started.elapsed().as_secs_f64(),
        "initial snapshot finished"
    );
    Ok(consistent_point)
}

/// A snapshot row waiting to be sent.
struct Pending {
    topic: String,
    key: Row,
    envelope: Envelope,
}

async fn send(
    publisher: &mut Publisher,
    row: Pending,
    max_in_flight: usize,
) -> Result<(), PublishError> {
    while publisher.records_in_flight() >= max_in_flight {
        publisher.next_ack().await?;
    }
    publisher
        .send(Record {
            topic: row.topic,
            key: Some(to_json_bytes(&row.key)),
            position: RecordPosition::of(&row.envelope.source, 0),
            value: Some(to_json_bytes(&row.envelope)),
            all_partitions: false,
        })
        .await
}
