//! Publishing to Kafka with acknowledgement tracking, without duplicates across restarts.
//!
//! Records are sent asynchronously (many in flight, no round trip per record) by an idempotent
//! producer (`enable.idempotence=true`, `acks=all`). Every send and every transaction end is queued
//! in stream order; the queue is drained in that order, so when a transaction-end marker comes out,
//! Kafka has acknowledged every record of that transaction and of every transaction before it. That
//! end LSN, and only that, may be confirmed to PostgreSQL.
//!
//! No duplicates: a change sent but not yet confirmed when a session ends is streamed again by the
//! next one. Each record carries its [`RecordPosition`] (header `cdc.position`), and the reader
//! chooses each record's partition itself (murmur2 of the key, as Java clients do), so at the start
//! of a session [`Publisher::learn_tails`] reads the last record of every partition and `send`
//! skips every record at or below it. That is exact because two things hold: one reader owns a slot
//! (the advisory lock of `setup::lock_slot`), and within a partition records are written in
//! position order (one producer, idempotent, in stream order, and a session starts only after the
//! previous one's records were all settled, see [`Publisher::settle`]).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use service::kafka::TracingContext;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::decode::Lsn;
use crate::envelope::{Record, RecordPosition};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("creating the Kafka client failed")]
    Client(#[source] KafkaError),
    #[error("creating topic {topic} failed")]
    CreateTopic {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("reading the partitions of topic {topic} failed")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("Kafka did not accept a record")]
    Delivery(#[source] KafkaError),
    #[error("the producer went away before reporting a delivery")]
    Cancelled,
    #[error("reading the last record of {topic} [{partition}] failed")]
    Tail {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("reading {topic} [{partition}] back failed")]
    ReadBack {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
}

/// Producer settings: brokers plus librdkafka properties that override the defaults.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub overrides: Vec<(String, String)>,
    pub topic_partitions: i32,
    /// -1: the broker's `default.replication.factor`.
    pub topic_replication_factor: i32,
    /// Settings of the topics the reader creates (`retention.ms`, `cleanup.policy`, ...).
    pub topic_config: Vec<(String, String)>,
}

type Pending = BoxFuture<'static, Result<Option<Lsn>, PublishError>>;

/// Sends records and reports, in stream order, which transaction ends Kafka fully acknowledged.
pub struct Publisher {
    producer: FutureProducer<TracingContext>,
    pending: FuturesOrdered<Pending>,
    records_in_flight: usize,
    partitions: HashMap<String, i32>,
    /// Highest transaction end released while `send` waited for room in librdkafka's queue.
    released: Option<Lsn>,
    /// Per (topic, partition): the position of the last record already there, at session start.
    tails: HashMap<(String, i32), RecordPosition>,
    /// Records skipped because their partition already had them.
    pub skipped: u64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("records_in_flight", &self.records_in_flight)
            .finish_non_exhaustive()
    }
}

/// The producer settings of the reader (public for the benchmark's produce limit).
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("compression.type", "lz4")
        // The reader picks partitions itself (see `partition_of`); this only makes any record
        // without one land where a Java producer would put it.
        .set("partitioner", "murmur2_random")
        // A record is delivered or failed within this; a session end waits that long at most
        // (stream::SETTLE_LIMIT) so none of its records lands after the next session began.
        .set("message.timeout.ms", "50000");
    for (k, v) in &settings.overrides {
        config.set(k, v);
    }
    config
}

impl Publisher {
    pub fn new(settings: &KafkaSettings) -> Result<Self, PublishError> {
        let producer = client_config(settings)
            .create_with_context(TracingContext)
            .map_err(PublishError::Client)?;
        Ok(Publisher {
            producer,
            pending: FuturesOrdered::new(),
            records_in_flight: 0,
            partitions: HashMap::new(),
            released: None,
            tails: HashMap::new(),
            skipped: 0,
        })
    }

