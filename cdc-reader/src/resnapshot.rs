//! `cdc-reader snapshot [--table T]`: the rows of captured tables published again, on demand,
//! while the reader keeps streaming (the watermark algorithm of Netflix's DBLog, which Debezium's
//! incremental snapshots also use).
//!
//! A worker task reads each table in key order, in chunks. Per chunk it writes a *low* watermark
//! into the WAL (`pg_logical_emit_message`, which the stream delivers in WAL order), waits for the
//! transactions then in progress to end, reads the chunk, hands it to the session and writes a
//! *high* watermark. The session notes the keys of every change it streams between the two
//! watermarks; when the high one arrives it publishes the chunk's other rows as `op: "r"` events
//! (`source.snapshot` `"incremental"`) at the high watermark's position. So every partition stays in
//! position order (changes committed before the high watermark came first, later ones come after),
//! and no row older than a streamed change overtakes it: a row changed while its chunk was read is
//! left to the change itself. The projector's position guard does the rest.
//!
//! Requests are rows of `user_db.cdc_reader_snapshot_requests`, taken one at a time within a
//! second; one interrupted by a reader restart is taken again from the start.

use std::collections::HashSet;
use std::sync::Arc;

use change_event::{Envelope, Op, Row, Source};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::connect::TableSchemas;
use crate::decode::Lsn;
use crate::envelope::{self, Record, Settings};
use crate::setup::{self, pg, SetupError};
use crate::snapshot::published_columns;

/// The prefix of the watermark messages.
pub const PREFIX: &str = "cdc-reader.snapshot";
/// Rows per chunk.
const CHUNK: i64 = 2048;

/// A request taken from `cdc_reader_snapshot_requests`.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: i64,
    /// The tables to snapshot (schema.table).
    pub tables: Vec<String>,
}

