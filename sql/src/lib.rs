//! Schema of the two databases as ordered migrations, and the one code path that applies them.
//!
//! ```text
//!  sql/migrations/user_db/NNNN_*.sql              ──► user_db              (user-api, cdc-reader)
//!  sql/migrations/materialized_view_db/NNNN_*.sql ──► materialized_view_db (projector, post-api)
//! ```
//!
//! Services call [`migrate`] on start, `scripts/dev` and users call the `migrate` binary, tests call
//! [`migrate`] on their private databases: all three run the same SQL the same way.
//!
//! Rules the runner enforces:
//! - all pending migrations of a database apply in one transaction, in version order, under a
//!   transaction-scoped advisory lock, so concurrent starters serialize and a failure leaves nothing
//!   half-applied;
//! - each applied migration is recorded in `schema_migrations` with the md5 of its text; re-running is a
//!   no-op, and a recorded migration whose text changed since is an error (edit by adding a migration,
//!   never by rewriting one).

use std::fmt;
use std::str::FromStr;

/// Which of the two databases a set of migrations belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// `user_db`: the user service's source of truth.
    UserDb,
    /// `materialized_view_db`: the projector's views and the post service's posts.
    ViewDb,
}

impl Database {
    /// The conventional database name (the dev stack and compose use it).
    pub fn default_name(self) -> &'static str {
        match self {
            Database::UserDb => "user_db",
            Database::ViewDb => "materialized_view_db",
        }
    }

    /// The migrations of this database, in the order they apply.
    pub fn migrations(self) -> &'static [Migration] {
        match self {
            Database::UserDb => USER_DB,
            Database::ViewDb => VIEW_DB,
        }
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.default_name())
    }
}

impl FromStr for Database {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user_db" => Ok(Database::UserDb),
            "materialized_view_db" => Ok(Database::ViewDb),
            other => Err(format!(
                "unknown database {other:?}: expected user_db or materialized_view_db"
            )),
        }
    }
}

/// One schema change: applied once, never edited after it shipped.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migration {
    ($db:literal, $version:literal, $file:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../migrations/", $db, "/", $file)),
        }
    };
}

static USER_DB: &[Migration] = &[
    migration!("user_db", 1, "0001_users.sql", "users"),
    migration!(
        "user_db",
        2,
        "0002_cdc_reader_snapshots.sql",
        "cdc_reader_snapshots"
    ),
    migration!(
        "user_db",
        3,
        "0003_cdc_reader_snapshot_attempts.sql",
        "cdc_reader_snapshot_attempts"
    ),
    migration!("user_db", 4, "0004_cdc_slot_status.sql", "cdc_slot_status"),
    migration!(
        "user_db",
        5,
        "0005_cdc_reader_replays.sql",
        "cdc_reader_replays"
    ),
    migration!(
        "user_db",
        6,
        "0006_cdc_reader_snapshot_requests.sql",
        "cdc_reader_snapshot_requests"
    ),
    migration!(
        "user_db",
        7,
        "0007_cdc_reader_topics.sql",
        "cdc_reader_topics"
    ),
];
static VIEW_DB: &[Migration] = &[
    migration!("materialized_view_db", 1, "0001_views.sql", "views"),
    migration!("materialized_view_db", 2, "0002_projector.sql", "projector"),
    migration!(
        "materialized_view_db",
        3,
        "0003_projector_status.sql",
        "projector_status"
    ),
    migration!(
        "materialized_view_db",
        4,
        "0004_derived_views.sql",
        "derived_views"
    ),
    migration!(
        "materialized_view_db",
        5,
        "0005_post_stats.sql",
        "post_stats"
    ),
    migration!(
        "materialized_view_db",
        6,
        "0006_user_activity.sql",
        "user_activity"
    ),
    migration!(
        "materialized_view_db",
        7,
        "0007_department_performance.sql",
        "department_performance"
    ),
    migration!(
        "materialized_view_db",
        8,
        "0008_derived_views_concurrency.sql",
        "derived_views_concurrency"
    ),
    migration!(
        "materialized_view_db",
        9,
        "0009_source_position.sql",
        "source_position"
    ),
    migration!(
        "materialized_view_db",
        10,
        "0010_derived_views_cost.sql",
        "derived_views_cost"
    ),
    migration!(
        "materialized_view_db",
        11,
        "0011_derived_views_new_rows.sql",
        "derived_views_new_rows"
    ),
];

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {version} ({name}) of {database} was changed after it was applied; add a new migration instead")]
    Changed {
        database: Database,
        version: i32,
        name: &'static str,
    },
    #[error("{database} has migration {version} applied, which this build does not know; is this build older than the database?")]
    Unknown { database: Database, version: i32 },
    #[error("applying migrations to {database} failed")]
    Postgres {
        database: Database,
        #[source]
        source: tokio_postgres::Error,
    },
}