    /// Records sent and not yet acknowledged.
    pub fn records_in_flight(&self) -> usize {
        self.records_in_flight
    }

    /// True when nothing (record or marker) is waiting.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Queues `record` for sending (to every partition when it asks for that), unless its
    /// partition already has it (see [`Publisher::learn_tails`]).
    pub async fn send(&mut self, record: Record) -> Result<(), PublishError> {
        let n = self.partition_count(&record.topic).await?;
        if record.all_partitions {
            for p in 0..n {
                self.send_one(&record, p).await?;
            }
            Ok(())
        } else {
            let p = partition_of(record.key.as_deref().unwrap_or_default(), n);
            self.send_one(&record, p).await
        }
    }

    async fn send_one(&mut self, record: &Record, partition: i32) -> Result<(), PublishError> {
        if !self.tails.is_empty() {
            let tail_key = (record.topic.clone(), partition);
            if let Some(tail) = self.tails.get(&tail_key) {
                if record.position <= *tail {
                    self.skipped += 1;
                    return Ok(());
                }
                // Past the tail: everything after is new in this partition.
                tracing::info!(topic = %record.topic, partition, skipped = self.skipped,
                    "caught up with what the partition already had; publishing again");
                self.tails.remove(&tail_key);
            }
        }
        let position = record.position.header_value();
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic)
            .partition(partition)
            .headers(OwnedHeaders::new().insert(Header {
                key: RecordPosition::HEADER,
                value: Some(position.as_str()),
            }));
        if let Some(key) = &record.key {
            r = r.key(key);
        }
        if let Some(value) = &record.value {
            r = r.payload(value);
        }
        // A full local queue (too many records or bytes waiting) is back-pressure: wait for the
        // oldest delivery, keep any transaction end it releases, and try again.
        let delivery = loop {
            match self.producer.send_result(r) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if !self.pending.is_empty() =>
                {
                    r = back;
                    if let Some(lsn) = self.next_ack().await? {
                        self.released = Some(self.released.map_or(lsn, |l| l.max(lsn)));
                    }
                }
                Err((e, _)) => return Err(PublishError::Delivery(e)),
            }
        };
        self.records_in_flight += 1;
        self.pending.push_back(
            delivery
                .map(|outcome| match outcome {
                    Ok(Ok(_)) => Ok(None),
                    Ok(Err((e, _))) => Err(PublishError::Delivery(e)),
                    Err(_) => Err(PublishError::Cancelled),
                })
                .boxed(),
        );
        Ok(())
    }

    /// The highest transaction end released while `send` waited for room, once.
    pub fn take_released(&mut self) -> Option<Lsn> {
        self.released.take()
    }

    /// Marks the end of a transaction whose records were all sent.
    pub fn commit(&mut self, end_lsn: Lsn) {
        self.pending
            .push_back(futures_util::future::ready(Ok(Some(end_lsn))).boxed());
    }

    /// Waits for the next queued item: `Some(lsn)` when a transaction end is reached (everything up
    /// to it acknowledged), `None` for an acknowledged record. Pending forever when idle.
    pub async fn next_ack(&mut self) -> Result<Option<Lsn>, PublishError> {
        match self.pending.next().await {
            Some(result) => {
                if matches!(result, Ok(None) | Err(_)) {
                    self.records_in_flight = self.records_in_flight.saturating_sub(1);
                }
                result
            }
            None => std::future::pending().await,
        }
    }

    /// The partition count of each of `topics`, as the cluster says now (and this publisher keeps
    /// using for its session).
    pub async fn partition_counts(
        &mut self,
        topics: &[String],
    ) -> Result<Vec<(String, i32)>, PublishError> {
        let mut counts = Vec::with_capacity(topics.len());
        for topic in topics {
            counts.push((topic.clone(), self.partition_count(topic).await?));
        }
        Ok(counts)
    }

    async fn partition_count(&mut self, topic: &str) -> Result<i32, PublishError> {
        if let Some(&n) = self.partitions.get(topic) {
            return Ok(n);
        }
        let producer = self.producer.clone();
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))
        })
        .await
        .map_err(|_| PublishError::Cancelled)?
        .map_err(|source| PublishError::Metadata {
            topic: topic.to_owned(),
            source,
        })?;
        let n = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        let n = i32::try_from(n).unwrap_or(i32::MAX);
        if n == 0 {
            return Err(PublishError::Metadata {
                topic: topic.to_owned(),
                source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
            });
        }
        self.partitions.insert(topic.to_owned(), n);
        Ok(n)
    }

    /// Reads the last record of every partition of `topics`; `send` then skips what is already
    /// there. Call with nothing in flight (a fresh publisher). Returns how many partitions had one.
    pub async fn learn_tails(
        &mut self,
        settings: &KafkaSettings,
        topics: &[String],
    ) -> Result<usize, PublishError> {
        let mut work = Vec::new();
        for topic in topics {
            let n = self.partition_count(topic).await?;
            work.extend((0..n).map(|p| (topic.clone(), p)));
        }
        // A reader killed without a chance to settle may still have produce requests on their
        // way into the broker: read until the ends stay put for a moment.
        let mut tails = HashMap::new();
        for round in 0..10 {
            let brokers = settings.brokers.clone();
            let work = work.clone();
            let now = tokio::task::spawn_blocking(move || read_tails(&brokers, &work))
                .await
                .map_err(|_| PublishError::Cancelled)??;
            if round > 0 && now == tails {
                break;
            }
            tails = now;
            tokio::time::sleep(TAIL_QUIET).await;
        }
        let found = tails.len();
        for ((topic, partition), position) in &tails {
            tracing::info!(topic, partition, last = %position.header_value(),
                "last record already in the partition; records up to it are not sent again");
        }
        self.tails = tails;
        Ok(found)
    }

    /// Where every partition of `topics` ends now (its high watermark), as (topic, partition,
    /// offset).
    pub async fn end_offsets(
        &mut self,
        settings: &KafkaSettings,
        topics: &[String],
    ) -> Result<Vec<(String, i32, i64)>, PublishError> {
        let mut work = Vec::new();
        for topic in topics {
            let n = self.partition_count(topic).await?;
            work.extend((0..n).map(|p| (topic.clone(), p)));
        }
        let brokers = settings.brokers.clone();
        tokio::task::spawn_blocking(move || {
            let consumer = reading_consumer(&brokers)?;
            work.into_iter()
                .map(|(topic, partition)| {
                    let (_, high) = consumer
                        .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                        .map_err(|source| PublishError::Tail {
                            topic: topic.clone(),
                            partition,
                            source,
                        })?;
                    Ok((topic, partition, high))
                })
                .collect()
        })
        .await
        .map_err(|_| PublishError::Cancelled)?
    }

    /// Forgets tails past `wal_end` (the database's current WAL position): such records come from
    /// another history of the database (a restored or re-created cluster), and skipping up to them
    /// would lose changes.
    pub fn forget_tails_after(&mut self, wal_end: Lsn) {
        self.tails.retain(|(topic, partition), tail| {
            let ours = tail.commit_lsn <= wal_end;
            if !ours {
                tracing::warn!(topic, partition, tail = %tail.header_value(), wal_end,
                    "the partition ends with a record from past this database's WAL (another \
                     history?); not de-duplicating against it");
            }
            ours
        });
    }

    /// Waits up to `timeout` until every record handed to librdkafka is delivered or failed, so
    /// that nothing of this publisher lands in Kafka after the next session read the tails.
    pub fn settle(&self, timeout: Duration) -> impl std::future::Future<Output = ()> + Send {
        let producer = self.producer.clone();
        async move {
            let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
            if !matches!(flushed, Ok(Ok(()))) {
                tracing::warn!("records still in flight after {timeout:?}; a duplicate may follow");
            }
        }
    }

    /// Waits up to `timeout` for librdkafka to deliver what it holds (on shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, "not every record was delivered before shutdown; they will be re-read from the slot");
        }
    }
}

