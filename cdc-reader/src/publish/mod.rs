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
//!
//! - this file: the producer and its Kafka transactions;
//! - [`position`]: the resume position committed with them, and reading the topics back;
//! - [`topics`]: creating the topics and reading their partition counts and ends;
//! - [`error`]: what publishing fails with, and which failures a new producer can cure.

mod error;
mod position;
mod topics;

pub use error::{is_transient, PublishError};
pub use position::{read_back, Committed, Lasts};
pub use topics::{ensure_topics, position_partition, POSITION_TOPIC_PARTITIONS};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};

use crate::envelope::{Record, RecordPosition};
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

/// The producer's `transaction.timeout.ms`: a transaction open longer (its producer killed, say)
/// is aborted by the broker.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

impl Publisher {
    pub async fn new(settings: &KafkaSettings) -> Result<Self, PublishError> {
        let mut config = client_config(settings);
        if settings.delivery == Delivery::ExactlyOnce {
            config
                .set("transactional.id", &settings.transactional_id)
                .set(
                    "transaction.timeout.ms",
                    TRANSACTION_TIMEOUT.as_millis().to_string(),
                );
        }
        let producer: Client = config
            .create_with_context(DeliveryContext::default())
            .map_err(PublishError::Client)?;
        let producer = Arc::new(producer);
        if settings.delivery == Delivery::ExactlyOnce {
            let p = producer.clone();
            let topic = settings.position_topic.clone();
            blocking(move || {
                // librdkafka asks for the transaction coordinator only over a connection to a
                // broker of the cluster that is up, and when there is none it asks again 500 ms
                // later: a new client has none. Two metadata requests (of the position topic,
                // which exists by now) bring one up: the first is answered over the bootstrap
                // connection, after which librdkafka 2.12 knows the brokers by id and is connected
                // to none yet. Registering then takes 12-16 ms here instead of ~0.5 s. A failure
                // of theirs only costs that time: init_transactions retries by itself.
                for _ in 0..2 {
                    if let Err(error) = p
                        .client()
                        .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    {
                        tracing::debug!(%error, "a metadata request before registering failed");
                    }
                }
                p.init_transactions(COMMIT_TIMEOUT)
            })
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
            let partition = self.position_partition().await?;
            let key = self.transactional_id.as_bytes();
            let r = BaseRecord::to(&self.position_topic)
                .partition(partition)
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
            // Its outcome no longer decides anything: what it held is aborted or sent again.
            match c.done.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "the commit under way failed; aborting"),
                Err(e) => tracing::debug!(error = %e, "the commit under way did not finish"),
            }
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
