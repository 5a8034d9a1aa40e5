//! Publishing to Kafka: records of whole source transactions, committed in Kafka transactions
//! together with the reader's resume position.
//!
//! **Exactly once** (the default, [`Delivery::ExactlyOnce`]). The producer is transactional; its
//! `transactional.id` is derived from the slot, so a restarted reader (or a second one) fences the
//! old producer and aborts what it left open. Records go out asynchronously inside an open Kafka
//! transaction, which many source transactions share; the stream commits it (see
//! [`Publisher::commit`]) together with a record in the position topic that says where the stream
//! resumes: the end LSN of the last source transaction wholly inside, and, when a very large source
//! transaction was split across Kafka transactions, the position of its last record already in.
//! A consumer with `isolation.level=read_committed` sees either all of a Kafka transaction or none
//! of it. Only after the commit is the end LSN confirmed to PostgreSQL. A session that fails aborts
//! its transaction; the next one reads the committed position ([`Publisher::committed`]) and
//! resumes from there, skipping records at or below a split position: nothing is lost, nothing is
//! doubled, whatever the broker did meanwhile (paused, failed over, records timed out).
//!
//! **At least once** ([`Delivery::AtLeastOnce`], for brokers without transactions). The same
//! batches, idempotent producer only: a batch ends by waiting until every record of it is
//! delivered. After a failure the next session sends again what was not confirmed: nothing is
//! lost, records may appear twice.
//!
//! Every record's partition is chosen here ([`crate::partition`]), where a Java producer puts its
//! key, so the position committed with a transaction can say which record is the last one of
//! each partition so far: a consumer that has read every partition that far has every source
//! transaction ending at or before the position, whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

use service::kafka::TracingContext;

use crate::decode::Lsn;
use change_event::ReaderPosition;

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
    #[error("{action} the Kafka transaction failed")]
    Transaction {
        action: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("the producer went away before reporting a delivery")]
    Cancelled,
    #[error("reading {topic} [{partition}] back failed")]
    ReadBack {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("the committed position of {key} in {topic} is not readable: {value:?}")]
    Position {
        topic: String,
        key: String,
        value: String,
    },
}

/// What a committed Kafka batch guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Delivery {
    // Kafka transactions with the resume position inside: every change once. (Plain comments:
    // documented variants would change the layout of `--help`, which tests and docs read.)
    ExactlyOnce,
    // Idempotent producer only, for brokers without transactions: every change at least once.
    AtLeastOnce,
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
    pub delivery: Delivery,
    /// The producer's `transactional.id`, which is also the key of its committed position.
    pub transactional_id: String,
    /// The compacted topic that holds committed positions.
    pub position_topic: String,
    /// Least time between a commit's return and the next transaction (see
    /// `--transaction-gap-ms`).
    pub transaction_gap: Duration,
}

/// The last record sent to each (topic, partition).
pub type Lasts = BTreeMap<(String, i32), RecordPosition>;

/// Where a stream resumes, as committed with the records it covers. The record in the position
/// topic also names the last record of every partition so far ([`change_event::ReaderPosition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// End LSN of the last source transaction wholly in Kafka: streaming resumes here.
    pub end_lsn: Lsn,
    /// Set when the source transaction after `end_lsn` was split: its records up to this one are
    /// in Kafka and are not sent again.
    pub position: Option<RecordPosition>,
}

impl Committed {
    /// The position record's value.
    fn to_json(self, key: &str, lasts: &Lasts) -> Vec<u8> {
        ReaderPosition {
            end_lsn: self.end_lsn,
            split: self.position,
            partitions: lasts.clone(),
        }
        .to_json(key)
    }

    fn parse(value: &[u8]) -> Option<(Self, Lasts)> {
        let p = ReaderPosition::parse(value)?;
        Some((
            Committed {
                end_lsn: p.end_lsn,
                position: p.split,
            },
            p.partitions,
        ))
    }
}

