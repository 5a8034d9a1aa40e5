//! `projector replay`: re-applies the topic from a point, while the projector keeps running.
//!
//! - **Repair** (default): the replay takes the live projector's partition locks (the advisory
//!   locks every batch takes), so the projector pauses after its current batch; it recomputes
//!   `department_stats` from `user_view`, then re-applies every event from the start offsets up to
//!   where the projector stands, over whatever position the view rows claim (the derived views
//!   over `user_view` and `posts` follow each batch); then compares every derived view with its
//!   definition and rewrites the rows that differ; then hands the partitions back. A row damaged
//!   by hand is restored to what its events (or, for a derived view, its definition) say.
//! - **Rebuild** (`--rebuild`): fresh, empty copies of the view tables in the schema
//!   `projector_rebuild` are filled from the start offsets while the projector keeps the live
//!   tables current; once the copies have caught up, the live projector is paused, the copies catch
//!   up to its offsets and are swapped in, in one transaction, which also carries the old tables'
//!   triggers over, points the derived views' definitions at the new tables and brings the derived
//!   views in line with them (post-api's writes wait for it). Readers see the old tables or the
//!   new ones, never a half-built one.
//!
//! A replay writes no offsets: the live projector's `projector_offsets` stay what they are, and
//! its position guard makes whatever it applies after the hand-back exact. Events that cannot be
//! applied are reported, not dead-lettered again. Two replays of one group and topic never run at
//! once.
//!
//! Here: the plan and the run; [`offsets`]: where each partition starts and stops; [`swap`]: the
//! swap, pausing the live projector, and recomputing what derives from the views.

mod offsets;
mod swap;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use change_event::format_lsn;
use chrono::{DateTime, Utc};
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::apply::Target;
use crate::project::{assign, consumer_config, Bounds, Context, Mode, Projector};
use crate::{Config, Metrics};
use offsets::{high_watermarks, partition_marks, start_offsets};
use swap::{pause_live, quote, recount_departments, repair_derived, swap, VIEW_TABLES};

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    /// Every partition from its first record.
    Earliest,
    /// The listed partitions from these offsets (the others are left alone).
    Offsets(Vec<(i32, i64)>),
    /// Every partition from this offset.
    Offset(i64),
    /// Every partition from its first record with a Kafka timestamp at or after this.
    Timestamp(DateTime<Utc>),
    /// Every partition from its first event whose source commit LSN is at or after this.
    Lsn(u64),
}

impl std::fmt::Display for From {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            From::Earliest => write!(f, "the earliest offsets"),
            From::Offsets(o) => {
                let list: Vec<String> = o.iter().map(|(p, o)| format!("{p}:{o}")).collect();
                write!(f, "offsets {}", list.join(","))
            }
            From::Offset(o) => write!(f, "offset {o} of every partition"),
            From::Timestamp(t) => write!(f, "timestamp {}", t.to_rfc3339()),
            From::Lsn(l) => write!(f, "LSN {}", format_lsn(*l)),
        }
    }
}

/// Parses `--offset`: `PARTITION:OFFSET[,...]`, or one `OFFSET` for every partition.
pub fn parse_offset_arg(text: &str) -> Result<From, String> {
    match text.trim().parse::<i64>() {
        Ok(o) if o >= 0 => Ok(From::Offset(o)),
        Ok(_) => Err(format!("{text:?}: the offset is not a number ≥ 0")),
        Err(_) => parse_offsets(text).map(From::Offsets),
    }
}

