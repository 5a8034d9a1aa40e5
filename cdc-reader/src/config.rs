//! Settings of cdc-reader. Every flag can also be set through the environment variable shown in
//! `--help`; they share the `CDC_READER_` prefix, except `KAFKA_BROKERS`, which means the same
//! thing for every service.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::publish::{Delivery, KafkaSettings};

#[derive(clap::Args, Clone)]
pub struct Config {
    /// PostgreSQL database to capture, as a role with REPLICATION that may read the captured
    /// tables (and own them, if the reader is to create the publication).
    #[arg(long, env = "CDC_READER_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Logical replication slot the reader owns (created on first start).
    #[arg(long, env = "CDC_READER_SLOT", default_value = "cdc_reader")]
    pub slot: String,

    /// Publication naming the captured tables (created, or extended, on start).
    #[arg(long, env = "CDC_READER_PUBLICATION", default_value = "cdc_reader")]
    pub publication: String,

    /// Captured tables, comma-separated, as schema.table.
    #[arg(
        long,
        env = "CDC_READER_TABLES",
        value_delimiter = ',',
        default_value = "public.users"
    )]
    pub tables: Vec<String>,

    /// Topic of each table, comma-separated schema.table=topic; a table not listed goes to the
    /// topic named schema.table.
    #[arg(
        long,
        env = "CDC_READER_TOPICS",
        value_delimiter = ',',
        default_value = "public.users=user-events"
    )]
    pub topics: Vec<String>,

    /// `source.name` of every event (Debezium's logical server name).
    #[arg(long, env = "CDC_READER_SERVER_NAME", default_value = "cdc")]
    pub server_name: String,

    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Extra librdkafka producer properties, comma-separated key=value (e.g. linger.ms=20).
    #[arg(long, env = "CDC_READER_PRODUCER_CONFIG", value_delimiter = ',')]
    pub producer_config: Vec<String>,

    /// Partitions of topics the reader creates.
    #[arg(long, env = "CDC_READER_TOPIC_PARTITIONS", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_partitions: i32,

    /// Replication factor of topics the reader creates; -1 takes the broker's
    /// `default.replication.factor`. Records are acknowledged by the topic's `min.insync.replicas`
    /// (acks=all).
    #[arg(long, env = "CDC_READER_TOPIC_REPLICATION_FACTOR", default_value_t = -1, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-1..=32767))]
    pub topic_replication_factor: i32,

    /// Topic settings of topics the reader creates, comma-separated key=value. The default keeps
    /// every change (time-based deletion off), so a replay or rebuild from the beginning sees the
    /// whole history; e.g. `retention.ms=604800000` keeps a week, `cleanup.policy=compact` only the
    /// latest change per key.
    #[arg(
        long,
        env = "CDC_READER_TOPIC_CONFIG",
        value_delimiter = ',',
        default_value = "cleanup.policy=delete,retention.ms=-1"
    )]
    pub topic_config: Vec<String>,

    /// Write every key and value with its schema, as Kafka Connect's JsonConverter does with
    /// `schemas.enable=true` (`{"schema": ..., "payload": ...}`), for Connect sinks that need
    /// schemas, such as Debezium's JDBC sink. json and jsonb values are then written as text.
    #[arg(long, env = "CDC_READER_SCHEMAS", default_value_t = false, action = clap::ArgAction::Set)]
    pub schemas: bool,

    /// What the reader guarantees: `exactly-once` commits records in Kafka transactions together
    /// with its resume position (consumers read with `isolation.level=read_committed`);
    /// `at-least-once` uses the idempotent producer alone, for brokers without transactions
    /// (after a failure, records may appear twice).
    #[arg(long, env = "CDC_READER_DELIVERY", value_enum, default_value_t = Delivery::ExactlyOnce)]
    pub delivery: Delivery,

    /// The producer's `transactional.id`, also the key of the reader's committed position
    /// (default `cdc-reader.<server name>.<slot>`). Stable across restarts: a restarted or second
    /// reader fences the previous one. Must differ between readers sharing a Kafka cluster.
    #[arg(long, env = "CDC_READER_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,

    /// Compacted topic holding every reader's committed position (created with 25 partitions; a
    /// reader writes and reads back only its key's, so another reader's open transaction seldom
    /// delays it; the count must not change, which the reader checks).
    #[arg(
        long,
        env = "CDC_READER_POSITION_TOPIC",
        default_value = "cdc-reader-positions"
    )]
    pub position_topic: String,

    /// Longest time a Kafka transaction stays open collecting source transactions before it is
    /// committed, in milliseconds (it is committed sooner when the WAL has nothing more to read).
    #[arg(long, env = "CDC_READER_COMMIT_INTERVAL_MS", default_value_t = 100)]
    pub commit_interval_ms: u64,

    /// Least time from a Kafka commit's return to the next transaction's first record, in
    /// milliseconds. Kafka's coordinator answers a transaction that starts while the previous
    /// one's markers are still being written with CONCURRENT_TRANSACTIONS, and librdkafka then
    /// retries after a fixed 20 ms; a short gap avoids that (0: none).
    #[arg(long, env = "CDC_READER_TRANSACTION_GAP_MS", default_value_t = 8)]
    pub transaction_gap_ms: u64,

    /// Most records in one Kafka transaction, and held in memory for the next one while one
    /// commits; a source transaction larger than this is split across Kafka transactions (at a
    /// record it resumes exactly after).
    #[arg(long, env = "CDC_READER_MAX_IN_FLIGHT", default_value_t = 50_000)]
    pub max_in_flight: usize,

    /// How often progress (the confirmed LSN) is reported to PostgreSQL, in milliseconds.
    #[arg(long, env = "CDC_READER_STATUS_INTERVAL_MS", default_value_t = 1000)]
    pub status_interval_ms: u64,

    /// Rows that exist when the slot is created: `initial` publishes them as `op: "r"` events
    /// first, `never` streams only later changes.
    #[arg(long, env = "CDC_READER_SNAPSHOT", value_enum, default_value_t = SnapshotMode::Initial)]
    pub snapshot: SnapshotMode,

    /// Keep the slot's confirmed position up to this many bytes of WAL behind what Kafka has, so
    /// that `cdc-reader replay --from-lsn` can reach back that far (PostgreSQL keeps that much WAL
    /// more). 0: confirm everything Kafka has.
    #[arg(long, env = "CDC_READER_WAL_REPLAY_WINDOW_BYTES", default_value_t = 0)]
    pub wal_replay_window_bytes: u64,

    /// Address of the /health and /metrics endpoint.
    #[arg(long, env = "CDC_READER_HTTP_LISTEN", default_value = "127.0.0.1:9101")]
    pub http_listen: SocketAddr,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL may carry a password.
        f.debug_struct("Config")
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("tables", &self.tables)
            .field("topics", &self.topics)
            .field("kafka_brokers", &self.kafka_brokers)
            .field("wal_replay_window_bytes", &self.wal_replay_window_bytes)
            .field("http_listen", &self.http_listen)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotMode {
    Initial,
    Never,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--topics entry {0:?} is not schema.table=topic")]
    Topic(String),
    #[error("--producer-config entry {0:?} is not key=value")]
    Producer(String),
    #[error("--topic-config entry {0:?} is not key=value")]
    TopicConfig(String),
    #[error("--tables is empty")]
    NoTables,
    #[error("{0:?} is not a valid identifier for a slot (lowercase letters, digits, underscores)")]
    Slot(String),
    #[error("--max-in-flight must be at least 1")]
    MaxInFlight,
    #[error("--topic-replication-factor must be -1 (the broker's default) or at least 1")]
    ReplicationFactor,
    #[error("--producer-config may not set {0}: the delivery guarantees depend on it")]
    Guarantee(String),
}

