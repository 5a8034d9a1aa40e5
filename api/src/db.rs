//! Postgres for the REST services: the pool, how query failures look to clients, `/health`.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use crate::http::ApiError;

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

/// A pooled connection, or 503 when the database cannot be reached.
pub async fn connection(pool: &Pool) -> Result<deadpool_postgres::Object, ApiError> {
    pool.get().await.map_err(|e| ApiError::unavailable(&e))
}

/// The client's view of a failed statement: 503 when the connection broke (the next request gets
/// a fresh one) or PostgreSQL rolled the transaction back for a conflict with another (SQLSTATE
/// class 40: a deadlock, e.g. with a `TRUNCATE` by hand; nothing was written), 500 otherwise; the
/// database's text goes to the log only.
pub fn query_error(err: tokio_postgres::Error) -> ApiError {
    let rolled_back = err
        .as_db_error()
        .is_some_and(|db| db.code().code().starts_with("40"));
    if rolled_back || service::is_transient_pg(&err) {
        ApiError::unavailable(&err)
    } else {
        ApiError::internal(&err)
    }
}

/// `/health`: 200 when the database answers within two seconds, 503 otherwise.
pub async fn health(pool: Pool) -> Response {
    let probe = async {
        let db = pool.get().await.map_err(|e| e.to_string())?;
        db.simple_query("SELECT 1").await.map_err(|e| e.to_string())
    };
    let database = match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer within 2 s".to_owned()),
    };
    match database {
        Ok(()) => warp::reply::json(&json!({"status": "UP", "database": "UP"})).into_response(),
        Err(error) => {
            tracing::warn!(%error, "health check: database down");
            warp::reply::with_status(
                warp::reply::json(&json!({"status": "DOWN", "database": "DOWN"})),
                StatusCode::SERVICE_UNAVAILABLE,
            )
            .into_response()
        }
    }
}