/// The producer's context: librdkafka's logs into `tracing`, and the first failed delivery kept
/// (the batch it belongs to must not be confirmed).
#[derive(Debug, Default)]
pub struct DeliveryContext {
    failures: AtomicU64,
    first_failure: Mutex<Option<KafkaError>>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        service::kafka::log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        service::kafka::client_error(&error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        if let Err((error, _)) = result {
            if self.failures.fetch_add(1, Ordering::Relaxed) == 0 {
                *service::lock(&self.first_failure) = Some(error.clone());
            }
        }
    }
}

impl DeliveryContext {
    /// The first failed delivery, if any record failed.
    fn failure(&self) -> Option<PublishError> {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let first = service::lock(&self.first_failure).clone();
        Some(PublishError::Delivery(first.unwrap_or(
            KafkaError::MessageProduction(RDKafkaErrorCode::Fail),
        )))
    }
}

type Client = ThreadedProducer<DeliveryContext>;

/// The open Kafka transaction (or, at least once, the unconfirmed batch).
#[derive(Debug)]
struct Open {
    began: Instant,
    records: usize,
}

/// A commit under way on a blocking thread, and the records handed over meanwhile: they go into
/// the next transaction once it is done.
#[derive(Debug)]
struct Committing {
    done: tokio::task::JoinHandle<Result<(), KafkaError>>,
    records: usize,
    waiting: Vec<Record>,
    /// What it commits: the position and the last record of every partition.
    position: Committed,
    lasts: Lasts,
}

/// Sends records in Kafka transactions (see the module documentation).
pub struct Publisher {
    producer: Arc<Client>,
    delivery: Delivery,
    transactional_id: String,
    position_topic: String,
    partitions: HashMap<String, i32>,
    open: Option<Open>,
    committing: Option<Committing>,
    /// Records handed over while the last commit ran, to send now.
    waiting: Vec<Record>,
    /// A commit failed: the transaction is to be aborted.
    failed: bool,
    /// Records at or below this position are in Kafka already (a split source transaction).
    skip_through: Option<RecordPosition>,
    /// Records not sent because the committed position says Kafka has them.
    pub skipped: u64,
    /// The last position committed, and the last record of each partition then.
    committed: Option<Committed>,
    committed_lasts: Lasts,
    /// When the next transaction may begin: [`KafkaSettings::transaction_gap`] after the last
    /// commit returned.
    next_begin: Option<Instant>,
    transaction_gap: Duration,
    /// The last record of each partition sent so far (committed, being committed or open).
    sent_lasts: Lasts,
    /// Whether those name every partition's last record (see [`Publisher::learn_lasts`]).
    lasts_known: bool,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("delivery", &self.delivery)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

/// The idempotent producer settings every reader producer starts from (public for the benchmark's
/// produce limit).
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A commit waits for every record of its transaction to be acknowledged, and that wait
        // does not cut the linger short (rdkafka's flush would, in 100 ms polls, see
        // `wait_delivered`): records go out at once, and those produced while requests are in
        // flight still form batches.
        .set("linger.ms", "0")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "50000");
    for (k, v) in &settings.overrides {
        config.set(k, v);
    }
    config
}

/// How long a commit (or, at least once, the wait for a batch's deliveries) may take.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