/// How long the partitions' ends must stay put before a session trusts them.
const TAIL_QUIET: Duration = Duration::from_millis(500);

/// The partition of a keyed record among `n`: murmur2 of the key, as Java's default partitioner.
pub fn partition_of(key: &[u8], n: i32) -> i32 {
    let n = n.max(1);
    #[allow(clippy::cast_possible_wrap)]
    let positive = (murmur2(key) & 0x7fff_ffff) as i32;
    positive % n
}

/// Kafka's murmur2 (seed 0x9747b28c), as in the Java client's `Utils.murmur2`.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    #[allow(clippy::cast_possible_truncation)]
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// A consumer that reads assigned partitions and commits nothing; it reports where each partition
/// ends (`enable.partition.eof`), so a read knows it is done without counting offsets.
fn reading_consumer(brokers: &str) -> Result<BaseConsumer<TracingContext>, PublishError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "cdc-reader-tail")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create_with_context(TracingContext)
        .map_err(PublishError::Client)
}

/// Longest wait for the next record or end of partition while reading back.
const READ_STALL: Duration = Duration::from_secs(30);

/// Reads each of `topic`'s partitions in `starts` from its offset to its end, as the broker reports
/// it (offset gaps from compaction or transaction markers need no arithmetic), handing every record
/// to `f` in offset order within its partition. Blocking.
fn read_to_end(
    consumer: &BaseConsumer<TracingContext>,
    topic: &str,
    starts: &[(i32, i64)],
    mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), (i32, KafkaError)> {
    let Some(&(first, _)) = starts.first() else {
        return Ok(());
    };
    let mut tpl = TopicPartitionList::new();
    for (partition, from) in starts {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*from))
            .map_err(|e| (*partition, e))?;
    }
    consumer.assign(&tpl).map_err(|e| (first, e))?;
    let mut open: std::collections::HashSet<i32> = starts.iter().map(|(p, _)| *p).collect();
    let mut progress = std::time::Instant::now();
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if open.contains(&m.partition()) => {
                f(&m);
                progress = std::time::Instant::now();
            }
            // A partition already read to its end: neither handed on nor progress.
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
                progress = std::time::Instant::now();
            }
            Some(Err(e)) => return Err((first, e)),
            None if progress.elapsed() > READ_STALL => {
                let p = open.iter().next().copied().unwrap_or(first);
                return Err((
                    p,
                    KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut),
                ));
            }
            None => {}
        }
    }
    consumer.unassign().map_err(|e| (first, e))
}

