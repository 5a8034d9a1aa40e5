//! The table work of a replay: the rebuild's swap (the live view tables replaced by the rebuilt
//! ones in one transaction), pausing the live projector, and recomputing `department_stats` and
//! the derived views from what they derive from.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Client;

use super::{sql, ReplayError, REBUILD_SCHEMA};
use crate::apply::Target;
use crate::Config;

/// The schema the replaced tables pass through during the swap.
const RETIRED_SCHEMA: &str = "projector_retired";
/// The tables a rebuild replaces: the views and the positions that guard them.
pub(super) const VIEW_TABLES: [&str; 4] = [
    "user_view",
    "department_stats",
    "user_view_deletions",
    "projector_truncations",
];

/// Makes each derived view (post_stats, user_activity, ...: see `derived_views` in
/// materialized_view_db) equal to its definition, in order; one row per view with the rows written.
const REPAIR_DERIVED: &str =
    "SELECT name, derived_view_repair(name) FROM derived_views ORDER BY position";

/// Replaces the live view tables by the rebuilt ones, in one transaction.
pub(super) async fn swap(db: &Client, live_schema: &str) -> Result<(), ReplayError> {
    let live = quote(live_schema);
    // Privileges granted on the live tables (beyond their owner's) go to the new ones.
    let mut grants = String::new();
    for t in VIEW_TABLES {
        for row in db
            .query(
                "SELECT a.privilege_type, CASE WHEN a.grantee = 0 THEN 'PUBLIC' \
                        ELSE quote_ident(pg_get_userbyid(a.grantee)) END \
                 FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a \
                 WHERE c.oid = ($1 || '.' || $2)::regclass AND a.grantee <> c.relowner",
                &[&live, &t],
            )
            .await
            .map_err(sql("reading the privileges on the view tables"))?
        {
            let (privilege, grantee): (String, String) = (row.get(0), row.get(1));
            grants.push_str(&format!(
                " GRANT {privilege} ON {REBUILD_SCHEMA}.{t} TO {grantee};"
            ));
        }
    }
    // Their triggers (the notes that keep the derived views current, and any of the user's) are
    // created again on the new tables, from their definitions as they read now.
    let mut triggers = String::new();
    for t in VIEW_TABLES {
        for row in db
            .query(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger \
                 WHERE tgrelid = ($1 || '.' || $2)::regclass AND NOT tgisinternal ORDER BY tgname",
                &[&live, &t],
            )
            .await
            .map_err(sql("reading the triggers on the view tables"))?
        {
            triggers.push_str(&format!(" {};", row.get::<_, String>(0)));
        }
    }
    // The derived views' definitions read user_view: they go with the old tables and are created
    // again over the new ones, with their privileges.
    let (mut drop_definitions, mut definitions) = (Vec::new(), String::new());
    for row in db
        .query(
            "SELECT quote_ident(v.relname), pg_get_viewdef(v.oid), \
                    coalesce(string_agg(format(' GRANT %s ON %I TO %s;', a.privilege_type, \
                        v.relname, CASE WHEN a.grantee = 0 THEN 'PUBLIC' \
                                        ELSE quote_ident(pg_get_userbyid(a.grantee)) END), '') \
                             FILTER (WHERE a.privilege_type IS NOT NULL), '') \
             FROM derived_views d \
             JOIN pg_class v ON v.oid = (d.name || '_definition')::regclass \
             LEFT JOIN LATERAL aclexplode(v.relacl) a ON a.grantee <> v.relowner \
             GROUP BY d.position, v.oid, v.relname ORDER BY d.position",
            &[],
        )
        .await
        .map_err(sql("reading the definitions of the derived views"))?
    {
        let (name, query, grants): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        drop_definitions.push(format!("{live}.{name}"));
        definitions.push_str(&format!(
            " CREATE VIEW {live}.{name} AS {};{grants}",
            query.trim().trim_end_matches(';')
        ));
    }
    // posts first: post-api's writes wait from here to the commit (not in the middle of their
    // own commit, which reads user_view), so the derived views are repaired against still posts.
    let mut text =
        format!("BEGIN; SET LOCAL lock_timeout = '10s'; LOCK TABLE {live}.posts IN SHARE MODE;");
    if !drop_definitions.is_empty() {
        text.push_str(&format!(" DROP VIEW {};", drop_definitions.join(", ")));
    }
    text.push_str(&format!(
        " DROP SCHEMA IF EXISTS {RETIRED_SCHEMA}; CREATE SCHEMA {RETIRED_SCHEMA};{grants}"
    ));
    for t in VIEW_TABLES {
        text.push_str(&format!(
            " ALTER TABLE {live}.{t} SET SCHEMA {RETIRED_SCHEMA};"
        ));
    }
    for t in VIEW_TABLES {
        text.push_str(&format!(
            " ALTER TABLE {REBUILD_SCHEMA}.{t} SET SCHEMA {live};"
        ));
    }
    text.push_str(&triggers);
    text.push_str(&definitions);
    text.push_str(&format!(" {REPAIR_DERIVED};"));
    // No CASCADE: a view or foreign key of someone else's on the old tables makes the swap fail
    // with PostgreSQL's message, and the live tables stay as they are.
    let retired: Vec<String> = VIEW_TABLES
        .iter()
        .map(|t| format!("{RETIRED_SCHEMA}.{t}"))
        .collect();
    text.push_str(&format!(
        " DROP TABLE {}; DROP SCHEMA {RETIRED_SCHEMA}; DROP SCHEMA {REBUILD_SCHEMA}; COMMIT;",
        retired.join(", ")
    ));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Err(e) = db.batch_execute(&text).await else {
            return Ok(());
        };
        if let Err(e) = db.batch_execute("ROLLBACK").await {
            tracing::debug!(error = %e, "rolling back the swap failed");
        }
        // Readers hold the tables for a moment: a lock timeout or a deadlock passes.
        let code = e.as_db_error().map(|d| d.code().code().to_owned());
        if !matches!(code.as_deref(), Some("55P03" | "40P01")) || attempt >= 5 {
            return Err(ReplayError::Sql {
                what: "swapping in the rebuilt tables",
                source: e,
            });
        }
        tracing::warn!(error = %e, attempt, "swapping in the rebuilt tables waited too long; retrying");
        tokio::time::sleep(Duration::from_millis(500) * attempt).await;
    }
}