impl Publisher {
    /// A producer for one session. Exactly once, it registers its `transactional.id`, which
    /// fences any earlier producer of the same id and ends (aborts) what that one left open.
    pub async fn new(settings: &KafkaSettings) -> Result<Self, PublishError> {
        let mut config = client_config(settings);
        if settings.delivery == Delivery::ExactlyOnce {
            config
                .set("transactional.id", &settings.transactional_id)
                .set("transaction.timeout.ms", "60000");
        }
        let producer: Client = config
            .create_with_context(DeliveryContext::default())
            .map_err(PublishError::Client)?;
        let producer = Arc::new(producer);
        if settings.delivery == Delivery::ExactlyOnce {
            let p = producer.clone();
            blocking(move || p.init_transactions(COMMIT_TIMEOUT))
                .await?
                .map_err(|source| PublishError::Transaction {
                    action: "registering the transactional id of",
                    source,
                })?;
        }
        Ok(Publisher {
            producer,
            delivery: settings.delivery,
            transactional_id: settings.transactional_id.clone(),
            position_topic: settings.position_topic.clone(),
            partitions: HashMap::new(),
            open: None,
            committing: None,
            waiting: Vec::new(),
            failed: false,
            skip_through: None,
            skipped: 0,
            committed: None,
            committed_lasts: Lasts::new(),
            next_begin: None,
            transaction_gap: settings.transaction_gap,
            sent_lasts: Lasts::new(),
            lasts_known: false,
        })
    }

    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The position committed last with this publisher's `transactional.id` (exactly once; at
    /// least once there is none). Read after [`Publisher::new`], when nothing of an earlier
    /// producer is open any more.
    pub async fn committed(
        &mut self,
        settings: &KafkaSettings,
    ) -> Result<Option<Committed>, PublishError> {
        if self.delivery != Delivery::ExactlyOnce {
            return Ok(None);
        }
        let key = self.transactional_id.clone();
        let topic = self.position_topic.clone();
        let brokers = settings.brokers.clone();
        let partitions = self.partition_count(&topic).await?;
        let read = blocking(move || {
            let consumer = reading_consumer(&brokers)?;
            let starts: Vec<(i32, i64)> = (0..partitions).map(|p| (p, 0)).collect();
            let mut last: Option<Option<Vec<u8>>> = None;
            read_to_end(&consumer, &topic, &starts, |m| {
                if m.key() == Some(key.as_bytes()) {
                    last = Some(m.payload().map(<[u8]>::to_vec));
                }
            })
            .map_err(|(partition, source)| PublishError::ReadBack {
                topic: topic.clone(),
                partition,
                source,
            })?;
            match last {
                None | Some(None) => Ok(None),
                Some(Some(value)) => {
                    // Positions of readers before they named partitions name none.
                    let named = serde_json::from_slice::<serde_json::Value>(&value)
                        .is_ok_and(|v| v.get("partitions").is_some());
                    Committed::parse(&value)
                        .map(|(position, lasts)| Some((position, lasts, named)))
                        .ok_or_else(|| PublishError::Position {
                            topic: topic.clone(),
                            key: key.clone(),
                            value: String::from_utf8_lossy(&value).into_owned(),
                        })
                }
            }
        })
        .await??;
        let Some((position, lasts, named)) = read else {
            return Ok(None);
        };
        self.lasts_known = named;
        self.committed = Some(position);
        self.committed_lasts.clone_from(&lasts);
        self.sent_lasts = lasts;
        Ok(Some(position))
    }

    /// When the committed position does not name the last record of every partition (there is
    /// none, though the topics may hold records: another delivery mode, a new transactional id;
    /// or an older reader wrote it), reads each partition's last record: a position that named
    /// only the partitions this session writes would tell consumers the others are complete.
    pub async fn learn_lasts(
        &mut self,
        settings: &KafkaSettings,
        topics: &[String],
    ) -> Result<(), PublishError> {
        if self.delivery != Delivery::ExactlyOnce || self.lasts_known {
            return Ok(());
        }
        let mut work = Vec::new();
        for topic in topics {
            let n = self.partition_count(topic).await?;
            work.extend((0..n).map(|p| (topic.clone(), p)));
        }
        let brokers = settings.brokers.clone();
        let found = blocking(move || {
            let consumer = reading_consumer(&brokers)?;
            let mut found = Lasts::new();
            for (topic, partition) in work {
                if let Some(last) = last_record_position(&consumer, &topic, partition)? {
                    found.insert((topic, partition), last);
                }
            }
            Ok::<_, PublishError>(found)
        })
        .await??;
        tracing::info!(
            partitions = found.len(),
            "the committed position named no partitions: read their last records"
        );
        for (k, last) in found {
            let sent = self.sent_lasts.entry(k.clone()).or_insert(last);
            *sent = (*sent).max(last);
            let committed = self.committed_lasts.entry(k).or_insert(last);
            *committed = (*committed).max(last);
        }
        self.lasts_known = true;
        Ok(())
    }

