//! Settings of the projector. Every flag can also be set through the environment variable shown in
//! `--help`; they share the `PROJECTOR_` prefix, except `KAFKA_BROKERS` and `VIEW_DB_URL`, which
//! mean the same thing for every service.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(clap::Args, Clone)]
pub struct Config {
    /// materialized_view_db, as a role that owns the view tables.
    #[arg(long, env = "VIEW_DB_URL", hide_env_values = true)]
    pub database_url: String,

    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Topic of the change events of the users table.
    #[arg(long, env = "PROJECTOR_TOPIC", default_value = "user-events")]
    pub topic: String,

    /// Consumer group. The offsets that count are the ones in materialized_view_db's
    /// projector_offsets table; they are committed to Kafka too, for lag tools.
    #[arg(long, env = "PROJECTOR_GROUP", default_value = "post-service-streams")]
    pub group: String,

    /// The reader's position topic (`CDC_READER_POSITION_TOPIC`): how far the views are
    /// complete in the source's history is read from it, for read-your-writes.
    #[arg(
        long,
        env = "PROJECTOR_POSITION_TOPIC",
        default_value = "cdc-reader-positions"
    )]
    pub position_topic: String,

    /// Where events that cannot be applied go (default: the topic's name + ".dlq").
    #[arg(long, env = "PROJECTOR_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,

    /// The source table the events must come from, as schema.table; others are dead-lettered.
    #[arg(long, env = "PROJECTOR_SOURCE_TABLE", default_value = "public.users")]
    pub source_table: String,

    /// Most events a view transaction takes from the records held, unless one source transaction
    /// has more (a view transaction always holds whole source transactions; one with parts
    /// written while more than --hold-max-kib was held has as many as they need).
    #[arg(long, env = "PROJECTOR_BATCH_MAX_EVENTS", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_max_events: u32,

    /// Most record data, in KiB, held in memory while source transactions are incomplete (a
    /// transaction still arriving, a partition behind the others). Past it, the oldest held
    /// transactions are written into a view transaction left open until they are complete: memory
    /// stays bounded whatever a transaction's size.
    #[arg(long, env = "PROJECTOR_HOLD_MAX_KIB", default_value_t = 16384, value_parser = clap::value_parser!(u64).range(1..))]
    pub hold_max_kib: u64,

    /// Longest time to wait for more events before applying a batch, in milliseconds. 0: a batch
    /// is what has arrived when the previous one committed (events that arrive while a batch is
    /// being applied make the next one larger), never a wait.
    #[arg(long, env = "PROJECTOR_BATCH_MAX_WAIT_MS", default_value_t = 0)]
    pub batch_max_wait_ms: u64,

    /// `whole`: every view transaction holds whole source transactions, also when their events
    /// span partitions; a projector then applies only while it holds every partition of the
    /// topic (one active member per group; another one waits). `per-member`: several members
    /// share the partitions and each applies its own, so a source transaction with events in
    /// partitions of different members is applied in parts, one per member. `batches`: view
    /// transactions end where batches end, whole source transactions or not (for topics whose
    /// positions are stale, e.g. a reader switched to `CDC_READER_DELIVERY=at-least-once`; with
    /// no positions at all the projector does so by itself, with a warning).
    #[arg(long, env = "PROJECTOR_TRANSACTIONS", value_enum, default_value_t = Transactions::Whole)]
    pub transactions: Transactions,

    /// Extra librdkafka consumer properties, comma-separated key=value.
    #[arg(long, env = "PROJECTOR_CONSUMER_CONFIG", value_delimiter = ',')]
    pub consumer_config: Vec<String>,

    /// Address of the /health and /metrics endpoint.
    #[arg(long, env = "PROJECTOR_HTTP_LISTEN", default_value = "127.0.0.1:9102")]
    pub http_listen: SocketAddr,

    /// Do not apply migrations on start (when a separate `migrate` step owns the schema).
    #[arg(long, env = "PROJECTOR_SKIP_MIGRATIONS")]
    pub skip_migrations: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL may carry a password.
        f.debug_struct("Config")
            .field("kafka_brokers", &self.kafka_brokers)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("position_topic", &self.position_topic)
            .field("dead_letter_topic", &self.dead_letter_topic())
            .field("source_table", &self.source_table)
            .field("batch_max_events", &self.batch_max_events)
            .field("batch_max_wait_ms", &self.batch_max_wait_ms)
            .field("hold_max_kib", &self.hold_max_kib)
            .field("transactions", &self.transactions)
            .field("http_listen", &self.http_listen)
            .finish_non_exhaustive()
    }
}