/// Takes the live projector's partition locks for the session: its next batch waits for them.
pub(super) async fn pause_live(
    db: &Client,
    config: &Config,
    marks: &BTreeMap<i32, (i64, i64)>,
) -> Result<(), ReplayError> {
    let partitions: Vec<i32> = marks.keys().copied().collect();
    db.query_one(
        "SELECT count(pg_advisory_lock(hashtext($1), p)) \
         FROM (SELECT DISTINCT unnest($2::int[]) AS p ORDER BY 1) AS ps",
        &[&Target::lock_key(&config.group, &config.topic), &partitions],
    )
    .await
    .map_err(sql("pausing the projector (taking its partition locks)"))?;
    Ok(())
}

/// `department_stats` := the counts of `user_view` (in `schema`, else the default one).
pub(super) async fn recount_departments(
    db: &Client,
    schema: Option<&str>,
) -> Result<(), ReplayError> {
    let q = |t: &str| schema.map_or(t.to_owned(), |s| format!("{}.{t}", quote(s)));
    db.batch_execute(&format!(
        "BEGIN; DELETE FROM {stats}; \
         INSERT INTO {stats} (department, user_count, active_users, inactive_users, last_updated) \
         SELECT department, count(*), count(*) FILTER (WHERE status = 'ACTIVE'), \
                count(*) FILTER (WHERE status <> 'ACTIVE'), now() \
         FROM {view} GROUP BY department; COMMIT",
        stats = q("department_stats"),
        view = q("user_view"),
    ))
    .await
    .map_err(sql("recounting department_stats"))
}

/// Every derived view (`derived_views`, in order) := its definition, where they differ. post-api's
/// writes wait meanwhile; the projector must be paused.
pub(super) async fn repair_derived(db: &Client) -> Result<(), ReplayError> {
    db.batch_execute("BEGIN; LOCK TABLE posts IN SHARE MODE")
        .await
        .map_err(sql("locking posts to repair the derived views"))?;
    let repaired = match db.query(REPAIR_DERIVED, &[]).await {
        Ok(rows) => rows,
        Err(e) => {
            if let Err(e) = db.batch_execute("ROLLBACK").await {
                tracing::debug!(error = %e, "rolling back the repair failed");
            }
            return Err(ReplayError::Sql {
                what: "repairing the derived views",
                source: e,
            });
        }
    };
    db.batch_execute("COMMIT")
        .await
        .map_err(sql("committing the repair of the derived views"))?;
    for row in repaired {
        let (view, rows): (String, i64) = (row.get(0), row.get(1));
        tracing::info!(view, rows, "derived view compared with its definition");
    }
    Ok(())
}

pub(super) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