/// Reads every record of each `(topic, partition)` from its offset to its end and folds it into
/// `state` with `f` (in offset order within a partition): topic, key, value, position.
pub async fn read_back<S, F>(
    settings: &KafkaSettings,
    starts: Vec<(String, i32, i64)>,
    mut state: S,
    f: F,
) -> Result<S, PublishError>
where
    S: Send + 'static,
    F: Fn(&mut S, &str, Option<&[u8]>, Option<&[u8]>, Option<RecordPosition>) + Send + 'static,
{
    let brokers = settings.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let consumer = reading_consumer(&brokers)?;
        let mut by_topic: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
        for (topic, partition, from) in starts {
            by_topic.entry(topic).or_default().push((partition, from));
        }
        for (topic, starts) in &by_topic {
            read_to_end(&consumer, topic, starts, |m| {
                f(&mut state, topic, m.key(), m.payload(), tail_position(m));
            })
            .map_err(|(partition, source)| PublishError::ReadBack {
                topic: topic.clone(),
                partition,
                source,
            })?;
        }
        Ok(state)
    })
    .await
    .map_err(|_| PublishError::Cancelled)?
}

/// The position of the last record of each `(topic, partition)` that has one. Blocking.
fn read_tails(
    brokers: &str,
    partitions: &[(String, i32)],
) -> Result<HashMap<(String, i32), RecordPosition>, PublishError> {
    let consumer = reading_consumer(brokers)?;
    let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
    for (topic, partition) in partitions {
        by_topic.entry(topic).or_default().push(*partition);
    }
    let mut tails = HashMap::new();
    let mut unmarked = Vec::new();
    for (topic, partitions) in by_topic {
        let err = |partition, source| PublishError::Tail {
            topic: topic.to_owned(),
            partition,
            source,
        };
        // Per non-empty partition: (low and high watermark, where to read from). The last record
        // is read from the offset before the end; where that holds none (a transaction marker,
        // say), the read starts twice as far back.
        let mut todo: HashMap<i32, (i64, i64, i64)> = HashMap::new();
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_err(|e| err(p, e))?;
            if high > low {
                todo.insert(p, (low, high, high - 1));
            }
        }
        while !todo.is_empty() {
            let starts: Vec<(i32, i64)> = todo.iter().map(|(p, (.., from))| (*p, *from)).collect();
            let mut last: HashMap<i32, Option<RecordPosition>> = HashMap::new();
            read_to_end(&consumer, topic, &starts, |m| {
                last.insert(m.partition(), tail_position(m));
            })
            .map_err(|(p, e)| err(p, e))?;
            let mut again = HashMap::new();
            for (p, (low, high, from)) in todo {
                match last.remove(&p) {
                    Some(Some(position)) => {
                        tails.insert((topic.to_owned(), p), position);
                    }
                    Some(None) => unmarked.push((topic.to_owned(), p)),
                    // Nothing from `from` to the end: records were deleted under the read, or
                    // only markers follow `from`.
                    None if from > low => {
                        again.insert(p, (low, high, (high - 2 * (high - from)).max(low)));
                    }
                    None => {}
                }
            }
            todo = again;
        }
    }
    for (topic, partition) in unmarked {
        tracing::warn!(topic, partition,
            "the last record of the partition carries no position (not written by this reader?); records after a restart may be sent twice");
    }
    Ok(tails)
}

