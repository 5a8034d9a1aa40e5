//! cdc-reader: PostgreSQL WAL (logical replication, `pgoutput`) → Kafka change events.
//!
//! ```text
//!  slot ──XLogData──► decode ──► envelope ──records──► publish ──► Kafka
//!    ▲                                                    │
//!    └──────── confirmed LSN (only what Kafka acked) ◄────┘
//! ```
//!
//! - [`decode`]: pgoutput protocol v1 bytes → typed messages; pure, never panics.
//! - [`values`]: column values in text form → natural JSON; pure.
//! - [`envelope`]: decoded changes → Kafka records in the change-event format; pure.
//! - [`publish`]: the transactional producer: Kafka transactions with the resume position inside.
//! - [`stream`]: the replication session and the progress rule (what may be confirmed, when).
//! - [`snapshot`]: the initial snapshot under the slot's exported snapshot, as `op: "r"` events.
//! - [`setup`]: publication, slot and catalog lookups over plain SQL.
//! - [`replay`]: streaming again from an earlier LSN, asked through `cdc_reader_replays`.
//! - [`resnapshot`]: on-demand snapshots while streaming, asked through
//!   `cdc_reader_snapshot_requests`.
//! - [`control`]: the task that takes those requests and hands them to the session.
//! - [`config`], [`telemetry`]: flags, `/health` and `/metrics`.

pub mod config;
pub mod connect;
pub mod control;
pub mod decode;
pub mod envelope;
pub mod partition;
pub mod publish;
pub mod replay;
pub mod resnapshot;
pub mod setup;
pub mod snapshot;
pub mod stream;
pub mod telemetry;
pub mod values;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("the reader stopped on an error it cannot retry")]
    Halted(#[source] stream::SessionError),
}

/// Streams until `shutdown`, retrying transient failures with capped exponential backoff.
/// `listener` serves `/health` and `/metrics`.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let metrics = Metrics::new();
    let http = service::telemetry::spawn(listener, metrics.clone(), shutdown.clone());
    let lag = tokio::spawn(watch_slot_lag(
        config.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let (mut control, control_task) = control::spawn(&config, metrics.clone(), shutdown.clone());

    let mut backoff = service::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut resume = stream::Resume::new(control.progress.clone());
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        let before = resume.acknowledged();
        match stream::session(&config, &metrics, &mut resume, &mut control, &shutdown).await {
            Ok(stream::End::Shutdown) => break Ok(()),
            Ok(stream::End::Rewind(replay)) => {
                // A replay: the next session streams from there (the slot still has it).
                resume.rewind(replay, metrics.events_published.load(Ordering::Relaxed));
            }
            Err(e) if e.is_transient() => {
                if e.is_slot_taken() {
                    resume.slot_lost();
                }
                let error = service::error_chain(&e);
                tracing::warn!(%error, acknowledged = %setup::lsn_text(resume.acknowledged()),
                    "replication session ended; resuming from the last acknowledged position");
                metrics.record_error(error);
                metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                metrics.set_state(telemetry::State::Retrying);
                if resume.acknowledged() > before {
                    backoff.reset();
                }
                if !backoff.wait(&shutdown).await {
                    break Ok(());
                }
            }
            Err(e) => {
                let error = service::error_chain(&e);
                tracing::error!(%error, "halting");
                metrics.record_error(error);
                break Err(Error::Halted(e));
            }
        }
    };
    shutdown.cancel();
    drop(control);
    for (name, task) in [
        ("telemetry", http),
        ("slot lag", lag),
        ("control requests", control_task),
    ] {
        if let Err(e) = task.await {
            tracing::error!(task = name, error = %e, "task panicked");
        }
    }
    result
}

/// Measures the slot's lag every few seconds on its own connection, for `/metrics`.
async fn watch_slot_lag(config: Config, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client =
                match tokio_postgres::connect(&config.database_url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "slot lag connection ended");
                            }
                        });
                        Some(c)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "slot lag: cannot connect");
                        None
                    }
                };
        }
        if let Some(c) = &client {
            match setup::slot_lag(c, &config.slot).await {
                Ok(Some((lag, retained))) => {
                    metrics.slot_lag_bytes.store(lag, Ordering::Relaxed);
                    metrics
                        .slot_retained_bytes
                        .store(retained, Ordering::Relaxed);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "slot lag query failed"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Messages captured from a real PostgreSQL, shared by the unit tests.
#[cfg(test)]
mod testdata {
    use std::sync::OnceLock;

    /// `(lsn, message bytes)` of `testdata/pgoutput-v1.txt`.
    pub fn captured() -> &'static [(String, Vec<u8>)] {
        static CAPTURED: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
        CAPTURED.get_or_init(|| {
            include_str!("../testdata/pgoutput-v1.txt")
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .map(|l| {
                    let mut parts = l.split('|');
                    let lsn = parts.next().unwrap().to_owned();
                    let hex = parts.nth(1).unwrap();
                    let bytes = (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                        .collect::<Vec<u8>>();
                    (lsn, bytes)
                })
                .collect()
        })
    }
}
