//! Control requests: replays (`cdc_reader_replays`, see [`crate::replay`]) and on-demand snapshots
//! (`cdc_reader_snapshot_requests`, see [`crate::resnapshot`]), which `cdc-reader replay` and
//! `cdc-reader snapshot` write. A task of its own, on a connection of its own, takes them every
//! second and hands them to the streaming session through a channel ([`Request`]); the session
//! tells it where the stream stands ([`Progress`]) and how a snapshot ended ([`Report`]), and the
//! task closes what is finished. The WAL loop never waits on these tables, and a lost connection
//! here delays requests only.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::decode::Lsn;
use crate::setup::{pg, SetupError};
use crate::telemetry::Metrics;
use crate::{envelope, replay, resnapshot, Config};

/// What the session is asked to do.
#[derive(Debug)]
pub enum Request {
    /// Stream again from an LSN (the slot still has it): the session ends, and the next one
    /// starts there.
    Replay(Replay),
    /// Publish the current rows of these tables while streaming.
    Snapshot(resnapshot::Request),
}

/// A replay request taken: where it streams from, and which request it is (its `requested_at`;
/// the table's row of the slot may be replaced by a newer request meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub from: Lsn,
    pub request: String,
}

/// What the session tells the control task about a snapshot it was handed.
#[derive(Debug)]
pub enum Report {
    /// Kafka has every row it published (`Ok`), or it failed: the request is closed.
    SnapshotEnded {
        request: i64,
        outcome: Result<(), String>,
        rows: u64,
    },
    /// The session ended before it did: the request stays open and is taken again.
    SnapshotAbandoned { request: i64 },
}

/// Where the stream stands, as the session counts it: what closing a replay goes by.
#[derive(Debug)]
pub struct Progress {
    /// A session of this process holds the slot and streams: requests are taken only then (a
    /// second reader waiting for the slot must not take what it cannot run).
    streaming: AtomicBool,
    /// Everything before this LSN is in Kafka (the position confirmed, before the replay window).
    acknowledged: AtomicU64,
    /// Records the current session did not send again (Kafka had them).
    skipped: AtomicU64,
    /// While a replay runs: `events_published` when it started; [`REPLAY_PENDING`] from its
    /// hand-over to its start; [`NO_REPLAY`] otherwise.
    replay_base: AtomicU64,
    /// The request this process runs (its `requested_at`), until it is done or the slot is lost.
    replay_request: Mutex<Option<String>>,
}

const NO_REPLAY: u64 = u64::MAX;
const REPLAY_PENDING: u64 = u64::MAX - 1;

impl Default for Progress {
    fn default() -> Self {
        Progress {
            streaming: AtomicBool::new(false),
            acknowledged: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            replay_base: AtomicU64::new(NO_REPLAY),
            replay_request: Mutex::new(None),
        }
    }
}

impl Progress {
    /// The session streams until the guard is dropped.
    pub fn streaming(self: &Arc<Self>) -> Streaming {
        self.streaming.store(true, Ordering::SeqCst);
        Streaming(self.clone())
    }

    pub fn set_acknowledged(&self, lsn: Lsn) {
        self.acknowledged.store(lsn, Ordering::SeqCst);
    }

    pub fn set_skipped(&self, skipped: u64) {
        self.skipped.store(skipped, Ordering::SeqCst);
    }

    /// A replay starts streaming (after [`Progress::set_acknowledged`] of its start);
    /// `published` is `events_published` now.
    pub fn replay_started(&self, published: u64) {
        self.replay_base.store(published, Ordering::SeqCst);
    }

    /// A replay was handed to the session and is not done.
    pub fn replay_running(&self) -> bool {
        self.replay_base.load(Ordering::SeqCst) != NO_REPLAY
    }

    /// A replay began streaming in this process and is not done.
    pub fn replay_streaming(&self) -> bool {
        self.replay_base.load(Ordering::SeqCst) < REPLAY_PENDING
    }

    /// Whether `replay` is the request this process runs (not one handed over since).
    pub fn runs(&self, replay: &Replay) -> bool {
        service::lock(&self.replay_request).as_deref() == Some(replay.request.as_str())
    }

