//! What both REST services do around their routes: a connection pool, the schema brought up to
//! date (waiting for the database), serving until shutdown, and a bounded drain.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::{Filter, Reply};

use crate::db::{self, DbError};
use crate::http;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("in-flight requests did not finish within {0:?} of shutdown")]
    DrainTimeout(Duration),
}

/// How one service is run.
#[derive(Debug, Clone, Copy)]
pub struct Service<'a> {
    /// For logs: `user-api`, `post-api`.
    pub name: &'static str,
    pub database: schema::Database,
    pub database_url: &'a str,
    pub pool_size: u16,
    pub skip_migrations: bool,
    /// Longest time in-flight requests may take after shutdown.
    pub drain: Duration,
}

/// Serves `routes` (made over the service's pool) on `listener` until `shutdown`, then drains.
pub async fn run<F>(
    service: Service<'_>,
    listener: TcpListener,
    shutdown: CancellationToken,
    routes: impl FnOnce(Pool) -> F,
) -> Result<(), Error>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let pool = db::pool(service.database_url, usize::from(service.pool_size))?;
    if !service.skip_migrations {
        let migrated =
            schema::migrate_when_reachable(service.database_url, service.database, &shutdown).await;
        let applied = match migrated {
            Ok(applied) => applied,
            // Asked to stop while waiting for the database: a clean exit.
            Err(schema::WaitError::Cancelled(_)) => return Ok(()),
            Err(e) => return Err(DbError::from(e).into()),
        };
        tracing::info!(?applied, database = %service.database, "schema is current");
    }
    let addr = listener.local_addr().ok();
    tracing::info!(service = service.name, ?addr, "listening");
    if http::serve(routes(pool), listener, shutdown, service.drain).await {
        Ok(())
    } else {
        Err(Error::DrainTimeout(service.drain))
    }
}
