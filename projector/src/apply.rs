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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use change_event::{format_lsn, parse_lsn, Position, RecordPosition};
use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Statement};

use crate::events::{self, BadEvent, Change, Current, Final, Status, UserRow};

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
}

impl ApplyError {
    /// True when retrying the same batch later may succeed (connection lost, server restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Connect(e) | ApplyError::Sql { source: e, .. } => {
                service::is_transient_pg(e)
            }
            ApplyError::TransactionLost => true,
            ApplyError::BadLsn(_) | ApplyError::StatsOutOfStep(_) | ApplyError::PauseLost => false,
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

struct Statements {
    lock: Statement,
    rows: Statement,
    deletions: Statement,
    floor: Statement,
    upsert: Statement,
    delete: Statement,
    record_deletions: Statement,
    forget_deletions: Statement,
    stats_lock: Statement,
    stats_add: Statement,
    stats_change: Statement,
    drop_empty: Statement,
    offsets: Statement,
    truncate_rows: Statement,
    truncate_deletions: Statement,
    truncate_floor: Statement,
    read_offset: Statement,
    complete: Statement,
    topic_partitions: Statement,
}

impl Store {
    pub async fn connect(url: &str, target: &Target) -> Result<Store, ApplyError> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(ApplyError::Connect)?;
        let connection = service::spawn_connection(conn, "view transactions");
        if let Some(schema) = &target.schema {
            // Before preparing: the statements' table names resolve through it.
            client
                .execute("SELECT set_config('search_path', $1, false)", &[schema])
                .await
                .map_err(sql("setting the search path"))?;
        }
        let p = |text: &'static str| {
            let client = &client;
            async move {
                client
                    .prepare(text)
                    .await
                    .map_err(sql("preparing statements"))
            }
        };
        let s = Statements {
            // Partitions in a fixed order, so two projectors of one group never deadlock while
            // an old owner finishes a batch of a partition that moved in a rebalance.
            lock: p("SELECT count(pg_advisory_xact_lock(hashtext($1), p)) \
                     FROM (SELECT DISTINCT unnest($2::int[]) AS p ORDER BY 1) AS ps")
            .await?,
            rows: p("SELECT user_id, name, email, department, status, created_at, updated_at, \
                            source_lsn::text, source_seq \
                     FROM user_view WHERE user_id = ANY($1) FOR UPDATE")
            .await?,
            deletions: p("SELECT user_id, source_lsn::text, source_seq \
                          FROM user_view_deletions WHERE user_id = ANY($1)")
            .await?,
            floor: p("SELECT source_lsn::text, source_seq FROM projector_truncations \
                      WHERE source_table = $1")
            .await?,
            upsert: p("INSERT INTO user_view (user_id, name, email, department, status, \
                                              created_at, updated_at, source_lsn, source_seq, \
                                              projected_at) \
                       SELECT id, name, email, dept, status, ca, ua, lsn::pg_lsn, seq, \
                              clock_timestamp() \
                       FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                   $6::timestamptz[], $7::timestamptz[], $8::text[], \
                                   $9::bigint[]) AS t(id, name, email, dept, status, ca, ua, \
                                                      lsn, seq) \
                       ON CONFLICT (user_id) DO UPDATE SET name = excluded.name, \
                         email = excluded.email, department = excluded.department, \
                         status = excluded.status, created_at = excluded.created_at, \
                         updated_at = excluded.updated_at, source_lsn = excluded.source_lsn, \
                         source_seq = excluded.source_seq, projected_at = excluded.projected_at")
            .await?,
            delete: p("DELETE FROM user_view WHERE user_id = ANY($1)").await?,
            record_deletions: p("INSERT INTO user_view_deletions (user_id, source_lsn, source_seq) \
                                 SELECT id, lsn::pg_lsn, seq \
                                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) \
                                      AS t(id, lsn, seq) \
                                 ON CONFLICT (user_id) DO UPDATE SET \
                                   source_lsn = excluded.source_lsn, \
                                   source_seq = excluded.source_seq, deleted_at = now()")
            .await?,
            forget_deletions: p("DELETE FROM user_view_deletions WHERE user_id = ANY($1)").await?,
            // The existing rows first, in key order: two projectors of a group (or a replay) that
            // change the same departments then queue instead of deadlocking between the two
            // statements below.
            stats_lock: p("SELECT count(*) FROM (SELECT 1 FROM department_stats \
                           WHERE department = ANY($1) ORDER BY department FOR UPDATE) AS l")
            .await?,
            // Growing departments may be new: upsert. (An INSERT's row must pass the CHECKs before
            // the conflict is seen, so a shrinking department cannot take this path.)
            stats_add: p("INSERT INTO department_stats (department, user_count, active_users, \
                                                    inactive_users, last_updated) \
                      SELECT d, u, a, i, clock_timestamp() \
                      FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) \
                           AS t(d, u, a, i) \
                      ON CONFLICT (department) DO UPDATE SET \
                        user_count = department_stats.user_count + excluded.user_count, \
                        active_users = department_stats.active_users + excluded.active_users, \
                        inactive_users = department_stats.inactive_users + excluded.inactive_users, \
                        last_updated = excluded.last_updated")
            .await?,
            // Shrinking (or status-flipping) departments exist already.
            stats_change: p("UPDATE department_stats s SET user_count = s.user_count + t.u, \
                               active_users = s.active_users + t.a, \
                               inactive_users = s.inactive_users + t.i, \
                               last_updated = clock_timestamp() \
                             FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) \
                                  AS t(d, u, a, i) \
                             WHERE s.department = t.d")
            .await?,
            drop_empty: p("DELETE FROM department_stats WHERE user_count = 0").await?,
            // GREATEST: an older owner of a partition finishing late never moves it backwards.
            offsets: p("INSERT INTO projector_offsets (consumer_group, topic, partition, \
                                                       next_offset, source_lsn, updated_at, \
                                                       last_record_at, last_position) \
                        SELECT $1, $2, p, o, l::pg_lsn, now(), to_timestamp(ts / 1000.0), lp \
                        FROM unnest($3::int[], $4::bigint[], $5::text[], $6::bigint[], \
                                    $7::text[]) AS t(p, o, l, ts, lp) \
                        ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET \
                          next_offset = GREATEST(projector_offsets.next_offset, \
                                                 excluded.next_offset), \
                          source_lsn = CASE WHEN excluded.next_offset >= \
                                                 projector_offsets.next_offset \
                                            THEN coalesce(excluded.source_lsn, \
                                                          projector_offsets.source_lsn) \
                                            ELSE projector_offsets.source_lsn END, \
                          updated_at = excluded.updated_at, \
                          last_record_at = CASE WHEN excluded.next_offset >= \
                                                     projector_offsets.next_offset \
                                                THEN coalesce(excluded.last_record_at, \
                                                              projector_offsets.last_record_at) \
                                                ELSE projector_offsets.last_record_at END, \
                          last_position = CASE WHEN excluded.next_offset >= \
                                                    projector_offsets.next_offset \
                                               THEN coalesce(excluded.last_position, \
                                                             projector_offsets.last_position) \
                                               ELSE projector_offsets.last_position END")
            .await?,
            truncate_rows: p("WITH gone AS (DELETE FROM user_view \
                                            WHERE (source_lsn, source_seq) <= ($1::pg_lsn, $2) \
                                            RETURNING department, status), \
                                  counts AS (SELECT department, count(*) AS u, \
                                                    count(*) FILTER (WHERE status = 'ACTIVE') AS a \
                                             FROM gone GROUP BY department) \
                              UPDATE department_stats s SET user_count = s.user_count - c.u, \
                                active_users = s.active_users - c.a, \
                                inactive_users = s.inactive_users - (c.u - c.a), \
                                last_updated = clock_timestamp() \
                              FROM counts c WHERE s.department = c.department")
            .await?,
            truncate_deletions: p("DELETE FROM user_view_deletions \
                                   WHERE (source_lsn, source_seq) <= ($1::pg_lsn, $2)")
            .await?,
            truncate_floor: p("INSERT INTO projector_truncations (source_table, source_lsn, \
                                                                  source_seq) \
                               VALUES ($1, $2::pg_lsn, $3) \
                               ON CONFLICT (source_table) DO UPDATE SET \
                                 source_lsn = excluded.source_lsn, \
                                 source_seq = excluded.source_seq, applied_at = now() \
                               WHERE (projector_truncations.source_lsn, \
                                      projector_truncations.source_seq) \
                                     < (excluded.source_lsn, excluded.source_seq)")
            .await?,
            read_offset: p("SELECT next_offset, complete_lsn::text, last_position \
                            FROM projector_offsets \
                            WHERE consumer_group = $1 AND topic = $2 AND partition = $3")
            .await?,
            // Only ever raised (an older owner of a partition finishing late never lowers it);
            // the offset is the one a partition without a row starts with.
            complete: p("INSERT INTO projector_offsets (consumer_group, topic, partition, \
                                                        next_offset, complete_lsn) \
                         SELECT $1, $2, p, o, c::pg_lsn \
                         FROM unnest($3::int[], $4::bigint[], $5::text[]) AS t(p, o, c) \
                         ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET \
                           complete_lsn = GREATEST(projector_offsets.complete_lsn, \
                                                   excluded.complete_lsn)")
            .await?,
            topic_partitions: p("INSERT INTO projector_topics (consumer_group, topic, partitions) \
                                 VALUES ($1, $2, $3) \
                                 ON CONFLICT (consumer_group, topic) DO UPDATE SET \
                                   partitions = excluded.partitions, updated_at = now() \
                                 WHERE projector_topics.partitions <> excluded.partitions")
            .await?,
        };
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
                self.client
                    .execute(
                        &s.offsets,
                        &[&t.group, &t.topic, &parts, &offsets, &lsns, &times, &last],
                    )
                    .await
                    .map_err(sql("storing offsets"))?;
                write_complete(&self.client, s, t, completes).await?;
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
            db.query_one(&s.lock, &[&t.lock_key, &list])
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

