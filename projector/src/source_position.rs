//! Read-your-writes: how far in the source's history the views are complete.
//!
//! With every Kafka transaction the reader commits its position into its position topic
//! ([`change_event::ReaderPosition`]): `end_lsn` (every source transaction that ended at or before
//! it is in Kafka, whole) and the last record of each partition so far. A [`Follower`] reads those
//! on a thread of its own. Once the projector has applied a partition up to the record a position
//! names for it (or the position names none: nothing of that partition to wait for), every source
//! transaction that ended at or before that `end_lsn` is in the views as far as the partition
//! goes: the partition's `complete_lsn` in `projector_offsets`, written in the transaction that
//! applies the records (an idle partition's in a transaction of its own). The minimum over the
//! topic's partitions (the view `projector_source_position`) is what post-api waits for when a
//! request asks for `X-Min-Source-LSN`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use change_event::{ReaderPosition, RecordPosition};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use service::kafka::TracingContext;

/// A committed reader position, for one topic: its `end_lsn` and the last record of each
/// partition then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub end_lsn: u64,
    pub lasts: BTreeMap<i32, RecordPosition>,
}

/// The newest committed positions, oldest first, with strictly increasing `end_lsn`.
#[derive(Debug, Default)]
pub struct Targets {
    list: VecDeque<Target>,
}

/// Positions kept: a partition further behind than this many reader commits gets no
/// `complete_lsn` from the ones dropped (it catches up to the ones kept).
const KEPT: usize = 4096;

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn push(&mut self, target: Target) {
        if self
            .list
            .back()
            .is_none_or(|last| target.end_lsn > last.end_lsn)
        {
            self.list.push_back(target);
            if self.list.len() > KEPT {
                self.list.pop_front();
            }
        }
    }

    /// The end LSN of the newest position whose last record of `partition` is at or below
    /// `applied` (the last record applied from it), or that names none for it.
    pub fn complete(&self, partition: i32, applied: Option<RecordPosition>) -> Option<u64> {
        self.list
            .iter()
            .rev()
            .find_map(|t| match t.lasts.get(&partition) {
                None => Some(t.end_lsn),
                Some(last) => applied.filter(|a| a >= last).map(|_| t.end_lsn),
            })
    }
}

/// What a stored `complete_lsn` says of a partition: every record of a source transaction that
/// ended at or before it is applied, so the last applied record is at least the last one a
/// transaction ending just before it could have.
pub fn applied_through(complete_lsn: u64) -> Option<RecordPosition> {
    (complete_lsn > 0).then(|| RecordPosition {
        commit_lsn: complete_lsn - 1,
        event_index: u64::MAX,
        sub: u8::MAX,
    })
}

/// What the reader's positions can tell of the followed topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// The position topic is still being read from its tail: wait.
    Loading,
    /// Positions of the topic are known.
    Positions,
    /// None for [`NO_POSITIONS_AFTER`] after the tail was read: the topic's writer commits none
    /// (a reader with `CDC_READER_DELIVERY=at-least-once`, another producer).
    None,
}

/// How long after reading the position topic's tail a topic without positions is taken for one
/// whose writer commits none (its first records and their position may arrive a moment apart).
const NO_POSITIONS_AFTER: Duration = Duration::from_secs(5);

