//! What the open Kafka transaction holds and when it is committed: the position committed with
//! it, and what may be confirmed to PostgreSQL once it is.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Resume;
use crate::decode::Lsn;
use crate::publish::{self, PublishError, Publisher};
use crate::telemetry::Metrics;

/// A source transaction larger than a Kafka transaction may hold is split once it has been open
/// this long, well within the `transaction.timeout.ms` (60 s) after which the broker aborts it.
const SPLIT_AFTER: Duration = Duration::from_secs(10);

/// When the open Kafka transaction is committed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Longest a transaction stays open collecting whole source transactions.
    pub(super) interval: Duration,
    /// Most records in one; a source transaction is split at this count.
    pub(super) max_records: usize,
}

impl Limits {
    pub(super) fn due(&self, publisher: &Publisher, in_source_tx: bool) -> bool {
        if !publisher.is_open() {
            return false;
        }
        let open_for = publisher.open_for();
        publisher.open_records() >= self.max_records
            || if in_source_tx {
                open_for >= SPLIT_AFTER
            } else {
                open_for >= self.interval
            }
    }
}

/// What the open Kafka transaction holds, for the position committed with it, and what the one
/// being committed held.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// End LSN of the last source transaction wholly in the open transaction.
    source_end: Option<Lsn>,
    /// Source transactions wholly in it.
    source_transactions: u64,
    /// The last record handed to the publisher.
    last: Option<crate::envelope::RecordPosition>,
    /// The commit under way: its last source transaction end, source transactions, start.
    committing: Option<(Option<Lsn>, u64, std::time::Instant)>,
}

impl Batch {
    pub(super) fn sending(&mut self, record: &crate::envelope::Record) {
        self.last = Some(record.position);
    }

    pub(super) fn source_end(&mut self, end_lsn: Lsn) {
        self.source_end = Some(end_lsn);
        self.source_transactions += 1;
    }

    /// Begins committing the open Kafka transaction with the position the stream resumes from;
    /// `split` when a source transaction is open (its records so far go in, the rest follows in
    /// the next).
    pub(super) async fn begin(
        &mut self,
        publisher: &mut Publisher,
        split: bool,
        resume: &Resume,
    ) -> Result<(), PublishError> {
        if !publisher.is_open() || publisher.is_committing() {
            return Ok(());
        }
        let position = publish::Committed {
            end_lsn: self.source_end.unwrap_or(resume.acknowledged),
            position: if split { self.last } else { None },
        };
        publisher.begin_commit(Some(position)).await?;
        if split {
            tracing::info!(records = publisher.open_records(), position = ?self.last.map(|p| p.header_value()),
                "a large source transaction split across Kafka transactions");
        }
        self.committing = Some((
            self.source_end.take(),
            std::mem::take(&mut self.source_transactions),
            std::time::Instant::now(),
        ));
        Ok(())
    }

    /// The commit under way is done (`records` in it): the source transaction end that may now
    /// be confirmed to PostgreSQL.
    pub(super) fn done(&mut self, records: usize, metrics: &Metrics) -> Option<Lsn> {
        let (end, transactions, began) = self.committing.take()?;
        metrics.kafka_commits.fetch_add(1, Ordering::Relaxed);
        metrics.kafka_commit_micros.fetch_add(
            u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        metrics
            .events_published
            .fetch_add(records as u64, Ordering::Relaxed);
        metrics
            .transactions
            .fetch_add(transactions, Ordering::Relaxed);
        end
    }

    /// With nothing open, committing or waiting: source transactions that ended meanwhile
    /// without records to send are confirmed as they are.
    pub(super) fn nothing_open(&mut self, metrics: &Metrics) -> Option<Lsn> {
        metrics.transactions.fetch_add(
            std::mem::take(&mut self.source_transactions),
            Ordering::Relaxed,
        );
        self.source_end.take()
    }

    /// Commits everything (the commit under way, what waited for it, what is open): for a
    /// shutdown or a replay. Returns the last source transaction end it covers.
    pub(super) async fn finish(
        &mut self,
        publisher: &mut Publisher,
        split: bool,
        resume: &Resume,
        metrics: &Metrics,
    ) -> Result<Option<Lsn>, PublishError> {
        let mut end = None;
        if publisher.is_committing() {
            end = self.done(publisher.commit_done().await?, metrics).or(end);
            publisher.send_waiting().await?;
        }
        if publisher.is_open() {
            self.begin(publisher, split, resume).await?;
            end = self.done(publisher.commit_done().await?, metrics).or(end);
        }
        if publisher.is_idle() {
            end = self.nothing_open(metrics).or(end);
        }
        Ok(end)
    }
}