// An arbitrary constant shared by every migrator of every database.
const MIGRATION_LOCK_KEY: i64 = 0x6364_635f_6d69_6772; // "cdc_migr"

/// Applies every pending migration of `database` through `client`; returns the versions applied now
/// (empty when the schema was already current).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    database: Database,
) -> Result<Vec<i32>, MigrateError> {
    let pg = |source| MigrateError::Postgres { database, source };
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(pg)?;
    // "already exists, skipping" notices on every start are noise.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             checksum   text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg)?;

    let applied = tx
        .query("SELECT version, checksum FROM schema_migrations", &[])
        .await
        .map_err(pg)?;
    let migrations = database.migrations();
    for row in &applied {
        let version: i32 = row.get(0);
        if !migrations.iter().any(|m| m.version == version) {
            return Err(MigrateError::Unknown { database, version });
        }
    }

    let mut done = Vec::new();
    for m in migrations {
        let recorded = applied.iter().find(|row| row.get::<_, i32>(0) == m.version);
        if let Some(row) = recorded {
            let same: bool = tx
                .query_one("SELECT md5($1) = $2", &[&m.sql, &row.get::<_, String>(1)])
                .await
                .map_err(pg)?
                .get(0);
            if !same {
                return Err(MigrateError::Changed {
                    database,
                    version: m.version,
                    name: m.name,
                });
            }
            continue;
        }
        tx.batch_execute(m.sql).await.map_err(pg)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, md5($3))",
            &[&m.version, &m.name, &m.sql],
        )
        .await
        .map_err(pg)?;
        tracing::info!(%database, version = m.version, name = m.name, "applied migration");
        done.push(m.version);
    }
    tx.commit().await.map_err(pg)?;
    Ok(done)
}

/// Why [`migrate_when_reachable`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("connecting to {database} failed")]
    Connect {
        database: Database,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("shut down while waiting for {0}")]
    Cancelled(Database),
}

/// Connects to `url` and applies the migrations of `database`, retrying with capped exponential
/// backoff while the database is unreachable. Definite errors (a changed migration, bad SQL,
/// authentication) end the wait at once.
pub async fn migrate_when_reachable(
    url: &str,
    database: Database,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Vec<i32>, WaitError> {
    let mut backoff = service::Backoff::default();
    loop {
        let attempt = async {
            let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|source| WaitError::Connect { database, source })?;
            let conn = tokio::spawn(conn);
            let result = migrate(&mut client, database).await;
            drop(client);
            // The connection task ends once the client is gone; its own error is not news.
            if let Ok(Err(err)) = conn.await {
                tracing::debug!(error = %err, "migration connection closed with an error");
            }
            result.map_err(WaitError::from)
        };
        let err = match attempt.await {
            Ok(applied) => return Ok(applied),
            Err(err) => err,
        };
        let transient = match &err {
            WaitError::Connect { source, .. }
            | WaitError::Migrate(MigrateError::Postgres { source, .. }) => {
                service::is_transient_pg(source)
            }
            _ => false,
        };
        if !transient {
            return Err(err);
        }
        tracing::warn!(%database, error = %service::error_chain(&err), "database not reachable; retrying");
        if !backoff.wait(shutdown).await {
            return Err(WaitError::Cancelled(database));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_strictly_increasing_and_files_are_not_empty() {
        for db in [Database::UserDb, Database::ViewDb] {
            let ms = db.migrations();
            assert!(!ms.is_empty(), "{db} has no migrations");
            for pair in ms.windows(2) {
                assert!(pair[0].version < pair[1].version, "{db}: out of order");
            }
            for m in ms {
                assert!(m.sql.trim().len() > 10, "{db} {} is empty", m.name);
            }
        }
    }

    #[test]
    fn database_names_round_trip() {
        for db in [Database::UserDb, Database::ViewDb] {
            assert_eq!(db.default_name().parse::<Database>(), Ok(db));
        }
        assert!("users".parse::<Database>().is_err());
    }
}
