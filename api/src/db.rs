//! Postgres connections for the services: the pool, the transient/definite error line, and
//! start-up migration that waits (with backoff) for a database that is not reachable yet.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL")]
    Url(#[source] tokio_postgres::Error),
    #[error("building the connection pool failed")]
    Pool(#[source] deadpool_postgres::BuildError),
    #[error(transparent)]
    Migrate(#[from] schema::MigrateError),
    #[error("connecting to the database failed")]
    Connect(#[source] tokio_postgres::Error),
    #[error("shut down while waiting for the database")]
    Cancelled,
}

/// A pool of at most `size` connections to `url`. Connections are made lazily.
pub fn pool(url: &str, size: usize) -> Result<Pool, DbError> {
    let config = tokio_postgres::Config::from_str(url).map_err(DbError::Url)?;
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(5)))
        .wait_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(DbError::Pool)
}

/// Connects to `url` and applies the migrations of `database`, retrying with capped exponential
/// backoff while the database is unreachable. Definite errors (a changed migration, bad SQL,
/// authentication) end the wait at once.
pub async fn migrate_when_reachable(
    url: &str,
    database: schema::Database,
    shutdown: &CancellationToken,
) -> Result<Vec<i32>, DbError> {
    let mut backoff = service::Backoff::default();
    loop {
        let attempt = async {
            let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(DbError::Connect)?;
            let conn = tokio::spawn(conn);
            let result = schema::migrate(&mut client, database).await;
            drop(client);
            // The connection task ends once the client is gone; its own error is not news.
            if let Ok(Err(err)) = conn.await {
                tracing::debug!(error = %err, "migration connection closed with an error");
            }
            result.map_err(DbError::from)
        };
        let err = match attempt.await {
            Ok(applied) => return Ok(applied),
            Err(err) => err,
        };
        let transient = match &err {
            DbError::Connect(e) => service::is_transient_pg(e),
            DbError::Migrate(schema::MigrateError::Postgres { source, .. }) => {
                service::is_transient_pg(source)
            }
            _ => false,
        };
        if !transient {
            return Err(err);
        }
        tracing::warn!(%database, error = %service::error_chain(&err), "database not reachable; retrying");
        if !backoff.wait(shutdown).await {
            return Err(DbError::Cancelled);
        }
    }
}