    /// Records at or below `position` are not sent (Kafka has them from a split transaction).
    pub fn skip_through(&mut self, position: Option<RecordPosition>) {
        self.skip_through = position;
    }

    /// The end LSN of the last committed position, if any.
    pub fn committed_end(&self) -> Option<Lsn> {
        self.committed.map(|c| c.end_lsn)
    }

    /// Exactly once, with nothing open: begins committing a Kafka transaction that holds only
    /// `position` (its outcome through [`Publisher::commit_done`]). An idle stream's position
    /// moves on so, and readers of the position topic learn that nothing else committed
    /// before it.
    pub async fn begin_position_commit(&mut self, position: Committed) -> Result<(), PublishError> {
        if self.delivery != Delivery::ExactlyOnce || !self.is_idle() {
            return Ok(());
        }
        self.begin().await?;
        self.begin_commit(Some(position)).await
    }

    /// Records sent in the open transaction.
    pub fn open_records(&self) -> usize {
        self.open.as_ref().map_or(0, |o| o.records)
    }

    /// How long the open transaction has been open.
    pub fn open_for(&self) -> Duration {
        self.open
            .as_ref()
            .map_or(Duration::ZERO, |o| o.began.elapsed())
    }

    /// True when nothing is open, committing or waiting: everything sent is committed.
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.committing.is_none() && self.waiting.is_empty()
    }

    /// True while a transaction is open (records sent, no commit begun).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// True while a commit runs.
    pub fn is_committing(&self) -> bool {
        self.committing.is_some()
    }

    /// Records handed over while a commit runs, waiting for the next transaction.
    pub fn waiting_records(&self) -> usize {
        self.committing.as_ref().map_or(0, |c| c.waiting.len()) + self.waiting.len()
    }

    /// Sends `record` (to every partition when it asks for that) in the open transaction, opening
    /// one if none is, unless Kafka has it already (see [`Publisher::skip_through`]).
    pub async fn send(&mut self, record: Record) -> Result<(), PublishError> {
        if let Some(through) = self.skip_through {
            if record.position <= through {
                self.skipped += 1;
                return Ok(());
            }
            tracing::info!(skipped = self.skipped, position = %through.header_value(),
                "past the committed position inside a split transaction; publishing again");
            self.skip_through = None;
        }
        if let Some(committing) = &mut self.committing {
            committing.waiting.push(record);
            return Ok(());
        }
        let n = self.partition_count(&record.topic).await?;
        if record.all_partitions {
            for p in 0..n {
                self.send_one(&record, p).await?;
            }
            Ok(())
        } else {
            let p = crate::partition::of(record.key.as_deref(), record.position, n);
            self.send_one(&record, p).await
        }
    }

    /// Opens a transaction when none is: once [`KafkaSettings::transaction_gap`] has passed
    /// since the last commit (a transaction begun sooner may meet the last one's markers still
    /// being written, and wait 20 ms more).
    async fn begin(&mut self) -> Result<(), PublishError> {
        if self.open.is_none() {
            if self.delivery == Delivery::ExactlyOnce {
                if let Some(at) = self.next_begin.take().filter(|at| *at > Instant::now()) {
                    tokio::time::sleep_until(at.into()).await;
                }
                self.producer
                    .begin_transaction()
                    .map_err(|source| PublishError::Transaction {
                        action: "beginning",
                        source,
                    })?;
            }
            self.open = Some(Open {
                began: Instant::now(),
                records: 0,
            });
        }
        Ok(())
    }

    async fn send_one(&mut self, record: &Record, partition: i32) -> Result<(), PublishError> {
        let position = record.position.header_value();
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&record.topic)
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
        self.begin().await?;
        self.produce(r).await?;
        if let Some(open) = &mut self.open {
            open.records += 1;
        }
        // (A replay sends older records again: the last one a partition holds may be older than
        // what consumers were told of, but they applied that already.)
        let last = self
            .sent_lasts
            .entry((record.topic.clone(), partition))
            .or_insert(record.position);
        *last = (*last).max(record.position);
        Ok(())
    }

    /// Hands one record to librdkafka. A full local queue is back-pressure: wait for deliveries
    /// to make room (a failed one ends the batch).
    async fn produce(&self, mut r: BaseRecord<'_, [u8], [u8]>) -> Result<(), PublishError> {
        loop {
            if let Some(failure) = self.producer.context().failure() {
                return Err(failure);
            }
            match self.producer.send(r) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    r = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(PublishError::Delivery(e)),
            }
        }
        Ok(())
    }

    /// Begins ending the open batch: exactly once, writes `position` (where the stream resumes;
    /// `None` keeps the last one, as a snapshot does) with the last record of every partition
    /// into the position topic inside the transaction and starts committing it; at least once,
    /// starts waiting until every record of it is delivered. Either runs on a blocking thread:
    /// records sent meanwhile wait for the next transaction. [`Publisher::commit_done`] reports
    /// the outcome.
    pub async fn begin_commit(&mut self, position: Option<Committed>) -> Result<(), PublishError> {
        if self.committing.is_some() {
            return Ok(());
        }
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let position = position.or(self.committed).unwrap_or(Committed {
            end_lsn: 0,
            position: None,
        });
        let lasts = self.sent_lasts.clone();
        if self.delivery == Delivery::ExactlyOnce {
            let value = position.to_json(&self.transactional_id, &lasts);
            let key = self.transactional_id.as_bytes();
            let r = BaseRecord::to(&self.position_topic)
                .key(key)
                .payload(&value[..]);
            if let Err(e) = self.produce(r).await {
                self.failed = true;
                return Err(e);
            }
        }
        let producer = self.producer.clone();
        let delivery = self.delivery;
        let done = tokio::task::spawn_blocking(move || {
            wait_delivered(&producer, COMMIT_TIMEOUT)?;
            match delivery {
                Delivery::ExactlyOnce => producer.commit_transaction(COMMIT_TIMEOUT),
                Delivery::AtLeastOnce => Ok(()),
            }
        });
        self.committing = Some(Committing {
            done,
            records: open.records,
            waiting: Vec::new(),
            position,
            lasts,
        });
        Ok(())
    }

    /// Waits for the commit under way (pending forever when none is): the records it held, once
    /// Kafka has them all. Cancel-safe. Records that waited for it are sent by
    /// [`Publisher::send_waiting`].
    pub async fn commit_done(&mut self) -> Result<usize, PublishError> {
        let Some(committing) = &mut self.committing else {
            return std::future::pending().await;
        };
        let outcome = (&mut committing.done).await;
        let Some(committing) = self.committing.take() else {
            return Ok(0);
        };
        self.waiting = committing.waiting;
        let failure = self.producer.context().failure();
        match outcome {
            Ok(Ok(())) if failure.is_none() => {
                self.committed = Some(committing.position);
                self.next_begin = Some(Instant::now() + self.transaction_gap);
                self.committed_lasts = committing.lasts;
                Ok(committing.records)
            }
            Ok(result) => {
                self.failed = true;
                Err(failure.unwrap_or(PublishError::Transaction {
                    action: "committing",
                    source: result
                        .err()
                        .unwrap_or(KafkaError::MessageProduction(RDKafkaErrorCode::Fail)),
                }))
            }
            Err(_) => {
                self.failed = true;
                Err(PublishError::Cancelled)
            }
        }
    }

    /// Sends the records that waited for the last commit, in a new transaction.
    pub async fn send_waiting(&mut self) -> Result<(), PublishError> {
        for record in std::mem::take(&mut self.waiting) {
            self.send(record).await?;
        }
        Ok(())
    }

    /// Commits everything: the commit under way, what waited for it and what is open, with
    /// `position` (see [`Publisher::begin_commit`]). Returns the records committed.
    pub async fn commit(&mut self, position: Option<Committed>) -> Result<usize, PublishError> {
        let mut records = 0;
        if self.committing.is_some() {
            records += self.commit_done().await?;
            self.send_waiting().await?;
        }
        if self.open.is_some() {
            self.begin_commit(position).await?;
            records += self.commit_done().await?;
        }
        Ok(records)
    }

    /// Aborts what is open or failed to commit (a failed session's last act); at least once,
    /// drops what librdkafka still holds.
    pub async fn abort(&mut self) {
        let committing = self.committing.take();
        if let Some(c) = committing {
            // Its outcome no longer matters: what it held is aborted or sent again.
            let _ = c.done.await;
            self.failed = true;
        }
        self.waiting.clear();
        self.sent_lasts.clone_from(&self.committed_lasts);
        if self.open.take().is_some() || std::mem::take(&mut self.failed) {
            self.abort_open().await;
        }
    }

    async fn abort_open(&self) {
        let producer = self.producer.clone();
        let delivery = self.delivery;
        let aborted = blocking(move || match delivery {
            Delivery::ExactlyOnce => producer.abort_transaction(Duration::from_secs(10)),
            Delivery::AtLeastOnce => {
                producer.purge(rdkafka::producer::PurgeConfig::default().queue());
                producer.flush(Duration::from_secs(5))
            }
        })
        .await;
        if !matches!(aborted, Ok(Ok(()))) {
            tracing::warn!(
                "the open Kafka transaction could not be aborted now; the next session's producer \
                 aborts it when it registers (or the broker does after transaction.timeout.ms)"
            );
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
        let metadata = blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))
        })
        .await?
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
        blocking(move || {
            let consumer = reading_consumer(&brokers)?;
            work.into_iter()
                .map(|(topic, partition)| {
                    let (_, high) = consumer
                        .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                        .map_err(|source| PublishError::ReadBack {
                            topic: topic.clone(),
                            partition,
                            source,
                        })?;
                    Ok((topic, partition, high))
                })
                .collect()
        })
        .await?
    }
}

