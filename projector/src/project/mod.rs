//! The projector's loop, live or replay (one [`Mode`]), by job:
//!
//! - this file: the state, the loop that consumes and applies, and what a failure calls for;
//! - [`consume`]: the consumer group, positioning every partition at the offset stored with the
//!   views, taking records in offset order, pausing, and mirroring offsets to Kafka;
//! - [`batch`]: which records make the next view transaction (whole source transactions, see
//!   [`crate::source_position`]) and, past the hold limit, which go into one left open;
//! - [`write`]: writing and committing view transactions, isolating and dead-lettering events the
//!   database refuses, raising `complete_lsn`.

mod batch;
mod consume;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use change_event::RecordPosition;

use crate::apply::{ApplyError, Store, Target};
use crate::dead_letter::DeadLetters;
use crate::events::{BadEvent, Change};
use crate::source_position::Follower;
use crate::{telemetry, Config, Error, Metrics};

use batch::ViewTx;
pub(crate) use consume::{assign, consumer_config, Context};

/// What a projector runs for.
pub(crate) enum Mode {
    /// The live projector: from the offsets stored with the views on, until shutdown. What cannot
    /// be applied is dead-lettered; the reader's committed positions (`follower`) say when a
    /// source transaction is complete; applied offsets are mirrored to Kafka for lag tools.
    Live {
        dead_letters: DeadLetters,
        follower: Follower,
    },
    /// A replay: each partition's range, then it returns. What cannot be applied was
    /// dead-lettered when first consumed: it is reported, not sent again; with no reader
    /// positions to go by, records are applied in batches as they come.
    Replay(Bounds),
}

impl Mode {
    fn follower(&self) -> Option<&Follower> {
        match self {
            Mode::Live { follower, .. } => Some(follower),
            Mode::Replay(_) => None,
        }
    }

    fn dead_letters(&self) -> Option<&DeadLetters> {
        match self {
            Mode::Live { dead_letters, .. } => Some(dead_letters),
            Mode::Replay(_) => None,
        }
    }

    fn bounds(&self) -> Option<&Bounds> {
        match self {
            Mode::Live { .. } => None,
            Mode::Replay(b) => Some(b),
        }
    }

    fn bounds_mut(&mut self) -> Option<&mut Bounds> {
        match self {
            Mode::Live { .. } => None,
            Mode::Replay(b) => Some(b),
        }
    }

    fn is_live(&self) -> bool {
        matches!(self, Mode::Live { .. })
    }
}

/// Why applying a batch failed.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("dead-lettering failed")]
    DeadLetter(#[source] KafkaError),
}

/// How to handle a failed batch.
#[derive(Debug, PartialEq, Eq)]
enum Remedy {
    /// Try the same batch again later (connection lost, broker away, serialization failure).
    Retry,
    /// The data of some event is refused by the database: isolate it and dead-letter it.
    Isolate,
    /// The schema or the permissions are wrong: nothing will work until an operator acts.
    Halt,
    /// Another applier committed some of the batch's records: read the partitions again from the
    /// stored offsets.
    Reread,
}

impl BatchError {
    fn remedy(&self) -> Remedy {
        match self {
            BatchError::DeadLetter(_) => Remedy::Retry,
            BatchError::Apply(e) if e.is_transient() => Remedy::Retry,
            BatchError::Apply(ApplyError::OffsetsMoved { .. }) => Remedy::Reread,
            BatchError::Apply(ApplyError::Sql { source, .. }) => {
                match source.as_db_error().map(|d| d.code().code()) {
                    // Transaction rollbacks (serialization, deadlock), lock timeouts, cancels.
                    Some(c) if c.starts_with("40") || c == "55P03" || c == "57014" => Remedy::Retry,
                    // Data exceptions and integrity violations: something in this batch.
                    Some(c) if c.starts_with("22") || c.starts_with("23") => Remedy::Isolate,
                    _ => Remedy::Halt,
                }
            }
            BatchError::Apply(_) => Remedy::Halt,
        }
    }
}

/// Where a partition stands: the rebalance generation it was positioned in and the offset of the
/// next record to apply.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    generation: u64,
    next: i64,
}

/// One consumed record.
#[derive(Debug)]
struct Record {
    partition: i32,
    offset: i64,
    /// The record's Kafka timestamp (when the reader produced it), in ms since the epoch.
    timestamp_ms: Option<i64>,
    /// Its `cdc.position` header, when it has one.
    position: Option<RecordPosition>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    decoded: Result<Change, BadEvent>,
}

impl Record {
    /// Roughly what holding it costs, in bytes.
    fn size(&self) -> u64 {
        let data = self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len);
        // The decoded row, and the rest.
        (2 * data + 256) as u64
    }
}

