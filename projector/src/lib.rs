//! projector: Kafka change events → the materialized views of materialized_view_db.
//!
//! ```text
//!  user-events ──records──► decode ──► batch ──► apply: one Postgres transaction ──► user_view
//!       ▲                     │ bad                 │  view rows + department_stats   department_stats
//!       │                     ▼                     │  + projector_offsets            projector_offsets
//!   seek to the         user-events.dlq ◄───────────┘  (dead letters acknowledged before the commit)
//!   stored offsets
//! ```
//!
//! - [`encode`]: record → [`encode::Change`]; a run of changes → final rows and stats deltas. Pure.
//! - [`apply`]: the transaction that writes a batch and its offsets together.
//! - [`dead_letter`]: the dead-letter topic.
//! - [`config`], [`telemetry`]: flags, `/health` and `/metrics`.
//!
//! Exactly-once effect: the offsets that count are the ones in `projector_offsets`, committed in the
//! same transaction as the rows. Whenever the consumer group hands this process partitions (the
//! cooperative-sticky assignor moves only those that change owner), each is positioned at the
//! offset stored with the views, and records below it are never applied again. Each view row also
//! remembers the source position it reflects, so even a record delivered twice in the topic (or a
//! replay) changes nothing. Kafka's own committed offsets are updated after each transaction, for
//! lag tools only.

pub mod apply;
pub mod config;
pub mod dead_letter;
pub mod encode;
pub mod replay;
pub mod source_position;
pub mod telemetry;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use change_event::RecordPosition;

use crate::apply::{ApplyError, Complete, Item, Store, Target};
use crate::dead_letter::{DeadLetters, Letter};
use crate::encode::{BadEvent, Change};
use crate::source_position::Follower;

pub use config::Config;
pub use telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Migrate(#[from] schema::WaitError),
    #[error("creating a Kafka client failed")]
    Kafka(#[source] KafkaError),
    #[error("the projector stopped on an error it cannot retry")]
    Halted(#[source] ApplyError),
    #[error(
        "partition {partition} of {topic} ends at offset {end}, but the views were applied up to \
         offset {stored}: the topic was deleted and created again (or truncated), so its offsets \
         name other records now. Rebuild the views from it (`projector replay --earliest \
         --rebuild`), or, if they are right as they are, delete the projector's stored offsets \
         for the topic (projector_offsets) to start at its beginning"
    )]
    OffsetPastEnd {
        topic: String,
        partition: i32,
        stored: i64,
        end: i64,
    },
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
}