/// Waits until librdkafka holds nothing more of the producer: every record delivered (or failed)
/// and reported. rdkafka's own `flush`, which `commit_transaction` starts with, waits in polls of
/// up to 100 ms that the producer's polling thread, serving the same events, leaves empty: each
/// commit took 100 ms more than Kafka needed. Blocking.
fn wait_delivered(producer: &Client, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Runs a blocking Kafka client call off the runtime's worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PublishError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| PublishError::Cancelled)
}

/// A consumer that reads assigned partitions and commits nothing; it reports where each partition
/// ends (`enable.partition.eof`), so a read knows it is done without counting offsets.
fn reading_consumer(brokers: &str) -> Result<BaseConsumer<TracingContext>, PublishError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "cdc-reader-read-back")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create_with_context(TracingContext)
        .map_err(PublishError::Client)
}

/// The `cdc.position` of the last record of `topic` [`partition`] (read committed), reading
/// back from its end in growing windows (its last offsets may be transaction markers). Blocking.
fn last_record_position(
    consumer: &BaseConsumer<TracingContext>,
    topic: &str,
    partition: i32,
) -> Result<Option<RecordPosition>, PublishError> {
    let read_back = |source| PublishError::ReadBack {
        topic: topic.to_owned(),
        partition,
        source,
    };
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(read_back)?;
    let mut window = 16;
    loop {
        let from = low.max(high - window);
        let mut last = None;
        read_to_end(consumer, topic, &[(partition, from)], |m| {
            let position = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == RecordPosition::HEADER)
                    .and_then(|h| std::str::from_utf8(h.value?).ok())
                    .and_then(RecordPosition::parse)
            });
            last = position.or(last);
        })
        .map_err(|(_, source)| read_back(source))?;
        if last.is_some() || from <= low {
            return Ok(last);
        }
        window *= 8;
    }
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
                f(&mut state, topic, m.key(), m.payload(), record_position(m));
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

