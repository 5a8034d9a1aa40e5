//! Where a record goes: the partition of its key as Kafka's Java clients place keyed records,
//! `(murmur2(key) & 0x7fffffff) % partitions`.
//!
//! The reader chooses every record's partition itself rather than leave it to librdkafka, so it
//! knows, when it commits a Kafka transaction, which record is the last one of each partition. It
//! commits that with its position ([`crate::publish::Committed`]); a consumer reading the
//! position topic then knows how far each partition must be read for every source transaction up
//! to that position to be complete.

use crate::envelope::RecordPosition;

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    // Java hashes the length as an int; keys longer than that cannot be sent anyway.
    let mut h = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a record among `partitions` (at least 1): its key's, as a Java producer
/// places it; a record without a key (a table without a primary key or replica identity index)
/// goes by its position, which spreads such records over the partitions.
pub fn of(key: Option<&[u8]>, position: RecordPosition, partitions: i32) -> i32 {
    match key {
        Some(k) => of_key(k, partitions),
        None => i32::try_from(position.event_index % partitions.max(1) as u64).unwrap_or(0),
    }
}

/// The partition of `key` among `partitions` (at least 1), as a Java producer places it.
pub fn of_key(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's `UtilsTest.testMurmur2`.
    pub const KAFKA_VECTORS: [(&str, i32); 6] = [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        ("abc", 479_470_107),
    ];

    #[test]
    fn murmur2_matches_kafkas_vectors() {
        for (key, expected) in KAFKA_VECTORS {
            assert_eq!(murmur2(key.as_bytes()), expected, "{key}");
        }
    }

    #[test]
    fn keyless_records_spread_by_position() {
        let at = |event_index| RecordPosition {
            commit_lsn: 1,
            event_index,
            sub: 0,
        };
        assert_eq!(of(None, at(0), 3), 0);
        assert_eq!(of(None, at(4), 3), 1);
        assert_eq!(of(Some(b"21"), at(4), 1), 0);
    }

    /// librdkafka's `murmur2_random` (what Java clients' placement is documented to match) puts
    /// keys where [`of`] does. Client logic only, so librdkafka's in-process mock cluster serves
    /// as the broker.
    #[tokio::test]
    async fn keys_land_where_librdkafka_and_the_java_client_put_them() {
        use rdkafka::config::ClientConfig;
        use rdkafka::producer::{FutureProducer, FutureRecord};
        use std::time::Duration;
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let n = 61;
        cluster.create_topic("placed", n, 1).unwrap();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap();
        let position = RecordPosition {
            commit_lsn: 1,
            event_index: 0,
            sub: 0,
        };
        let mut keys: Vec<String> = KAFKA_VECTORS.iter().map(|(k, _)| (*k).to_owned()).collect();
        keys.extend((0..200).map(|i| format!("{{\"id\":{}}}", i * 7919)));
        for key in &keys {
            let delivered = producer
                .send(
                    FutureRecord::<str, str>::to("placed")
                        .key(key.as_str())
                        .payload("v"),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            assert_eq!(
                delivered.partition,
                of(Some(key.as_bytes()), position, n),
                "{key}"
            );
        }
    }
}
