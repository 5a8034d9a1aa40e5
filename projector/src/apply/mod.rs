//! The Postgres side: the view transaction that writes the view rows, the department counts and
//! the Kafka offsets together, so the views and "how far we read" never disagree. It is written in
//! one or more parts ([`Store::write`], each under a savepoint) and committed with the offsets
//! ([`Store::commit`]).
//!
//! Per part, whatever its size, a fixed handful of statements run (all prepared once per
//! connection and pipelined): lock the part's partitions, read the current state of the users it
//! touches, then write the outcome of [`events::fold`] with `unnest` arrays. A truncate splits the
//! part: what came before it is written, the truncate is applied, and the rest is folded against
//! the state after it.

mod statements;
mod write;

use std::collections::{BTreeMap, BTreeSet};

use change_event::{format_lsn, parse_lsn, RecordPosition};
use tokio_postgres::Client;

use statements::Statements;
use write::{truncate_views, write_complete, write_segment};

use crate::events::{BadEvent, Change};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("connecting to materialized_view_db failed")]
    Connect(#[source] tokio_postgres::Error),
    #[error("{what} failed")]
    Sql {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("materialized_view_db holds a position that is not an LSN: {0:?}")]
    BadLsn(String),
    #[error(
        "department_stats has no row for {0}, which user_view says it must have (edited by hand?)"
    )]
    StatsOutOfStep(String),
    #[error(
        "the projector is no longer paused (the replay's own connection, which held its locks, \
         was lost): stopped so as not to write over what it applies; run the replay again"
    )]
    PauseLost,
    #[error(
        "the connection to materialized_view_db was lost with a view transaction open; its \
         records are read again from the stored offsets"
    )]
    TransactionLost,
    #[error(
        "another applier stored offsets of partition {partition} past this view transaction's \
         first record ({stored} > {first}: a projector that lost the partition in a rebalance \
         finishing late, or offsets set by hand); rolled back, the partitions are read again \
         from the stored offsets"
    )]
    OffsetsMoved {
        partition: i32,
        stored: i64,
        first: i64,
    },
}

impl ApplyError {
    /// True when retrying the same batch later may succeed (connection lost, server restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Connect(e) | ApplyError::Sql { source: e, .. } => {
                service::is_transient_pg(e)
            }
            ApplyError::TransactionLost => true,
            ApplyError::BadLsn(_)
            | ApplyError::StatsOutOfStep(_)
            | ApplyError::PauseLost
            | ApplyError::OffsetsMoved { .. } => false,
        }
    }
}

fn sql(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
    move |source| ApplyError::Sql { what, source }
}

/// One event of a batch, decoded.
#[derive(Debug, Clone)]
pub struct Item {
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp in ms (when the reader produced it), if it has one.
    pub timestamp_ms: Option<i64>,
    /// Its `cdc.position` header, when it has one.
    pub position: Option<RecordPosition>,
    /// `None` for a record that was dead-lettered: only its offset counts.
    pub change: Option<Change>,
}

/// What `projector_offsets` holds of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The next record to apply.
    pub next_offset: i64,
    /// See [`crate::source_position`]; 0 when none.
    pub complete_lsn: u64,
    /// The last record applied, when known.
    pub last_position: Option<RecordPosition>,
}

/// A partition's `complete_lsn` to store (see [`crate::source_position`]), with the offset to
/// give it when it has no row yet (no record of it applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    pub partition: i32,
    pub next_offset: i64,
    pub complete_lsn: u64,
}

/// What a committed batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub upserted: usize,
    pub deleted: usize,
    pub truncates: usize,
    /// Events the views already reflected.
    pub ignored: usize,
    /// Highest source commit LSN among the batch's events.
    pub last_lsn: Option<u64>,
}

/// The view transaction a [`Store`] has open: what was written in it so far.
#[derive(Debug, Default)]
struct Open {
    /// Partitions whose advisory lock it holds.
    locked: BTreeSet<i32>,
    /// Per partition: the offsets to store at commit.
    lasts: BTreeMap<i32, Last>,
    outcome: Outcome,
}

