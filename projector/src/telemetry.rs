//! Counters of the projector, exposed on `/health` and `/metrics` (see [`service::telemetry`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use service::telemetry::{Exposition, Telemetry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Starting = 0,
    Running = 1,
    Retrying = 2,
    Stopping = 3,
    /// Holding only some of the topic's partitions in whole-transaction mode: nothing applied
    /// until a rebalance hands it all (a killed member's session still running out, or another
    /// member sharing the topic).
    Waiting = 4,
    /// Another projector of the group holds the leader lock (whole-transaction mode): not
    /// consuming, ready to take over.
    Standby = 5,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Retrying => "retrying",
            State::Stopping => "stopping",
            State::Waiting => "waiting_for_partitions",
            State::Standby => "standby",
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Running,
            2 => State::Retrying,
            3 => State::Stopping,
            4 => State::Waiting,
            5 => State::Standby,
            _ => State::Starting,
        }
    }
}

/// Upper bounds (seconds) of the apply-latency histogram.
const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug, Default)]
struct Partitions {
    /// High watermark per partition, from librdkafka's statistics.
    high: BTreeMap<i32, i64>,
    /// Next offset to apply per partition, as committed to materialized_view_db.
    applied: BTreeMap<i32, i64>,
}

#[derive(Debug, Default)]
struct Latency {
    buckets: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    state: AtomicU8,
    /// Records consumed and committed (applied, ignored as already reflected, or tombstones).
    pub events: AtomicU64,
    pub upserted: AtomicU64,
    pub deleted: AtomicU64,
    pub truncates: AtomicU64,
    /// Events at or below the position the views already reflected.
    pub ignored: AtomicU64,
    pub batches: AtomicU64,
    /// Parts of view transactions written before they could commit (more than
    /// `--hold-max-kib` held: a large source transaction, or a partition behind the others).
    pub parts: AtomicU64,
    /// View transactions written while the one before them committed (on another connection).
    pub overlapped: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub errors: AtomicU64,
    pub last_applied_lsn: AtomicU64,
    partitions: Mutex<Partitions>,
    latency: Mutex<Latency>,
    last_error: Mutex<Option<String>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
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

    pub fn record_batch(&self, took: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        {
            let mut l = service::lock(&self.latency);
            let s = took.as_secs_f64();
            for (bucket, le) in l.buckets.iter_mut().zip(LATENCY_BUCKETS) {
                if s <= le {
                    *bucket += 1;
                }
            }
            l.sum += s;
            l.count += 1;
        }
    }

    pub fn set_high_watermark(&self, partition: i32, high: i64) {
        service::lock(&self.partitions).high.insert(partition, high);
    }

    pub fn set_applied(&self, partition: i32, next_offset: i64) {
        {
            let mut p = service::lock(&self.partitions);
            let e = p.applied.entry(partition).or_insert(next_offset);
            *e = (*e).max(next_offset);
        }
    }

    /// The next offset to apply per partition, as far as this process applied.
    pub fn applied(&self) -> BTreeMap<i32, i64> {
        service::lock(&self.partitions).applied.clone()
    }

    /// Records in the topic not yet applied, per partition (where both ends are known).
    pub fn lag(&self) -> Vec<(i32, i64)> {
        let p = service::lock(&self.partitions);
        p.applied
            .iter()
            .filter_map(|(part, applied)| {
                p.high
                    .get(part)
                    .map(|high| (*part, (high - applied).max(0)))
            })
            .collect()
    }

    fn last_error(&self) -> Option<String> {
        service::lock(&self.last_error).clone()
    }

    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Exposition::default();
        out.metric(
            "projector_events_total",
            "counter",
            "Records consumed and committed with the views (applied, already reflected, or tombstones).",
            g(&self.events),
        );
        out.metric(
            "projector_rows_upserted_total",
            "counter",
            "user_view rows written.",
            g(&self.upserted),
        );
        out.metric(
            "projector_rows_deleted_total",
            "counter",
            "user_view rows deleted.",
            g(&self.deleted),
        );
        out.metric(
            "projector_truncates_total",
            "counter",
            "Truncates applied.",
            g(&self.truncates),
        );
        out.metric(
            "projector_events_ignored_total",
            "counter",
            "Events at or below the position the views already reflected (re-deliveries).",
            g(&self.ignored),
        );
        out.metric(
            "projector_batches_total",
            "counter",
            "Transactions committed.",
            g(&self.batches),
        );
        out.metric(
            "projector_transaction_parts_total",
            "counter",
            "Parts of view transactions written before they could commit (more than \
             --hold-max-kib held: a large source transaction, or a partition behind the others).",
            g(&self.parts),
        );
        out.metric(
            "projector_transactions_overlapped_total",
            "counter",
            "View transactions written while the one before them committed, on a second \
             connection.",
            g(&self.overlapped),
        );
        out.metric(
            "projector_dead_lettered_total",
            "counter",
            "Records sent to the dead-letter topic.",
            g(&self.dead_lettered),
        );
        out.metric(
            "projector_errors_total",
            "counter",
            "Failed attempts to apply a batch or to consume (each retried).",
            g(&self.errors),
        );
        out.metric(
            "projector_last_applied_lsn",
            "gauge",
            "Highest source commit LSN applied (as a number).",
            g(&self.last_applied_lsn),
        );
        out.labelled(
            "projector_consumer_lag_records",
            "gauge",
            "Records in the topic not yet applied to the views.",
            "partition",
            self.lag().into_iter().map(|(p, l)| (p.to_string(), l)),
        );
        {
            let l = service::lock(&self.latency);
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                .iter()
                .copied()
                .zip(l.buckets.iter().copied())
                .collect();
            out.histogram(
                "projector_apply_seconds",
                "Time to apply and commit one batch.",
                &buckets,
                l.sum,
                l.count,
            );
        }
        out.metric(
            "projector_running",
            "gauge",
            "1 while consuming and applying.",
            u8::from(self.state() == State::Running),
        );
        out.finish()
    }
}

impl Telemetry for Metrics {
    fn health(&self) -> (bool, serde_json::Value) {
        let state = self.state();
        // Waiting for partitions (it passes when a member is gone) and standing by are as designed.
        let up = matches!(state, State::Running | State::Waiting | State::Standby);
        let body = serde_json::json!({
            "status": if up { "UP" } else { "DOWN" },
            "state": state.name(),
            "last_applied_lsn": change_event::format_lsn(self.last_applied_lsn.load(Ordering::Relaxed)),
            "consumer_lag": self.lag().into_iter().map(|(p, l)| (p.to_string(), l)).collect::<BTreeMap<_, _>>(),
            "last_error": self.last_error(),
        });
        (up, body)
    }

    fn render(&self) -> String {
        Metrics::render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_high_watermark_minus_applied() {
        let m = Metrics::default();
        m.set_high_watermark(0, 100);
        m.set_high_watermark(1, 7);
        m.set_applied(0, 90);
        m.set_applied(0, 80); // never backwards
        assert_eq!(m.lag(), vec![(0, 10)]);
        m.record_batch(Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("projector_consumer_lag_records{partition=\"0\"} 10"));
        assert!(text.contains("projector_apply_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("projector_apply_seconds_bucket{le=\"0.0025\"} 0"));
    }
}
