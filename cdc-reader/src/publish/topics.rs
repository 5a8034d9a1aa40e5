//! Topic administration: the change topics and the position topic created when missing, and the
//! partition counts and ends the publisher reads.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use service::kafka::{Detached, TracingContext};

use super::position::reading_consumer;
use super::{blocking, client_config, Delivery, KafkaSettings, PublishError, Publisher};

impl Publisher {
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

    pub(super) async fn partition_count(&mut self, topic: &str) -> Result<i32, PublishError> {
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

    /// Exactly once, the position topic and its partition count.
    pub async fn position_topic_count(&mut self) -> Result<Option<(String, i32)>, PublishError> {
        if self.delivery != Delivery::ExactlyOnce {
            return Ok(None);
        }
        let topic = self.position_topic.clone();
        let n = self.partition_count(&topic).await?;
        Ok(Some((topic, n)))
    }

    /// The partition of the position topic this publisher's positions go to: its key's.
    pub(super) async fn position_partition(&mut self) -> Result<i32, PublishError> {
        let topic = self.position_topic.clone();
        let n = self.partition_count(&topic).await?;
        Ok(position_partition(&self.transactional_id, n))
    }

    /// Where every partition of `topics` ends now for a `read_committed` reader (its last stable
    /// offset, at or before its high watermark: a read from there misses nothing committed
    /// later), as (topic, partition, offset).
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

/// The partition of a position topic of `partitions` that holds the positions of the reader
/// with `transactional_id` (their key), as a Java producer would place them.
pub fn position_partition(transactional_id: &str, partitions: i32) -> i32 {
    crate::partition::of_key(transactional_id.as_bytes(), partitions)
}

/// Partitions of the position topic when the reader creates it (as Kafka Connect's offsets topic,
/// `offset.storage.partitions`). Each reader's positions go to its key's partition and a session
/// start reads only that one, so an open transaction of another reader (one killed while
/// committing is open until the broker aborts it, a minute later) holds back only the readers
/// whose keys share its partition. An existing topic keeps its count; a count changed later would
/// move keys, so the reader records it per slot and refuses to run on another.
pub const POSITION_TOPIC_PARTITIONS: i32 = 25;

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
    let admin: Detached<AdminClient<TracingContext>> = Detached::new(
        client_config(settings)
            .create_with_context(TracingContext)
            .map_err(PublishError::Client)?,
    );
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
            NewTopic::new(
                &settings.position_topic,
                POSITION_TOPIC_PARTITIONS,
                replication(),
            ),
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