/// What is stored of a partition after the last record of it written.
#[derive(Debug, Default, Clone, Copy)]
struct Last {
    /// The first record of it written.
    first_offset: Option<i64>,
    next_offset: i64,
    commit_lsn: Option<u64>,
    timestamp_ms: Option<i64>,
    position: Option<RecordPosition>,
}

/// What a [`Store`] writes to, and how.
#[derive(Debug, Clone)]
pub struct Target {
    /// Consumer group of the offsets it keeps in `projector_offsets`.
    pub group: String,
    pub topic: String,
    /// `schema.table` the events come from (for truncates).
    pub source_table: String,
    /// The advisory lock a batch takes per partition: appliers of one group and topic with the
    /// same key never interleave their batches (see [`Target::lock_key`]).
    pub lock_key: String,
    /// The schema of the view tables, when not the role's default (a rebuild's fresh tables).
    pub schema: Option<String>,
    /// A replay: every event is applied over whatever position the view row claims (the events
    /// come in order, from a point the caller chose), and no offsets are written.
    pub replay: bool,
    /// The lock key of a projector this one must find paused (its partition locks held by
    /// another session) in every batch: a repair writing over the live views.
    pub paused: Option<String>,
}

impl Target {
    /// The live projector's target: the default schema, offsets kept.
    pub fn live(group: &str, topic: &str, source_table: &str) -> Target {
        Target {
            group: group.to_owned(),
            topic: topic.to_owned(),
            source_table: source_table.to_owned(),
            lock_key: Target::lock_key(group, topic),
            schema: None,
            replay: false,
            paused: None,
        }
    }

    /// The advisory lock key of the projector of `group` on `topic`; the second key is the
    /// partition. Holding it (for every partition) keeps that projector's batches out.
    pub fn lock_key(group: &str, topic: &str) -> String {
        format!("projector {group} {topic}")
    }
}

