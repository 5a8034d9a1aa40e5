//! The replication session: slot → decode → envelope → publish, and the progress rule.
//!
//! **Batches.** Records of whole source transactions go into the publisher's open Kafka
//! transaction; it is committed, with the position the stream resumes from, when the WAL has
//! nothing more to read between two source transactions, after the commit interval, or at the
//! record limit (a source transaction that reaches the limit, or stays open [`SPLIT_AFTER`], is
//! split at a record; the position committed then names that record).
//!
//! **Progress rule.** The LSN reported to PostgreSQL as flushed is only ever
//! - the end LSN of a source transaction once the Kafka transaction holding its last records
//!   committed, or
//! - the WAL end of a keepalive received while no source or Kafka transaction is open, so an idle
//!   slot advances (writes to tables outside the publication do not pin WAL) and a fast shutdown of
//!   PostgreSQL is not held up. Exactly once, that WAL end is committed as the position too (in a
//!   Kafka transaction of its own, at most every [`WATERMARK_SPACING`]): readers of the position
//!   topic learn that no source transaction committed before it is still to come.
//!
//! Any failure ends the session (its open Kafka transaction aborted); [`run`](crate::run) starts
//! a new one after a backoff, from the position committed in Kafka. Nothing is confirmed that
//! Kafka does not have, so nothing is lost; nothing committed is sent again, so nothing is doubled.
//! A replay request ([`crate::control`]) ends the session normally ([`End::Rewind`]), after
//! committing what is open; the next one streams from the replay's start.
//!
//! Here: the session and its loop; [`batch`]: what the open Kafka transaction holds and when it
//! commits.