async fn write_complete(
    db: &impl tokio_postgres::GenericClient,
    s: &Statements,
    t: &Target,
    completes: &[Complete],
) -> Result<(), ApplyError> {
    if completes.is_empty() || t.replay {
        return Ok(());
    }
    let parts: Vec<i32> = completes.iter().map(|c| c.partition).collect();
    let offsets: Vec<i64> = completes.iter().map(|c| c.next_offset).collect();
    let lsns: Vec<String> = completes
        .iter()
        .map(|c| format_lsn(c.complete_lsn))
        .collect();
    db.execute(&s.complete, &[&t.group, &t.topic, &parts, &offsets, &lsns])
        .await
        .map_err(sql("storing how far the views are complete"))?;
    Ok(())
}

fn position_of(lsn: &str, seq: i64) -> Result<Position, ApplyError> {
    Ok(Position {
        commit_lsn: parse_lsn(lsn).ok_or_else(|| ApplyError::BadLsn(lsn.to_owned()))?,
        event_index: u64::try_from(seq).unwrap_or(0),
    })
}

fn seq(p: Position) -> i64 {
    i64::try_from(p.event_index).unwrap_or(i64::MAX)
}

async fn floor(db: &Client, s: &Statements, table: &str) -> Result<Option<Position>, ApplyError> {
    let row = db
        .query_opt(&s.floor, &[&table])
        .await
        .map_err(sql("reading the last truncate"))?;
    row.map(|r| position_of(r.get(0), r.get(1))).transpose()
}

