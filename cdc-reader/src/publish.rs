//! Publishing to Kafka with acknowledgement tracking.
//!
//! Records are sent asynchronously (many in flight, no round trip per record) by an idempotent
//! producer (`enable.idempotence=true`, `acks=all`). Every send and every transaction end is queued
//! in stream order; the queue is drained in that order, so when a transaction-end marker comes out,
//! Kafka has acknowledged every record of that transaction and of every transaction before it. That
//! end LSN, and only that, may be confirmed to PostgreSQL.

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

use crate::decode::Lsn;
use crate::envelope::Record;

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
}

/// Producer settings: brokers plus librdkafka properties that override the defaults.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub overrides: Vec<(String, String)>,
    pub topic_partitions: i32,
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
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("records_in_flight", &self.records_in_flight)
            .finish_non_exhaustive()
    }
}

fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("compression.type", "lz4");
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

    /// Queues `record` for sending (to every partition when it asks for that).
    pub async fn send(&mut self, record: Record) -> Result<(), PublishError> {
        if record.all_partitions {
            let n = self.partition_count(&record.topic).await?;
            for p in 0..n {
                self.send_one(&record, Some(p)).await?;
            }
            Ok(())
        } else {
            self.send_one(&record, None).await
        }
    }

    async fn send_one(
        &mut self,
        record: &Record,
        partition: Option<i32>,
    ) -> Result<(), PublishError> {
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic);
        if let Some(key) = &record.key {
            r = r.key(key);
        }
        if let Some(value) = &record.value {
            r = r.payload(value);
        }
        if let Some(p) = partition {
            r = r.partition(p);
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

    /// Waits up to `timeout` for librdkafka to deliver what it holds (on shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, "not every record was delivered before shutdown; they will be re-read from the slot");
        }
    }
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
        .map(|t| NewTopic::new(t, settings.topic_partitions, TopicReplication::Fixed(1)))
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
            Ok(topic) => tracing::info!(topic, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(PublishError::CreateTopic {
                    topic,
                    source: KafkaError::AdminOp(code),
                })
            }
        }
    }
    Ok(())
}

/// True for errors that retrying with a fresh producer can cure (broker away, timeouts).
pub fn is_transient(err: &PublishError) -> bool {
    match err {
        PublishError::Client(_) => false,
        PublishError::Delivery(KafkaError::MessageProduction(code)) => !matches!(
            code,
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessage
        ),
        _ => true,
    }
}