    /// The replay asked for will not run (refused when its session began).
    pub fn replay_refused(&self) {
        self.replay_base.store(NO_REPLAY, Ordering::SeqCst);
    }

    /// Another reader holds the slot: the replay this process was running or about to run is
    /// theirs to take again, and this process's to take again only once it streams.
    pub fn replay_handed_over(&self) {
        self.replay_base.store(NO_REPLAY, Ordering::SeqCst);
        *service::lock(&self.replay_request) = None;
    }
}

/// While it lives, a session of this process streams (see [`Progress::streaming`]).
#[derive(Debug)]
pub struct Streaming(Arc<Progress>);

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.streaming.store(false, Ordering::SeqCst);
    }
}

/// The session's side of the control task.
#[derive(Debug)]
pub struct Control {
    pub requests: mpsc::Receiver<Request>,
    reports: mpsc::UnboundedSender<Report>,
    pub progress: Arc<Progress>,
}

impl Control {
    /// A session's on-demand snapshot slot, which reports to this task.
    pub fn on_demand(&self) -> OnDemand {
        OnDemand {
            running: None,
            reports: self.reports.clone(),
        }
    }
}

/// Starts the control task; it ends on `shutdown`.
pub fn spawn(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> (Control, tokio::task::JoinHandle<()>) {
    let (requests_tx, requests) = mpsc::channel(4);
    let (reports, reports_rx) = mpsc::unbounded_channel();
    let progress = Arc::new(Progress::default());
    let task = Task {
        config: config.clone(),
        metrics,
        progress: progress.clone(),
        requests: requests_tx,
        db: None,
        snapshot: None,
        ended: VecDeque::new(),
        failing: false,
    };
    let handle = tokio::spawn(task.run(reports_rx, shutdown));
    (
        Control {
            requests,
            reports,
            progress,
        },
        handle,
    )
}

struct Task {
    config: Config,
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    requests: mpsc::Sender<Request>,
    db: Option<Client>,
    /// The snapshot request handed to the session, until it reports how it ended.
    snapshot: Option<i64>,
    /// Snapshots ended, their requests not yet closed.
    ended: VecDeque<(i64, Result<(), String>, u64)>,
    /// The last round failed (logged once until one succeeds).
    failing: bool,
}

impl Task {
    async fn run(
        mut self,
        mut reports: mpsc::UnboundedReceiver<Report>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                report = reports.recv() => match report {
                    Some(report) => self.report(report),
                    None => return,
                },
                _ = tick.tick() => {}
            }
            // (A round may wait: for the database, or for the session to take a request.)
            let round = tokio::select! {
                () = shutdown.cancelled() => return,
                round = self.round() => round,
            };
            match round {
                Ok(()) => self.failing = false,
                Err(e) => {
                    if !self.failing {
                        tracing::warn!(error = %service::error_chain(&e),
                            "looking for replay and snapshot requests failed; retrying");
                        self.failing = true;
                    }
                    if self.db.as_ref().is_some_and(Client::is_closed) {
                        self.db = None;
                    }
                }
            }
        }
    }

    fn report(&mut self, report: Report) {
        match report {
            Report::SnapshotEnded {
                request,
                outcome,
                rows,
            } => self.ended.push_back((request, outcome, rows)),
            Report::SnapshotAbandoned { request } => {
                if self.snapshot == Some(request) {
                    self.snapshot = None;
                }
            }
        }
    }

    /// Closes what ended, then takes a replay request or, when none, a snapshot request.
    async fn round(&mut self) -> Result<(), SetupError> {
        if self.db.is_none() {
            let (client, conn) =
                tokio_postgres::connect(&self.config.database_url, tokio_postgres::NoTls)
                    .await
                    .map_err(pg("connecting for control requests"))?;
            service::spawn_connection(conn, "control requests");
            self.db = Some(client);
        }
        let Some(db) = &self.db else {
            return Ok(());
        };
        let slot = &self.config.slot;
        while let Some((request, outcome, rows)) = self.ended.front().cloned() {
            match outcome {
                Ok(()) => {
                    resnapshot::close(db, request, "done", rows).await?;
                    tracing::info!(request, rows, "on-demand snapshot done");
                }
                Err(e) => {
                    tracing::warn!(request, error = %e, "on-demand snapshot failed");
                    resnapshot::close(db, request, &format!("failed: {e}"), rows).await?;
                }
            }
            self.ended.pop_front();
            if self.snapshot == Some(request) {
                self.snapshot = None;
            }
        }
        if !self.progress.streaming.load(Ordering::SeqCst) {
            return Ok(());
        }
        // (The base first: a replay's start stores its acknowledged position before its base.)
        let base = self.progress.replay_base.load(Ordering::SeqCst);
        let acknowledged = self.progress.acknowledged.load(Ordering::SeqCst);
        let running = service::lock(&self.progress.replay_request).clone();
        if let (true, Some(request)) = (base < REPLAY_PENDING, &running) {
            let sent = self
                .metrics
                .events_published
                .load(Ordering::Relaxed)
                .saturating_sub(base);
            let skipped = self.progress.skipped.load(Ordering::SeqCst);
            if replay::finish(db, slot, request, acknowledged, skipped, sent).await? {
                let closed = self.progress.replay_base.compare_exchange(
                    base,
                    NO_REPLAY,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                if closed.is_err() {
                    tracing::debug!("another replay started meanwhile; its base stays");
                }
            }
        }
        let reported = acknowledged.saturating_sub(self.config.wal_replay_window_bytes);
        if let Some(replay) = replay::take(db, slot, reported, running.as_deref()).await? {
            // Nothing closes it before the session starts it.
            self.progress
                .replay_base
                .store(REPLAY_PENDING, Ordering::SeqCst);
            *service::lock(&self.progress.replay_request) = Some(replay.request.clone());
            self.send(Request::Replay(replay)).await;
            return Ok(());
        }
        if self.snapshot.is_none() {
            if let Some(request) = resnapshot::take(db, slot, &self.config.tables).await? {
                self.snapshot = Some(request.id);
                self.send(Request::Snapshot(request)).await;
            }
        }
        Ok(())
    }

    async fn send(&self, request: Request) {
        if self.requests.send(request).await.is_err() {
            tracing::debug!("the reader stopped; a control request was not handed over");
        }
    }
}

