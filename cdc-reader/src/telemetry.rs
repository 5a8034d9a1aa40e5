//! Counters of the reader and the small HTTP endpoint that exposes them: `/health` (200 while
//! streaming, 503 otherwise, with the state as JSON) and `/metrics` (Prometheus text format).

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use service::telemetry::{Exposition, Telemetry};

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
    /// Kafka transactions committed (at least once: batches confirmed), and the time spent in
    /// those commits, in microseconds.
    pub kafka_commits: AtomicU64,
    pub kafka_commit_micros: AtomicU64,
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
        *service::lock(&self.last_error) = Some(error);
    }

    fn last_error(&self) -> Option<String> {
        service::lock(&self.last_error).clone()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Exposition::default();
        out.metric(
            "cdc_reader_events_published_total",
            "counter",
            "Records committed to Kafka.",
            g(&self.events_published),
        );
        out.metric(
            "cdc_reader_transactions_total",
            "counter",
            "Source transactions wholly committed to Kafka.",
            g(&self.transactions),
        );
        out.metric(
            "cdc_reader_acknowledged_lsn",
            "gauge",
            "Highest LSN confirmed to PostgreSQL (as a number).",
            g(&self.acknowledged_lsn),
        );
        out.metric(
            "cdc_reader_received_lsn",
            "gauge",
            "Highest commit LSN received from the slot.",
            g(&self.received_lsn),
        );
        out.metric(
            "cdc_reader_in_flight_records",
            "gauge",
            "Records in the open Kafka transaction.",
            g(&self.in_flight),
        );
        out.metric(
            "cdc_reader_kafka_commits_total",
            "counter",
            "Kafka transactions committed (at least once: batches confirmed delivered).",
            g(&self.kafka_commits),
        );
        out.metric(
            "cdc_reader_kafka_commit_seconds_total",
            "counter",
            "Time spent committing Kafka transactions.",
            g(&self.kafka_commit_micros) as f64 / 1e6,
        );
        out.metric(
            "cdc_reader_errors_total",
            "counter",
            "Errors that ended a replication session.",
            g(&self.errors),
        );
        out.metric(
            "cdc_reader_reconnects_total",
            "counter",
            "Replication sessions started after an error.",
            g(&self.reconnects),
        );
        out.metric(
            "cdc_reader_slot_lag_bytes",
            "gauge",
            "Current WAL minus the slot's confirmed flush LSN (-1: unknown).",
            self.slot_lag_bytes.load(Ordering::Relaxed),
        );
        out.metric(
            "cdc_reader_slot_retained_wal_bytes",
            "gauge",
            "Current WAL minus the slot's restart LSN (-1: unknown).",
            self.slot_retained_bytes.load(Ordering::Relaxed),
        );
        out.metric(
            "cdc_reader_streaming",
            "gauge",
            "1 while the replication stream is up.",
            u8::from(self.state() == State::Streaming),
        );
        out.finish()
    }
}

impl Telemetry for Metrics {
    fn health(&self) -> (bool, serde_json::Value) {
        let state = self.state();
        let body = serde_json::json!({
            "status": if state == State::Streaming { "UP" } else { "DOWN" },
            "state": state.name(),
            "acknowledged_lsn": change_event::format_lsn(self.acknowledged_lsn.load(Ordering::Relaxed)),
            "last_error": self.last_error(),
        });
        (state == State::Streaming, body)
    }

    fn render(&self) -> String {
        Metrics::render(self)
    }
}
