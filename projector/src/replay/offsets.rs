//! Where a replay starts and stops in each partition: from offsets, a source LSN or a timestamp
//! (a scan of the topic), checked against what the partitions still hold.

use std::collections::BTreeMap;
use std::time::Duration;

use change_event::Position;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{kafka, From, ReplayError};
use crate::project::Context;
use crate::{events, Config};

fn topic_partitions(
    consumer: &StreamConsumer<Context>,
    topic: &str,
) -> Result<Vec<i32>, ReplayError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kafka("reading the topic's partitions"))?;
    let mut partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    partitions.sort_unstable();
    if partitions.is_empty() {
        return Err(ReplayError::NoTopic(topic.to_owned()));
    }
    Ok(partitions)
}

/// The first and next offsets of every partition of `topic`. Blocking.
pub(super) fn partition_marks(
    consumer: &StreamConsumer<Context>,
    topic: &str,
) -> Result<BTreeMap<i32, (i64, i64)>, ReplayError> {
    topic_partitions(consumer, topic)?
        .into_iter()
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map(|w| (p, w))
                .map_err(kafka(format!("reading the offsets of partition {p}")))
        })
        .collect()
}

/// The next offset of each of `partitions`. Blocking.
pub(super) fn high_watermarks<'a>(
    consumer: &StreamConsumer<Context>,
    topic: &str,
    partitions: impl Iterator<Item = &'a i32>,
) -> Result<BTreeMap<i32, i64>, ReplayError> {
    partitions
        .map(|p| {
            consumer
                .fetch_watermarks(topic, *p, Duration::from_secs(10))
                .map(|(_, high)| (*p, high))
                .map_err(kafka(format!("reading the offsets of partition {p}")))
        })
        .collect()
}

/// The offset each replayed partition starts from.
pub(super) async fn start_offsets(
    config: &Config,
    from: &From,
    marks: &BTreeMap<i32, (i64, i64)>,
) -> Result<BTreeMap<i32, i64>, ReplayError> {
    match from {
        From::Earliest => Ok(marks.iter().map(|(p, (low, _))| (*p, *low)).collect()),
        // Each partition from there, or from as near as it holds.
        From::Offset(o) => Ok(marks
            .iter()
            .map(|(p, (low, high))| (*p, (*o).clamp(*low, *high)))
            .collect()),
        From::Offsets(list) => checked_offsets(list, marks),
        From::Timestamp(t) => {
            let ms = t.timestamp_millis();
            scan(config, marks, |record_ms, _| {
                record_ms.is_some_and(|r| r >= ms)
            })
            .await
        }
        From::Lsn(lsn) => {
            let at = Position {
                commit_lsn: *lsn,
                event_index: 0,
            };
            scan(config, marks, |_, position| {
                position.is_some_and(|p| p >= at)
            })
            .await
        }
    }
}

/// `list`, when every partition exists and every offset is one the topic holds.
fn checked_offsets(
    list: &[(i32, i64)],
    marks: &BTreeMap<i32, (i64, i64)>,
) -> Result<BTreeMap<i32, i64>, ReplayError> {
    list.iter()
        .map(|(p, o)| {
            let (low, high) = *marks
                .get(p)
                .ok_or(ReplayError::NoPartition(*p, marks.len()))?;
            if *o < low || *o > high {
                return Err(ReplayError::OffsetOutOfRange {
                    partition: *p,
                    offset: *o,
                    low,
                    high,
                });
            }
            Ok((*p, *o))
        })
        .collect()
}

/// Reads every partition from its start to the first record `found(timestamp_ms, position)`
/// accepts (records without a position, the tombstones, are passed over): its offset, else the
/// partition's end. Linear, so it costs one read of the topic up to there.
async fn scan(
    config: &Config,
    marks: &BTreeMap<i32, (i64, i64)>,
    found: impl Fn(Option<i64>, Option<Position>) -> bool,
) -> Result<BTreeMap<i32, i64>, ReplayError> {
    let table = config.source_table()?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("group.id", format!("{}.replay-scan", config.group))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(kafka("creating a consumer"))?;
    let mut tpl = TopicPartitionList::new();
    let mut result = BTreeMap::new();
    let mut todo = BTreeMap::new();
    for (p, (low, high)) in marks {
        if low >= high {
            result.insert(*p, *high);
        } else {
            tpl.add_partition_offset(&config.topic, *p, Offset::Offset(*low))
                .map_err(kafka("building the partition list"))?;
            todo.insert(*p, (*low, *high));
        }
    }
    if todo.is_empty() {
        return Ok(result);
    }
    consumer
        .assign(&tpl)
        .map_err(kafka("assigning partitions"))?;
    while !todo.is_empty() {
        let message = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(Ok(m)) => m,
            // Read to its end without finding one (the last offsets may hold no record: a
            // transaction marker, compaction).
            Ok(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                if let Some((_, high)) = todo.remove(&p) {
                    result.insert(p, high);
                }
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the topic failed; retrying");
                continue;
            }
            Err(_) => {
                let (p, (next, high)) = todo
                    .iter()
                    .next()
                    .map(|(p, r)| (*p, *r))
                    .unwrap_or_default();
                return Err(ReplayError::Stalled {
                    partition: p,
                    offset: next,
                    high,
                });
            }
        };
        let p = message.partition();
        let Some((_, high)) = todo.get(&p).copied() else {
            continue;
        };
        let position = events::decode(message.key(), message.payload(), (&table.0, &table.1))
            .ok()
            .and_then(|c| c.position());
        let offset = message.offset();
        if found(message.timestamp().to_millis(), position) {
            result.insert(p, offset);
            todo.remove(&p);
        } else if offset + 1 >= high {
            result.insert(p, high);
            todo.remove(&p);
        } else {
            todo.insert(p, (offset + 1, high));
        }
    }
    Ok(result)
}
