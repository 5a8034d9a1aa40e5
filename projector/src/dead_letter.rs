//! The dead-letter topic: records the projector cannot apply go there, unchanged, with headers
//! that say why and where they came from. A record is dead-lettered (and Kafka has acknowledged
//! it) before the offset that passes it is committed, so nothing is ever dropped silently.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use service::kafka::TracingContext;
use tokio::task::JoinHandle;

/// Header names of a dead-lettered record.
pub mod header {
    /// Human-readable reason.
    pub const ERROR: &str = "dlq.error";
    /// Short stable reason (`not_an_event`, `bad_key`, `missing_column`, ...).
    pub const KIND: &str = "dlq.error.kind";
    pub const TOPIC: &str = "dlq.source.topic";
    pub const PARTITION: &str = "dlq.source.partition";
    pub const OFFSET: &str = "dlq.source.offset";
}

/// One record to dead-letter.
#[derive(Debug)]
pub struct Letter<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub kind: &'static str,
    pub error: String,
}

pub struct DeadLetters {
    producer: FutureProducer<TracingContext>,
    topic: String,
    source_topic: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    c
}

impl DeadLetters {
    pub fn new(brokers: &str, topic: &str, source_topic: &str) -> Result<Self, KafkaError> {
        Ok(DeadLetters {
            producer: producer_config(brokers).create_with_context(TracingContext)?,
            topic: topic.to_owned(),
            source_topic: source_topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Creates the dead-letter topic when it does not exist yet (one partition: it is an audit
    /// trail, read in order by people; kept forever, at the broker's default replication factor).
    pub async fn ensure_topic(&self, brokers: &str) -> Result<(), KafkaError> {
        create_topic(brokers.to_owned(), self.topic.clone()).await
    }

    /// [`DeadLetters::ensure_topic`] on a task of its own, started when the projector starts:
    /// creating a topic takes the broker up to a second, which would otherwise come before the
    /// first view transaction.
    pub fn ensure_topic_early(&self, brokers: &str) -> JoinHandle<Result<(), KafkaError>> {
        tokio::spawn(create_topic(brokers.to_owned(), self.topic.clone()))
    }

    /// Sends every letter and waits until Kafka acknowledged all of them.
    pub async fn send_all(&self, letters: &[Letter<'_>]) -> Result<(), KafkaError> {
        let sends = letters.iter().map(|l| {
            let partition = l.partition.to_string();
            let offset = l.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: header::ERROR,
                    value: Some(l.error.as_str()),
                })
                .insert(Header {
                    key: header::KIND,
                    value: Some(l.kind),
                })
                .insert(Header {
                    key: header::TOPIC,
                    value: Some(self.source_topic.as_str()),
                })
                .insert(Header {
                    key: header::PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: header::OFFSET,
                    value: Some(offset.as_str()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(k) = l.key {
                record = record.key(k);
            }
            if let Some(v) = l.value {
                record = record.payload(v);
            }
            self.producer.send(record, Duration::from_secs(30))
        });
        for result in futures_util::future::join_all(sends).await {
            result.map_err(|(e, _)| e)?;
        }
        for l in letters {
            tracing::warn!(
                partition = l.partition,
                offset = l.offset,
                kind = l.kind,
                error = %l.error,
                dead_letter_topic = %self.topic,
                "dead-lettered an event"
            );
        }
        Ok(())
    }
}

async fn create_topic(brokers: String, topic: String) -> Result<(), KafkaError> {
    let admin: AdminClient<TracingContext> =
        producer_config(&brokers).create_with_context(TracingContext)?;
    let results = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(-1)).set("retention.ms", "-1")],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, "created the dead-letter topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}
