//! The replication session: slot → decode → envelope → publish, and the progress rule.
//!
//! **Progress rule.** The LSN reported to PostgreSQL as flushed is only ever
//! - the end LSN of a transaction once Kafka acknowledged every record of it and of every earlier
//!   transaction (the publisher releases transaction ends in stream order), or
//! - the WAL end of a keepalive received while no transaction is open and nothing is in flight, so
//!   an idle slot advances (writes to tables outside the publication do not pin WAL) and a fast
//!   shutdown of PostgreSQL is not held up.
//!
//! Any failure ends the session; [`run`] starts a new one after a backoff, from the last
//! acknowledged position. Nothing is confirmed that Kafka does not have, so nothing is lost; what
//! was sent but not confirmed is sent again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgwire_replication::{Lsn as PgLsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::decode::{self, Lsn, Message};
use crate::envelope::{self, Builder, EnvelopeError, Step};
use crate::publish::{self, PublishError, Publisher};
use crate::resnapshot;
use crate::setup::{self, SetupError};
use crate::snapshot;
use crate::telemetry::{Metrics, State};
use crate::values::SESSION_OPTIONS;

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
    /// Not a failure: a replay was asked for; the next session streams from this LSN.
    #[error("a replay from {} was asked for", setup::lsn_text(*.0))]
    Rewind(Lsn),
}

impl SessionError {
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
            SessionError::Rewind(_) => true,
            SessionError::Config(_)
            | SessionError::Url(_)
            | SessionError::Decode(_)
            | SessionError::Envelope(_) => false,
        }
    }
}

