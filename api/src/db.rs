//! Postgres connections for the REST services: the pool.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL")]
    Url(#[source] tokio_postgres::Error),
    #[error("building the connection pool failed")]
    Pool(#[source] deadpool_postgres::BuildError),
    #[error(transparent)]
    Migrate(#[from] schema::WaitError),
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
