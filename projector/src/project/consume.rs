//! Consuming and positioning: the consumer group, its rebalances, every partition positioned at
//! the offset stored with the views (or a replay's start), records taken in offset order, pausing,
//! and the applied offsets mirrored to Kafka.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{Message, Offset, TopicPartitionList};

use change_event::RecordPosition;

use super::{BatchError, Cursor, Projector, Record};
use crate::{apply, events, source_position, telemetry, Config, Error, Metrics, Transactions};

/// The consumer's context: librdkafka logs into `tracing`, statistics into the metrics, and a
/// generation number bumped on every rebalance so the loop knows to re-position.
pub(crate) struct Context {
    generation: AtomicU64,
    /// An offset commit to Kafka is under way (its result not yet reported).
    kafka_commit_in_flight: AtomicBool,
    /// Partitions of the topic this member holds now.
    assigned: Mutex<BTreeSet<i32>>,
    metrics: Arc<Metrics>,
    topic: String,
}

impl Context {
    pub(crate) fn new(metrics: Arc<Metrics>, topic: &str) -> Context {
        Context {
            generation: AtomicU64::new(0),
            kafka_commit_in_flight: AtomicBool::new(false),
            assigned: Mutex::new(BTreeSet::new()),
            metrics,
            topic: topic.to_owned(),
        }
    }

    fn assigned(&self) -> Vec<i32> {
        service::lock(&self.assigned).iter().copied().collect()
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        service::kafka::log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        service::kafka::client_error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        if let Some(t) = statistics.topics.get(&self.topic) {
            for (p, s) in &t.partitions {
                if *p >= 0 && s.hi_offset >= 0 {
                    self.metrics.set_high_watermark(*p, s.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "committing offsets to Kafka failed (lag tools only)");
        }
        self.kafka_commit_in_flight.store(false, Ordering::SeqCst);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| e.partition())
                .collect::<Vec<_>>()
        };
        let mine = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .filter(|e| e.topic() == self.topic)
                .map(|e| e.partition())
                .collect::<Vec<_>>()
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?partitions(tpl), "partitions assigned");
                service::lock(&self.assigned).extend(mine(tpl));
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = ?partitions(tpl), "partitions revoked");
                let mut assigned = service::lock(&self.assigned);
                for p in mine(tpl) {
                    assigned.remove(&p);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Takes `partitions` of `topic` without a group (a replay reads on its own); the loop then
/// positions them as after a rebalance.
pub(crate) fn assign(
    consumer: &StreamConsumer<Context>,
    topic: &str,
    partitions: &[i32],
) -> Result<(), Error> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(Error::Kafka)?;
    }
    consumer.assign(&tpl).map_err(Error::Kafka)?;
    let context = consumer.context();
    service::lock(&context.assigned).extend(partitions.iter().copied());
    context.generation.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// The consumer settings every projector (and replay) uses; `group` names the offsets it commits.
pub(crate) fn consumer_config(config: &Config, group: &str) -> Result<ClientConfig, Error> {
    let mut kafka = ClientConfig::new();
    kafka
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        // Incremental rebalancing: when a member joins or leaves, only the partitions that move
        // stop; the others go on being applied (the eager protocol stops every member).
        .set("partition.assignment.strategy", "cooperative-sticky")
        // A projector killed without leaving the group holds its partitions until this expires
        // (librdkafka's default is 45 s); a restarted one waits that long for them.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // A fetch with nothing to return waits this long at the broker, and partitions resumed
        // meanwhile (see `Projector::pause`) wait for it (librdkafka's default is 500 ms).
        .set("fetch.wait.max.ms", "100")
        .set("statistics.interval.ms", "5000");
    for (k, v) in config.consumer_overrides()? {
        // librdkafka's debug lines, when asked for, are logged (at `tracing`'s debug level).
        if k == "debug" {
            kafka.set_log_level(RDKafkaLogLevel::Debug);
        }
        kafka.set(k, v);
    }
    Ok(kafka)
}