/// Parses `PARTITION:OFFSET[,...]`.
pub fn parse_offsets(text: &str) -> Result<Vec<(i32, i64)>, String> {
    let mut out: Vec<(i32, i64)> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (p, o) = entry
            .split_once(':')
            .ok_or_else(|| format!("{entry:?} is not PARTITION:OFFSET"))?;
        let p: i32 = p
            .trim()
            .parse()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(|| format!("{entry:?}: the partition is not a number ≥ 0"))?;
        let o: i64 = o
            .trim()
            .parse()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(|| format!("{entry:?}: the offset is not a number ≥ 0"))?;
        if out.iter().any(|(q, _)| *q == p) {
            return Err(format!("partition {p} is listed twice"));
        }
        out.push((p, o));
    }
    if out.is_empty() {
        return Err("no PARTITION:OFFSET given".into());
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("Kafka: {what}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
    #[error("the topic {0} does not exist or has no partitions")]
    NoTopic(String),
    #[error("partition {0} does not exist in the topic (it has {1})")]
    NoPartition(i32, usize),
    #[error(
        "offset {offset} of partition {partition} is outside what the topic holds ({low}..{high})"
    )]
    OffsetOutOfRange {
        partition: i32,
        offset: i64,
        low: i64,
        high: i64,
    },
    #[error("the broker sent nothing more from partition {partition} after offset {offset} (its end is {high})")]
    Stalled {
        partition: i32,
        offset: i64,
        high: i64,
    },
    #[error("materialized_view_db: {what}")]
    Sql {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "--rebuild replaces the views whole, so it reads every partition (the topic has {0}): \
         list them all in --offset, give one OFFSET for all, or repair without --rebuild"
    )]
    PartialRebuild(usize),
    #[error("another replay of group {0} on topic {1} is running")]
    Busy(String, String),
    #[error("the projector's replay failed")]
    Projector(#[source] Box<crate::Error>),
    #[error("stopped before the replay was done; the live views are as they were{0}")]
    Interrupted(&'static str),
}

fn sql(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ReplayError {
    move |source| ReplayError::Sql { what, source }
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> ReplayError {
    let what = what.into();
    move |source| ReplayError::Kafka { what, source }
}

/// What a replay will do, for the confirmation prompt.
#[derive(Debug, Clone)]
pub struct Plan {
    pub group: String,
    pub topic: String,
    pub from: From,
    pub rebuild: bool,
    /// Per partition: (start offset, stop offset as of now).
    pub ranges: BTreeMap<i32, (i64, i64)>,
}

impl Plan {
    pub fn events(&self) -> i64 {
        self.ranges.values().map(|(a, b)| (b - a).max(0)).sum()
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|(p, (a, b))| format!("{p}:{a}..{b}"))
            .collect();
        if self.rebuild {
            writeln!(
                f,
                "Rebuild the views of group {} from {} of {}: fresh tables are filled from \
                 partition:offsets {}, then swapped in for the live ones.",
                self.group,
                self.from,
                self.topic,
                ranges.join(" ")
            )?;
            if self.from != From::Earliest {
                writeln!(
                    f,
                    "The rebuilt views hold only what the events from there say: users whose \
                     last change came earlier will be missing."
                )?;
            }
        } else {
            writeln!(
                f,
                "Re-apply the events of {} for group {} from {} (partition:offsets {}) over the \
                 live views; the projector pauses meanwhile.",
                self.topic,
                self.group,
                self.from,
                ranges.join(" ")
            )?;
        }
        write!(f, "About {} events.", self.events())
    }
}

/// How far a running replay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: i64,
    pub total: i64,
}

/// What a finished replay did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Events read and applied (or found inapplicable).
    pub events: u64,
    pub upserted: u64,
    pub deleted: u64,
    /// Events that cannot be applied (reported in the log).
    pub not_applied: u64,
}

/// The schema a rebuild fills before the swap.
pub const REBUILD_SCHEMA: &str = "projector_rebuild";