/// Producer settings the no-loss, once-only, in-order delivery depends on; not overridable.
const PROTECTED: [&str; 8] = [
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "max.in.flight.requests.per.connection",
    "bootstrap.servers",
    // Has its own flag (it is also the key of the committed position).
    "transactional.id",
    // Keys must keep their partition (the partition count is checked, the placement is this).
    "partitioner",
    "partitioner.class",
];

impl Config {
    /// Checks everything that can be checked before connecting anywhere.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tables.is_empty() {
            return Err(ConfigError::NoTables);
        }
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return Err(ConfigError::Slot(self.slot.clone()));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::MaxInFlight);
        }
        if self.topic_replication_factor == 0 {
            return Err(ConfigError::ReplicationFactor);
        }
        self.topic_map()?;
        self.kafka()?;
        Ok(())
    }

    pub fn topic_map(&self) -> Result<HashMap<String, String>, ConfigError> {
        self.topics
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| match e.split_once('=') {
                Some((t, topic)) if t.contains('.') && !topic.trim().is_empty() => {
                    Ok((t.trim().to_owned(), topic.trim().to_owned()))
                }
                _ => Err(ConfigError::Topic(e.clone())),
            })
            .collect()
    }

    /// The topic of every captured table.
    pub fn captured_topics(&self) -> Result<Vec<String>, ConfigError> {
        let map = self.topic_map()?;
        let mut topics: Vec<String> = self
            .tables
            .iter()
            .map(|t| map.get(t).cloned().unwrap_or_else(|| t.clone()))
            .collect();
        topics.sort();
        topics.dedup();
        Ok(topics)
    }

    pub fn kafka(&self) -> Result<KafkaSettings, ConfigError> {
        let overrides = self
            .producer_config
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| match e.split_once('=') {
                Some((k, _)) if PROTECTED.contains(&k.trim()) => {
                    Err(ConfigError::Guarantee(k.trim().to_owned()))
                }
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_owned(), v.trim().to_owned()))
                }
                _ => Err(ConfigError::Producer(e.clone())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let topic_config = self
            .topic_config
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| match e.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_owned(), v.trim().to_owned()))
                }
                _ => Err(ConfigError::TopicConfig(e.clone())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KafkaSettings {
            brokers: self.kafka_brokers.clone(),
            overrides,
            topic_partitions: self.topic_partitions,
            topic_replication_factor: self.topic_replication_factor,
            topic_config,
            delivery: self.delivery,
            transactional_id: self
                .transactional_id
                .clone()
                .filter(|id| !id.trim().is_empty())
                .unwrap_or_else(|| format!("cdc-reader.{}.{}", self.server_name, self.slot)),
            position_topic: self.position_topic.clone(),
            transaction_gap: Duration::from_millis(self.transaction_gap_ms),
        })
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }

    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.status_interval_ms.max(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Config {
        let mut all = vec![
            "cdc-reader",
            "--database-url",
            "postgres://x@h/db",
            "--kafka-brokers",
            "k:1",
        ];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().config
    }

    #[test]
    fn defaults_capture_users_into_user_events() {
        let c = parse(&[]);
        c.validate().unwrap();
        assert_eq!(c.tables, ["public.users"]);
        assert_eq!(c.captured_topics().unwrap(), ["user-events"]);
        let kafka = c.kafka().unwrap();
        assert_eq!(kafka.delivery, Delivery::ExactlyOnce);
        assert_eq!(kafka.transactional_id, "cdc-reader.cdc.cdc_reader");
        assert_eq!(kafka.position_topic, "cdc-reader-positions");
        let bad = parse(&["--producer-config", "transactional.id=x"]);
        assert_eq!(
            bad.validate(),
            Err(ConfigError::Guarantee("transactional.id".into()))
        );
    }

    #[test]
    fn topic_map_and_producer_overrides() {
        let c = parse(&[
            "--tables",
            "public.users,public.orders",
            "--topics",
            "public.users=u",
            "--producer-config",
            "linger.ms=20,compression.type=zstd",
        ]);
        assert_eq!(c.captured_topics().unwrap(), ["public.orders", "u"]);
        assert_eq!(
            c.kafka().unwrap().overrides[1],
            ("compression.type".into(), "zstd".into())
        );
        let bad = parse(&["--topics", "users"]);
        assert_eq!(bad.validate(), Err(ConfigError::Topic("users".into())));
        let bad = parse(&["--producer-config", "acks=1"]);
        assert_eq!(bad.validate(), Err(ConfigError::Guarantee("acks".into())));
        let bad = parse(&["--max-in-flight", "0"]);
        assert_eq!(bad.validate(), Err(ConfigError::MaxInFlight));
        let bad = parse(&["--slot", "Bad-Slot"]);
        assert!(matches!(bad.validate(), Err(ConfigError::Slot(_))));
    }
}