mod batch;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn as PgLsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{Control, Progress, Replay, Request};
use crate::decode::{self, Lsn, Message};
use crate::envelope::{self, now_ms, Builder, EnvelopeError, Step};
use crate::publish::{self, PublishError, Publisher};
use crate::resnapshot;
use crate::setup::{self, SetupError};
use crate::snapshot;
use crate::telemetry::{Metrics, State};
use crate::values::SESSION_OPTIONS;
use batch::{Batch, Limits};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("connecting to PostgreSQL failed")]
    Connect(#[source] tokio_postgres::Error),
    #[error("invalid database URL")]
    Url(#[source] tokio_postgres::Error),
    #[error("replication stream failed")]
    Replication(#[source] pgwire_replication::PgWireError),
    #[error("the replication stream ended")]
    Ended,
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("a pgoutput message could not be decoded")]
    Decode(#[from] decode::DecodeError),
    #[error("a change could not be turned into an event")]
    Envelope(#[from] EnvelopeError),
    #[error("the initial snapshot failed")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// How a session ended, when not by a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Shutdown was asked for.
    Shutdown,
    /// A replay was asked for: the next session streams from its LSN.
    Rewind(Replay),
}

impl SessionError {
    /// Another reader holds the slot.
    pub fn is_slot_taken(&self) -> bool {
        matches!(
            self,
            SessionError::Setup(
                setup::SetupError::SlotLocked { .. } | setup::SetupError::SlotActive { .. }
            )
        )
    }

    /// Worth a new session after a backoff. Decoding and envelope errors are not: the same bytes
    /// would come again, so the reader halts with the message instead of looping.
    pub fn is_transient(&self) -> bool {
        match self {
            SessionError::Setup(e) => e.is_transient(),
            // A wrong password (28P01, 28000) or a missing database (3D000) will not fix itself.
            SessionError::Connect(e) => !e
                .as_db_error()
                .is_some_and(|d| matches!(d.code().code(), "28P01" | "28000" | "3D000")),
            SessionError::Ended => true,
            // pg_terminate_backend surfaces as a server error that the library calls
            // non-transient; for a long-running reader every server-side end of the stream is
            // worth a retry. Only credentials and TLS set-up are definite.
            SessionError::Replication(e) => !matches!(
                e,
                pgwire_replication::PgWireError::Auth(_) | pgwire_replication::PgWireError::Tls(_)
            ),
            SessionError::Publish(e) => publish::is_transient(e),
            SessionError::Snapshot(e) => e.is_transient(),
            SessionError::Config(_)
            | SessionError::Url(_)
            | SessionError::Decode(_)
            | SessionError::Envelope(_) => false,
        }
    }
}

/// Position the next session resumes from: the last LSN confirmed in this process (0: the slot's).
#[derive(Debug)]
pub struct Resume {
    acknowledged: Lsn,
    /// A replay, until the session that streams from its start has begun.
    rewind: Option<Replay>,
    /// What the control task learns of it.
    progress: Arc<Progress>,
}

impl Resume {
    pub fn new(progress: Arc<Progress>) -> Self {
        Resume {
            acknowledged: 0,
            rewind: None,
            progress,
        }
    }

    pub fn acknowledged(&self) -> Lsn {
        self.acknowledged
    }

    fn set_acknowledged(&mut self, lsn: Lsn) {
        self.acknowledged = lsn;
        self.progress.set_acknowledged(lsn);
    }

    /// The next session streams again from `replay.from`; `published` is `events_published` now.
    pub fn rewind(&mut self, replay: Replay, published: u64) {
        self.set_acknowledged(replay.from);
        self.rewind = Some(replay);
        self.progress.replay_started(published);
    }

    /// Another reader holds the slot: a replay not yet begun is not this process's to run (the
    /// one streaming takes the request again).
    pub fn slot_lost(&mut self) {
        if self.rewind.take().is_some() || self.progress.replay_running() {
            self.progress.replay_handed_over();
        }
    }
}

/// One replication session, until shutdown or a replay request (Ok) or a failure (Err).
pub async fn session(
    config: &Config,
    metrics: &Arc<Metrics>,
    resume: &mut Resume,
    control: &mut Control,
    shutdown: &CancellationToken,
) -> Result<End, SessionError> {
    let pg_config: tokio_postgres::Config =
        config.database_url.parse().map_err(SessionError::Url)?;
    let (mut db, conn) = pg_config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(SessionError::Connect)?;
    let conn = tokio::spawn(conn);
    let result = stream(
        config, &pg_config, &mut db, metrics, resume, control, shutdown,
    )
    .await;
    drop(db);
    if let Ok(Err(e)) = conn.await {
        tracing::debug!(error = %e, "catalog connection ended with an error");
    }
    result
}

async fn stream(
    config: &Config,
    pg_config: &tokio_postgres::Config,
    db: &mut tokio_postgres::Client,
    metrics: &Arc<Metrics>,
    resume: &mut Resume,
    control: &mut Control,
    shutdown: &CancellationToken,
) -> Result<End, SessionError> {
    // One reader per slot, for the whole session: the slot alone does not tell (it is not active
    // while a snapshot is read), and a second reader must neither drop nor share it.
    setup::lock_slot(db, &config.slot).await?;
    setup::ensure_publication(db, &config.publication, &config.tables).await?;
    let kafka = config.kafka()?;
    let topics = config.captured_topics()?;
    publish::ensure_topics(&kafka, &topics).await?;
    // Exactly once: registering the transactional id fences an earlier producer of this slot and
    // ends what it left open, so the committed position read next is final.
    let mut publisher = Publisher::new(&kafka).await?;
    // Per-key order: the keys' partitions depend on the partition count, which must not change.
    let mut counts = publisher.partition_counts(&topics).await?;
    // (Positions go to their key's partition of the position topic, whose count must not change
    // either.)
    let position_topic = publisher.position_topic_count().await?;
    counts.extend(position_topic.clone());
    let position_topic = position_topic.map(|(topic, _)| topic);
    setup::check_partition_counts(db, &config.slot, &counts, position_topic.as_deref()).await?;
    let committed = publisher.committed(&kafka).await?;
    publisher.learn_lasts(&kafka, &topics).await?;
    let result = stream_with(
        config,
        pg_config,
        db,
        metrics,
        resume,
        control,
        shutdown,
        &mut publisher,
        committed,
    )
    .await;
    if result.is_err() {
        // What this session left open never shows to read_committed consumers; the next session
        // resumes from the committed position.
        publisher.abort().await;
    }
    if publisher.skipped > 0 {
        tracing::info!(
            skipped = publisher.skipped,
            "records not sent again: Kafka had them from an earlier session"
        );
    }
    result
}

/// Where a session starts streaming an existing slot: the later of the slot's confirmed position,
/// what this process confirmed, and what Kafka committed — unless a replay asks for an earlier
/// point. A committed position past the WAL's end belongs to another history of the database (a
/// restored or re-created cluster) and is not trusted.
fn start_position(
    confirmed: Lsn,
    acknowledged: Lsn,
    rewind: Option<Lsn>,
    committed: Option<publish::Committed>,
    wal_end: Lsn,
) -> (Lsn, Option<crate::envelope::RecordPosition>) {
    if let Some(from) = rewind {
        return (from.max(confirmed), None);
    }
    let start = confirmed.max(acknowledged);
    match committed {
        Some(c) if c.end_lsn <= wal_end => (start.max(c.end_lsn), c.position),
        Some(c) => {
            tracing::warn!(committed = %setup::lsn_text(c.end_lsn), wal_end = %setup::lsn_text(wal_end),
                "the committed position is past this database's WAL (another history?); not resuming from it");
            (start, None)
        }
        None => (start, None),
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_with(
    config: &Config,
    pg_config: &tokio_postgres::Config,
    db: &mut tokio_postgres::Client,
    metrics: &Arc<Metrics>,
    resume: &mut Resume,
    control: &mut Control,
    shutdown: &CancellationToken,
    publisher: &mut Publisher,
    committed: Option<publish::Committed>,
) -> Result<End, SessionError> {
    let settings = envelope::Settings {
        server_name: config.server_name.clone(),
        database: pg_config.get_dbname().unwrap_or_default().to_owned(),
        topics: config.topic_map()?,
        schemas: config.schemas,
    };

    let mut slot = setup::slot_status(db, &config.slot).await?;
    let snapshots = config.snapshot == crate::config::SnapshotMode::Initial;
    if snapshots && slot.is_some() && !snapshot::completed(db, &config.slot).await? {
        snapshot::drop_unfinished(db, &config.slot).await?;
        slot = None;
    }
    let mut repl = match slot {
        Some(confirmed) => {
            // (Kept until the stream starts: a session that fails before runs it next time.)
            let mut rewind = resume.rewind.as_ref().map(|r| r.from);
            if let Some(replay) = &resume.rewind {
                if confirmed > replay.from {
                    // The slot moved on before this session began: it cannot start there.
                    let refusal = crate::replay::Refusal::NotRetained {
                        slot: config.slot.clone(),
                        requested: replay.from,
                        oldest: confirmed,
                    };
                    crate::replay::refuse(db, &config.slot, &replay.request, &refusal).await?;
                    resume.progress.replay_refused();
                    resume.rewind = None;
                    rewind = None;
                }
            }
            // A replay under way resumes where it got to, not from what Kafka committed before
            // its first commit (later, the position it was asked in).
            let committed = committed.filter(|c| {
                rewind.is_some()
                    || !resume.progress.replay_streaming()
                    || c.end_lsn <= resume.acknowledged
            });
            let wal_end = setup::current_wal_lsn(db).await?;
            let (start, skip) =
                start_position(confirmed, resume.acknowledged, rewind, committed, wal_end);
            publisher.skip_through(skip);
            resume.set_acknowledged(resume.acknowledged.max(start));
            let repl = ReplicationClient::connect(replication_config(config, pg_config, start))
                .await
                .map_err(SessionError::Replication)?;
            resume.rewind = None;
            tracing::info!(slot = %config.slot, start = %setup::lsn_text(start), "streaming");
            repl
        }
        None if snapshots => {
            // The slot is created on the replication connection itself, so that its exported
            // snapshot lives until the rows are read; streaming then starts at its consistent point.
            let mut repl =
                ReplicationClient::connect_gated(replication_config(config, pg_config, 0))
                    .await
                    .map_err(SessionError::Replication)?;
            let target = snapshot::Target {
                slot: &config.slot,
                publication: &config.publication,
                tables: &config.tables,
                settings: &settings,
                kafka: &config.kafka()?,
                max_in_flight: config.max_in_flight,
                metrics,
            };
            let Some(point) = snapshot::take(&mut repl, db, &target, publisher, shutdown).await?
            else {
                return Ok(End::Shutdown);
            };
            repl.start().await.map_err(SessionError::Replication)?;
            resume.set_acknowledged(resume.acknowledged.max(point));
            tracing::info!(slot = %config.slot, start = %setup::lsn_text(point), "streaming");
            repl
        }
        None => {
            let point = setup::create_slot(db, &config.slot).await?;
            ReplicationClient::connect(replication_config(config, pg_config, point))
                .await
                .map_err(SessionError::Replication)?
        }
    };
    metrics.set_state(State::Streaming);
    // From here this session holds the slot and streams: the control task may hand it requests.
    let _streaming = resume.progress.streaming();

    let snapshot_settings = settings.clone();
    resume.progress.set_skipped(0);
    let mut on_demand = control.on_demand();
    let mut builder = Builder::new(settings);
    // The slot is told a position `window` bytes behind what Kafka has (never backwards: the
    // server ignores that), so a replay can start that far back.
    let window = config.wal_replay_window_bytes;
    let acknowledge = |lsn: Lsn, repl: &ReplicationClient, resume: &mut Resume| {
        if lsn > resume.acknowledged {
            repl.update_applied_lsn(PgLsn(lsn.saturating_sub(window)));
            resume.set_acknowledged(lsn);
            metrics.acknowledged_lsn.store(lsn, Ordering::Relaxed);
        }
    };
    let mut control_open = true;
    // How often a running on-demand snapshot is checked for its end.
    let mut snapshot_check = tokio::time::interval(Duration::from_secs(1));
    snapshot_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Batch::default();
    // An idle WAL end to commit as the position, and when the last one was.
    let mut watermark: Option<Lsn> = None;
    let mut last_watermark = tokio::time::Instant::now();
    let limits = Limits {
        interval: config.commit_interval(),
        max_records: config.max_in_flight,
    };

    loop {
        metrics.in_flight.store(
            (publisher.open_records() + publisher.waiting_records()) as u64,
            Ordering::Relaxed,
        );
        resume.progress.set_skipped(publisher.skipped);
        if !publisher.is_committing() && limits.due(publisher, builder.in_transaction()) {
            batch
                .begin(publisher, builder.in_transaction(), resume)
                .await?;
        }
        // While a commit runs, records wait in memory for the next transaction, up to the limit.
        let can_read = publisher.waiting_records() < config.max_in_flight;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                metrics.set_state(State::Stopping);
                // What is open goes in (a split position, if a source transaction is open).
                let finished = tokio::time::timeout(
                    SHUTDOWN_COMMIT_TIMEOUT,
                    batch.finish(publisher, builder.in_transaction(), resume, metrics),
                );
                match finished.await {
                    Ok(Ok(end)) => {
                        if let Some(lsn) = end {
                            acknowledge(lsn, &repl, resume);
                        }
                    }
                    Ok(Err(error)) => tracing::warn!(error = %service::error_chain(&error),
                        "the last Kafka transaction did not commit; the next start sends it again"),
                    Err(_) => tracing::warn!("the last Kafka transaction did not commit within \
                        {SHUTDOWN_COMMIT_TIMEOUT:?}; the next start sends it again"),
                }
                // Stopping sends no status update of its own: wait (bounded) until the worker has
                // reported the last confirmed position (a restart resumes from Kafka's committed
                // position anyway).
                let reported = tokio::time::timeout(config.status_interval() * 3, async {
                    while repl.metrics().last_applied_lsn().0 < resume.acknowledged.saturating_sub(window) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                if reported.is_err() {
                    tracing::warn!(acknowledged = %setup::lsn_text(resume.acknowledged),
                        "the last confirmed position may not have reached PostgreSQL");
                }
                repl.stop();
                // Let the worker send its last status update and close the stream.
                let closed = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(Some(_)) = repl.recv().await {}
                })
                .await;
                if closed.is_err() {
                    tracing::warn!("the replication stream did not close within 5 s");
                }
                return Ok(End::Shutdown);
            }
            request = control.requests.recv(), if control_open => match request {
                Some(Request::Replay(replay)) if !resume.progress.runs(&replay) => {
                    tracing::debug!(?replay, "a replay handed over before this session took it; not run");
                }
                Some(Request::Replay(replay)) => {
                    // Never past what Kafka has: a replay from further on skips nothing.
                    let replay = Replay { from: replay.from.min(resume.acknowledged), ..replay };
                    // Whatever is open goes in first: the replay starts from a clean state.
                    match batch.finish(publisher, builder.in_transaction(), resume, metrics).await {
                        Ok(Some(lsn)) => acknowledge(lsn, &repl, resume),
                        Ok(None) => {}
                        Err(e) => {
                            // The next session runs it (what was open is aborted: sent again).
                            resume.rewind(replay, metrics.events_published.load(Ordering::Relaxed));
                            return Err(e.into());
                        }
                    }
                    return Ok(End::Rewind(replay));
                }
                Some(Request::Snapshot(request)) => on_demand.start(request, config, &snapshot_settings),
                None => {
                    // (Only when the task failed: it ends with shutdown, which comes first.)
                    tracing::error!("the control task ended: replay and snapshot requests wait for a restart");
                    control_open = false;
                }
            },
            _ = snapshot_check.tick(), if on_demand.running.is_some() => {
                on_demand.check(resume.acknowledged, publisher.is_idle());
            }
            done = publisher.commit_done(), if publisher.is_committing() => {
                if let Some(lsn) = batch.done(done?, metrics) {
                    acknowledge(lsn, &repl, resume);
                }
                publisher.send_waiting().await?;
                if publisher.is_idle() {
                    // Source transactions that ended while the commit ran, with nothing to send.
                    if let Some(lsn) = batch.nothing_open(metrics) {
                        acknowledge(lsn, &repl, resume);
                    }
                }
            }
            event = repl.recv(), if can_read => {
                let Some(event) = event.map_err(SessionError::Replication)? else {
                    return Err(SessionError::Ended);
                };
                match event {
                    ReplicationEvent::KeepAlive { wal_end, .. } => {
                        if !builder.in_transaction() && publisher.is_idle() {
                            acknowledge(wal_end.0, &repl, resume);
                            if publisher.committed_end().is_none_or(|end| end < wal_end.0) {
                                watermark = Some(wal_end.0);
                            }
                        }
                    }
                    ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                        builder.apply(
                            Message::Begin(decode::Begin { final_lsn: final_lsn.0, commit_time: commit_time_micros, xid }),
                            0,
                            now_ms(),
                            |_| None,
                        )?;
                    }
                    ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => {
                        let step = builder.apply(
                            Message::Commit(decode::Commit { flags: 0, commit_lsn: lsn.0, end_lsn: end_lsn.0, commit_time: commit_time_micros }),
                            0,
                            now_ms(),
                            |_| None,
                        )?;
                        if let Step::Commit { end_lsn } = step {
                            metrics.received_lsn.store(end_lsn, Ordering::Relaxed);
                            if publisher.is_idle() {
                                // Nothing of it is open (no records, or Kafka had them all).
                                metrics.transactions.fetch_add(1, Ordering::Relaxed);
                                acknowledge(end_lsn, &repl, resume);
                            } else {
                                batch.source_end(end_lsn);
                            }
                        }
                    }
                    ReplicationEvent::XLogData { data, wal_start, .. } => {
                        let message = decode::decode(&data)?;
                        let primary_key = match &message {
                            Message::Relation(r) => setup::primary_key(db, r.id).await?,
                            _ => None,
                        };
                        if let Step::Records(records) = builder.apply(message, wal_start.0, now_ms(), |_| primary_key)? {
                            for record in records {
                                if let Some(snapshot) = &mut on_demand.running {
                                    snapshot.streamed(&record);
                                }
                                batch.sending(&record);
                                publisher.send(record).await?;
                            }
                        }
                    }
                    ReplicationEvent::Message { prefix, content, lsn, .. } if prefix == resnapshot::PREFIX => {
                        if let Some(snapshot) = &mut on_demand.running {
                            if let resnapshot::Watermark::Publish(records) = snapshot.watermark(&content, lsn.0, &snapshot_settings).await? {
                                for record in records {
                                    batch.sending(&record);
                                    publisher.send(record).await?;
                                }
                            }
                        }
                    }
                    ReplicationEvent::Message { .. } => {}
                    ReplicationEvent::StoppedAt { .. } => return Ok(End::Shutdown),
                }
            }
            // Nothing more to read right now, between source transactions: commit what is open.
            () = std::future::ready(()), if publisher.is_open() && !publisher.is_committing() && !builder.in_transaction() => {
                batch.begin(publisher, false, resume).await?;
            }
            // Idle: the WAL end reached goes into Kafka as the position. (Anything sent since
            // commits a later position anyway.)
            () = tokio::time::sleep_until(last_watermark + WATERMARK_SPACING), if watermark.is_some() => {
                if let Some(end_lsn) = watermark.take() {
                    if publisher.is_idle() && !builder.in_transaction() && publisher.committed_end().is_none_or(|end| end < end_lsn) {
                        publisher.begin_position_commit(publish::Committed { end_lsn, position: None }).await?;
                        last_watermark = tokio::time::Instant::now();
                    }
                }
            }
        }
    }
}

/// Least time between two Kafka transactions that only move an idle stream's position on.
const WATERMARK_SPACING: Duration = Duration::from_millis(100);

/// How long a shutdown waits for the last commit.
const SHUTDOWN_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

fn replication_config(
    config: &Config,
    pg: &tokio_postgres::Config,
    start: Lsn,
) -> ReplicationConfig {
    let host = pg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    ReplicationConfig::new(
        host,
        pg.get_user().unwrap_or("postgres"),
        password,
        pg.get_dbname().unwrap_or("postgres"),
        config.slot.clone(),
        config.publication.clone(),
    )
    .with_port(port)
    .with_start_lsn(PgLsn(start))
    .with_ack_lsn(PgLsn(start.saturating_sub(config.wal_replay_window_bytes)))
    .with_status_interval(config.status_interval())
    .with_wakeup_interval(Duration::from_secs(1))
    .with_options(SESSION_OPTIONS)
    .with_application_name("cdc-reader")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::RecordPosition;
    use crate::publish::Committed;

    #[test]
    fn a_session_starts_at_the_latest_position_kafka_or_postgres_knows() {
        let split = RecordPosition {
            commit_lsn: 900,
            event_index: 41,
            sub: 0,
        };
        let committed = |end_lsn, position| Some(Committed { end_lsn, position });
        // The committed position is ahead of the slot (confirmed lags, or a replay window).
        assert_eq!(
            start_position(100, 0, None, committed(800, Some(split)), 1000),
            (800, Some(split))
        );
        // The slot or this process is ahead (an idle slot advanced on keepalives).
        assert_eq!(
            start_position(850, 0, None, committed(800, None), 1000).0,
            850
        );
        assert_eq!(
            start_position(100, 870, None, committed(800, None), 1000).0,
            870
        );
        // A replay starts where it asked, with nothing skipped.
        assert_eq!(
            start_position(100, 0, Some(300), committed(800, Some(split)), 1000),
            (300, None)
        );
        // A committed position past the WAL's end is another history of the database.
        assert_eq!(
            start_position(100, 0, None, committed(5000, Some(split)), 1000),
            (100, None)
        );
        assert_eq!(start_position(100, 0, None, None, 1000), (100, None));
    }
}
