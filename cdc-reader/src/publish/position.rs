//! The reader's resume position, committed in the position topic with each Kafka transaction
//! ([`Committed`], keyed by the transactional id), and reading the topics back: the committed
//! position when a session starts, the last record of each partition when that position does not
//! name them, and what a snapshot published.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use change_event::{ReaderPosition, RecordPosition};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use service::kafka::{Detached, TracingContext};

use super::{blocking, Delivery, KafkaSettings, PublishError, Publisher, TRANSACTION_TIMEOUT};
use crate::decode::Lsn;

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
    pub(super) fn to_json(self, key: &str, lasts: &Lasts) -> Vec<u8> {
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

impl Publisher {
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
        let partition = self.position_partition().await?;
        let read = blocking(move || {
            let reading = Reading::new(&brokers)?;
            let mut last: Option<Option<Vec<u8>>> = None;
            reading
                .read_to_end(&topic, &[(partition, 0)], |m| {
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
            let reading = Reading::new(&brokers)?;
            let mut found = Lasts::new();
            for (topic, partition) in work {
                if let Some(last) = reading.last_record_position(&topic, partition)? {
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
}

/// A consumer that reads assigned partitions and commits nothing; it reports where each partition
/// ends (`enable.partition.eof`), so a read knows it is done without counting offsets. Reading
/// `read_committed`, that end is the partition's last stable offset: see [`Reading::read_to_end`].
/// A fetch at a partition's end is answered at once: the broker otherwise holds it
/// `fetch.wait.max.ms` (500 ms by default) waiting for new records, which every read to the end
/// would wait out once (a session's start reads two: about a second).
pub(super) fn reading_consumer(
    brokers: &str,
) -> Result<BaseConsumer<TracingContext>, PublishError> {
    consumer(brokers, "read_committed")
}

fn consumer(brokers: &str, isolation: &str) -> Result<BaseConsumer<TracingContext>, PublishError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "cdc-reader-read-back")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .set("isolation.level", isolation)
        .create_with_context(TracingContext)
        .map_err(PublishError::Client)
}

/// Reads partitions back to their end: what every transaction committed before the read began.
/// Its consumers are closed off the caller's path once it is dropped ([`Detached`]).
pub(super) struct Reading {
    /// Reads, `read_committed`, and reports ends ([`reading_consumer`]).
    committed: Detached<BaseConsumer<TracingContext>>,
    /// Only asked for high watermarks: where partitions end, open transactions included.
    uncommitted: Detached<BaseConsumer<TracingContext>>,
}

/// Longest wait for the next record or end of partition while reading back.
const READ_STALL: Duration = Duration::from_secs(30);

/// Longest wait for transactions open on a partition to end before it is read back: another
/// reader killed while committing holds its partition of the position topic until the broker
/// aborts its transaction, after `transaction.timeout.ms` and at its next check for those (every
/// 10 s by default).
const STABLE_WAIT: Duration = TRANSACTION_TIMEOUT.saturating_add(Duration::from_secs(15));

impl Reading {
    pub(super) fn new(brokers: &str) -> Result<Self, PublishError> {
        Ok(Reading {
            committed: Detached::new(reading_consumer(brokers)?),
            uncommitted: Detached::new(consumer(brokers, "read_uncommitted")?),
        })
    }

    /// The `cdc.position` of the last record of `topic` [`partition`] (read committed), reading
    /// back from its end in growing windows (its last offsets may be transaction markers).
    /// Blocking.
    fn last_record_position(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Option<RecordPosition>, PublishError> {
        let read_back = |source| PublishError::ReadBack {
            topic: topic.to_owned(),
            partition,
            source,
        };
        let (low, high) = self
            .uncommitted
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(read_back)?;
        if low >= high {
            // Empty: no record, committed or open.
            return Ok(None);
        }
        let mut window = 16;
        loop {
            let from = low.max(high - window);
            let mut last = None;
            self.read_to_end(topic, &[(partition, from)], |m| {
                let position = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == RecordPosition::HEADER)
                        .and_then(|h| RecordPosition::from_header(h.value?))
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

    /// Reads each of `topic`'s partitions in `starts` from its offset to its end, handing every
    /// committed record to `f` in offset order within its partition (offset gaps from compaction
    /// or transaction markers need no arithmetic). The end is the broker's: the partition's last
    /// stable offset, which an open transaction holds back — another producer's on a shared topic
    /// such as the position topic, whose records after it would go unread. So the read first
    /// waits, per partition, until the last stable offset reaches the high watermark the
    /// partition had then: everything committed before the read began is read. Blocking.
    fn read_to_end(
        &self,
        topic: &str,
        starts: &[(i32, i64)],
        mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
    ) -> Result<(), (i32, KafkaError)> {
        let Some(&(first, _)) = starts.first() else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        for (partition, from) in starts {
            self.wait_stable(topic, *partition)
                .map_err(|e| (*partition, e))?;
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*from))
                .map_err(|e| (*partition, e))?;
        }
        let consumer = &self.committed;
        consumer.assign(&tpl).map_err(|e| (first, e))?;
        let mut open: std::collections::HashSet<i32> = starts.iter().map(|(p, _)| *p).collect();
        let mut progress = Instant::now();
        while !open.is_empty() {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) if open.contains(&m.partition()) => {
                    f(&m);
                    progress = Instant::now();
                }
                // A partition already read to its end: neither handed on nor progress.
                Some(Ok(_)) => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                    progress = Instant::now();
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

    /// Waits until `topic` [`partition`]'s last stable offset reaches its high watermark as of
    /// now: no transaction open then is open any more. The last stable offset only moves on, so
    /// every later read ends at or past it.
    fn wait_stable(&self, topic: &str, partition: i32) -> Result<(), KafkaError> {
        let timeout = Duration::from_secs(10);
        let (_, high) = self
            .uncommitted
            .fetch_watermarks(topic, partition, timeout)?;
        let started = Instant::now();
        let mut told = false;
        loop {
            let (_, stable) = self.committed.fetch_watermarks(topic, partition, timeout)?;
            if stable >= high {
                return Ok(());
            }
            if started.elapsed() > STABLE_WAIT {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            if !told && started.elapsed() > Duration::from_secs(1) {
                told = true;
                tracing::info!(
                    topic,
                    partition,
                    stable,
                    high,
                    "waiting for an open transaction to end before reading the partition \
                     back (another producer's; a killed one's until the broker aborts it)"
                );
            }
            // (Polled: Kafka tells no client when a partition's last stable offset moves.)
            std::thread::sleep(Duration::from_millis(10));
        }
    }
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
        let reading = Reading::new(&brokers)?;
        let mut by_topic: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
        for (topic, partition, from) in starts {
            by_topic.entry(topic).or_default().push((partition, from));
        }
        for (topic, starts) in &by_topic {
            reading
                .read_to_end(topic, starts, |m| {
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
                return RecordPosition::from_header(h.value?);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