async fn truncate_views(
    db: &Client,
    s: &Statements,
    t: &Target,
    position: Position,
    outcome: &mut Outcome,
) -> Result<(), ApplyError> {
    let table = t.source_table.as_str();
    if !t.replay && floor(db, s, table).await?.is_some_and(|f| position <= f) {
        outcome.ignored += 1;
        return Ok(());
    }
    let lsn = format_lsn(position.commit_lsn);
    let seq = seq(position);
    db.execute(&s.truncate_rows, &[&lsn, &seq])
        .await
        .map_err(sql("truncating user_view"))?;
    db.execute(&s.drop_empty, &[])
        .await
        .map_err(sql("dropping empty departments"))?;
    db.execute(&s.truncate_deletions, &[&lsn, &seq])
        .await
        .map_err(sql("truncating user_view_deletions"))?;
    db.execute(&s.truncate_floor, &[&table, &lsn, &seq])
        .await
        .map_err(sql("recording the truncate"))?;
    outcome.truncates += 1;
    Ok(())
}

async fn write_segment(
    db: &Client,
    s: &Statements,
    t: &Target,
    segment: &[Item],
    first_index: usize,
    outcome: &mut Outcome,
    bad: &mut Vec<(usize, BadEvent)>,
) -> Result<(), ApplyError> {
    let ids: Vec<i64> = segment
        .iter()
        .filter_map(|i| match i.change.as_ref()? {
            Change::Upsert { row, .. } => Some(row.id),
            Change::Delete { id, .. } => Some(*id),
            Change::Truncate { .. } | Change::Tombstone => None,
        })
        .collect::<HashSet<i64>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    // Three reads, pipelined on the one connection.
    let (rows, deletions, floor) = tokio::try_join!(
        async {
            db.query(&s.rows, &[&ids])
                .await
                .map_err(sql("reading current rows"))
        },
        async {
            db.query(&s.deletions, &[&ids])
                .await
                .map_err(sql("reading deletions"))
        },
        floor(db, s, &t.source_table),
    )?;
    let mut current = HashMap::with_capacity(rows.len() + deletions.len());
    for r in deletions {
        current.insert(
            r.get::<_, i64>(0),
            Current::Deleted(position_of(r.get(1), r.get(2))?),
        );
    }
    for r in rows {
        let status: &str = r.get(4);
        let row = UserRow {
            id: r.get(0),
            name: r.get(1),
            email: r.get(2),
            department: r.get(3),
            // The projector writes only the two values; anything else was put there by hand and
            // counts as inactive, as department_stats has always counted it.
            status: Status::parse(status).unwrap_or(Status::Inactive),
            created_at: r.get(5),
            updated_at: r.get(6),
        };
        current.insert(row.id, Current::Row(row, position_of(r.get(7), r.get(8))?));
    }
    // Dead-lettered records stay in as no-ops, so indexes keep matching the segment.
    let changes: Vec<Change> = segment
        .iter()
        .map(|i| i.change.clone().unwrap_or(Change::Tombstone))
        .collect();
    if t.replay {
        // Whatever the rows claim, the replayed events come after it (not after the last
        // truncate, though: what it removed stays removed).
        let unclaimed = Position {
            commit_lsn: 0,
            event_index: 0,
        };
        for c in current.values_mut() {
            match c {
                Current::Row(_, p) | Current::Deleted(p) => *p = unclaimed,
            }
        }
    }
    let folded = events::fold(&current, floor, &changes);
    outcome.ignored += folded.ignored;
    bad.extend(folded.bad.into_iter().map(|(i, e)| (first_index + i, e)));

    let mut up = Upserts::default();
    let (mut del_ids, mut del_lsns, mut del_seqs) = (Vec::new(), Vec::new(), Vec::new());
    for (id, fin) in &folded.writes {
        match fin {
            Final::Row(row, p) => up.push(row, *p),
            Final::Deleted(p) => {
                del_ids.push(*id);
                del_lsns.push(format_lsn(p.commit_lsn));
                del_seqs.push(seq(*p));
            }
        }
    }
    let (add, change) = StatsColumns::split(&folded.stats);
    let departments: Vec<&str> = folded.stats.keys().map(String::as_str).collect();
    // Pipelined; the server runs them in this order.
    tokio::try_join!(
        async {
            if up.ids.is_empty() {
                return Ok(0);
            }
            db.execute(
                &s.upsert,
                &[
                    &up.ids,
                    &up.names,
                    &up.emails,
                    &up.departments,
                    &up.statuses,
                    &up.created,
                    &up.updated,
                    &up.lsns,
                    &up.seqs,
                ],
            )
            .await
            .map_err(sql("upserting user_view"))
        },
        async {
            if up.ids.is_empty() {
                return Ok(0);
            }
            db.execute(&s.forget_deletions, &[&up.ids])
                .await
                .map_err(sql("forgetting deletions"))
        },
        async {
            if del_ids.is_empty() {
                return Ok(0);
            }
            db.execute(&s.delete, &[&del_ids])
                .await
                .map_err(sql("deleting from user_view"))
        },
        async {
            if del_ids.is_empty() {
                return Ok(0);
            }
            db.execute(&s.record_deletions, &[&del_ids, &del_lsns, &del_seqs])
                .await
                .map_err(sql("recording deletions"))
        },
        async {
            if departments.is_empty() {
                return Ok(0);
            }
            db.execute(&s.stats_lock, &[&departments])
                .await
                .map_err(sql("locking department_stats rows"))
        },
        async {
            if add.departments.is_empty() {
                return Ok(0);
            }
            db.execute(&s.stats_add, &add.params())
                .await
                .map_err(sql("updating department_stats"))
        },
        async {
            if change.departments.is_empty() {
                return Ok(0);
            }
            let n = db
                .execute(&s.stats_change, &change.params())
                .await
                .map_err(sql("updating department_stats"))?;
            if n != change.departments.len() as u64 {
                return Err(ApplyError::StatsOutOfStep(change.departments.join(", ")));
            }
            Ok(n)
        },
        async {
            if folded.stats.is_empty() {
                return Ok(0);
            }
            db.execute(&s.drop_empty, &[])
                .await
                .map_err(sql("dropping empty departments"))
        },
    )?;
    outcome.upserted += up.ids.len();
    outcome.deleted += del_ids.len();
    Ok(())
}

