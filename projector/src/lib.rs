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
pub mod leader;
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
use crate::source_position::{Follower, Known};

pub use config::{Config, Transactions};
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
    loop {
        // In whole-transaction mode one member applies, the others stand by (see [`leader`]).
        let term = match config.transactions {
            Transactions::Whole => {
                let key = Target::lock_key(&config.group, &config.topic);
                let standby = || metrics.set_state(telemetry::State::Standby);
                match leader::acquire(&config.database_url, &key, shutdown, standby).await {
                    Some(term) => Some(term),
                    None => return Ok(()),
                }
            }
            Transactions::PerMember | Transactions::Batches => None,
        };
        let stop = term
            .as_ref()
            .map_or_else(|| shutdown.clone(), |t| t.lost.clone());
        project(config, metrics, &stop).await?;
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // Not consuming until the lock is held again (or another holds it: standby).
        metrics.set_state(telemetry::State::Starting);
        // (The lock was lost: the consumer has left the group; stand by again.)
    }
}

/// Joins the group and applies until `shutdown`.
async fn project(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    metrics.set_state(telemetry::State::Starting);
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
    consumer: Arc<StreamConsumer<Context>>,
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
    /// The view transaction being written, when one is open.
    view_tx: Option<ViewTx>,
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

/// The view transaction being written: what it holds so far.
#[derive(Debug)]
struct ViewTx {
    started: Instant,
    /// Some records written in it are no longer in hand (parts written while more than
    /// `--hold-max-kib` was held): when it fails, the partitions are read again from the stored
    /// offsets.
    released: bool,
    /// Per partition: the last record written (by position) and the offset after it.
    applied: HashMap<i32, RecordPosition>,
    next: BTreeMap<i32, i64>,
    /// The highest source commit LSN written: the transaction commits only once every partition
    /// is complete past it.
    through: Option<u64>,
    events: u64,
    dead: u64,
}

impl ViewTx {
    fn new() -> ViewTx {
        ViewTx {
            started: Instant::now(),
            released: false,
            applied: HashMap::new(),
            next: BTreeMap::new(),
            through: None,
            events: 0,
            dead: 0,
        }
    }
}

/// Whether `r` belongs to a source transaction complete below `frontier` (records without a
/// position are never held back).
fn ready(r: &Record, frontier: Option<u64>) -> bool {
    frontier.is_none_or(|f| r.position.is_none_or(|p| p.commit_lsn < f))
}

/// What [`Projector::take_ready`] takes, given the `frontier` and, when a view transaction is
/// open, the highest commit LSN written in it (`open`).
fn take_view_tx(
    held: &mut Vec<Record>,
    frontier: Option<u64>,
    open: Option<Option<u64>>,
    max: usize,
) -> Option<Vec<Record>> {
    let through = open.flatten();
    if through.is_some_and(|t| frontier.is_some_and(|f| t >= f)) {
        return None;
    }
    let lsn = |r: &Record| r.position.map_or(0, |p| p.commit_lsn);
    let mut lsns: Vec<u64> = held
        .iter()
        .filter(|r| ready(r, frontier))
        .map(lsn)
        .collect();
    if lsns.is_empty() && open.is_none() {
        return None;
    }
    lsns.sort_unstable();
    // Below the transaction of the first record past the limit (the whole first transaction
    // when it alone is larger), and past every transaction the open one has parts of.
    let below = lsns
        .get(max)
        .map(|&at| if at > lsns[0] { at } else { lsns[0] + 1 })
        .map(|b| through.map_or(b, |t| b.max(t + 1)));
    let records = take_prefix(held, |r| {
        ready(r, frontier) && below.is_none_or(|b| lsn(r) < b)
    });
    // (Ready records behind one that is not, in their partition, wait with it.)
    (!records.is_empty() || open.is_some()).then_some(records)
}

/// Takes out of `held`, in order, each partition's records up to the first one `take` refuses
/// (a partition's records are applied in order).
fn take_prefix(held: &mut Vec<Record>, take: impl Fn(&Record) -> bool) -> Vec<Record> {
    let mut blocked = BTreeSet::new();
    let mut taken = Vec::new();
    let mut kept = Vec::with_capacity(held.len());
    for r in held.drain(..) {
        if !blocked.contains(&r.partition) && take(&r) {
            taken.push(r);
        } else {
            blocked.insert(r.partition);
            kept.push(r);
        }
    }
    *held = kept;
    taken
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
            consumer: Arc::new(consumer),
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
            view_tx: None,
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
    async fn run(&mut self) -> Result<bool, Error> {
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

    /// After a rebalance: applies what is complete in hand (it belongs to the old assignment),
    /// then moves every assigned partition to the offset stored with the views; after a view
    /// transaction was lost with records no longer in hand, only the latter. Ok(false) on
    /// shutdown.
    async fn reposition(&mut self, held: &mut Vec<Record>) -> Result<bool, Error> {
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
        if self.bounds.is_none() {
            let Some(partitions) = self.partition_count().await else {
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
    async fn kafka<T: Send + 'static>(
        &self,
        call: impl FnOnce(&StreamConsumer<Context>) -> T + Send + 'static,
    ) -> T {
        let consumer = Arc::clone(&self.consumer);
        match tokio::task::spawn_blocking(move || call(&consumer)).await {
            Ok(t) => t,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("a blocking Kafka call did not finish: {e}"),
            },
        }
    }

    /// Pauses (or resumes) fetching every partition this member holds.
    fn pause_all(&self, pause: bool) {
        self.pause(&self.consumer.context().assigned(), pause);
    }

    /// Pauses (or resumes) fetching `partitions`. Records fetched and not yet consumed are
    /// dropped by the client and fetched again on resume, from after the last one consumed.
    fn pause(&self, partitions: &[i32], pause: bool) {
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
    async fn partition_count(&self) -> Option<usize> {
        let mut backoff = service::Backoff::default();
        loop {
            let topic = self.config.topic.clone();
            let count = move |c: &StreamConsumer<Context>| {
                let m = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
                let t = m.topics().iter().find(|t| t.name() == topic);
                Ok::<_, KafkaError>(t.map(|t| t.partitions().len()))
            };
            match self.kafka(count).await {
                Ok(Some(n)) => return Some(n),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e,
                    "reading the topic's partition count failed; retrying"),
            }
            if !backoff.wait(self.shutdown).await {
                return None;
            }
        }
    }

    /// The first offset the topic still holds in `partition` and the one after its last record,
    /// retrying while the broker does not say; `None` on shutdown.
    async fn watermarks(&self, partition: i32) -> Option<(i64, i64)> {
        let mut backoff = service::Backoff::default();
        loop {
            let topic = self.config.topic.clone();
            let marks = move |c: &StreamConsumer<Context>| {
                c.fetch_watermarks(&topic, partition, Duration::from_secs(10))
            };
            match self.kafka(marks).await {
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

    /// The source commit LSN below which every positioned partition's records are all in hand
    /// (applied, written or held): a source transaction that committed below it is complete, and
    /// its records can be applied without tearing it. Per partition that is the end of the
    /// newest reader position whose last record of it is in hand (see [`source_position`]), or
    /// the commit LSN of the last record in hand (a partition is in commit order). `None`: no
    /// limit (a replay, which has no reader positions to go by; a topic whose writer commits no
    /// positions; `--transactions batches`).
    fn frontier(&self, held: &[Record]) -> Option<u64> {
        self.complete_through(held)
            .map(|c| c.into_values().min().unwrap_or(u64::MAX))
    }

    /// Per positioned partition, the source commit LSN below which its records are all in hand
    /// (see [`Projector::frontier`]); `None`: no limit.
    fn complete_through(&self, held: &[Record]) -> Option<BTreeMap<i32, u64>> {
        let follower = self.follower.as_ref()?;
        if self.config.transactions == Transactions::Batches {
            return None;
        }
        match follower.known() {
            Known::Positions => {}
            // Read the positions first (the projector's first moments).
            Known::Loading => return Some(self.positions.keys().map(|&p| (p, 0)).collect()),
            // Nothing to go by (a reader without Kafka transactions): batches as they come.
            Known::None => return None,
        }
        let mut last: HashMap<i32, RecordPosition> = HashMap::new();
        let written = self.view_tx.iter().flat_map(|v| v.applied.iter());
        for (&partition, &position) in self.applied.iter().chain(written) {
            let e = last.entry(partition).or_insert(position);
            *e = (*e).max(position);
        }
        for r in held {
            if let Some(position) = r.position {
                let e = last.entry(r.partition).or_insert(position);
                *e = (*e).max(position);
            }
        }
        let through = self.positions.keys().map(|&partition| {
            let last = last.get(&partition).copied();
            let complete = [
                self.complete.get(&partition).copied(),
                follower.complete(partition, last),
                last.map(|p| p.commit_lsn),
            ];
            (partition, complete.into_iter().flatten().max().unwrap_or(0))
        });
        Some(through.collect())
    }

    /// Writes what `held` allows. The records of the source transactions complete in every
    /// partition (see [`Projector::frontier`]) are committed, in view transactions of whole
    /// source transactions, with what an open one holds already. When more than
    /// `--hold-max-kib` stays held (a source transaction larger than that, or a partition far
    /// behind the others), the older half of it goes into a view transaction left open, which
    /// commits once they are complete; while it is open, only records it needs are written in
    /// parts, and past the limit the partitions complete past it are paused until it commits.
    /// Ok(false) on shutdown.
    async fn step(&mut self, held: &mut Vec<Record>) -> Result<bool, Error> {
        if !self.commit_ready(held).await? {
            return Ok(false);
        }
        if self.reread {
            return Ok(true);
        }
        let through = self.view_tx.as_ref().map(|v| v.through);
        if through.is_none() {
            self.resume_ahead();
        }
        let bytes: u64 = held.iter().map(Record::size).sum();
        let full = bytes >= self.config.hold_max_kib.saturating_mul(1024);
        if let Some(Some(through)) = through {
            self.pause_ahead(held, through, full);
        }
        if !full {
            return Ok(true);
        }
        let upto = match through.flatten() {
            // Only what the open transaction waits for: a part past its end would move the end.
            Some(through) => through,
            None => {
                let frontier = self.frontier(held);
                let mut waiting: Vec<u64> = held
                    .iter()
                    .filter(|r| !ready(r, frontier))
                    .filter_map(|r| r.position.map(|p| p.commit_lsn))
                    .collect();
                waiting.sort_unstable();
                let Some(&upto) = waiting.get(waiting.len() / 2) else {
                    return Ok(true);
                };
                upto
            }
        };
        let records = take_prefix(held, |r| r.position.is_none_or(|p| p.commit_lsn <= upto));
        if records.is_empty() {
            return Ok(true);
        }
        tracing::debug!(
            events = records.len(),
            held = held.len(),
            "writing part of a view transaction before its source transactions are complete"
        );
        self.metrics.parts.fetch_add(1, Ordering::Relaxed);
        self.apply(records, false).await
    }

    /// While the open view transaction ends at `through`: past the hold limit (`full`), pauses
    /// the partitions complete past it; resumes those paused that are no longer known to be (the
    /// reader positions that said so were dropped from the follower's window, and only their
    /// next records would say it again).
    fn pause_ahead(&mut self, held: &[Record], through: u64, full: bool) {
        let Some(complete) = self.complete_through(held) else {
            return;
        };
        let behind: Vec<i32> = self
            .ahead
            .iter()
            .copied()
            .filter(|p| complete.get(p).is_none_or(|&c| c <= through))
            .collect();
        if !behind.is_empty() {
            self.pause(&behind, false);
            for p in &behind {
                self.ahead.remove(p);
            }
        }
        if !full {
            return;
        }
        let ahead: Vec<i32> = complete
            .into_iter()
            .filter(|&(p, c)| c > through && !self.ahead.contains(&p))
            .map(|(p, _)| p)
            .collect();
        if !ahead.is_empty() {
            tracing::debug!(
                ?ahead,
                through,
                "pausing partitions complete past the open view transaction"
            );
            self.pause(&ahead, true);
            self.ahead.extend(ahead);
        }
    }

    /// Resumes the partitions [`Projector::pause_ahead`] paused.
    fn resume_ahead(&mut self) {
        let ahead: Vec<i32> = std::mem::take(&mut self.ahead).into_iter().collect();
        self.pause(&ahead, false);
    }

    /// Commits view transactions of the ready records (and what the open one holds), each of at
    /// most `--batch-max-events` events unless a source transaction has more, while there are
    /// some. Ok(false) on shutdown.
    async fn commit_ready(&mut self, held: &mut Vec<Record>) -> Result<bool, Error> {
        // (After a view transaction with parts was lost, nothing more until the partitions are
        // read again: a later commit would store offsets past its records.)
        while !self.reread {
            let Some(records) = self.take_ready(held) else {
                break;
            };
            if !self.apply(records, true).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The records of the next view transaction, taken out of `held`: the ready records of the
    /// oldest source transactions, at most `--batch-max-events` of them unless the first
    /// transaction has more, and every ready record of the transactions the open view
    /// transaction (committed with them) has parts of. `None` when there is nothing to commit,
    /// or the open view transaction holds transactions not yet complete.
    fn take_ready(&self, held: &mut Vec<Record>) -> Option<Vec<Record>> {
        let frontier = self.frontier(held);
        let open = self.view_tx.as_ref().map(|v| v.through);
        take_view_tx(held, frontier, open, self.config.batch_max_events as usize)
    }

    /// One attempt at one view transaction of what [`Projector::commit_ready`] commits, for the
    /// shutdown; the number of records committed.
    async fn try_commit_ready(&mut self, held: &mut Vec<Record>) -> Result<usize, BatchError> {
        let Some(records) = self.take_ready(held) else {
            return Ok(0);
        };
        self.write(&records).await?;
        let events = self.view_tx.as_ref().map_or(0, |v| v.events);
        self.commit_view_tx().await?;
        Ok(usize::try_from(events).unwrap_or(usize::MAX))
    }

    /// Writes `records` into the view transaction and, when `commit`, commits it, retrying what
    /// can be retried: from memory when every record of the transaction is still in hand, by
    /// reading the partitions again from the stored offsets when some are not. Ok(false) on
    /// shutdown.
    async fn apply(&mut self, records: Vec<Record>, commit: bool) -> Result<bool, Error> {
        loop {
            let attempt = async {
                self.write(&records).await?;
                if commit {
                    self.commit_view_tx().await?;
                } else if let Some(v) = &mut self.view_tx {
                    v.released = true;
                }
                Ok::<_, BatchError>(())
            }
            .await;
            let Err(error) = attempt else {
                return Ok(true);
            };
            let released = self.view_tx.as_ref().is_some_and(|v| v.released) || !commit;
            self.abandon().await;
            if !self.failed(error).await? {
                return Ok(false);
            }
            if released {
                // Read every partition again from the stored offsets (records held are read
                // again too).
                self.reread = true;
                self.positioned_generation = u64::MAX;
                return Ok(true);
            }
        }
    }

    /// Writes `records` into the view transaction, dead letters first. A range the database
    /// refuses for its data is halved, inside the transaction, until the event is alone; that one
    /// is dead-lettered.
    async fn write(&mut self, records: &[Record]) -> Result<(), BatchError> {
        self.ensure_dead_letter_topic().await?;
        let mut todo = Vec::new();
        todo.push(0..records.len());
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            let error = match self.write_chunk(&records[range.clone()], None).await {
                Ok(()) => continue,
                Err(e) => e,
            };
            let open = self.store.as_ref().is_some_and(Store::in_transaction);
            if error.remedy() != Remedy::Isolate || !open {
                return Err(error);
            }
            if range.len() > 1 {
                let mid = range.start + range.len() / 2;
                // Stack: the first half is written first, keeping the order.
                todo.push(mid..range.end);
                todo.push(range.start..mid);
                tracing::warn!(error = %service::error_chain(&error), events = range.len(),
                    "the database refused a batch; writing it in halves to find the event");
            } else {
                let reason = service::error_chain(&error);
                self.write_chunk(&records[range], Some(&reason)).await?;
            }
        }
        Ok(())
    }

    /// Writes `records` into the view transaction; with `refused`, only their offsets (the
    /// database refused them for that reason: they are dead-lettered).
    async fn write_chunk(
        &mut self,
        records: &[Record],
        refused: Option<&str>,
    ) -> Result<(), BatchError> {
        let items: Vec<Item> = records
            .iter()
            .map(|r| Item {
                partition: r.partition,
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                position: r.position,
                change: match refused {
                    Some(_) => None,
                    None => r.decoded.as_ref().ok().cloned(),
                },
            })
            .collect();
        let open = self.view_tx.is_some();
        let store = connected(&mut self.store, &self.config.database_url, &self.target).await?;
        if open && !store.in_transaction() {
            return Err(ApplyError::TransactionLost.into());
        }
        let bad = store.write(&items).await?;
        let letters: Vec<Letter<'_>> = match refused {
            Some(reason) => records
                .iter()
                .map(|r| letter(r, "database_refused", reason.to_owned()))
                .collect(),
            None => records
                .iter()
                .filter_map(|r| {
                    let e = r.decoded.as_ref().err()?;
                    Some(letter(r, e.kind(), e.to_string()))
                })
                .chain(
                    bad.iter()
                        .map(|(i, e)| letter(&records[*i], e.kind(), e.to_string())),
                )
                .collect(),
        };
        if !letters.is_empty() {
            match &self.dead_letters {
                Some(d) => d.send_all(&letters).await.map_err(BatchError::DeadLetter)?,
                None => not_applied(&letters),
            }
        }
        let v = self.view_tx.get_or_insert_with(ViewTx::new);
        v.dead += letters.len() as u64;
        v.events += records.len() as u64;
        for r in records {
            let next = v.next.entry(r.partition).or_insert(r.offset + 1);
            *next = (*next).max(r.offset + 1);
            if let Some(p) = r.position {
                let last = v.applied.entry(r.partition).or_insert(p);
                *last = (*last).max(p);
                v.through = v.through.max(Some(p.commit_lsn));
            }
        }
        Ok(())
    }

    /// Commits the view transaction with the partitions' `complete_lsn`.
    async fn commit_view_tx(&mut self) -> Result<(), BatchError> {
        let Some(v) = &self.view_tx else {
            return Ok(());
        };
        let completes = self.completes(&v.applied);
        let store = connected(&mut self.store, &self.config.database_url, &self.target).await?;
        if !store.in_transaction() {
            return Err(ApplyError::TransactionLost.into());
        }
        let outcome = store.commit(&completes).await?;
        let Some(v) = self.view_tx.take() else {
            return Ok(());
        };
        let m = self.metrics;
        m.events.fetch_add(v.events, Ordering::Relaxed);
        m.upserted
            .fetch_add(outcome.upserted as u64, Ordering::Relaxed);
        m.deleted
            .fetch_add(outcome.deleted as u64, Ordering::Relaxed);
        m.truncates
            .fetch_add(outcome.truncates as u64, Ordering::Relaxed);
        m.ignored
            .fetch_add(outcome.ignored as u64, Ordering::Relaxed);
        m.dead_lettered.fetch_add(v.dead, Ordering::Relaxed);
        if let Some(lsn) = outcome.last_lsn {
            m.last_applied_lsn.fetch_max(lsn, Ordering::Relaxed);
        }
        m.record_batch(v.started.elapsed());
        m.set_state(telemetry::State::Running);
        self.backoff.reset();
        self.completed(v.applied, &completes);
        self.commit_to_kafka(&v.next);
        Ok(())
    }

    /// Abandons the open view transaction, if any.
    async fn abandon(&mut self) {
        self.view_tx = None;
        if let Some(store) = &mut self.store {
            store.rollback().await;
        }
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

    /// The `complete_lsn` every positioned partition reaches once `written` (the last record of
    /// each partition in the view transaction) is applied, where it rises (see
    /// [`source_position`]).
    fn completes(&self, written: &HashMap<i32, RecordPosition>) -> Vec<Complete> {
        let Some(follower) = &self.follower else {
            return Vec::new();
        };
        let mut completes = Vec::new();
        for (&partition, cursor) in &self.positions {
            let last = written
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
        completes
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
        // (A view transaction open on the connection would take these writes in.)
        if self.follower.is_none() || self.positions.is_empty() || self.view_tx.is_some() {
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
        let completes = self.completes(&HashMap::new());
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

    /// Mirrors the committed offsets (`applied`: the next offset of each partition) to Kafka,
    /// for lag tools; the views' copy is the one used.
    /// One commit at a time, at most every [`KAFKA_COMMIT_EVERY`]: librdkafka does not rejoin the
    /// group after losing it until every commit it holds has ended, and commits sent to a broker
    /// that stopped answering (paused, partitioned) end only after their retries time out, so
    /// a commit per batch kept a projector out of its group for minutes.
    fn commit_to_kafka(&mut self, applied: &BTreeMap<i32, i64>) {
        for (&partition, &next) in applied {
            self.metrics.set_applied(partition, next);
            if self.bounds.is_none() {
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

    fn record(partition: i32, offset: i64, commit_lsn: Option<u64>) -> Record {
        Record {
            partition,
            offset,
            timestamp_ms: None,
            position: commit_lsn.map(|commit_lsn| RecordPosition {
                commit_lsn,
                event_index: 0,
                sub: 0,
            }),
            key: None,
            value: None,
            decoded: Ok(Change::Tombstone),
        }
    }

    #[test]
    fn records_are_taken_in_each_partitions_order_up_to_the_first_held_back() {
        let mut held = vec![
            record(0, 1, Some(10)),
            record(1, 1, Some(10)),
            record(0, 2, Some(30)),
            record(1, 2, Some(20)),
            // Ready, but after a record of its partition held back.
            record(0, 3, None),
            record(1, 3, Some(25)),
        ];
        let taken = take_prefix(&mut held, |r| ready(r, Some(30)));
        let at = |rs: &[Record]| {
            rs.iter()
                .map(|r| (r.partition, r.offset))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(&taken), [(0, 1), (1, 1), (1, 2), (1, 3)]);
        assert_eq!(at(&held), [(0, 2), (0, 3)]);
        // Without a frontier (a replay) everything is ready.
        assert_eq!(take_prefix(&mut held, |r| ready(r, None)).len(), 2);
        assert!(held.is_empty());
    }

    #[test]
    fn view_transactions_take_whole_transactions_up_to_the_limit() {
        let at = |rs: &[Record]| {
            rs.iter()
                .map(|r| (r.partition, r.offset))
                .collect::<Vec<_>>()
        };
        // Three transactions of three records each on one partition; at most 4 records: the
        // first transaction only (the second would pass the limit).
        let mut held: Vec<Record> = (0..9)
            .map(|i| record(0, i, Some(10 * (1 + i as u64 / 3))))
            .collect();
        let taken = take_view_tx(&mut held, Some(100), None, 4).unwrap();
        assert_eq!(at(&taken), [(0, 0), (0, 1), (0, 2)]);
        // A transaction larger than the limit is taken whole.
        let taken = take_view_tx(&mut held, Some(100), None, 2).unwrap();
        assert_eq!(taken.len(), 3);
        // Nothing at or past the frontier.
        assert!(take_view_tx(&mut held, Some(30), None, 10).is_none());
        assert_eq!(held.len(), 3);
    }

    #[test]
    fn an_open_view_transaction_commits_with_every_record_of_its_transactions() {
        // Parts of transactions 150 and 200 written (through 200); partition 1 then brings 6
        // records of 150 and 2 of 200. With a limit of 1 the commit still takes all of them.
        let mut held: Vec<Record> = (0..6)
            .map(|i| record(1, i, Some(150)))
            .chain((6..8).map(|i| record(1, i, Some(200))))
            .collect();
        let taken = take_view_tx(&mut held, Some(250), Some(Some(200)), 1).unwrap();
        assert_eq!(taken.len(), 8);
        // Not before every partition is complete past it.
        let mut held = vec![record(1, 0, Some(150))];
        assert!(take_view_tx(&mut held, Some(200), Some(Some(200)), 1).is_none());
        // An open transaction with nothing more to add is committed (empty list).
        let mut held = Vec::new();
        assert_eq!(
            take_view_tx(&mut held, Some(250), Some(Some(200)), 1).map(|r| r.len()),
            Some(0)
        );
    }

    #[test]
    fn ready_records_behind_one_held_back_give_nothing_to_commit() {
        // A record without a position after one not yet complete: nothing to take (an empty
        // view transaction would be committed over and over).
        let mut held = vec![record(0, 0, Some(200)), record(0, 1, None)];
        assert!(take_view_tx(&mut held, Some(150), None, 10).is_none());
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn dead_letter_failures_are_retried() {
        let e = BatchError::DeadLetter(KafkaError::Canceled);
        assert_eq!(e.remedy(), Remedy::Retry);
        let e = BatchError::Apply(ApplyError::BadLsn("x".into()));
        assert_eq!(e.remedy(), Remedy::Halt);
    }
}