/// Runs a replay. `confirm` sees the plan first and may refuse it (then `Ok(None)`); `progress`
/// is called about once a second.
pub async fn replay(
    config: &Config,
    from: From,
    rebuild: bool,
    confirm: impl FnOnce(&Plan) -> bool,
    progress: impl Fn(Progress) + Send + 'static,
    shutdown: &CancellationToken,
) -> Result<Option<Summary>, ReplayError> {
    config.validate()?;
    let metrics = Metrics::new();
    let consumer: StreamConsumer<Context> =
        consumer_config(config, &format!("{}.replay", config.group))
            .map_err(|e| ReplayError::Projector(Box::new(e)))?
            // The end of a partition ends its range even where no record follows the last one
            // of the range (a transaction marker, compaction).
            .set("enable.partition.eof", "true")
            .create_with_context(Context::new(metrics.clone(), &config.topic))
            .map_err(kafka("creating a consumer"))?;
    // (Blocking calls, on the blocking pool.)
    let topic = config.topic.clone();
    let (consumer, marks) = service::blocking(move || {
        let marks = partition_marks(&consumer, &topic)?;
        Ok::<_, ReplayError>((consumer, marks))
    })
    .await?;
    let db = connect(&config.database_url).await?;
    let live_offsets = stored_offsets(&db, config).await?;
    let start = start_offsets(config, &from, &marks).await?;
    if rebuild && start.len() < marks.len() {
        // The rebuilt tables replace the live ones whole: the other partitions' rows would go.
        return Err(ReplayError::PartialRebuild(marks.len()));
    }

    let replay_lock = Target::lock_key(&format!("{} replay", config.group), &config.topic);
    let free: bool = db
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext($1), -1)",
            &[&replay_lock],
        )
        .await
        .map_err(sql("taking the replay lock"))?
        .get(0);
    if !free {
        return Err(ReplayError::Busy(
            config.group.clone(),
            config.topic.clone(),
        ));
    }
    let stop_of = |live: &BTreeMap<i32, i64>, p: i32, start: i64| {
        let high = marks[&p].1;
        let stop = if rebuild {
            high
        } else {
            live.get(&p).copied().unwrap_or(high)
        };
        stop.max(start)
    };
    let plan = Plan {
        group: config.group.clone(),
        topic: config.topic.clone(),
        from: from.clone(),
        rebuild,
        ranges: start
            .iter()
            .map(|(p, s)| (*p, (*s, stop_of(&live_offsets, *p, *s))))
            .collect(),
    };
    if !confirm(&plan) {
        return Ok(None);
    }

    let ranges = Arc::new(std::sync::Mutex::new(plan.ranges.clone()));
    let reporter = spawn_progress(metrics.clone(), ranges.clone(), progress);
    let target = Target {
        group: config.group.clone(),
        topic: config.topic.clone(),
        source_table: config.source_table.clone(),
        lock_key: replay_lock.clone(),
        schema: None,
        replay: true,
        // A repair writes over the live views: only while the projector is paused.
        paused: (!rebuild).then(|| Target::lock_key(&config.group, &config.topic)),
    };
    let partitions: Vec<i32> = start.keys().copied().collect();
    assign(&consumer, &config.topic, &partitions)
        .map_err(|e| ReplayError::Projector(Box::new(e)))?;
    let run = Run {
        config,
        db: &db,
        metrics: &metrics,
        shutdown,
        start: &start,
        marks: &marks,
        ranges: &ranges,
    };
    let result = if rebuild {
        run.rebuild(consumer, target).await
    } else {
        run.repair(consumer, target).await
    };
    reporter.abort();
    if let Err(e) = db.execute("SELECT pg_advisory_unlock_all()", &[]).await {
        tracing::debug!(error = %e, "releasing the locks failed (they go with the connection)");
    }
    result?;
    Ok(Some(Summary {
        events: metrics.events.load(Ordering::Relaxed),
        upserted: metrics.upserted.load(Ordering::Relaxed),
        deleted: metrics.deleted.load(Ordering::Relaxed),
        not_applied: metrics.dead_lettered.load(Ordering::Relaxed),
    }))
}

type Ranges = Arc<std::sync::Mutex<BTreeMap<i32, (i64, i64)>>>;