/// Follows the position topic on a thread of its own, from its last [`TAIL`] records on (each
/// position names every partition, so the newest says all; older ones only let a partition that is
/// catching up be complete sooner), keeping the positions that name `topic` in [`Targets`];
/// `changed` is notified on each new one.
pub struct Follower {
    pub targets: Arc<Mutex<Targets>>,
    pub changed: Arc<tokio::sync::Notify>,
    /// The partition count of the followed topic (0 until known), read every [`METADATA_EVERY`].
    pub partitions: Arc<AtomicI32>,
    /// When the position topic's tail was read (or found not to exist).
    loaded: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Follower {
    pub fn start(brokers: &str, position_topic: &str, topic: &str) -> Result<Follower, KafkaError> {
        let consumer: BaseConsumer<TracingContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "projector-source-position")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            // Tells when the tail read at the start is done (see [`Known`]).
            .set("enable.partition.eof", "true")
            // A fetch at a partition's end is held this long before the broker answers that it is
            // the end: with librdkafka's 500 ms the tail read, and so the projector's first view
            // transaction, waited that long. (A fetch returns as soon as records come.)
            .set("fetch.wait.max.ms", "100")
            .create_with_context(TracingContext)?;
        let targets = Arc::new(Mutex::new(Targets::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let partitions = Arc::new(AtomicI32::new(0));
        let loaded = Arc::new(Mutex::new(None));
        {
            let shared = Shared {
                targets: targets.clone(),
                changed: changed.clone(),
                partitions: partitions.clone(),
                loaded: loaded.clone(),
                stop: stop.clone(),
            };
            let topic = topic.to_owned();
            let position_topic = position_topic.to_owned();
            // Detached: it ends by itself within a poll once stopped.
            std::thread::Builder::new()
                .name("source-position".to_owned())
                .spawn(move || {
                    if let Some(assigned) = assign_tail(&consumer, &position_topic, &shared) {
                        follow(&consumer, &topic, assigned, &shared);
                    }
                })
                .map_err(|_| KafkaError::Canceled)?;
        }
        Ok(Follower {
            targets,
            changed,
            partitions,
            loaded,
            stop,
        })
    }

    /// What the positions can tell now (see [`Known`]).
    pub fn known(&self) -> Known {
        let empty = service::lock(&self.targets).is_empty();
        if !empty {
            return Known::Positions;
        }
        match *service::lock(&self.loaded) {
            Some(at) if at.elapsed() >= NO_POSITIONS_AFTER => Known::None,
            _ => Known::Loading,
        }
    }

    pub fn complete(&self, partition: i32, applied: Option<RecordPosition>) -> Option<u64> {
        service::lock(&self.targets).complete(partition, applied)
    }
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower").finish_non_exhaustive()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What the follower's thread shares with the projector.
struct Shared {
    targets: Arc<Mutex<Targets>>,
    changed: Arc<tokio::sync::Notify>,
    partitions: Arc<AtomicI32>,
    loaded: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn set_loaded(&self) {
        let mut loaded = service::lock(&self.loaded);
        if loaded.is_none() {
            *loaded = Some(Instant::now());
            // Woken, the projector looks again once the wait for positions is over.
            self.changed.notify_one();
        }
    }
}

/// How often the follower reads the followed topic's partition count.
const METADATA_EVERY: Duration = Duration::from_secs(30);

/// Records of the position topic read when the projector starts.
const TAIL: i64 = 1000;

/// Assigns every partition of the position topic (each reader writes its key's) from its last
/// [`TAIL`] records, retrying while it cannot be read (broker away); the number of partitions
/// assigned, or `None` when asked to stop first. A position topic that does not exist counts as
/// read (no positions) meanwhile.
fn assign_tail(
    consumer: &BaseConsumer<TracingContext>,
    position_topic: &str,
    shared: &Shared,
) -> Option<usize> {
    let mut failing = false;
    while !shared.stop.load(Ordering::SeqCst) {
        let assigned = partition_count(consumer, position_topic).and_then(|n| {
            let mut tpl = TopicPartitionList::new();
            for p in 0..n {
                let (low, high) =
                    consumer.fetch_watermarks(position_topic, p, Duration::from_secs(5))?;
                tpl.add_partition_offset(position_topic, p, Offset::Offset(low.max(high - TAIL)))?;
            }
            consumer.assign(&tpl)?;
            Ok(tpl.count())
        });
        match assigned {
            Ok(n) => return Some(n),
            Err(e) => {
                use RDKafkaErrorCode as Code;
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition
                    )
                ) {
                    shared.set_loaded();
                }
                if !failing {
                    tracing::warn!(topic = position_topic, error = %e,
                        "the reader's position topic cannot be read yet; retrying");
                    failing = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    None
}

/// `topic`'s partition count (an error when it does not exist).
fn partition_count(consumer: &BaseConsumer<TracingContext>, topic: &str) -> KafkaResult<i32> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let n = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    match i32::try_from(n) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        )),
    }
}

/// Follows the assigned partitions of the position topic (`assigned` of them) and, every
/// [`METADATA_EVERY`], `topic`'s partition count.
fn follow(consumer: &BaseConsumer<TracingContext>, topic: &str, assigned: usize, shared: &Shared) {
    let Shared {
        targets,
        changed,
        partitions,
        stop,
        ..
    } = shared;
    let mut failing = false;
    let mut warned = false;
    let mut metadata_read: Option<std::time::Instant> = None;
    // Partitions read to the end they had when assigned: the tail is read once all are.
    let mut at_end = std::collections::HashSet::new();
    while !stop.load(Ordering::SeqCst) {
        if metadata_read.is_none_or(|at| at.elapsed() >= METADATA_EVERY) {
            metadata_read = Some(std::time::Instant::now());
            match partition_count(consumer, topic) {
                Ok(n) => partitions.store(n, Ordering::SeqCst),
                // (As before it exists, or once deleted.)
                Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    partitions.store(0, Ordering::SeqCst);
                }
                Err(e) => tracing::debug!(error = %e, "reading the topic's partition count failed"),
            }
        }
        if !warned
            && service::lock(&shared.loaded).is_some_and(|at| at.elapsed() >= NO_POSITIONS_AFTER)
            && service::lock(targets).is_empty()
        {
            warned = true;
            changed.notify_one();
            tracing::warn!(
                topic,
                "no reader position names this topic: view transactions follow batches and may \
                 hold part of a source transaction (a reader with \
                 CDC_READER_DELIVERY=at-least-once commits no positions)"
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                failing = false;
                let Some(position) = m.payload().and_then(ReaderPosition::parse) else {
                    tracing::warn!(
                        offset = m.offset(),
                        "a record of the position topic that is not a reader position; ignored"
                    );
                    continue;
                };
                let lasts: BTreeMap<i32, RecordPosition> = position
                    .partitions
                    .iter()
                    .filter(|((t, _), _)| t == topic)
                    .map(|((_, p), last)| (*p, *last))
                    .collect();
                // Another reader's topics only (or a reader that names no partitions).
                if lasts.is_empty() {
                    continue;
                }
                service::lock(targets).push(Target {
                    end_lsn: position.end_lsn,
                    lasts,
                });
                changed.notify_one();
            }
            // The end of a partition as it was: the tail is read once every one got there.
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
                if at_end.len() >= assigned {
                    shared.set_loaded();
                }
            }
            Some(Err(e)) => {
                if !failing {
                    tracing::warn!(error = %e, "reading the reader's position topic failed; retrying");
                    failing = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(commit_lsn: u64, event_index: u64) -> RecordPosition {
        RecordPosition {
            commit_lsn,
            event_index,
            sub: 0,
        }
    }

    #[test]
    fn a_partition_is_complete_through_the_newest_position_it_has_reached() {
        let mut t = Targets::default();
        t.push(Target {
            end_lsn: 100,
            lasts: [(0, at(90, 3))].into_iter().collect(),
        });
        t.push(Target {
            end_lsn: 200,
            lasts: [(0, at(90, 3)), (1, at(150, 0))].into_iter().collect(),
        });
        // Not increasing: ignored.
        t.push(Target {
            end_lsn: 200,
            lasts: BTreeMap::new(),
        });
        t.push(Target {
            end_lsn: 300,
            lasts: [(0, at(250, 1)), (1, at(150, 0))].into_iter().collect(),
        });
        assert_eq!(t.complete(0, None), None);
        assert_eq!(t.complete(0, Some(at(90, 2))), None);
        assert_eq!(t.complete(0, Some(at(90, 3))), Some(200));
        assert_eq!(t.complete(0, Some(at(250, 1))), Some(300));
        // Partition 1 had nothing until 200; partition 2 never had anything.
        assert_eq!(t.complete(1, None), Some(100));
        assert_eq!(t.complete(1, Some(at(150, 0))), Some(300));
        assert_eq!(t.complete(2, None), Some(300));
        // What a stored complete_lsn says: records of transactions that ended by then.
        assert_eq!(t.complete(0, applied_through(251)), Some(300));
        assert_eq!(t.complete(0, applied_through(250)), Some(200));
        assert_eq!(applied_through(0), None);
    }
}