/// Takes the oldest unfinished request of `slot`. Tables it names that the reader does not capture
/// close it as refused.
pub async fn take(
    db: &Client,
    slot: &str,
    captured: &[String],
) -> Result<Option<Request>, SetupError> {
    let Some(row) = db
        .query_opt(
            "SELECT id, tables FROM cdc_reader_snapshot_requests \
             WHERE slot = $1 AND done_at IS NULL ORDER BY id LIMIT 1",
            &[&slot],
        )
        .await
        .map_err(pg("looking for a snapshot request"))?
    else {
        return Ok(None);
    };
    let id: i64 = row.get(0);
    let asked: Option<Vec<String>> = row.get(1);
    let tables = asked.unwrap_or_else(|| captured.to_vec());
    if let Some(t) = tables.iter().find(|t| !captured.contains(t)) {
        close(
            db,
            id,
            &format!(
                "refused: {t} is not captured by this reader (it captures {})",
                captured.join(", ")
            ),
            0,
        )
        .await?;
        return Ok(None);
    }
    db.execute(
        "UPDATE cdc_reader_snapshot_requests SET started_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .map_err(pg("starting the snapshot"))?;
    tracing::info!(slot, id, tables = ?tables, "on-demand snapshot: starting");
    Ok(Some(Request { id, tables }))
}

/// Marks request `id` finished with `outcome` ('done' or why not) after `rows` rows.
pub async fn close(db: &Client, id: i64, outcome: &str, rows: u64) -> Result<(), SetupError> {
    db.execute(
        "UPDATE cdc_reader_snapshot_requests SET done_at = now(), outcome = $2, rows = $3 \
         WHERE id = $1",
        &[&id, &outcome, &i64::try_from(rows).unwrap_or(i64::MAX)],
    )
    .await
    .map_err(pg("finishing the snapshot request"))?;
    Ok(())
}

/// Records a request for `tables` (`None`: every captured table); returns its id.
pub async fn request(
    db: &Client,
    slot: &str,
    tables: Option<&[String]>,
) -> Result<i64, SetupError> {
    let tables: Option<Vec<String>> = tables.map(<[String]>::to_vec);
    Ok(db
        .query_one(
            "INSERT INTO cdc_reader_snapshot_requests (slot, tables) VALUES ($1, $2) RETURNING id",
            &[&slot, &tables],
        )
        .await
        .map_err(pg("recording the snapshot request"))?
        .get(0))
}

/// (started, outcome, rows) of request `id`.
pub async fn status(
    db: &Client,
    id: i64,
) -> Result<Option<(bool, Option<String>, Option<i64>)>, SetupError> {
    let row = db
        .query_opt(
            "SELECT started_at IS NOT NULL, outcome, rows FROM cdc_reader_snapshot_requests \
             WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(pg("reading the snapshot request"))?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// One row of a chunk: topic, key (JSON), schema, table, the row.
#[derive(Debug, Clone)]
struct ChunkRow {
    topic: String,
    /// Plain JSON (without its schema).
    key: Vec<u8>,
    schema: String,
    table: String,
    after: Row,
    schemas: Option<Arc<TableSchemas>>,
}

/// Rows read between a low and a high watermark.
#[derive(Debug)]
struct Chunk {
    mark: String,
    rows: Vec<ChunkRow>,
}

/// The watermark text: `slot:request:run:chunk:low|high`. `run` tells this run's watermarks from
/// those of an earlier run of the same request that the stream delivers again (after a restart
/// or a replay).
fn mark(slot: &str, request: i64, run: u64, chunk: u64) -> String {
    format!("{slot}:{request}:{run}:{chunk}")
}

/// A key in a form that compares equal however its JSON was written (with its schema or not).
fn canonical(key: &[u8]) -> Option<Value> {
    change_event::parse(key).ok()
}

/// The session's side of a running on-demand snapshot.
#[derive(Debug)]
pub struct Running {
    pub request: i64,
    /// This run's watermarks (see [`mark`]).
    run: u64,
    slot: String,
    topics: HashSet<String>,
    chunks: mpsc::Receiver<Chunk>,
    worker: tokio::task::JoinHandle<Result<(), SetupError>>,
    /// Between a chunk's watermarks.
    window: Option<Window>,
    /// Rows published so far.
    pub rows: u64,
    /// The last high watermark whose chunk was published.
    pub last_high: Lsn,
    /// How the worker ended, once it did.
    outcome: Option<Result<(), String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

/// What streamed between a chunk's watermarks.
#[derive(Debug)]
struct Window {
    mark: String,
    /// (topic, key) of every change streamed meanwhile.
    keys: HashSet<(String, Value)>,
    /// Topics truncated meanwhile.
    truncated: HashSet<String>,
}

/// What the session does with a watermark message.
#[derive(Debug)]
pub enum Watermark {
    /// Not ours (another slot, another request) or a low one: nothing to publish.
    Nothing,
    /// Publish these records, in order.
    Publish(Vec<Record>),
}

impl Running {
    /// Starts the worker for `request` on a connection of its own.
    pub fn start(
        request: Request,
        slot: &str,
        publication: &str,
        database_url: &str,
        settings: &Settings,
    ) -> Running {
        let (tx, chunks) = mpsc::channel(1);
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let topics = request
            .tables
            .iter()
            .map(|t| settings.topics.get(t).cloned().unwrap_or_else(|| t.clone()))
            .collect();
        let worker = tokio::spawn(worker(
            request.clone(),
            run,
            slot.to_owned(),
            publication.to_owned(),
            database_url.to_owned(),
            settings.clone(),
            tx,
        ));
        Running {
            request: request.id,
            run,
            slot: slot.to_owned(),
            topics,
            chunks,
            worker,
            window: None,
            rows: 0,
            last_high: 0,
            outcome: None,
        }
    }

    /// Notes a record the stream is about to publish.
    pub fn streamed(&mut self, record: &Record) {
        let Some(Window {
            keys, truncated, ..
        }) = &mut self.window
        else {
            return;
        };
        if !self.topics.contains(&record.topic) {
            return;
        }
        match record.key.as_deref().and_then(canonical) {
            Some(key) => {
                keys.insert((record.topic.clone(), key));
            }
            // A truncate: every row of the chunk read before it is gone.
            None => {
                truncated.insert(record.topic.clone());
            }
        }
    }

    /// Handles a watermark message at `lsn`.
    pub async fn watermark(
        &mut self,
        content: &[u8],
        lsn: Lsn,
        settings: &Settings,
    ) -> Result<Watermark, SetupError> {
        let text = String::from_utf8_lossy(content);
        let Some((mark, kind)) = text.rsplit_once(':') else {
            return Ok(Watermark::Nothing);
        };
        if !mark.starts_with(&format!("{}:{}:{}:", self.slot, self.request, self.run)) {
            return Ok(Watermark::Nothing);
        }
        match kind {
            "low" => {
                self.window = Some(Window {
                    mark: mark.to_owned(),
                    keys: HashSet::new(),
                    truncated: HashSet::new(),
                });
                Ok(Watermark::Nothing)
            }
            "high" => {
                let Some(Window {
                    mark: open,
                    keys,
                    truncated,
                }) = self.window.take()
                else {
                    return Ok(Watermark::Nothing);
                };
                if open != mark {
                    tracing::warn!(open = %open, high = %mark, "on-demand snapshot: a high watermark without its low one; ignored");
                    return Ok(Watermark::Nothing);
                }
                // The worker handed the chunk over before it wrote this watermark.
                let chunk = match self.chunks.try_recv() {
                    Ok(c) => c,
                    Err(_) => return Ok(Watermark::Nothing),
                };
                if chunk.mark != mark {
                    tracing::warn!(expected = %mark, got = %chunk.mark, "on-demand snapshot: watermarks out of step; the chunk is skipped");
                    return Ok(Watermark::Nothing);
                }
                let read = chunk.rows.len();
                let mut records = Vec::with_capacity(read);
                for row in chunk.rows {
                    if truncated.contains(&row.topic) {
                        continue;
                    }
                    if canonical(&row.key).is_some_and(|k| keys.contains(&(row.topic.clone(), k))) {
                        continue;
                    }
                    let index = records.len() as u64;
                    let source = Source {
                        lsn: Some(lsn),
                        ts_ms: envelope::now_ms(),
                        snapshot: "incremental".to_owned(),
                        commit_lsn: lsn,
                        event_index: index,
                        ..settings.source(&row.schema, &row.table)
                    };
                    let envelope = Envelope {
                        before: None,
                        after: Some(row.after),
                        source,
                        op: Op::Read,
                        ts_ms: envelope::now_ms(),
                        unchanged_toast: Vec::new(),
                    };
                    records.extend(envelope::records(
                        row.topic,
                        Some(row.key),
                        &envelope,
                        row.schemas.as_deref(),
                    ));
                }
                tracing::debug!(
                    mark,
                    read,
                    published = records.len(),
                    changed_meanwhile = keys.len(),
                    "on-demand snapshot: chunk published at its high watermark"
                );
                self.rows += records.len() as u64;
                self.last_high = lsn;
                Ok(Watermark::Publish(records))
            }
            _ => Ok(Watermark::Nothing),
        }
    }

    /// How the worker ended, once it did and every chunk it read was published: `None` while it
    /// runs.
    /// A failure counts at once (a window it opened will never close); a success once every
    /// chunk it read was published.
    pub fn finished(&mut self) -> Option<&Result<(), String>> {
        if self.outcome.is_none() && self.worker.is_finished() {
            let result = futures_util::FutureExt::now_or_never(&mut self.worker)?;
            self.outcome = Some(match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(service::error_chain(&e)),
                Err(e) => Err(format!("the snapshot task failed: {e}")),
            });
        }
        match &self.outcome {
            Some(Err(_)) => {
                self.window = None;
                self.outcome.as_ref()
            }
            Some(Ok(())) if self.chunks.is_empty() && self.window.is_none() => {
                self.outcome.as_ref()
            }
            _ => None,
        }
    }
}

async fn worker(
    request: Request,
    run: u64,
    slot: String,
    publication: String,
    database_url: String,
    settings: Settings,
    chunks: mpsc::Sender<Chunk>,
) -> Result<(), SetupError> {
    let (mut db, conn) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls)
        .await
        .map_err(pg("connecting for the on-demand snapshot"))?;
    service::spawn_connection(conn, "on-demand snapshot");
    db.batch_execute(
        "SET DateStyle = ISO; SET TimeZone = UTC; SET IntervalStyle = iso_8601; \
         SET extra_float_digits = 3; SET bytea_output = hex",
    )
    .await
    .map_err(pg("setting up the snapshot connection"))?;
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut n: u64 = 0;
    for table in &request.tables {
        let (schema, name) = setup::split_table(table)?;
        let topic = settings
            .topics
            .get(table)
            .cloned()
            .unwrap_or_else(|| table.clone());
        let oid: u32 = db
            .query_one("SELECT $1::text::regclass::oid", &[table])
            .await
            .map_err(pg("resolving a table to snapshot"))?
            .get(0);
        let tx = db
            .transaction()
            .await
            .map_err(pg("reading the table's shape"))?;
        let (columns, row_filter) = published_columns(&tx, oid, &publication).await?;
        let names: Vec<String> = columns.iter().map(|(c, _)| c.clone()).collect();
        let keys = setup::event_key_columns(&tx, oid, &names).await?;
        let schemas = settings.table_schemas(schema, name, &columns, &keys);
        let key_types: Vec<String> = tx
            .query(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
                 JOIN unnest($2::text[]) WITH ORDINALITY AS k(name, ord) ON attname::text = k.name \
                 WHERE attrelid = $1 ORDER BY k.ord",
                &[&oid, &keys],
            )
            .await
            .map_err(pg("reading the key's types"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.commit().await.map_err(pg("reading the table's shape"))?;
        if keys.is_empty() || key_types.len() != keys.len() {
            return Err(SetupError::Unsupported(format!(
                "{table} has no key to read it in chunks by (a primary key or a replica identity index)"
            )));
        }
        let select = columns
            .iter()
            .map(|(c, _)| format!("{}::text", quote(c)))
            .chain(keys.iter().map(|k| format!("{}::text", quote(k))))
            .collect::<Vec<_>>()
            .join(", ");
        // Qualified: a bare name in ORDER BY would mean the output column of that name, the
        // key's text form, and order the rows as text.
        let key_list = keys
            .iter()
            .map(|k| format!("t.{}", quote(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let after_params = key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let filter = row_filter.map(|f| format!("({f})"));
        let first = format!(
            "SELECT {select} FROM {}.{} AS t {} ORDER BY {key_list} LIMIT {CHUNK}",
            quote(schema),
            quote(name),
            filter
                .as_ref()
                .map(|f| format!("WHERE {f}"))
                .unwrap_or_default()
        );
        let next = format!(
            "SELECT {select} FROM {}.{} AS t WHERE ({key_list}) > ({after_params}) {} \
             ORDER BY {key_list} LIMIT {CHUNK}",
            quote(schema),
            quote(name),
            filter
                .as_ref()
                .map(|f| format!("AND {f}"))
                .unwrap_or_default()
        );
        let mut last: Option<Vec<String>> = None;
        loop {
            n += 1;
            let m = mark(&slot, request.id, run, n);
            emit(&db, &format!("{m}:low")).await?;
            wait_for_running_transactions(&db).await?;
            let rows = match &last {
                None => db.query(&first, &[]).await,
                Some(after) => {
                    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = after
                        .iter()
                        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                        .collect();
                    db.query(&next, &params).await
                }
            }
            .map_err(pg("reading a chunk"))?;
            let mut chunk = Chunk {
                mark: m.clone(),
                rows: Vec::with_capacity(rows.len()),
            };
            for row in &rows {
                let mut after = Row::new();
                for (i, (column, type_oid)) in columns.iter().enumerate() {
                    let text: Option<&str> = row.get(i);
                    after.insert(
                        column.clone(),
                        text.map_or(Value::Null, |t| settings.value(*type_oid, t)),
                    );
                }
                let mut key = Row::new();
                for k in &keys {
                    let value = after.get(k).cloned().ok_or_else(|| {
                        SetupError::Unsupported(format!(
                            "key column {k} missing from a snapshot chunk of {schema}.{name}"
                        ))
                    })?;
                    key.insert(k.clone(), value);
                }
                chunk.rows.push(ChunkRow {
                    topic: topic.clone(),
                    key: crate::envelope::to_json_bytes(&key),
                    schema: schema.to_owned(),
                    table: name.to_owned(),
                    after,
                    schemas: schemas.clone(),
                });
            }
            let full = rows.len() as i64 == CHUNK;
            last = rows.last().map(|r| {
                (columns.len()..columns.len() + keys.len())
                    .map(|i| r.get::<_, Option<String>>(i).unwrap_or_default())
                    .collect()
            });
            if chunks.send(chunk).await.is_err() {
                return Ok(());
            }
            emit(&db, &format!("{m}:high")).await?;
            if !full {
                break;
            }
        }
    }
    Ok(())
}

/// Writes a watermark into the WAL (not transactional: the stream sees it at once, in WAL order).
async fn emit(db: &Client, text: &str) -> Result<(), SetupError> {
    db.execute(
        "SELECT pg_logical_emit_message(false, $1, $2)",
        &[&PREFIX, &text],
    )
    .await
    .map_err(pg("writing a snapshot watermark"))?;
    Ok(())
}

/// Waits until every transaction running now has ended, so that a chunk read afterwards sees every
/// transaction whose commit record precedes the low watermark. "Ended" as snapshots see it: a
/// transaction leaves the running set after its commit is in the commit log (and, with synchronous
/// replication, after the standby confirmed it), so the commit log alone would say so too early.
async fn wait_for_running_transactions(db: &Client) -> Result<(), SetupError> {
    let snapshot: String = db
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(pg("reading the running transactions"))?
        .get(0);
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        let running: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_snapshot_xip($1::text::pg_snapshot) x \
                 WHERE x IN (SELECT pg_snapshot_xip(pg_current_snapshot()))",
                &[&snapshot],
            )
            .await
            .map_err(pg("waiting for running transactions"))?
            .get(0);
        if running == 0 {
            return Ok(());
        }
        if !said && started.elapsed() > std::time::Duration::from_secs(10) {
            tracing::warn!(
                running,
                "on-demand snapshot: waiting for long-running transactions to end"
            );
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