/// What both kinds of replay work with.
#[derive(Clone, Copy)]
struct Run<'a> {
    config: &'a Config,
    /// The replay's own connection: its locks, the recount, the swap.
    db: &'a Client,
    metrics: &'a Arc<Metrics>,
    shutdown: &'a CancellationToken,
    start: &'a BTreeMap<i32, i64>,
    /// (low, high) offsets per partition when the replay began.
    marks: &'a BTreeMap<i32, (i64, i64)>,
    ranges: &'a Ranges,
}

impl<'a> Run<'a> {
    /// A projector bounded to read from the start offsets up to `stop`, writing to `target`.
    fn projector(
        self,
        consumer: StreamConsumer<Context>,
        target: Target,
        stop: BTreeMap<i32, i64>,
    ) -> Result<Projector<'a>, ReplayError> {
        set_ranges(self.ranges, self.start, &stop);
        let bounds = Bounds {
            start: self.start.clone(),
            stop,
            ended: Default::default(),
        };
        Projector::new(
            self.config,
            self.metrics,
            self.shutdown,
            consumer,
            target,
            Mode::Replay(bounds),
        )
        .map_err(|e| ReplayError::Projector(Box::new(e)))
    }

    async fn repair(
        self,
        consumer: StreamConsumer<Context>,
        target: Target,
    ) -> Result<(), ReplayError> {
        let Run {
            config,
            db,
            start,
            marks,
            ..
        } = self;
        // Pause the live projector: its batches take these locks.
        pause_live(db, config, marks).await?;
        let live = stored_offsets(db, config).await?;
        let stop: BTreeMap<i32, i64> = start
            .iter()
            .map(|(p, s)| (*p, live.get(p).copied().unwrap_or(marks[p].1).max(*s)))
            .collect();
        // Hand edits may have put department_stats out of step with user_view; the replay's
        // changes are counted from what user_view holds.
        recount_departments(db, None).await?;
        let mut p = self.projector(consumer, target, stop)?;
        match p.run().await {
            Ok(true) => {}
            Ok(false) => {
                return Err(ReplayError::Interrupted(
                    " but for the events re-applied so far (run the replay again)",
                ))
            }
            Err(e) => return Err(ReplayError::Projector(Box::new(e))),
        }
        // The views derived from user_view and posts followed every re-applied event; rows
        // damaged by hand are restored from their definitions.
        repair_derived(db).await
    }

    async fn rebuild(
        self,
        consumer: StreamConsumer<Context>,
        target: Target,
    ) -> Result<(), ReplayError> {
        let Run {
            config,
            db,
            start,
            marks,
            ranges,
            ..
        } = self;
        let live_schema: String = db
            .query_one(
                "SELECT n.nspname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = 'user_view'::regclass",
                &[],
            )
            .await
            .map_err(sql("finding the view tables"))?
            .get(0);
        let mut create = format!(
            "DROP SCHEMA IF EXISTS {REBUILD_SCHEMA} CASCADE; CREATE SCHEMA {REBUILD_SCHEMA};"
        );
        for t in VIEW_TABLES {
            create.push_str(&format!(
                " CREATE TABLE {REBUILD_SCHEMA}.{t} (LIKE {live}.{t} INCLUDING ALL);",
                live = quote(&live_schema)
            ));
        }
        db.batch_execute(&create)
            .await
            .map_err(sql("creating the rebuild's tables"))?;
        let target = Target {
            // The offsets table (never written by a replay) still resolves, to the live one.
            schema: Some(format!("{REBUILD_SCHEMA}, {}", quote(&live_schema))),
            ..target
        };
        let outcome = async {
            let stop: BTreeMap<i32, i64> = start
                .iter()
                .map(|(p, s)| (*p, marks[p].1.max(*s)))
                .collect();
            let mut p = self.projector(consumer, target, stop)?;
            // 1. From the start to the end of the topic as it was; 2. on to its end now, while
            // the projector keeps the live tables current; 3. with the projector paused, on to
            // where it stands; then the swap.
            for phase in 0..3 {
                if phase > 0 {
                    let ends = if phase == 2 {
                        pause_live(db, config, marks).await?;
                        stored_offsets(db, config).await?
                    } else {
                        let topic = config.topic.clone();
                        let partitions: Vec<i32> = start.keys().copied().collect();
                        p.kafka(move |c| high_watermarks(c, &topic, partitions.iter()))
                            .await?
                    };
                    let stop: BTreeMap<i32, i64> = p
                        .next_offsets()
                        .map(|(part, next)| (part, ends.get(&part).copied().unwrap_or(0).max(next)))
                        .collect();
                    set_ranges(ranges, start, &stop);
                    p.resume(stop)
                        .await
                        .map_err(|e| ReplayError::Projector(Box::new(e)))?;
                }
                match p.run().await {
                    Ok(true) => {}
                    Ok(false) => return Err(ReplayError::Interrupted("")),
                    Err(e) => return Err(ReplayError::Projector(Box::new(e))),
                }
            }
            swap(db, &live_schema).await
        }
        .await;
        if outcome.is_err() {
            if let Err(e) = db
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {REBUILD_SCHEMA} CASCADE"))
                .await
            {
                tracing::warn!(error = %e, "dropping the rebuild's tables failed");
            }
        }
        outcome
    }
}