impl Projector<'_> {
    /// In a replay: whether every partition reached its stop.
    pub(super) fn reached_stop(&self) -> bool {
        let Some(b) = self.mode.bounds() else {
            return false;
        };
        b.stop.iter().all(|(p, stop)| {
            b.ended.contains(p) || self.positions.get(p).is_some_and(|c| c.next >= *stop)
        })
    }

    /// In a replay, before reading on to a further stop: re-reads every partition from where it
    /// stands (records past the last stop were fetched and dropped).
    pub(crate) async fn resume(&mut self, stop: BTreeMap<i32, i64>) -> Result<(), Error> {
        if let Some(b) = self.mode.bounds_mut() {
            b.stop = stop;
            b.ended.clear();
        }
        let cursors: Vec<(i32, Cursor)> = self.positions.iter().map(|(p, c)| (*p, *c)).collect();
        for (partition, cursor) in cursors {
            let Some((low, _)) = self.watermarks(partition).await? else {
                return Ok(());
            };
            self.seek(partition, cursor, low).await;
        }
        Ok(())
    }

    /// After a rebalance: applies what is complete in hand (it belongs to the old assignment),
    /// then moves every assigned partition to the offset stored with the views; after a view
    /// transaction was lost with records no longer in hand, only the latter. Ok(false) on
    /// shutdown.
    pub(super) async fn reposition(&mut self, held: &mut Vec<Record>) -> Result<bool, Error> {
        let generation = self.consumer.context().generation.load(Ordering::SeqCst);
        if generation == self.positioned_generation {
            return Ok(true);
        }
        if !std::mem::take(&mut self.reread) && !self.commit_ready(held).await? {
            return Ok(false);
        }
        // (That commit may have failed and asked for the partitions to be read again: the
        // positioning below does so.)
        self.reread = false;
        self.abandon().await;
        held.clear();
        self.positions.clear();
        // (Whatever was paused: a partition paused, revoked and assigned again may still be.)
        self.waiting = false;
        self.ahead.clear();
        self.pause_all(false);
        for partition in self.consumer.context().assigned() {
            let start = match self.mode.bounds() {
                Some(b) => b.start.get(&partition).copied(),
                None => match self.stored_offset(partition).await? {
                    Some(stored) => stored.map(|stored| {
                        self.complete.insert(partition, stored.complete_lsn);
                        let known = source_position::applied_through(stored.complete_lsn)
                            .max(stored.last_position);
                        if let Some(known) = known {
                            let applied = self.applied.entry(partition).or_insert(known);
                            *applied = (*applied).max(known);
                        }
                        stored.next_offset
                    }),
                    None => return Ok(false),
                },
            };
            let Some((low, high)) = self.watermarks(partition).await? else {
                return Ok(false);
            };
            // (A replay's start was checked against the partition when it was planned.)
            if let Some(stored) = start.filter(|s| *s > high && self.mode.is_live()) {
                tracing::error!(partition, stored, end = high,
                    "the views were applied past the end of the partition: the topic was recreated?");
                return Err(Error::OffsetPastEnd {
                    topic: self.config.topic.clone(),
                    partition,
                    stored,
                    end: high,
                });
            }
            // Nothing stored: the views have nothing of this partition yet, start at its
            // beginning (whatever Kafka's committed offset says).
            let next = start.unwrap_or(low);
            tracing::info!(
                partition,
                next,
                "positioning the partition (stored offset, or the replay's start)"
            );
            let cursor = Cursor { generation, next };
            self.seek(partition, cursor, low).await;
            // (Where the partition was positioned: never past a record not yet applied.)
            if let Some(c) = self.positions.get(&partition) {
                self.positioned_at.insert(partition, c.next);
            }
        }
        self.positioned_generation = generation;
        if self.mode.is_live() {
            let Some(partitions) = self.partition_count().await? else {
                return Ok(false);
            };
            let mine = self.positions.len();
            if mine < partitions && self.config.transactions == Transactions::Whole {
                tracing::warn!(
                    mine,
                    partitions,
                    "this projector holds only some of the topic's partitions: it applies \
                     whole source transactions only with all of them, and waits for a rebalance \
                     (a killed member's session running out, or a member of the group in \
                     another mode leaving: members sharing a topic need --transactions per-member)"
                );
                self.waiting = true;
                self.pause_all(true);
                self.metrics.set_state(telemetry::State::Waiting);
            } else {
                if mine < partitions {
                    tracing::info!(
                        mine,
                        partitions,
                        "this projector applies some of the topic's partitions: a source \
                         transaction with events in partitions of other members is applied in \
                         parts, one per member (--transactions per-member)"
                    );
                }
                self.metrics.set_state(telemetry::State::Running);
            }
        }
        Ok(true)
    }

    /// Takes what the consumer has fetched already, without waiting, up to a view transaction's
    /// worth of records.
    pub(super) async fn take_fetched(&mut self, held: &mut Vec<Record>) -> Result<(), Error> {
        use futures_util::FutureExt;
        for _ in 0..self.config.batch_max_events {
            let Some(message) = self.consumer.recv().now_or_never() else {
                break;
            };
            self.take(message.map(|m| m.detach()), held).await?;
        }
        Ok(())
    }

    /// Adds a consumed record to the batch when it is the next one to apply of its partition.
    pub(super) async fn take(
        &mut self,
        message: Result<rdkafka::message::OwnedMessage, KafkaError>,
        batch: &mut Vec<Record>,
    ) -> Result<(), Error> {
        let message = match message {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(partition)) => {
                // A replay (which asks to be told) read the partition to its end: no record is
                // left below its stop, even where the last offsets hold none (a transaction
                // marker, compaction). A stop is never past the end a read_committed consumer
                // reaches, except by records still uncommitted when it was taken, which the live
                // projector applies.
                if let Some(b) = self.mode.bounds_mut() {
                    let positioned = self.positions.get(&partition).is_some_and(|c| {
                        c.generation == self.positioned_generation
                            && c.generation
                                == self.consumer.context().generation.load(Ordering::SeqCst)
                    });
                    if positioned && b.stop.contains_key(&partition) {
                        b.ended.insert(partition);
                    }
                }
                return Ok(());
            }
            Err(e) => {
                // librdkafka retries by itself; this is for the operator (and a short pause).
                tracing::warn!(error = %e, "consuming failed");
                self.metrics.record_error(e.to_string());
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(());
            }
        };
        if self.waiting {
            // (Fetched before the pause; read again once this member holds every partition.)
            return Ok(());
        }
        let partition = message.partition();
        let offset = message.offset();
        let generation = self.consumer.context().generation.load(Ordering::SeqCst);
        let cursor = match self.positions.get(&partition).copied() {
            Some(c) if c.generation == generation && generation == self.positioned_generation => c,
            // A rebalance since: the loop repositions before the next record is taken.
            _ => return Ok(()),
        };
        let next = cursor.next;
        if let Some(b) = self.mode.bounds_mut() {
            let stop = b.stop.get(&partition).copied().unwrap_or(next);
            if offset >= stop {
                // Past the replay's range (read again by the next range, if any). Records come in
                // offset order from `next`, so the offsets up to the stop hold nothing more.
                b.ended.insert(partition);
                return Ok(());
            }
        }
        if offset < next {
            tracing::debug!(partition, offset, next, "skipping a record already applied");
            return Ok(());
        }
        if offset > next {
            // A gap in the offsets: compaction, transaction markers.
            tracing::debug!(partition, next, offset, "a gap in the partition's offsets");
        }
        self.positions.insert(
            partition,
            Cursor {
                generation,
                next: offset + 1,
            },
        );
        let key = message.key().map(<[u8]>::to_vec);
        let value = message.payload().map(<[u8]>::to_vec);
        let position = message.headers().and_then(|headers| {
            use rdkafka::message::Headers;
            headers
                .iter()
                .find(|h| h.key == RecordPosition::HEADER)
                .and_then(|h| RecordPosition::from_header(h.value?))
        });
        let decoded = events::decode(
            key.as_deref(),
            value.as_deref(),
            (&self.table.0, &self.table.1),
        );
        batch.push(Record {
            partition,
            offset,
            timestamp_ms: message.timestamp().to_millis(),
            position,
            key,
            value,
            decoded,
        });
        Ok(())
    }

    /// Reads `partition` from `cursor.next` on. Records deleted by retention before they were
    /// applied cannot be read: that is logged as an error and the partition moves on from its first
    /// remaining record (`low`).
    async fn seek(&mut self, partition: i32, cursor: Cursor, low: i64) {
        let mut cursor = cursor;
        if low > cursor.next {
            tracing::error!(
                partition,
                next = cursor.next,
                first_remaining = low,
                "records were deleted from the topic (retention) before they were applied; \
                 the views miss them: rebuild the views from a replay"
            );
            self.metrics.record_error(format!(
                "partition {partition}: records {}..{low} deleted before they were applied",
                cursor.next
            ));
            cursor.next = low;
        }
        self.positions.insert(partition, cursor);
        tracing::debug!(partition, next = cursor.next, "reading the partition from");
        let mut backoff = service::Backoff::default();
        loop {
            // A rebalance since (the partition may be ours no more, and a seek of it would fail
            // for good): the loop repositions every partition of the new assignment.
            if self.consumer.context().generation.load(Ordering::SeqCst) != cursor.generation {
                tracing::debug!(partition, "a rebalance while seeking; positioning again");
                return;
            }
            // Right after an assignment librdkafka may refuse a seek until the partition's fetcher
            // has started; that passes.
            let topic = self.config.topic.clone();
            let next = Offset::Offset(cursor.next);
            let seek = move |c: &StreamConsumer<Context>| {
                c.seek(&topic, partition, next, Duration::from_secs(10))
            };
            match self.kafka(seek).await {
                Ok(()) => return,
                Err(e) => tracing::debug!(partition, error = %e, "seeking failed; retrying"),
            }
            if !backoff.wait(self.shutdown).await {
                return;
            }
        }
    }

    /// Runs a call of the Kafka client that blocks (metadata, watermarks, a seek: up to their
    /// timeouts) on the blocking pool, off the async runtime's worker threads.
    pub(crate) async fn kafka<T: Send + 'static>(
        &self,
        call: impl FnOnce(&StreamConsumer<Context>) -> T + Send + 'static,
    ) -> T {
        let consumer = Arc::clone(&self.consumer);
        service::blocking(move || call(&consumer)).await
    }

    /// Pauses (or resumes) fetching every partition this member holds.
    fn pause_all(&self, pause: bool) {
        self.pause(&self.consumer.context().assigned(), pause);
    }

    /// Pauses (or resumes) fetching `partitions`. Records fetched and not yet consumed are
    /// dropped by the client and fetched again on resume, from after the last one consumed.
    pub(super) fn pause(&self, partitions: &[i32], pause: bool) {
        if partitions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.config.topic, p);
        }
        let done = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, pause, "pausing or resuming the partitions failed");
        }
    }

    /// The topic's partition count, retrying while the broker does not say; `None` on shutdown.
    async fn partition_count(&self) -> Result<Option<usize>, Error> {
        let topic = self.config.topic.clone();
        let count = move |c: &StreamConsumer<Context>| {
            let m = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let t = m.topics().iter().find(|t| t.name() == topic);
            Ok(t.map(|t| t.partitions().len()))
        };
        self.retrying("reading the topic's partition count", count)
            .await
            .map(Option::flatten)
    }

    /// The first offset the topic still holds in `partition` and the one after its last record,
    /// retrying while the broker does not say; `None` on shutdown.
    async fn watermarks(&self, partition: i32) -> Result<Option<(i64, i64)>, Error> {
        let topic = self.config.topic.clone();
        let marks = move |c: &StreamConsumer<Context>| {
            c.fetch_watermarks(&topic, partition, Duration::from_secs(10))
                .map(Some)
        };
        self.retrying("reading a partition's watermarks", marks)
            .await
            .map(Option::flatten)
    }

    /// Runs `call` until it answers `Some` (`Ok(None)` when shutdown comes first), retrying after
    /// errors and `None`s. A client that has answered it with nothing but errors and `None`s for
    /// [`STUCK_AFTER`] is taken as stuck: [`Error::KafkaStuck`] asks for a fresh one.
    async fn retrying<T: Send + 'static>(
        &self,
        what: &'static str,
        call: impl Fn(&StreamConsumer<Context>) -> Result<Option<T>, KafkaError>
            + Clone
            + Send
            + 'static,
    ) -> Result<Option<Option<T>>, Error> {
        let mut backoff = service::Backoff::default();
        let mut failing_since: Option<Instant> = None;
        loop {
            match self.kafka(call.clone()).await {
                Ok(Some(t)) => return Ok(Some(Some(t))),
                Ok(None) => {
                    failing_since.get_or_insert_with(Instant::now);
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= STUCK_AFTER {
                        return Err(Error::KafkaStuck { what, source: e });
                    }
                    tracing::warn!(error = %e, "{what} failed; retrying");
                }
            }
            if !backoff.wait(self.shutdown).await {
                return Ok(None);
            }
        }
    }

    /// The offset stored with the views for `partition`, retrying while the database is away.
    /// `None` when asked to shut down first.
    async fn stored_offset(
        &mut self,
        partition: i32,
    ) -> Result<Option<Option<apply::Stored>>, Error> {
        loop {
            let result = match self.connected().await {
                Ok(store) => store.next_offset(partition).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(stored) => return Ok(Some(stored)),
                Err(e) => {
                    if !self.failed(BatchError::Apply(e)).await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Mirrors the committed offsets (`applied`: the next offset of each partition) to Kafka,
    /// for lag tools; the views' copy is the one used.
    /// One commit at a time, at most every [`KAFKA_COMMIT_EVERY`]: librdkafka does not rejoin the
    /// group after losing it until every commit it holds has ended, and commits sent to a broker
    /// that stopped answering (paused, partitioned) end only after their retries time out, so
    /// a commit per batch kept a projector out of its group for minutes.
    pub(super) fn commit_to_kafka(&mut self, applied: &BTreeMap<i32, i64>) {
        for (&partition, &next) in applied {
            self.metrics.set_applied(partition, next);
            if self.mode.is_live() {
                let e = self.kafka_offsets.entry(partition).or_insert(next);
                *e = (*e).max(next);
            }
        }
        let context = self.consumer.context();
        if self.kafka_offsets.is_empty()
            || self.last_kafka_commit.elapsed() < KAFKA_COMMIT_EVERY
            || context.kafka_commit_in_flight.load(Ordering::SeqCst)
        {
            return;
        }
        let assigned = context.assigned();
        let mut tpl = TopicPartitionList::new();
        for (p, o) in std::mem::take(&mut self.kafka_offsets) {
            // (Partitions moved to another member since: theirs to commit.)
            if !assigned.contains(&p) {
                continue;
            }
            if let Err(e) = tpl.add_partition_offset(&self.config.topic, p, Offset::Offset(o)) {
                tracing::debug!(error = %e, "building the offset list failed");
            }
        }
        if tpl.count() == 0 {
            return;
        }
        self.last_kafka_commit = Instant::now();
        context.kafka_commit_in_flight.store(true, Ordering::SeqCst);
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            context
                .kafka_commit_in_flight
                .store(false, Ordering::SeqCst);
            tracing::debug!(error = %e, "committing offsets to Kafka failed (lag tools only)");
        }
    }
}

/// How long the Kafka client may fail a metadata or watermark read in a row before it is replaced
/// by a fresh one. After a broker paused past every timeout, a client was seen failing every
/// watermark read with "Unknown partition" for minutes while its fetches worked again.
const STUCK_AFTER: Duration = Duration::from_secs(30);

/// Least time between two offset commits to Kafka (see [`Projector::commit_to_kafka`]).
const KAFKA_COMMIT_EVERY: Duration = Duration::from_secs(1);