impl BatchError {
    fn remedy(&self) -> Remedy {
        match self {
            BatchError::DeadLetter(_) => Remedy::Retry,
            BatchError::Apply(e) if e.is_transient() => Remedy::Retry,
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

/// The consumer's context: librdkafka logs into `tracing`, statistics into the metrics, and a
/// generation number bumped on every rebalance so the loop knows to re-position.
struct Context {
    generation: AtomicU64,
    /// An offset commit to Kafka is under way (its result not yet reported).
    kafka_commit_in_flight: std::sync::atomic::AtomicBool,
    /// Partitions of the topic this member holds now.
    assigned: std::sync::Mutex<std::collections::BTreeSet<i32>>,
    metrics: Arc<Metrics>,
    topic: String,
}

impl Context {
    fn new(metrics: Arc<Metrics>, topic: &str) -> Context {
        Context {
            generation: AtomicU64::new(0),
            kafka_commit_in_flight: std::sync::atomic::AtomicBool::new(false),
            assigned: std::sync::Mutex::new(BTreeSet::new()),
            metrics,
            topic: topic.to_owned(),
        }
    }

    fn assigned(&self) -> Vec<i32> {
        self.assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
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
                self.assigned
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(mine(tpl));
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = ?partitions(tpl), "partitions revoked");
                let mut assigned = self
                    .assigned
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for p in mine(tpl) {
                    assigned.remove(&p);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
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

/// Consumes and applies until `shutdown`. `listener` serves `/health` and `/metrics`.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let metrics = Metrics::new();
    let http = service::telemetry::spawn(listener, metrics.clone(), shutdown.clone());
    let result = consume(&config, &metrics, &shutdown).await;
    metrics.set_state(telemetry::State::Stopping);
    shutdown.cancel();
    if let Err(e) = http.await {
        tracing::error!(task = "telemetry", error = %e, "task panicked");
    }
    result
}

async fn consume(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    if !config.skip_migrations {
        match schema::migrate_when_reachable(
            &config.database_url,
            schema::Database::ViewDb,
            shutdown,
        )
        .await
        {
            Ok(applied) => tracing::info!(?applied, "materialized_view_db schema is current"),
            Err(schema::WaitError::Cancelled(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    let dead_letters = DeadLetters::new(
        &config.kafka_brokers,
        &config.dead_letter_topic(),
        &config.topic,
    )
    .map_err(Error::Kafka)?;
    let kafka = consumer_config(config, &config.group)?;
    let context = Context::new(metrics.clone(), &config.topic);
    let consumer: StreamConsumer<Context> =
        kafka.create_with_context(context).map_err(Error::Kafka)?;
    consumer.subscribe(&[&config.topic]).map_err(Error::Kafka)?;
    let target = Target::live(&config.group, &config.topic, &config.source_table);
    let mut p = Projector::new(config, metrics, shutdown, consumer, target, None)?;
    p.dead_letters = Some(dead_letters);
    p.follower = Some(
        Follower::start(&config.kafka_brokers, &config.position_topic, &config.topic)
            .map_err(Error::Kafka)?,
    );
    tracing::info!(topic = %config.topic, group = %config.group,
        dead_letter_topic = %config.dead_letter_topic(), "projector consuming");
    p.run().await.map(|_| ())
}

/// The consumer settings every projector (and replay) uses; `group` names the offsets it commits.
fn consumer_config(config: &Config, group: &str) -> Result<ClientConfig, Error> {
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

/// What a replay reads: each partition from `start` up to, not including, `stop`.
#[derive(Debug, Clone, Default)]
struct Bounds {
    start: BTreeMap<i32, i64>,
    stop: BTreeMap<i32, i64>,
    /// Partitions read past `stop` without a record between the cursor and it (a gap in the
    /// offsets at the end of the range).
    ended: BTreeSet<i32>,
}

struct Projector<'a> {
    config: &'a Config,
    metrics: &'a Arc<Metrics>,
    shutdown: &'a CancellationToken,
    consumer: StreamConsumer<Context>,
    /// `None` in a replay: what cannot be applied was dead-lettered when first consumed; it is
    /// reported, not sent again.
    dead_letters: Option<DeadLetters>,
    store: Option<Store>,
    target: Target,
    /// Schema and table the events must come from.
    table: (String, String),
    /// A replay's range; `None` for the live projector, which runs from its stored offsets on.
    bounds: Option<Bounds>,
    /// Where each partition stands.
    positions: HashMap<i32, Cursor>,
    /// The rebalance generation the partitions were last positioned for.
    positioned_generation: u64,
    backoff: service::Backoff,
    dead_letter_topic_ready: bool,
    /// Offsets applied and not yet mirrored to Kafka, and when the last mirror was sent.
    kafka_offsets: BTreeMap<i32, i64>,
    last_kafka_commit: Instant,
    /// The reader's committed positions (the live projector only; see [`source_position`]).
    follower: Option<Follower>,
    /// Per partition: the last record applied (as far as known) and the `complete_lsn` stored.
    applied: HashMap<i32, RecordPosition>,
    complete: HashMap<i32, u64>,
    /// The partition count of the topic `projector_topics` has from this projector.
    topic_partitions_stored: Option<i32>,
    /// The offset each partition was positioned at.
    positioned_at: HashMap<i32, i64>,
}

impl<'a> Projector<'a> {
    fn new(
        config: &'a Config,
        metrics: &'a Arc<Metrics>,
        shutdown: &'a CancellationToken,
        consumer: StreamConsumer<Context>,
        target: Target,
        bounds: Option<Bounds>,
    ) -> Result<Projector<'a>, Error> {
        let table = config.source_table()?;
        Ok(Projector {
            config,
            metrics,
            shutdown,
            consumer,
            dead_letters: None,
            store: None,
            target,
            table,
            bounds,
            positions: HashMap::new(),
            positioned_generation: 0,
            backoff: service::Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            dead_letter_topic_ready: false,
            kafka_offsets: BTreeMap::new(),
            last_kafka_commit: Instant::now(),
            follower: None,
            applied: HashMap::new(),
            complete: HashMap::new(),
            topic_partitions_stored: None,
            positioned_at: HashMap::new(),
        })
    }
}

/// How long a batch in hand may take to apply once shutdown was asked for.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

impl Projector<'_> {
    /// Consumes and applies until shutdown (Ok(false)) or, in a replay, until every partition
    /// reached its stop (Ok(true)).
    async fn run(&mut self) -> Result<bool, Error> {
        let max = self.config.batch_max_events as usize;
        let mut batch: Vec<Record> = Vec::with_capacity(max);
        self.metrics.set_state(telemetry::State::Running);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'consume: loop {
            if !self.reposition(&mut batch).await? {
                break 'consume;
            }
            if self.reached_stop() {
                return Ok(true);
            }
            let changed = self.follower.as_ref().map(|f| f.changed.clone());
            let position_changed = async {
                match &changed {
                    Some(notify) => notify.notified().await,
                    None => std::future::pending().await,
                }
            };
            let first = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break 'consume,
                // Before more records: a reader position that arrived after the batch that
                // applied its records raises complete_lsn now (read-your-writes waits on it).
                () = position_changed => {
                    if !self.raise_complete().await? {
                        break 'consume;
                    }
                    continue 'consume;
                }
                m = self.consumer.recv() => m.map(|m| m.detach()),
                _ = tick.tick() => {
                    // Offsets applied in the last batches reach Kafka even when no more come.
                    self.commit_to_kafka(&[]);
                    if !self.raise_complete().await? {
                        break 'consume;
                    }
                    continue 'consume;
                }
            };
            self.take(first, &mut batch).await?;
            let deadline = tokio::time::Instant::now() + self.config.batch_max_wait();
            while !batch.is_empty() && batch.len() < max {
                // Records already here first: the deadline only ends a wait for more.
                let next = tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => break 'consume,
                    m = self.consumer.recv() => m.map(|m| m.detach()),
                    () = tokio::time::sleep_until(deadline) => break,
                };
                let before = batch.len();
                self.take(next, &mut batch).await?;
                // Records passed over (a rebalance since, past a replay's stop) keep coming
                // without growing the batch: apply what is in hand once the wait is over.
                if batch.len() == before && tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            if !self.flush(&mut batch).await? {
                return Ok(false);
            }
        }
        // Apply what is in hand, within a limit; whatever is not committed is read again next time.
        if !batch.is_empty() {
            match tokio::time::timeout(DRAIN_LIMIT, self.try_flush(&batch)).await {
                Ok(Ok(())) => tracing::info!(events = batch.len(), "applied the last batch"),
                Ok(Err(e)) => tracing::warn!(error = %service::error_chain(&e),
                    "the last batch was not applied; it will be read again"),
                Err(_) => tracing::warn!(
                    "the last batch did not apply within {DRAIN_LIMIT:?}; it will be read again"
                ),
            }
        }
        Ok(false)
    }

    /// In a replay: whether every partition reached its stop.
    fn reached_stop(&self) -> bool {
        let Some(b) = &self.bounds else {
            return false;
        };
        b.stop.iter().all(|(p, stop)| {
            b.ended.contains(p) || self.positions.get(p).is_some_and(|c| c.next >= *stop)
        })
    }

    /// In a replay, before reading on to a further stop: re-reads every partition from where it
    /// stands (records past the last stop were fetched and dropped).
    async fn resume(&mut self, stop: BTreeMap<i32, i64>) {
        if let Some(b) = &mut self.bounds {
            b.stop = stop;
            b.ended.clear();
        }
        let cursors: Vec<(i32, Cursor)> = self.positions.iter().map(|(p, c)| (*p, *c)).collect();
        for (partition, cursor) in cursors {
            let Some((low, _)) = self.watermarks(partition).await else {
                return;
            };
            self.seek(partition, cursor, low).await;
        }
    }

    /// After a rebalance: applies what is in hand (it belongs to the old assignment), then moves
    /// every assigned partition to the offset stored with the views. Ok(false) on shutdown.
    async fn reposition(&mut self, batch: &mut Vec<Record>) -> Result<bool, Error> {
        let generation = self.consumer.context().generation.load(Ordering::SeqCst);
        if generation == self.positioned_generation {
            return Ok(true);
        }
        if !self.flush(batch).await? {
            return Ok(false);
        }
        self.positions.clear();
        for partition in self.consumer.context().assigned() {
            let start = match &self.bounds {
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
            let Some((low, high)) = self.watermarks(partition).await else {
                return Ok(false);
            };
            // (A replay's start was checked against the partition when it was planned.)
            if let Some(stored) = start.filter(|s| *s > high && self.bounds.is_none()) {
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
        Ok(true)
    }

    /// Adds a consumed record to the batch when it is the next one to apply of its partition.
    async fn take(
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
                if let Some(b) = &mut self.bounds {
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
        let partition = message.partition();
        let offset = message.offset();
        let generation = self.consumer.context().generation.load(Ordering::SeqCst);
        let cursor = match self.positions.get(&partition).copied() {
            Some(c) if c.generation == generation && generation == self.positioned_generation => c,
            // A rebalance since: the loop repositions before the next record is taken.
            _ => return Ok(()),
        };
        let next = cursor.next;
        if let Some(b) = &mut self.bounds {
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
                .and_then(|h| std::str::from_utf8(h.value?).ok())
                .and_then(RecordPosition::parse)
        });
        let decoded = encode::decode(
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
            match self.consumer.seek(
                &self.config.topic,
                partition,
                Offset::Offset(cursor.next),
                Duration::from_secs(10),
            ) {
                Ok(()) => return,
                Err(e) => tracing::debug!(partition, error = %e, "seeking failed; retrying"),
            }
            if !backoff.wait(self.shutdown).await {
                return;
            }
        }
    }

    /// The first offset the topic still holds in `partition` and the one after its last record,
    /// retrying while the broker does not say; `None` on shutdown.
    async fn watermarks(&self, partition: i32) -> Option<(i64, i64)> {
        let mut backoff = service::Backoff::default();
        loop {
            match self.consumer.fetch_watermarks(
                &self.config.topic,
                partition,
                Duration::from_secs(10),
            ) {
                Ok(w) => return Some(w),
                Err(e) => tracing::warn!(partition, error = %e,
                    "reading the partition's watermarks failed; retrying"),
            }
            if !backoff.wait(self.shutdown).await {
                return None;
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
        tracing::warn!(error = %text, "applying failed; retrying without moving the offsets");
        self.metrics.set_state(telemetry::State::Retrying);
        if self.store.as_ref().is_some_and(Store::is_closed) {
            self.store = None;
        }
        Ok(self.backoff.wait(self.shutdown).await)
    }

    /// Applies `batch` (retrying as needed) and empties it. Ok(false) when shutdown came first.
    async fn flush(&mut self, batch: &mut Vec<Record>) -> Result<bool, Error> {
        if batch.is_empty() {
            return Ok(true);
        }
        // Ranges still to apply; a range refused for its data is split until the culprit is alone.
        let mut todo = Vec::new();
        todo.push(0..batch.len());
        while let Some(range) = todo.pop() {
            loop {
                let error = match self.try_flush(&batch[range.clone()]).await {
                    Ok(()) => break,
                    Err(e) => e,
                };
                if error.remedy() == Remedy::Isolate {
                    if range.len() > 1 {
                        let mid = range.start + range.len() / 2;
                        // Stack: the first half is applied first, keeping the order.
                        todo.push(mid..range.end);
                        todo.push(range.start..mid);
                        tracing::warn!(error = %service::error_chain(&error), events = range.len(),
                            "the database refused a batch; applying it in halves to find the event");
                        break;
                    }
                    let reason = service::error_chain(&error);
                    if !self
                        .dead_letter_refused(&batch[range.clone()], reason)
                        .await?
                    {
                        return Ok(false);
                    }
                    break;
                }
                if !self.failed(error).await? {
                    return Ok(false);
                }
            }
        }
        batch.clear();
        Ok(true)
    }

    /// One attempt to apply `records` in one transaction, dead letters first.
    async fn try_flush(&mut self, records: &[Record]) -> Result<(), BatchError> {
        let started = Instant::now();
        let items: Vec<Item> = records
            .iter()
            .map(|r| Item {
                partition: r.partition,
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                position: r.position,
                change: r.decoded.as_ref().ok().cloned(),
            })
            .collect();
        self.ensure_dead_letter_topic().await?;
        let (applied, completes) = self.completes(records);
        let store = connected(&mut self.store, &self.config.database_url, &self.target).await?;
        let pending = store.apply(&items, &completes).await?;
        let mut letters: Vec<Letter<'_>> = records
            .iter()
            .filter_map(|r| {
                let e = r.decoded.as_ref().err()?;
                Some(letter(r, e.kind(), e.to_string()))
            })
            .collect();
        letters.extend(
            pending
                .bad
                .iter()
                .map(|(i, e)| letter(&records[*i], e.kind(), e.to_string())),
        );
        if !letters.is_empty() {
            match &self.dead_letters {
                Some(d) => d.send_all(&letters).await.map_err(BatchError::DeadLetter)?,
                None => not_applied(&letters),
            }
        }
        let dead = letters.len();
        let outcome = pending.commit().await?;

        let m = self.metrics;
        m.events.fetch_add(records.len() as u64, Ordering::Relaxed);
        m.upserted
            .fetch_add(outcome.upserted as u64, Ordering::Relaxed);
        m.deleted
            .fetch_add(outcome.deleted as u64, Ordering::Relaxed);
        m.truncates
            .fetch_add(outcome.truncates as u64, Ordering::Relaxed);
        m.ignored
            .fetch_add(outcome.ignored as u64, Ordering::Relaxed);
        m.dead_lettered.fetch_add(dead as u64, Ordering::Relaxed);
        if let Some(lsn) = outcome.last_lsn {
            m.last_applied_lsn.fetch_max(lsn, Ordering::Relaxed);
        }
        m.record_batch(started.elapsed());
        m.set_state(telemetry::State::Running);
        self.backoff.reset();
        self.completed(applied, &completes);
        self.commit_to_kafka(records);
        Ok(())
    }

    async fn ensure_dead_letter_topic(&mut self) -> Result<(), BatchError> {
        if let Some(d) = &self.dead_letters {
            if !self.dead_letter_topic_ready {
                d.ensure_topic(&self.config.kafka_brokers)
                    .await
                    .map_err(BatchError::DeadLetter)?;
                self.dead_letter_topic_ready = true;
            }
        }
        Ok(())
    }

    /// Dead-letters one record the database refused, and moves the offset past it.
    async fn dead_letter_refused(
        &mut self,
        records: &[Record],
        reason: String,
    ) -> Result<bool, Error> {
        loop {
            let attempt = async {
                let letters: Vec<Letter<'_>> = records
                    .iter()
                    .map(|r| letter(r, "database_refused", reason.clone()))
                    .collect();
                match &self.dead_letters {
                    Some(d) => d.send_all(&letters).await.map_err(BatchError::DeadLetter)?,
                    None => not_applied(&letters),
                }
                let items: Vec<Item> = records
                    .iter()
                    .map(|r| Item {
                        partition: r.partition,
                        offset: r.offset,
                        timestamp_ms: r.timestamp_ms,
                        position: r.position,
                        change: None,
                    })
                    .collect();
                let store =
                    connected(&mut self.store, &self.config.database_url, &self.target).await?;
                store.apply(&items, &[]).await?.commit().await?;
                Ok::<_, BatchError>(())
            };
            match attempt.await {
                Ok(()) => {
                    let (applied, _) = self.completes(records);
                    self.completed(applied, &[]);
                    self.metrics
                        .dead_lettered
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    self.metrics
                        .events
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    self.commit_to_kafka(records);
                    return Ok(true);
                }
                Err(e) => {
                    if !self.failed(e).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// For `records` about to be applied: the last record of each of their partitions, and the
    /// `complete_lsn` every positioned partition then reaches, where it rises (see
    /// [`source_position`]).
    fn completes(&self, records: &[Record]) -> (HashMap<i32, RecordPosition>, Vec<Complete>) {
        let mut applied: HashMap<i32, RecordPosition> = HashMap::new();
        for r in records {
            if let Some(p) = r.position {
                let last = applied.entry(r.partition).or_insert(p);
                *last = (*last).max(p);
            }
        }
        let Some(follower) = &self.follower else {
            return (applied, Vec::new());
        };
        let mut completes = Vec::new();
        for (&partition, cursor) in &self.positions {
            let last = applied
                .get(&partition)
                .copied()
                .max(self.applied.get(&partition).copied());
            let Some(complete_lsn) = follower.complete(partition, last) else {
                continue;
            };
            if self
                .complete
                .get(&partition)
                .is_none_or(|stored| complete_lsn > *stored)
            {
                completes.push(Complete {
                    partition,
                    // Only for a partition without a row (nothing of it applied yet): the
                    // cursor may be past records of a batch still being applied.
                    next_offset: self
                        .positioned_at
                        .get(&partition)
                        .copied()
                        .unwrap_or(cursor.next),
                    complete_lsn,
                });
            }
        }
        (applied, completes)
    }

    /// After a commit: what [`Projector::completes`] said is now stored.
    fn completed(&mut self, applied: HashMap<i32, RecordPosition>, completes: &[Complete]) {
        for (partition, position) in applied {
            let last = self.applied.entry(partition).or_insert(position);
            *last = (*last).max(position);
        }
        for c in completes {
            self.complete.insert(c.partition, c.complete_lsn);
        }
    }

    /// Between batches: raises the `complete_lsn` of partitions the reader's newest positions
    /// say are complete further (idle ones, or ones whose last records came before the position
    /// did), and stores the topic's partition count when it is new. Ok(false) on shutdown.
    async fn raise_complete(&mut self) -> Result<bool, Error> {
        if self.follower.is_none() || self.positions.is_empty() {
            return Ok(true);
        }
        let partitions = self
            .follower
            .as_ref()
            .map_or(0, |f| f.partitions.load(Ordering::SeqCst));
        if partitions > 0 && self.topic_partitions_stored != Some(partitions) {
            let stored = match self.connected().await {
                Ok(store) => store.set_topic_partitions(partitions).await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(()) => self.topic_partitions_stored = Some(partitions),
                Err(e) => {
                    if !self.failed(BatchError::Apply(e)).await? {
                        return Ok(false);
                    }
                }
            }
        }
        let (_, completes) = self.completes(&[]);
        if completes.is_empty() {
            return Ok(true);
        }
        loop {
            let raised = match self.connected().await {
                Ok(store) => store.raise_complete(&completes).await,
                Err(e) => Err(e),
            };
            match raised {
                Ok(()) => {
                    self.completed(HashMap::new(), &completes);
                    return Ok(true);
                }
                Err(e) => {
                    if !self.failed(BatchError::Apply(e)).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Mirrors the committed offsets to Kafka, for lag tools; the views' copy is the one used.
    /// One commit at a time, at most every [`KAFKA_COMMIT_EVERY`]: librdkafka does not rejoin the
    /// group after losing it until every commit it holds has ended, and commits sent to a broker
    /// that stopped answering (paused, partitioned) end only after their retries time out, so
    /// a commit per batch kept a projector out of its group for minutes.
    fn commit_to_kafka(&mut self, records: &[Record]) {
        for r in records {
            let next = r.offset + 1;
            self.metrics.set_applied(r.partition, next);
            if self.bounds.is_none() {
                let e = self.kafka_offsets.entry(r.partition).or_insert(next);
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

/// Least time between two offset commits to Kafka (see [`Projector::commit_to_kafka`]).
const KAFKA_COMMIT_EVERY: Duration = Duration::from_secs(1);

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

/// A replay does not dead-letter again what the projector dead-lettered when it first met it.
fn not_applied(letters: &[Letter<'_>]) {
    for l in letters {
        tracing::warn!(partition = l.partition, offset = l.offset, kind = l.kind, error = %l.error,
            "replay: an event that cannot be applied (dead-lettered when it was first consumed)");
    }
}

fn letter<'a>(r: &'a Record, kind: &'static str, error: String) -> Letter<'a> {
    Letter {
        partition: r.partition,
        offset: r.offset,
        key: r.key.as_deref(),
        value: r.value.as_deref(),
        kind,
        error,
    }
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