async fn connect(url: &str) -> Result<Client, ReplayError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(sql("connecting"))?;
    service::spawn_connection(conn, "replay");
    Ok(client)
}

/// The live projector's stored offsets.
async fn stored_offsets(db: &Client, config: &Config) -> Result<BTreeMap<i32, i64>, ReplayError> {
    let rows = db
        .query(
            "SELECT partition, next_offset FROM projector_offsets \
             WHERE consumer_group = $1 AND topic = $2",
            &[&config.group, &config.topic],
        )
        .await
        .map_err(sql("reading the projector's offsets"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn set_ranges(ranges: &Ranges, start: &BTreeMap<i32, i64>, stop: &BTreeMap<i32, i64>) {
    *service::lock(ranges) = start
        .iter()
        .map(|(p, s)| (*p, (*s, stop.get(p).copied().unwrap_or(*s))))
        .collect();
}

fn spawn_progress(
    metrics: Arc<Metrics>,
    ranges: Ranges,
    progress: impl Fn(Progress) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let applied = metrics.applied();
            let r = service::lock(&ranges).clone();
            let (mut done, mut total) = (0, 0);
            for (p, (start, stop)) in r {
                total += (stop - start).max(0);
                done += (applied.get(&p).copied().unwrap_or(start).min(stop) - start).max(0);
            }
            progress(Progress { done, total });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_strictly() {
        assert_eq!(parse_offset_arg("17"), Ok(From::Offset(17)));
        assert_eq!(parse_offset_arg("1:17"), Ok(From::Offsets(vec![(1, 17)])));
        assert!(parse_offset_arg("-3").is_err());
        assert_eq!(parse_offsets("0:10, 2:0"), Ok(vec![(0, 10), (2, 0)]));
        assert!(parse_offsets("0:10,0:11").is_err());
        assert!(parse_offsets("0").is_err());
        assert!(parse_offsets("-1:5").is_err());
        assert!(parse_offsets("1:x").is_err());
        assert!(parse_offsets("").is_err());
    }

    #[test]
    fn the_plan_says_what_happens() {
        let plan = Plan {
            group: "g".into(),
            topic: "t".into(),
            from: From::Offsets(vec![(0, 5)]),
            rebuild: true,
            ranges: BTreeMap::from([(0, (5, 15)), (1, (3, 3))]),
        };
        let text = plan.to_string();
        assert!(text.contains("0:5..15"), "{text}");
        assert!(text.contains("will be missing"), "{text}");
        assert!(text.ends_with("About 10 events."), "{text}");
    }
}