/// How source transactions map onto view transactions (`--transactions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transactions {
    Whole,
    PerMember,
    Batches,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--consumer-config entry {0:?} is not key=value")]
    Consumer(String),
    #[error("--consumer-config may not set {0}: exactly-once application depends on it")]
    Guarantee(String),
    #[error("--source-table {0:?} is not schema.table")]
    SourceTable(String),
    #[error("the dead-letter topic may not be the topic it protects ({0})")]
    DeadLetterTopic(String),
}

/// Consumer settings the exactly-once effect depends on; not overridable.
const PROTECTED: [&str; 4] = [
    "enable.auto.commit",
    "isolation.level",
    "group.id",
    "enable.auto.offset.store",
];

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.consumer_overrides()?;
        self.source_table()?;
        if self.dead_letter_topic() == self.topic {
            return Err(ConfigError::DeadLetterTopic(self.topic.clone()));
        }
        Ok(())
    }

    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.topic))
    }

    /// `(schema, table)` of `--source-table`.
    pub fn source_table(&self) -> Result<(String, String), ConfigError> {
        match self.source_table.split_once('.') {
            Some((s, t)) if !s.is_empty() && !t.is_empty() && !t.contains('.') => {
                Ok((s.to_owned(), t.to_owned()))
            }
            _ => Err(ConfigError::SourceTable(self.source_table.clone())),
        }
    }

    pub fn consumer_overrides(&self) -> Result<Vec<(String, String)>, ConfigError> {
        self.consumer_config
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let (k, v) = e
                    .split_once('=')
                    .ok_or_else(|| ConfigError::Consumer(e.clone()))?;
                let k = k.trim();
                if PROTECTED.contains(&k) {
                    return Err(ConfigError::Guarantee(k.to_owned()));
                }
                Ok((k.to_owned(), v.trim().to_owned()))
            })
            .collect()
    }

    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        config: Config,
    }

    fn parse(extra: &[&str]) -> Config {
        let mut args = vec![
            "projector",
            "--database-url",
            "postgres://x@h/db",
            "--kafka-brokers",
            "h:1",
        ];
        args.extend_from_slice(extra);
        Args::try_parse_from(args).unwrap().config
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = parse(&[]);
        assert_eq!(c.topic, "user-events");
        assert_eq!(c.group, "post-service-streams");
        assert_eq!(c.dead_letter_topic(), "user-events.dlq");
        assert_eq!(c.source_table().unwrap(), ("public".into(), "users".into()));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn guarantees_cannot_be_overridden() {
        let c = parse(&[
            "--consumer-config",
            "fetch.min.bytes=1,enable.auto.commit=true",
        ]);
        assert_eq!(
            c.validate(),
            Err(ConfigError::Guarantee("enable.auto.commit".into()))
        );
        let c = parse(&["--consumer-config", "nonsense"]);
        assert!(matches!(c.validate(), Err(ConfigError::Consumer(_))));
        let c = parse(&["--source-table", "users"]);
        assert!(matches!(c.validate(), Err(ConfigError::SourceTable(_))));
        let c = parse(&["--dead-letter-topic", "user-events"]);
        assert!(matches!(c.validate(), Err(ConfigError::DeadLetterTopic(_))));
        let c = parse(&["--consumer-config", "fetch.min.bytes=1"]);
        assert_eq!(
            c.consumer_overrides().unwrap(),
            vec![("fetch.min.bytes".to_owned(), "1".to_owned())]
        );
    }
}