/// Column arrays of department_stats deltas.
#[derive(Default)]
struct StatsColumns<'a> {
    departments: Vec<&'a str>,
    users: Vec<i64>,
    active: Vec<i64>,
    inactive: Vec<i64>,
}

impl<'a> StatsColumns<'a> {
    /// (departments whose counts only grow, the others).
    fn split(stats: &'a BTreeMap<String, events::StatsDelta>) -> (Self, Self) {
        let (mut add, mut change) = (Self::default(), Self::default());
        for (d, delta) in stats {
            let to = if delta.users >= 0 && delta.active >= 0 && delta.inactive >= 0 {
                &mut add
            } else {
                &mut change
            };
            to.departments.push(d);
            to.users.push(delta.users);
            to.active.push(delta.active);
            to.inactive.push(delta.inactive);
        }
        (add, change)
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 4] {
        [&self.departments, &self.users, &self.active, &self.inactive]
    }
}

/// Column arrays for the upsert statement.
#[derive(Default)]
struct Upserts {
    ids: Vec<i64>,
    names: Vec<String>,
    emails: Vec<String>,
    departments: Vec<String>,
    statuses: Vec<&'static str>,
    created: Vec<DateTime<Utc>>,
    updated: Vec<DateTime<Utc>>,
    lsns: Vec<String>,
    seqs: Vec<i64>,
}

impl Upserts {
    fn push(&mut self, row: &UserRow, p: Position) {
        self.ids.push(row.id);
        self.names.push(row.name.clone());
        self.emails.push(row.email.clone());
        self.departments.push(row.department.clone());
        self.statuses.push(row.status.as_str());
        self.created.push(row.created_at);
        self.updated.push(row.updated_at);
        self.lsns.push(format_lsn(p.commit_lsn));
        self.seqs.push(seq(p));
    }
}