/// Position the next session resumes from: the last LSN confirmed in this process (0: the slot's).
#[derive(Debug, Default)]
pub struct Resume {
    pub acknowledged: Lsn,
    /// While a replay runs: `events_published` when it started.
    pub replay_sent_base: Option<u64>,
    /// A replay's start, until the session that streams from it has begun.
    pub rewind: Option<Lsn>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One replication session, until shutdown (Ok) or a failure (Err).
pub async fn session(
    config: &Config,
    metrics: &Arc<Metrics>,
    resume: &mut Resume,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let pg_config: tokio_postgres::Config =
        config.database_url.parse().map_err(SessionError::Url)?;
    let (mut db, conn) = pg_config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(SessionError::Connect)?;
    let conn = tokio::spawn(conn);
    let result = stream(config, &pg_config, &mut db, metrics, resume, shutdown).await;
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
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    // One reader per slot, for the whole session: the slot alone does not tell (it is not active
    // while a snapshot is read), and a second reader must neither drop nor share it.
    setup::lock_slot(db, &config.slot).await?;
    setup::ensure_publication(db, &config.publication, &config.tables).await?;
    let kafka = config.kafka()?;
    let topics = config.captured_topics()?;
    publish::ensure_topics(&kafka, &topics).await?;
    let mut publisher = Publisher::new(&kafka)?;
    // Per-key order: the keys' partitions depend on the partition count, which must not change.
    let counts = publisher.partition_counts(&topics).await?;
    setup::check_partition_counts(db, &config.slot, &counts).await?;
    // No duplicates across sessions: what each partition already has is not sent again.
    publisher.learn_tails(&kafka, &topics).await?;
    publisher.forget_tails_after(setup::current_wal_lsn(db).await?);
    let result = stream_with(
        config,
        pg_config,
        db,
        metrics,
        resume,
        shutdown,
        &mut publisher,
    )
    .await;
    if publisher.skipped > 0 {
        tracing::info!(
            skipped = publisher.skipped,
            "records not sent again: Kafka had them from an earlier session"
        );
    }
    // The next session reads the partitions' ends: nothing of this one may land after that. On a
    // shutdown the drain has had its time already; the next start's tail read waits for stragglers.
    let limit = if shutdown.is_cancelled() {
        Duration::from_secs(5)
    } else {
        SETTLE_LIMIT
    };
    publisher.settle(limit).await;
    result
}

/// How long a session end waits for its records to be delivered or failed.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

async fn stream_with(
    config: &Config,
    pg_config: &tokio_postgres::Config,
    db: &mut tokio_postgres::Client,
    metrics: &Arc<Metrics>,
    resume: &mut Resume,
    shutdown: &CancellationToken,
    publisher: &mut Publisher,
) -> Result<(), SessionError> {
    let settings = envelope::Settings {
        server_name: config.server_name.clone(),
        database: pg_config.get_dbname().unwrap_or_default().to_owned(),
        topics: config.topic_map()?,
    };

    let mut slot = setup::slot_status(db, &config.slot).await?;
    let snapshots = config.snapshot == crate::config::SnapshotMode::Initial;
    if snapshots && slot.is_some() && !snapshot::completed(db, &config.slot).await? {
        snapshot::drop_unfinished(db, &config.slot).await?;
        slot = None;
    }
    let mut repl = match slot {
        Some(confirmed) => {
            if let Some(from) = resume.rewind.take() {
                if confirmed > from {
                    // The slot moved on before this session began: it cannot start there.
                    let refusal = crate::replay::Refusal::NotRetained {
                        slot: config.slot.clone(),
                        requested: from,
                        oldest: confirmed,
                    };
                    crate::replay::refuse(db, &config.slot, &refusal).await?;
                    resume.replay_sent_base = None;
                }
            }
            let start = resume.acknowledged.max(confirmed);
            let repl = ReplicationClient::connect(replication_config(config, pg_config, start))
                .await
                .map_err(SessionError::Replication)?;
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
                return Ok(());
            };
            repl.start().await.map_err(SessionError::Replication)?;
            resume.acknowledged = resume.acknowledged.max(point);
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

    let snapshot_settings = settings.clone();
    let mut on_demand: Option<resnapshot::Running> = None;
    let mut builder = Builder::new(settings);
    // The slot is told a position `window` bytes behind what Kafka has (never backwards: the
    // server ignores that), so a replay can start that far back.
    let window = config.wal_replay_window_bytes;
    let mut acknowledge = |lsn: Lsn, repl: &ReplicationClient, resume: &mut Resume| {
        if lsn > resume.acknowledged {
            repl.update_applied_lsn(PgLsn(lsn.saturating_sub(window)));
            resume.acknowledged = lsn;
            metrics.acknowledged_lsn.store(lsn, Ordering::Relaxed);
        }
    };
    let mut replays = tokio::time::interval(Duration::from_secs(1));
    replays.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut replay_poll_failed = false;

    loop {
        metrics
            .in_flight
            .store(publisher.records_in_flight() as u64, Ordering::Relaxed);
        let can_read = publisher.records_in_flight() < config.max_in_flight;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                metrics.set_state(State::Stopping);
                drain(publisher, &repl, resume, &mut acknowledge).await;
                // Stopping sends no status update of its own: wait (bounded) until the worker has
                // reported the last confirmed position, or a restart re-sends what Kafka has.
                let reported = tokio::time::timeout(config.status_interval() * 3, async {
                    while repl.metrics().last_applied_lsn().0 < resume.acknowledged.saturating_sub(window) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                if reported.is_err() {
                    tracing::warn!(acknowledged = %setup::lsn_text(resume.acknowledged),
                        "the last confirmed position may not have reached PostgreSQL; a restart re-sends from the previous one");
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
                return Ok(());
            }
            _ = replays.tick() => {
                let polled = match poll_replays(db, &config.slot, resume, publisher.skipped, metrics, window).await {
                    Ok(Some(from)) => return Err(SessionError::Rewind(from)),
                    Ok(None) => poll_snapshots(db, config, &mut on_demand, &snapshot_settings, resume.acknowledged, publisher.is_idle()).await,
                    Err(e) => Err(e),
                };
                match polled {
                    Ok(()) => {}
                    Err(e) => {
                        // Replays wait; streaming goes on (a lost connection shows elsewhere).
                        if !replay_poll_failed {
                            tracing::warn!(error = %service::error_chain(&e), "looking for replay and snapshot requests failed");
                            replay_poll_failed = true;
                        }
                    }
                }
            }
            ack = publisher.next_ack(), if !publisher.is_idle() => match ack? {
                Some(end_lsn) => {
                    metrics.transactions.fetch_add(1, Ordering::Relaxed);
                    acknowledge(end_lsn, &repl, resume);
                }
                None => {
                    metrics.events_published.fetch_add(1, Ordering::Relaxed);
                }
            },
            event = repl.recv(), if can_read => {
                let Some(event) = event.map_err(SessionError::Replication)? else {
                    return Err(SessionError::Ended);
                };
                match event {
                    ReplicationEvent::KeepAlive { wal_end, .. } => {
                        if !builder.in_transaction() && publisher.is_idle() {
                            acknowledge(wal_end.0, &repl, resume);
                        }
                    }
                    ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                        builder.apply(
                            Message::Begin(decode::Begin { final_lsn: final_lsn.0, commit_time: commit_time_micros, xid }),
                            now_ms(),
                            |_| None,
                        )?;
                    }
                    ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => {
                        let step = builder.apply(
                            Message::Commit(decode::Commit { flags: 0, commit_lsn: lsn.0, end_lsn: end_lsn.0, commit_time: commit_time_micros }),
                            now_ms(),
                            |_| None,
                        )?;
                        if let Step::Commit { end_lsn } = step {
                            metrics.received_lsn.store(end_lsn, Ordering::Relaxed);
                            publisher.commit(end_lsn);
                        }
                    }
                    ReplicationEvent::XLogData { data, .. } => {
                        let message = decode::decode(&data)?;
                        let primary_key = match &message {
                            Message::Relation(r) => setup::primary_key(db, r.id).await?,
                            _ => None,
                        };
                        if let Step::Records(records) = builder.apply(message, now_ms(), |_| primary_key)? {
                            for record in records {
                                if let Some(snapshot) = &mut on_demand {
                                    snapshot.streamed(&record);
                                }
                                publisher.send(record).await?;
                            }
                            // Transaction ends the publisher released while it waited for room.
                            if let Some(lsn) = publisher.take_released() {
                                acknowledge(lsn, &repl, resume);
                            }
                        }
                    }
                    ReplicationEvent::Message { prefix, content, lsn, .. } if prefix == resnapshot::PREFIX => {
                        if let Some(snapshot) = &mut on_demand {
                            if let resnapshot::Watermark::Publish(records) = snapshot.watermark(&content, lsn.0, &snapshot_settings).await? {
                                for record in records {
                                    publisher.send(record).await?;
                                }
                                if let Some(lsn) = publisher.take_released() {
                                    acknowledge(lsn, &repl, resume);
                                }
                            }
                        }
                    }
                    ReplicationEvent::Message { .. } => {}
                    ReplicationEvent::StoppedAt { .. } => return Ok(()),
                }
            }
        }
    }
}

/// Closes a running replay once Kafka has everything it covers, then takes a new request, if any.
async fn poll_replays(
    db: &tokio_postgres::Client,
    slot: &str,
    resume: &mut Resume,
    skipped: u64,
    metrics: &Metrics,
    window: u64,
) -> Result<Option<Lsn>, SetupError> {
    if let Some(base) = resume.replay_sent_base {
        let sent = metrics
            .events_published
            .load(Ordering::Relaxed)
            .saturating_sub(base);
        if crate::replay::finish(db, slot, resume.acknowledged, skipped, sent).await? {
            resume.replay_sent_base = None;
        }
    }
    crate::replay::take(db, slot, resume.acknowledged.saturating_sub(window)).await
}

/// Starts the oldest on-demand snapshot request when none runs; closes the running one once the
/// worker ended and Kafka has every row it published (nothing in flight, or a transaction end
/// after its last chunk acknowledged).
async fn poll_snapshots(
    db: &tokio_postgres::Client,
    config: &Config,
    on_demand: &mut Option<resnapshot::Running>,
    settings: &envelope::Settings,
    acknowledged: Lsn,
    idle: bool,
) -> Result<(), SetupError> {
    if let Some(running) = on_demand {
        let (request, rows, last_high) = (running.request, running.rows, running.last_high);
        match running.finished() {
            None => {}
            Some(Ok(())) if idle || acknowledged > last_high => {
                resnapshot::close(db, request, "done", rows).await?;
                tracing::info!(request, rows, "on-demand snapshot done");
                *on_demand = None;
            }
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::warn!(request, error = %e, "on-demand snapshot failed");
                resnapshot::close(db, request, &format!("failed: {e}"), rows).await?;
                *on_demand = None;
            }
        }
        return Ok(());
    }
    if let Some(request) = resnapshot::take(db, &config.slot, &config.tables).await? {
        *on_demand = Some(resnapshot::Running::start(
            request,
            &config.slot,
            &config.publication,
            &config.database_url,
            settings,
        ));
    }
    Ok(())
}

/// On shutdown: wait (bounded) for what Kafka still owes, confirming what it acknowledges.
async fn drain(
    publisher: &mut Publisher,
    repl: &ReplicationClient,
    resume: &mut Resume,
    acknowledge: &mut impl FnMut(Lsn, &ReplicationClient, &mut Resume),
) {
    let limit = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + limit;
    while !publisher.is_idle() {
        match tokio::time::timeout_at(deadline, publisher.next_ack()).await {
            Ok(Ok(Some(lsn))) => acknowledge(lsn, repl, resume),
            Ok(Ok(None)) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %service::error_chain(&error), "a record failed while draining; it will be re-read from the slot");
                return;
            }
            Err(_) => {
                tracing::warn!(in_flight = publisher.records_in_flight(), "Kafka did not acknowledge everything within {limit:?}; the rest will be re-read from the slot");
                return;
            }
        }
    }
}

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