/// The position a record carries: its `cdc.position` header, else `source` in its value.
fn record_position<M: Message>(m: &M) -> Option<RecordPosition> {
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            if h.key == RecordPosition::HEADER {
                return std::str::from_utf8(h.value?)
                    .ok()
                    .and_then(RecordPosition::parse);
            }
        }
    }
    let value: serde_json::Value = change_event::parse(m.payload()?).ok()?;
    let source = &value["source"];
    Some(RecordPosition {
        commit_lsn: source["commit_lsn"].as_u64()?,
        event_index: source["event_index"].as_u64()?,
        sub: 0,
    })
}

/// Settings of the position topic: only the latest position per key matters, and the topic is
/// read from its start whenever a session begins, so it is compacted and kept in small segments.
const POSITION_TOPIC_CONFIG: [(&str, &str); 3] = [
    ("cleanup.policy", "compact"),
    ("segment.bytes", "8388608"),
    ("min.cleanable.dirty.ratio", "0.1"),
];

/// Creates each of `topics` (and, exactly once, the position topic) that does not exist yet.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[String],
) -> Result<(), PublishError> {
    let admin: AdminClient<TracingContext> = client_config(settings)
        .create_with_context(TracingContext)
        .map_err(PublishError::Client)?;
    let replication = || TopicReplication::Fixed(settings.topic_replication_factor);
    let mut new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            settings.topic_config.iter().fold(
                NewTopic::new(t, settings.topic_partitions, replication()),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let mut topics = topics.to_vec();
    if settings.delivery == Delivery::ExactlyOnce {
        new.push(POSITION_TOPIC_CONFIG.iter().fold(
            NewTopic::new(&settings.position_topic, 1, replication()),
            |topic, (k, v)| topic.set(k, v),
        ));
        topics.push(settings.position_topic.clone());
    }
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
            Ok(topic) => tracing::info!(
                topic,
                replication_factor = settings.topic_replication_factor,
                "created topic"
            ),
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
        PublishError::Client(_) | PublishError::Position { .. } => false,
        PublishError::Cancelled => true,
        PublishError::Delivery(e)
        | PublishError::CreateTopic { source: e, .. }
        | PublishError::Metadata { source: e, .. }
        | PublishError::Transaction { source: e, .. }
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
            | C::TransactionalIdAuthorizationFailed
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
    fn committed_positions_round_trip() {
        let at = |commit_lsn, event_index| RecordPosition {
            commit_lsn,
            event_index,
            sub: 0,
        };
        let lasts: Lasts = [
            (("users".to_owned(), 0), at(0x16B_3600, 2)),
            (("users".to_owned(), 2), at(0x16B_3748, 7)),
            (("orders".to_owned(), 0), at(0x16B_3500, 0)),
        ]
        .into_iter()
        .collect();
        for (position, lasts) in [
            (None, Lasts::new()),
            (
                Some(RecordPosition {
                    sub: 1,
                    ..at(0x16B_3748, 7)
                }),
                lasts.clone(),
            ),
        ] {
            let committed = Committed {
                end_lsn: 0x16B_3700,
                position,
            };
            let json = committed.to_json("cdc-reader.cdc.slot", &lasts);
            assert_eq!(Committed::parse(&json), Some((committed, lasts)));
        }
        let text = String::from_utf8(
            Committed {
                end_lsn: 0x16B_3700,
                position: None,
            }
            .to_json("k", &lasts),
        )
        .unwrap();
        assert!(text.contains(r#""end_lsn":"0/16B3700""#), "{text}");
        assert!(
            text.contains(r#""users":{"0":"23803392:2:0","2":"23803720:7:0"}"#),
            "{text}"
        );
        // Written before positions named partitions: none named.
        assert_eq!(
            Committed::parse(br#"{"end_lsn":"0/1","position":null}"#),
            Some((
                Committed {
                    end_lsn: 1,
                    position: None
                },
                Lasts::new()
            ))
        );
        for bad in [
            &b"{}"[..],
            b"not json",
            br#"{"end_lsn":"0/1","position":"x"}"#,
            br#"{"end_lsn":"0/1","position":null,"partitions":{"users":{"x":"1:0:0"}}}"#,
            br#"{"end_lsn":"0/1","position":null,"partitions":{"users":{"0":"1:0"}}}"#,
            br#"{"end_lsn":"0/1","position":null,"partitions":[]}"#,
        ] {
            assert_eq!(Committed::parse(bad), None);
        }
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
