//! Every statement the view transaction runs, prepared once per connection.

use tokio_postgres::{Client, Statement};

use super::{sql, ApplyError};

pub(super) struct Statements {
    pub(super) lock: Statement,
    pub(super) lock_shared: Statement,
    pub(super) rows: Statement,
    pub(super) deletions: Statement,
    pub(super) floor: Statement,
    pub(super) upsert: Statement,
    pub(super) delete: Statement,
    pub(super) record_deletions: Statement,
    pub(super) forget_deletions: Statement,
    pub(super) stats_lock: Statement,
    pub(super) stats_add: Statement,
    pub(super) stats_change: Statement,
    pub(super) drop_empty: Statement,
    pub(super) offsets: Statement,
    pub(super) stored_offsets: Statement,
    pub(super) truncate_rows: Statement,
    pub(super) truncate_deletions: Statement,
    pub(super) truncate_floor: Statement,
    pub(super) read_offset: Statement,
    pub(super) complete: Statement,
    pub(super) topic_partitions: Statement,
}

impl Statements {
    pub(super) async fn prepare(client: &Client) -> Result<Statements, ApplyError> {
        let p = |text: &'static str| {
            let client = &client;
            async move {
                client
                    .prepare(text)
                    .await
                    .map_err(sql("preparing statements"))
            }
        };
        Ok(Statements {
            // Partitions in a fixed order, so two projectors of one group never deadlock while
            // an old owner finishes a batch of a partition that moved in a rebalance.
            lock: p("SELECT count(pg_advisory_xact_lock(hashtext($1), p)) \
                 FROM (SELECT DISTINCT unnest($2::int[]) AS p ORDER BY 1) AS ps")
            .await?,
            // The live projector's: its own view transactions run side by side (two in flight,
            // see `project`); a replay pausing it, or a swap, takes the lock exclusively.
            lock_shared: p(
                "SELECT count(pg_advisory_xact_lock_shared(hashtext($1), p)) \
                 FROM (SELECT DISTINCT unnest($2::int[]) AS p ORDER BY 1) AS ps",
            )
            .await?,
            rows: p(
                "SELECT user_id, name, email, department, status, created_at, updated_at, \
                        source_lsn::text, source_seq \
                 FROM user_view WHERE user_id = ANY($1) FOR UPDATE",
            )
            .await?,
            deletions: p("SELECT user_id, source_lsn::text, source_seq \
                      FROM user_view_deletions WHERE user_id = ANY($1)")
            .await?,
            floor: p(
                "SELECT source_lsn::text, source_seq FROM projector_truncations \
                  WHERE source_table = $1",
            )
            .await?,
            upsert: p(
                "INSERT INTO user_view (user_id, name, email, department, status, \
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
                     source_seq = excluded.source_seq, projected_at = excluded.projected_at",
            )
            .await?,
            delete: p("DELETE FROM user_view WHERE user_id = ANY($1)").await?,
            record_deletions: p(
                "INSERT INTO user_view_deletions (user_id, source_lsn, source_seq) \
                             SELECT id, lsn::pg_lsn, seq \
                             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) \
                                  AS t(id, lsn, seq) \
                             ON CONFLICT (user_id) DO UPDATE SET \
                               source_lsn = excluded.source_lsn, \
                               source_seq = excluded.source_seq, deleted_at = now()",
            )
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
            stats_add: p(
                "INSERT INTO department_stats (department, user_count, active_users, \
                                                inactive_users, last_updated) \
                  SELECT d, u, a, i, clock_timestamp() \
                  FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) \
                       AS t(d, u, a, i) \
                  ON CONFLICT (department) DO UPDATE SET \
                    user_count = department_stats.user_count + excluded.user_count, \
                    active_users = department_stats.active_users + excluded.active_users, \
                    inactive_users = department_stats.inactive_users + excluded.inactive_users, \
                    last_updated = excluded.last_updated",
            )
            .await?,
            // Shrinking (or status-flipping) departments exist already.
            stats_change: p(
                "UPDATE department_stats s SET user_count = s.user_count + t.u, \
                           active_users = s.active_users + t.a, \
                           inactive_users = s.inactive_users + t.i, \
                           last_updated = clock_timestamp() \
                         FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) \
                              AS t(d, u, a, i) \
                         WHERE s.department = t.d",
            )
            .await?,
            drop_empty: p("DELETE FROM department_stats WHERE user_count = 0").await?,
            // GREATEST: an older owner of a partition finishing late never moves it backwards.
            offsets: p(
                "INSERT INTO projector_offsets (consumer_group, topic, partition, \
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
                                           ELSE projector_offsets.last_position END",
            )
            .await?,
            // Locked first: another applier's commit of these partitions is waited for and seen.
            stored_offsets: p("SELECT partition, next_offset FROM projector_offsets \
                            WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3) \
                            ORDER BY partition FOR UPDATE")
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
            truncate_floor: p(
                "INSERT INTO projector_truncations (source_table, source_lsn, \
                                                              source_seq) \
                           VALUES ($1, $2::pg_lsn, $3) \
                           ON CONFLICT (source_table) DO UPDATE SET \
                             source_lsn = excluded.source_lsn, \
                             source_seq = excluded.source_seq, applied_at = now() \
                           WHERE (projector_truncations.source_lsn, \
                                  projector_truncations.source_seq) \
                                 < (excluded.source_lsn, excluded.source_seq)",
            )
            .await?,
            read_offset: p("SELECT next_offset, complete_lsn::text, last_position \
                        FROM projector_offsets \
                        WHERE consumer_group = $1 AND topic = $2 AND partition = $3")
            .await?,
            // Only ever raised (an older owner of a partition finishing late never lowers it);
            // the offset is the one a partition without a row starts with.
            complete: p(
                "INSERT INTO projector_offsets (consumer_group, topic, partition, \
                                                    next_offset, complete_lsn) \
                     SELECT $1, $2, p, o, c::pg_lsn \
                     FROM unnest($3::int[], $4::bigint[], $5::text[]) AS t(p, o, c) \
                     ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET \
                       complete_lsn = GREATEST(projector_offsets.complete_lsn, \
                                               excluded.complete_lsn)",
            )
            .await?,
            topic_partitions: p(
                "INSERT INTO projector_topics (consumer_group, topic, partitions) \
                             VALUES ($1, $2, $3) \
                             ON CONFLICT (consumer_group, topic) DO UPDATE SET \
                               partitions = excluded.partitions, updated_at = now() \
                             WHERE projector_topics.partitions <> excluded.partitions",
            )
            .await?,
        })
    }
}