/// What a replay reads: each partition from `start` up to, not including, `stop`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bounds {
    pub(crate) start: BTreeMap<i32, i64>,
    pub(crate) stop: BTreeMap<i32, i64>,
    /// Partitions read past `stop` without a record between the cursor and it (a gap in the
    /// offsets at the end of the range).
    pub(crate) ended: BTreeSet<i32>,
}

pub(crate) struct Projector<'a> {
    config: &'a Config,
    metrics: &'a Arc<Metrics>,
    shutdown: &'a CancellationToken,
    consumer: Arc<StreamConsumer<Context>>,
    mode: Mode,
    /// The connection view transactions are written on, and a second one: while one commits,
    /// the next view transaction is written on the other (see [`write`]).
    store: Option<Store>,
    spare: Option<Store>,
    target: Target,
    /// Schema and table the events must come from.
    table: (String, String),
    /// Where each partition stands.
    positions: HashMap<i32, Cursor>,
    /// The rebalance generation the partitions were last positioned for.
    positioned_generation: u64,
    backoff: service::Backoff,
    dead_letter_topic: DeadLetterTopic,
    /// Offsets applied and not yet mirrored to Kafka, and when the last mirror was sent.
    kafka_offsets: BTreeMap<i32, i64>,
    last_kafka_commit: Instant,
    /// Per partition: the last record applied (as far as known) and the `complete_lsn` stored.
    applied: HashMap<i32, RecordPosition>,
    complete: HashMap<i32, u64>,
    /// The partition count of the topic `projector_topics` has from this projector.
    topic_partitions_stored: Option<i32>,
    /// The offset each partition was positioned at.
    positioned_at: HashMap<i32, i64>,
    /// The view transaction being written, when one is open.
    view_tx: Option<ViewTx>,
    /// The one committing on the other connection meanwhile, when there is one.
    committing: Option<ViewTx>,
    /// A view transaction was lost with records no longer in hand: read every partition again
    /// from the stored offsets.
    reread: bool,
    /// In whole-transaction mode, holding only some of the topic's partitions: they are paused
    /// and nothing is applied until a rebalance hands this member all of them.
    waiting: bool,
    /// Partitions paused while a view transaction with parts is open because they are complete
    /// past it: fetching goes to the partitions it waits for (more of these would only be held,
    /// and parts of them would move the transaction's end further away).
    ahead: BTreeSet<i32>,
}

/// Whether the dead-letter topic is known to exist: it must before a view transaction is
/// written, which may dead-letter events.
#[derive(Debug)]
enum DeadLetterTopic {
    /// Being created on a task started with the projector.
    Creating(tokio::task::JoinHandle<Result<(), rdkafka::error::KafkaError>>),
    /// Not known (that attempt failed): ensured before the next write.
    Unknown,
    Ready,
}

impl<'a> Projector<'a> {
    pub(crate) fn new(
        config: &'a Config,
        metrics: &'a Arc<Metrics>,
        shutdown: &'a CancellationToken,
        consumer: StreamConsumer<Context>,
        target: Target,
        mode: Mode,
    ) -> Result<Projector<'a>, Error> {
        let table = config.source_table()?;
        let dead_letter_topic = match &mode {
            Mode::Live { dead_letters, .. } => {
                DeadLetterTopic::Creating(dead_letters.ensure_topic_early(&config.kafka_brokers))
            }
            Mode::Replay(_) => DeadLetterTopic::Unknown,
        };
        Ok(Projector {
            config,
            metrics,
            shutdown,
            consumer: Arc::new(consumer),
            mode,
            store: None,
            spare: None,
            target,
            table,
            positions: HashMap::new(),
            positioned_generation: 0,
            backoff: service::Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            dead_letter_topic,
            kafka_offsets: BTreeMap::new(),
            last_kafka_commit: Instant::now(),
            applied: HashMap::new(),
            complete: HashMap::new(),
            topic_partitions_stored: None,
            positioned_at: HashMap::new(),
            view_tx: None,
            committing: None,
            reread: false,
            waiting: false,
            ahead: BTreeSet::new(),
        })
    }
}

/// How long a batch in hand may take to apply once shutdown was asked for.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

