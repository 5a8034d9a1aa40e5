//! projector: Kafka change events → the materialized views of materialized_view_db.
//!
//! ```text
//!  user-events ──records──► decode ──► batch ──► apply: one Postgres transaction ──► user_view
//!       ▲                     │ bad                 │  view rows + department_stats   department_stats
//!       │                     ▼                     │  + projector_offsets            projector_offsets
//!   seek to the         user-events.dlq ◄───────────┘  (dead letters acknowledged before the commit)
//!   stored offsets
//! ```
//!
//! - `project`: the loop, by job: consuming and positioning (`project/consume.rs`), batching
//!   whole source transactions (`project/batch.rs`), writing and committing view transactions and
//!   dead-lettering what is refused (`project/write.rs`); one `Mode` says live or replay.
//! - [`events`]: record → [`events::Change`]; a run of changes → final rows and stats deltas. Pure.
//! - [`apply`]: the transaction that writes a batch and its offsets together.
//! - [`dead_letter`]: the dead-letter topic.
//! - [`source_position`]: the reader's committed positions, which say when a source transaction is
//!   complete in the topic.
//! - [`leader`]: in whole-transaction mode, one member of the group applies.
//! - [`replay`]: `projector replay` (repair, rebuild with swap).
//! - [`config`], [`telemetry`]: flags, `/health` and `/metrics`.
//!
//! Exactly-once effect: the offsets that count are the ones in `projector_offsets`, committed in the
//! same transaction as the rows. Whenever the consumer group hands this process partitions (the
//! cooperative-sticky assignor moves only those that change owner), each is positioned at the
//! offset stored with the views, and records below it are never applied again. Each view row also
//! remembers the source position it reflects, so even a record delivered twice in the topic (or a
//! replay) changes nothing. Kafka's own committed offsets are updated after each transaction, for
//! lag tools only.

pub mod apply;
pub mod config;
pub mod dead_letter;
pub mod events;
pub mod leader;
mod project;
pub mod replay;
pub mod source_position;
pub mod telemetry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use crate::apply::{ApplyError, Target};
use crate::dead_letter::DeadLetters;
use crate::project::{consumer_config, Context, Mode, Projector};
use crate::source_position::Follower;

pub use config::{Config, Transactions};
pub use telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Migrate(#[from] schema::WaitError),
    #[error("creating a Kafka client failed")]
    Kafka(#[source] KafkaError),
    #[error("the Kafka client kept failing {what} for 30 s")]
    KafkaStuck {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("the projector stopped on an error it cannot retry")]
    Halted(#[source] ApplyError),
    #[error(
        "partition {partition} of {topic} ends at offset {end}, but the views were applied up to \
         offset {stored}: the topic was deleted and created again (or truncated), so its offsets \
         name other records now. Rebuild the views from it (`projector replay --earliest \
         --rebuild`), or, if they are right as they are, delete the projector's stored offsets \
         for the topic (projector_offsets) to start at its beginning"
    )]
    OffsetPastEnd {
        topic: String,
        partition: i32,
        stored: i64,
        end: i64,
    },
}

/// Consumes and applies until `shutdown`. `listener` serves `/health` and `/metrics`.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let metrics = Metrics::new();
    let http = service::telemetry::spawn(listener, metrics.clone(), shutdown.clone());
    let result = consume(&config, &metrics, &shutdown).await;
    metrics.set_state(telemetry::State::Stopping);
    shutdown.cancel();
    if let Err(e) = http.await {
        tracing::error!(task = "telemetry", error = %e, "task panicked");
    }
    result
}

async fn consume(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    if !config.skip_migrations {
        match schema::migrate_when_reachable(
            &config.database_url,
            schema::Database::ViewDb,
            shutdown,
        )
        .await
        {
            Ok(applied) => tracing::info!(?applied, "materialized_view_db schema is current"),
            Err(schema::WaitError::Cancelled(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    let mut replacements = service::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        // In whole-transaction mode one member applies, the others stand by (see [`leader`]).
        let term = match config.transactions {
            Transactions::Whole => {
                let key = Target::lock_key(&config.group, &config.topic);
                let standby = || metrics.set_state(telemetry::State::Standby);
                match leader::acquire(&config.database_url, &key, shutdown, standby).await {
                    Some(term) => Some(term),
                    None => return Ok(()),
                }
            }
            Transactions::PerMember | Transactions::Batches => None,
        };
        let stop = term
            .as_ref()
            .map_or_else(|| shutdown.clone(), |t| t.lost.clone());
        let began = Instant::now();
        match join_and_apply(config, metrics, &stop).await {
            Err(e @ Error::KafkaStuck { .. }) => {
                let error = service::error_chain(&e);
                tracing::warn!(%error, "leaving the group and joining again with a new consumer");
                metrics.record_error(error);
                // A client that stays stuck (a partition offline, the topic deleted) is not
                // replaced in a tight loop: each replacement rebalances the group.
                if began.elapsed() >= Duration::from_secs(300) {
                    replacements.reset();
                }
                if !replacements.wait(shutdown).await {
                    return Ok(());
                }
            }
            other => other?,
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // Not consuming until the lock is held again (or another holds it: standby).
        metrics.set_state(telemetry::State::Starting);
        // (The lock was lost: the consumer has left the group; stand by again.)
    }
}

/// Joins the group and applies until `shutdown`.
async fn join_and_apply(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    metrics.set_state(telemetry::State::Starting);
    let dead_letters = DeadLetters::new(
        &config.kafka_brokers,
        &config.dead_letter_topic(),
        &config.topic,
    )
    .map_err(Error::Kafka)?;
    let kafka = consumer_config(config, &config.group)?;
    let context = Context::new(metrics.clone(), &config.topic);
    let consumer: StreamConsumer<Context> =
        kafka.create_with_context(context).map_err(Error::Kafka)?;
    consumer.subscribe(&[&config.topic]).map_err(Error::Kafka)?;
    let target = Target::live(&config.group, &config.topic, &config.source_table);
    let mode = Mode::Live {
        dead_letters,
        follower: Follower::start(&config.kafka_brokers, &config.position_topic, &config.topic)
            .map_err(Error::Kafka)?,
    };
    let mut p = Projector::new(config, metrics, shutdown, consumer, target, mode)?;
    tracing::info!(topic = %config.topic, group = %config.group,
        dead_letter_topic = %config.dead_letter_topic(), "projector consuming");
    let result = p.run().await.map(|_| ());
    if matches!(result, Err(Error::KafkaStuck { .. })) {
        // A stuck client may hang in its close (leaving the group through a coordinator that
        // does not answer): it closes on a thread of its own, and a fresh one takes over at once.
        let consumer = p.into_consumer();
        std::thread::spawn(move || drop(consumer));
    }
    result
}