/// The on-demand snapshot the session runs, if any. Dropped with the session, it tells the control
/// task, which hands the request over again.
#[derive(Debug)]
pub struct OnDemand {
    pub running: Option<resnapshot::Running>,
    reports: mpsc::UnboundedSender<Report>,
}

impl OnDemand {
    pub fn start(
        &mut self,
        request: resnapshot::Request,
        config: &Config,
        settings: &envelope::Settings,
    ) {
        if let Some(running) = &self.running {
            // (The control task hands out one at a time.)
            tracing::warn!(
                running = running.request,
                request = request.id,
                "an on-demand snapshot request while one runs; it waits"
            );
            self.report(Report::SnapshotAbandoned {
                request: request.id,
            });
            return;
        }
        self.running = Some(resnapshot::Running::start(
            request,
            &config.slot,
            &config.publication,
            &config.database_url,
            settings,
        ));
    }

    /// Reports the running snapshot's end once its worker ended and Kafka has every row it
    /// published (nothing in flight, or a source transaction end after its last chunk
    /// acknowledged).
    pub fn check(&mut self, acknowledged: Lsn, idle: bool) {
        let Some(running) = &mut self.running else {
            return;
        };
        let (request, rows, last_high) = (running.request, running.rows, running.last_high);
        let outcome = match running.finished() {
            None => return,
            Some(Ok(())) if !(idle || acknowledged > last_high) => return,
            Some(outcome) => outcome.clone(),
        };
        self.running = None;
        self.report(Report::SnapshotEnded {
            request,
            outcome,
            rows,
        });
    }

    fn report(&self, report: Report) {
        if self.reports.send(report).is_err() {
            tracing::debug!("the control task stopped; a snapshot report was dropped");
        }
    }
}

impl Drop for OnDemand {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            self.report(Report::SnapshotAbandoned {
                request: running.request,
            });
        }
    }
}