impl Projector<'_> {
    /// Consumes and applies until shutdown (Ok(false)) or, in a replay, until every partition
    /// reached its stop (Ok(true)).
    pub(crate) async fn run(&mut self) -> Result<bool, Error> {
        let max = self.config.batch_max_events as usize;
        // Consumed, not yet written: the next view transaction's records, and later ones'.
        let mut held: Vec<Record> = Vec::with_capacity(max);
        self.metrics.set_state(telemetry::State::Running);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'consume: loop {
            if !self.reposition(&mut held).await? {
                break 'consume;
            }
            if self.reached_stop() {
                return Ok(true);
            }
            let changed = self.mode.follower().map(|f| f.changed.clone());
            let position_changed = async {
                match &changed {
                    Some(notify) => notify.notified().await,
                    None => std::future::pending().await,
                }
            };
            let first = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break 'consume,
                // Before more records: a reader position completes the transactions held (and
                // raises complete_lsn, which read-your-writes waits on).
                () = position_changed => {
                    if !self.step(&mut held).await? || !self.raise_complete().await? {
                        break 'consume;
                    }
                    continue 'consume;
                }
                m = self.consumer.recv() => m.map(|m| m.detach()),
                _ = tick.tick() => {
                    // Offsets applied in the last transactions reach Kafka even when no more
                    // come.
                    self.commit_to_kafka(&BTreeMap::new());
                    if !self.step(&mut held).await? || !self.raise_complete().await? {
                        break 'consume;
                    }
                    continue 'consume;
                }
            };
            let before = held.len();
            self.take(first, &mut held).await?;
            let deadline = tokio::time::Instant::now() + self.config.batch_max_wait();
            while !held.is_empty() && held.len() - before < max {
                // Records already here first: the deadline only ends a wait for more.
                let next = tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => break 'consume,
                    m = self.consumer.recv() => m.map(|m| m.detach()),
                    () = tokio::time::sleep_until(deadline) => break,
                };
                let had = held.len();
                self.take(next, &mut held).await?;
                // Records passed over (a rebalance since, past a replay's stop) keep coming
                // without growing the batch: apply what is in hand once the wait is over.
                if held.len() == had && tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            if !self.step(&mut held).await? {
                return Ok(false);
            }
        }
        // Apply what is complete, within a limit; whatever is not committed is read again next
        // time.
        if !held.is_empty() || self.view_tx.is_some() {
            match tokio::time::timeout(DRAIN_LIMIT, self.try_commit_ready(&mut held)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(events = n, "applied the last records"),
                Ok(Err(e)) => tracing::warn!(error = %service::error_chain(&e),
                    "the last records were not applied; they will be read again"),
                Err(_) => tracing::warn!(
                    "the last records did not apply within {DRAIN_LIMIT:?}; they will be read again"
                ),
            }
            self.abandon().await;
        }
        Ok(false)
    }

    /// The consumer, the rest dropped.
    pub(crate) fn into_consumer(self) -> Arc<StreamConsumer<Context>> {
        self.consumer.clone()
    }

    /// Per partition positioned, the offset of the next record to apply.
    pub(crate) fn next_offsets(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.positions.iter().map(|(p, c)| (*p, c.next))
    }

    async fn connected(&mut self) -> Result<&mut Store, ApplyError> {
        connected(&mut self.store, &self.config.database_url, &self.target).await
    }

    /// Logs a failure and waits before the retry. Ok(false) when shutdown came first; an error
    /// when the failure cannot be retried.
    async fn failed(&mut self, error: BatchError) -> Result<bool, Error> {
        let text = service::error_chain(&error);
        self.metrics.record_error(text.clone());
        if error.remedy() == Remedy::Halt {
            tracing::error!(error = %text, "halting: the view database refuses the projector's statements");
            return match error {
                BatchError::Apply(e) => Err(Error::Halted(e)),
                BatchError::DeadLetter(e) => Err(Error::Kafka(e)),
            };
        }
        if error.remedy() == Remedy::Reread {
            tracing::warn!(error = %text, "applying failed; reading the partitions again");
        } else {
            tracing::warn!(error = %text, "applying failed; retrying without moving the offsets");
        }
        self.metrics.set_state(telemetry::State::Retrying);
        if self.store.as_ref().is_some_and(Store::is_closed) {
            self.store = None;
        }
        Ok(self.backoff.wait(self.shutdown).await)
    }
}

/// The store in `slot`, connecting (and preparing statements) first when there is none or its
/// connection was lost.
async fn connected<'s>(
    slot: &'s mut Option<Store>,
    url: &str,
    target: &Target,
) -> Result<&'s mut Store, ApplyError> {
    if slot.as_ref().is_none_or(Store::is_closed) {
        *slot = None;
        *slot = Some(Store::connect(url, target).await?);
    }
    Ok(slot.as_mut().expect("connected just above"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_failures_are_retried() {
        let e = BatchError::DeadLetter(KafkaError::Canceled);
        assert_eq!(e.remedy(), Remedy::Retry);
        let e = BatchError::Apply(ApplyError::BadLsn("x".into()));
        assert_eq!(e.remedy(), Remedy::Halt);
    }
}
