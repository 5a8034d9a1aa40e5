//! Counters of the reader and the small HTTP endpoint that exposes them: `/health` (200 while
//! streaming, 503 otherwise, with the state as JSON) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::{Filter, Reply};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Starting = 0,
    Streaming = 1,
    Retrying = 2,
    Stopping = 3,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Streaming => "streaming",
            State::Retrying => "retrying",
            State::Stopping => "stopping",
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Streaming,
            2 => State::Retrying,
            3 => State::Stopping,
            _ => State::Starting,
        }
    }
}

/// Shared by the stream (writes) and the HTTP endpoint (reads).
#[derive(Debug, Default)]
pub struct Metrics {
    state: AtomicU8,
    pub events_published: AtomicU64,
    pub transactions: AtomicU64,
    pub acknowledged_lsn: AtomicU64,
    pub received_lsn: AtomicU64,
    pub in_flight: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// -1 until first measured.
    pub slot_lag_bytes: AtomicI64,
    pub slot_retained_bytes: AtomicI64,
    last_error: Mutex<Option<String>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let m = Metrics::default();
        m.slot_lag_bytes.store(-1, Ordering::Relaxed);
        m.slot_retained_bytes.store(-1, Ordering::Relaxed);
        Arc::new(m)
    }

    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn record_error(&self, error: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "cdc_reader_events_published_total",
            "counter",
            "Records Kafka acknowledged.",
            g(&self.events_published).to_string(),
        );
        metric(
            "cdc_reader_transactions_total",
            "counter",
            "Source transactions fully acknowledged.",
            g(&self.transactions).to_string(),
        );
        metric(
            "cdc_reader_acknowledged_lsn",
            "gauge",
            "Highest LSN confirmed to PostgreSQL (as a number).",
            g(&self.acknowledged_lsn).to_string(),
        );
        metric(
            "cdc_reader_received_lsn",
            "gauge",
            "Highest commit LSN received from the slot.",
            g(&self.received_lsn).to_string(),
        );
        metric(
            "cdc_reader_in_flight_records",
            "gauge",
            "Records sent and not yet acknowledged.",
            g(&self.in_flight).to_string(),
        );
        metric(
            "cdc_reader_errors_total",
            "counter",
            "Errors that ended a replication session.",
            g(&self.errors).to_string(),
        );
        metric(
            "cdc_reader_reconnects_total",
            "counter",
            "Replication sessions started after an error.",
            g(&self.reconnects).to_string(),
        );
        metric(
            "cdc_reader_slot_lag_bytes",
            "gauge",
            "Current WAL minus the slot's confirmed flush LSN (-1: unknown).",
            self.slot_lag_bytes.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "cdc_reader_slot_retained_wal_bytes",
            "gauge",
            "Current WAL minus the slot's restart LSN (-1: unknown).",
            self.slot_retained_bytes.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "cdc_reader_streaming",
            "gauge",
            "1 while the replication stream is up.",
            u8::from(self.state() == State::Streaming).to_string(),
        );
        out
    }
}

/// Serves /health and /metrics on `addr` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let m = metrics.clone();
    let health = warp::path!("health").and(warp::get()).map(move || {
        let state = m.state();
        let body = warp::reply::json(&serde_json::json!({
            "status": if state == State::Streaming { "UP" } else { "DOWN" },
            "state": state.name(),
            "acknowledged_lsn": change_event::format_lsn(m.acknowledged_lsn.load(Ordering::Relaxed)),
            "last_error": m.last_error(),
        }));
        let code = if state == State::Streaming {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        warp::reply::with_status(body, code).into_response()
    });
    let m = metrics;
    let prometheus = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(m.render(), "content-type", "text/plain; version=0.0.4")
            .into_response()
    });
    warp::serve(health.or(prometheus))
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run()
        .await;
}

/// Binds the telemetry address (so a taken port fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