/// The position a record carries: its `cdc.position` header, else `source` in its value.
fn tail_position<M: Message>(m: &M) -> Option<RecordPosition> {
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            if h.key == RecordPosition::HEADER {
                return std::str::from_utf8(h.value?)
                    .ok()
                    .and_then(RecordPosition::parse);
            }
        }
    }
    let value: serde_json::Value = serde_json::from_slice(m.payload()?).ok()?;
    let source = &value["source"];
    Some(RecordPosition {
        commit_lsn: source["commit_lsn"].as_u64()?,
        event_index: source["event_index"].as_u64()?,
        sub: 0,
    })
}

/// Creates each topic that does not exist yet.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[String],
) -> Result<(), PublishError> {
    let admin: AdminClient<TracingContext> = client_config(settings)
        .create_with_context(TracingContext)
        .map_err(PublishError::Client)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            settings.topic_config.iter().fold(
                NewTopic::new(
                    t,
                    settings.topic_partitions,
                    TopicReplication::Fixed(settings.topic_replication_factor),
                ),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(|source| PublishError::CreateTopic {
            topic: topics.join(","),
            source,
        })?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, partitions = settings.topic_partitions,
                replication_factor = settings.topic_replication_factor,
                config = ?settings.topic_config, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(PublishError::CreateTopic {
                    topic,
                    source: KafkaError::AdminOp(code),
                })
            }
        }
    }
    // A created topic reaches every broker's metadata a moment later; until then a producer asking
    // for its partitions is told it does not exist.
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            let missing = topics.iter().find(|topic| {
                admin
                    .inner()
                    .fetch_metadata(Some(topic), Duration::from_secs(10))
                    .ok()
                    .and_then(|m| {
                        let t = m.topics().iter().find(|t| t.name() == topic.as_str())?;
                        (t.error().is_none() && !t.partitions().is_empty()).then_some(())
                    })
                    .is_none()
            });
            let Some(topic) = missing else {
                return Ok(());
            };
            if started.elapsed() > Duration::from_secs(30) {
                return Err(PublishError::Metadata {
                    topic: topic.clone(),
                    source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .map_err(|_| PublishError::Cancelled)?
}

/// True for errors that retrying with a fresh producer can cure (broker away, timeouts, leader
/// changes). An answer that will be the same next time (a record or request the broker refuses,
/// missing authorization, a bad topic name or setting) halts the reader with the error instead of
/// retrying forever; nothing past the last acknowledged position was confirmed.
pub fn is_transient(err: &PublishError) -> bool {
    match err {
        PublishError::Client(_) => false,
        PublishError::Cancelled => true,
        PublishError::Delivery(e)
        | PublishError::CreateTopic { source: e, .. }
        | PublishError::Metadata { source: e, .. }
        | PublishError::Tail { source: e, .. }
        | PublishError::ReadBack { source: e, .. } => {
            // rdkafka gives no code for a failed admin operation; its code is inside.
            let code = match e {
                KafkaError::AdminOp(code) => Some(*code),
                e => e.rdkafka_error_code(),
            };
            !code.is_some_and(definite)
        }
    }
}

/// Broker answers that do not change by retrying.
fn definite(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidRecord
            | C::InvalidTopic
            | C::InvalidRequiredAcks
            | C::InvalidReplicationFactor
            | C::InvalidPartitions
            | C::InvalidConfig
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
            | C::UnsupportedCompressionType
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_answers_that_retrying_cannot_change_are_not_transient() {
        let delivery = |code| PublishError::Delivery(KafkaError::MessageProduction(code));
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
        ] {
            assert!(!is_transient(&delivery(code)), "{code:?}");
        }
        let create = |code| PublishError::CreateTopic {
            topic: "t".to_owned(),
            source: KafkaError::AdminOp(code),
        };
        assert!(!is_transient(&create(RDKafkaErrorCode::PolicyViolation)));
        assert!(!is_transient(&create(
            RDKafkaErrorCode::InvalidReplicationFactor
        )));
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert!(is_transient(&delivery(code)), "{code:?}");
        }
        assert!(is_transient(&PublishError::Cancelled));
    }

    #[test]
    fn murmur2_matches_the_java_client() {
        // Vectors of Kafka's UtilsTest.testMurmur2 (signed 32-bit results).
        for (input, expected) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            #[allow(clippy::cast_possible_wrap)]
            let got = murmur2(input.as_bytes()) as i32;
            assert_eq!(got, expected, "{input}");
        }
    }

    #[test]
    fn partitions_spread_and_stay_in_range() {
        let mut seen = [0; 6];
        for id in 0..600 {
            let key = format!("{{\"id\":{id}}}");
            let p = partition_of(key.as_bytes(), 6);
            assert_eq!(p, partition_of(key.as_bytes(), 6), "deterministic");
            seen[usize::try_from(p).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        assert_eq!(partition_of(b"", 1), 0);
    }

    #[test]
    fn record_positions_order_and_round_trip() {
        let a = RecordPosition {
            commit_lsn: 10,
            event_index: 3,
            sub: 0,
        };
        let tombstone = RecordPosition { sub: 1, ..a };
        let next = RecordPosition {
            commit_lsn: 10,
            event_index: 4,
            sub: 0,
        };
        assert!(a < tombstone && tombstone < next);
        assert_eq!(
            RecordPosition::parse(&tombstone.header_value()),
            Some(tombstone)
        );
        for bad in ["", "1:2", "1:2:3:4", "x:1:0", "1:2:300"] {
            assert_eq!(RecordPosition::parse(bad), None, "{bad}");
        }
    }
}