/// A connection to materialized_view_db with the projector's statements prepared on it.
pub struct Store {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    s: Statements,
    target: Target,
    /// The view transaction open on the connection, if any.
    open: Option<Open>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Store {
    pub async fn connect(url: &str, target: &Target) -> Result<Store, ApplyError> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(ApplyError::Connect)?;
        let connection = service::spawn_connection(conn, "view transactions");
        // Without JIT: a view transaction's statements (and the derived views' refresh at its
        // commit) over a few thousand rows pass the planner's jit_above_cost, and compiling
        // takes longer than running them (pgbench, 5,000 new users per transaction: 37.9–38.9 ms
        // against 39.0–40.4 ms).
        client
            .batch_execute("SET jit = off")
            .await
            .map_err(sql("turning JIT off"))?;
        if let Some(schema) = &target.schema {
            // Before preparing: the statements' table names resolve through it.
            client
                .execute("SELECT set_config('search_path', $1, false)", &[schema])
                .await
                .map_err(sql("setting the search path"))?;
        }
        let s = Statements::prepare(&client).await?;
        Ok(Store {
            client,
            connection,
            s,
            target: target.clone(),
            open: None,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// What is stored of `partition`, if anything.
    pub async fn next_offset(&self, partition: i32) -> Result<Option<Stored>, ApplyError> {
        let row = self
            .client
            .query_opt(
                &self.s.read_offset,
                &[&self.target.group, &self.target.topic, &partition],
            )
            .await
            .map_err(sql("reading the stored offset"))?;
        row.map(|r| {
            let complete = match r.get::<_, Option<&str>>(1) {
                Some(lsn) => parse_lsn(lsn).ok_or_else(|| ApplyError::BadLsn(lsn.to_owned()))?,
                None => 0,
            };
            Ok(Stored {
                next_offset: r.get(0),
                complete_lsn: complete,
                last_position: r.get::<_, Option<&str>>(2).and_then(RecordPosition::parse),
            })
        })
        .transpose()
    }

    /// Records how many partitions the topic has, for `projector_source_position`.
    pub async fn set_topic_partitions(&self, partitions: i32) -> Result<(), ApplyError> {
        self.client
            .execute(
                &self.s.topic_partitions,
                &[&self.target.group, &self.target.topic, &partitions],
            )
            .await
            .map_err(sql("storing the topic's partition count"))?;
        Ok(())
    }

    /// Raises the `complete_lsn` of partitions no record of which is being applied (in a
    /// transaction of its own).
    pub async fn raise_complete(&self, completes: &[Complete]) -> Result<(), ApplyError> {
        write_complete(&self.client, &self.s, &self.target, completes).await
    }

    /// Whether a view transaction is open (something written, not yet committed).
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Writes `items` into the view transaction, beginning one when none is open. Returns the
    /// items (by index) that turned out inapplicable against the current rows: they must be
    /// dead-lettered before [`Store::commit`]. The write runs under a savepoint: when it fails
    /// and the transaction is still open ([`Store::in_transaction`]), nothing of `items` is left
    /// in it and it goes on (so a batch the database refuses can be bisected inside it).
    pub async fn write(&mut self, items: &[Item]) -> Result<Vec<(usize, BadEvent)>, ApplyError> {
        if self.open.is_none() {
            self.client
                .batch_execute("BEGIN")
                .await
                .map_err(sql("beginning a transaction"))?;
            self.open = Some(Open::default());
        }
        let result = async {
            self.client
                .batch_execute("SAVEPOINT chunk")
                .await
                .map_err(sql("setting a savepoint"))?;
            let written = self.write_items(items).await?;
            self.client
                .batch_execute("RELEASE SAVEPOINT chunk")
                .await
                .map_err(sql("releasing a savepoint"))?;
            Ok(written)
        }
        .await;
        match result {
            Ok((bad, locked, lasts, outcome)) => {
                let open = self.open.get_or_insert_with(Open::default);
                open.locked.extend(locked);
                for (partition, last) in lasts {
                    let e = open.lasts.entry(partition).or_default();
                    e.first_offset = match (e.first_offset, last.first_offset) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    e.next_offset = e.next_offset.max(last.next_offset);
                    e.commit_lsn = e.commit_lsn.max(last.commit_lsn);
                    e.timestamp_ms = e.timestamp_ms.max(last.timestamp_ms);
                    e.position = e.position.max(last.position);
                }
                let o = &mut open.outcome;
                o.upserted += outcome.upserted;
                o.deleted += outcome.deleted;
                o.truncates += outcome.truncates;
                o.ignored += outcome.ignored;
                o.last_lsn = o.last_lsn.max(outcome.last_lsn);
                Ok(bad)
            }
            Err(e) => {
                if self
                    .client
                    .batch_execute("ROLLBACK TO SAVEPOINT chunk")
                    .await
                    .is_err()
                {
                    self.rollback().await;
                }
                Err(e)
            }
        }
    }

    /// Stores the offsets after everything written and `completes`, and commits. Returns what the
    /// transaction did.
    pub async fn commit(&mut self, completes: &[Complete]) -> Result<Outcome, ApplyError> {
        let Some(open) = self.open.take() else {
            write_complete(&self.client, &self.s, &self.target, completes).await?;
            return Ok(Outcome::default());
        };
        let stored = async {
            let (s, t) = (&self.s, &self.target);
            if !t.replay {
                let parts: Vec<i32> = open.lasts.keys().copied().collect();
                let offsets: Vec<i64> = open.lasts.values().map(|v| v.next_offset).collect();
                let lsns: Vec<Option<String>> = open
                    .lasts
                    .values()
                    .map(|v| v.commit_lsn.map(format_lsn))
                    .collect();
                let times: Vec<Option<i64>> = open.lasts.values().map(|v| v.timestamp_ms).collect();
                let last: Vec<Option<String>> = open
                    .lasts
                    .values()
                    .map(|v| v.position.map(|p| p.header_value()))
                    .collect();
                // Pipelined: the stored offsets are read (and locked) before they are written.
                let (stored, _, ()) = tokio::try_join!(
                    async {
                        self.client
                            .query(&s.stored_offsets, &[&t.group, &t.topic, &parts])
                            .await
                            .map_err(sql("reading the stored offsets"))
                    },
                    async {
                        self.client
                            .execute(
                                &s.offsets,
                                &[&t.group, &t.topic, &parts, &offsets, &lsns, &times, &last],
                            )
                            .await
                            .map_err(sql("storing offsets"))
                    },
                    write_complete(&self.client, s, t, completes),
                )?;
                // Live view transactions share the partition locks (see `lock_shared`): another
                // applier of these partitions (a member that lost them in a rebalance, finishing
                // late) may have committed some of these records meanwhile. Only one of the two
                // commits.
                for row in stored {
                    let (partition, stored): (i32, i64) = (row.get(0), row.get(1));
                    let first = open.lasts.get(&partition).and_then(|l| l.first_offset);
                    if let Some(first) = first.filter(|f| stored > *f) {
                        return Err(ApplyError::OffsetsMoved {
                            partition,
                            stored,
                            first,
                        });
                    }
                }
            }
            self.client
                .batch_execute("COMMIT")
                .await
                .map_err(sql("commit"))
        }
        .await;
        match stored {
            Ok(()) => Ok(open.outcome),
            Err(e) => {
                self.open = Some(open);
                self.rollback().await;
                Err(e)
            }
        }
    }

    /// Abandons the open view transaction, if any. (When even that fails the connection is
    /// dropped, which ends the transaction on the server.)
    pub async fn rollback(&mut self) {
        if self.open.take().is_some() {
            if let Err(e) = self.client.batch_execute("ROLLBACK").await {
                tracing::debug!(error = %e, "rolling back failed; closing the connection");
                self.connection.abort();
            }
        }
    }

    /// The statements of [`Store::write`]: locks, rows, stats; the offsets to store after it.
    #[allow(clippy::type_complexity)]
    async fn write_items(
        &self,
        items: &[Item],
    ) -> Result<
        (
            Vec<(usize, BadEvent)>,
            BTreeSet<i32>,
            BTreeMap<i32, Last>,
            Outcome,
        ),
        ApplyError,
    > {
        let db = &self.client;
        let s = &self.s;
        let t = &self.target;
        let locked = self.open.as_ref().map(|o| &o.locked);
        let partitions: BTreeSet<i32> = items
            .iter()
            .map(|i| i.partition)
            .filter(|p| locked.is_none_or(|l| !l.contains(p)))
            .collect();
        if !partitions.is_empty() {
            let list: Vec<i32> = partitions.iter().copied().collect();
            let lock = if t.replay { &s.lock } else { &s.lock_shared };
            db.query_one(lock, &[&t.lock_key, &list])
                .await
                .map_err(sql("locking the batch's partitions"))?;
            if let Some(key) = &t.paused {
                let free: bool = db
                    .query_one(
                        "SELECT coalesce(bool_or(pg_try_advisory_xact_lock(hashtext($1), p)), \
                                         false) \
                         FROM (SELECT DISTINCT unnest($2::int[]) AS p) AS ps",
                        &[key, &list],
                    )
                    .await
                    .map_err(sql("checking that the projector is paused"))?
                    .get(0);
                if free {
                    return Err(ApplyError::PauseLost);
                }
            }
        }

        let mut outcome = Outcome::default();
        let mut bad = Vec::new();
        let mut start = 0;
        // Segments between truncates; each truncate is applied between them.
        for i in 0..=items.len() {
            let truncate = match items.get(i).map(|item| item.change.as_ref()) {
                Some(Some(Change::Truncate { position })) => Some(*position),
                Some(_) => continue,
                None => None,
            };
            let segment = &items[start..i];
            if !segment.is_empty() {
                write_segment(db, s, t, segment, start, &mut outcome, &mut bad).await?;
            }
            if let Some(position) = truncate {
                truncate_views(db, s, t, position, &mut outcome).await?;
            }
            start = i + 1;
        }

        // Offsets: the record after the last one of each partition.
        let mut lasts: BTreeMap<i32, Last> = BTreeMap::new();
        for item in items {
            let e = lasts.entry(item.partition).or_default();
            e.first_offset = Some(e.first_offset.map_or(item.offset, |f| f.min(item.offset)));
            e.next_offset = e.next_offset.max(item.offset + 1);
            e.timestamp_ms = e.timestamp_ms.max(item.timestamp_ms);
            e.position = e.position.max(item.position);
            if let Some(p) = item.change.as_ref().and_then(Change::position) {
                e.commit_lsn = e.commit_lsn.max(Some(p.commit_lsn));
                outcome.last_lsn = outcome.last_lsn.max(Some(p.commit_lsn));
            }
        }
        Ok((bad, partitions, lasts, outcome))
    }
}
