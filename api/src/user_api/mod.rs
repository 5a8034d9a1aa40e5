//! user-api: the user service's REST API over `user_db.users`, the only table it writes.
//!
//! ```text
//! POST   /api/users          201 + Location    GET    /api/users?limit=&after=   200 (+ Link: next)
//! GET    /api/users/{id}     200 | 404         PUT    /api/users/{id}            200 | 404 (all fields)
//! PATCH  /api/users/{id}     200 | 404 (given fields only)
//! DELETE /api/users/{id}     204 | 404         GET    /health                    200 | 503
//! ```
//!
//! [`model`] parses and validates bodies (pure), [`store`] holds the SQL; this module wires them to
//! HTTP. Errors use the format of [`crate::http::ApiError`].

pub mod model;
mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::db::{self, DbError};
use crate::http::{self, ApiError};

/// Settings of user-api; every flag can also come from the environment variable named beside it.
#[derive(clap::Args, Clone)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "USER_API_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Connection URL of user_db.
    #[arg(long, env = "USER_DB_URL", hide_env_values = true)]
    pub database_url: String,
    /// Maximum number of database connections.
    #[arg(long, env = "USER_API_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub db_pool_size: u16,
    /// Do not apply migrations on start (when a separate `migrate` step owns the schema).
    #[arg(long, env = "USER_API_SKIP_MIGRATIONS")]
    pub skip_migrations: bool,
    /// Longest time to let in-flight requests finish after a shutdown signal.
    #[arg(long, env = "USER_API_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL may carry a password.
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("db_pool_size", &self.db_pool_size)
            .field("skip_migrations", &self.skip_migrations)
            .field("shutdown_timeout_secs", &self.shutdown_timeout_secs)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("in-flight requests did not finish within {0:?} of shutdown")]
    DrainTimeout(Duration),
}

/// Serves the API on `listener` until `shutdown` is cancelled, then drains in-flight requests.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let pool = db::pool(&config.database_url, usize::from(config.db_pool_size))?;
    if !config.skip_migrations {
        let migrated = schema::migrate_when_reachable(
            &config.database_url,
            schema::Database::UserDb,
            &shutdown,
        )
        .await;
        let applied = match migrated {
            Ok(applied) => applied,
            // Asked to stop while waiting for the database: a clean exit.
            Err(schema::WaitError::Cancelled(_)) => return Ok(()),
            Err(e) => return Err(DbError::from(e).into()),
        };
        tracing::info!(?applied, "user_db schema is current");
    }
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "user-api listening");

    let server = warp::serve(routes(pool))
        .incoming(listener)
        .graceful({
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        })
        .run();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        () = &mut server => return Ok(()),
        () = shutdown.cancelled() => {}
    }
    let limit = Duration::from_secs(config.shutdown_timeout_secs);
    tokio::time::timeout(limit, server)
        .await
        .map_err(|_| Error::DrainTimeout(limit))
}

/// Every route of the service, with JSON errors for rejections and an access log.
pub fn routes(
    pool: Pool,
) -> impl Filter<Extract = (impl Reply,), Error = std::convert::Infallible> + Clone {
    let db = warp::any().map(move || pool.clone());
    let users = warp::path!("api" / "users");
    let user = warp::path!("api" / "users" / String);

    let create = users
        .and(warp::post())
        .and(http::json_object())
        .and(db.clone())
        .then(|body, db| async move { http::respond(create(body, db).await) });
    let list = users
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(db.clone())
        .then(|query, db| async move { http::respond(list(query, db).await) });
    let get = user
        .and(warp::get())
        .and(db.clone())
        .then(|id, db| async move { http::respond(get(id, db).await) });
    let replace = user
        .and(warp::put())
        .and(http::json_object())
        .and(db.clone())
        .then(|id, body, db| async move { http::respond(replace(id, body, db).await) });
    let patch = user
        .and(warp::patch())
        .and(http::json_object())
        .and(db.clone())
        .then(|id, body, db| async move { http::respond(patch(id, body, db).await) });
    let delete = user
        .and(warp::delete())
        .and(db.clone())
        .then(|id, db| async move { http::respond(delete(id, db).await) });
    let health = warp::path!("health").and(warp::get()).and(db).then(health);

    create
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(replace)
        .unify()
        .or(patch)
        .unify()
        .or(delete)
        .unify()
        .or(health)
        .unify()
        .recover(http::recover)
        .unify()
        .with(http::access_log("user-api"))
}

/// Default and largest page size of `GET /api/users`.
pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 1000;

async fn connection(pool: &Pool) -> Result<deadpool_postgres::Object, ApiError> {
    pool.get().await.map_err(|e| ApiError::unavailable(&e))
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    match id.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ApiError::bad_request(
            "invalid_id",
            format!("user id must be a positive integer, got {id:?}"),
        )
        .with_field("id")),
    }
}

fn user_not_found(id: i64) -> ApiError {
    ApiError::not_found(format!("user {id} does not exist")).with_field("id")
}

async fn create(
    body: Result<Map<String, Value>, ApiError>,
    pool: Pool,
) -> Result<Response, ApiError> {
    let fields = model::parse_create(&body?)?;
    let user = store::insert(&connection(&pool).await?, &fields).await?;
    tracing::info!(user_id = user.id, "user created");
    let location = format!("/api/users/{}", user.id);
    Ok(warp::reply::with_header(
        warp::reply::with_status(warp::reply::json(&user), StatusCode::CREATED),
        "location",
        location,
    )
    .into_response())
}

async fn list(query: HashMap<String, String>, pool: Pool) -> Result<Response, ApiError> {
    let mut limit = DEFAULT_PAGE;
    let mut after = 0;
    for (key, value) in &query {
        let number = || {
            value.parse::<i64>().map_err(|_| {
                ApiError::bad_request("invalid_query", format!("{key} must be an integer"))
                    .with_field(key.as_str())
            })
        };
        match key.as_str() {
            "limit" => limit = number()?,
            "after" => after = number()?,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {key:?}; accepted: limit, after"),
                )
                .with_field(key.as_str()))
            }
        }
    }
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    if after < 0 {
        return Err(ApiError::invalid("after", "after must not be negative"));
    }
    let db = connection(&pool).await?;
    // One extra row tells whether a next page exists.
    let mut users = store::list(&db, after, limit + 1).await?;
    let more = users.len() as i64 > limit;
    users.truncate(limit as usize);
    let reply = warp::reply::json(&users).into_response();
    match users.last() {
        Some(last) if more => Ok(warp::reply::with_header(
            reply,
            "link",
            format!("</api/users?limit={limit}&after={}>; rel=\"next\"", last.id),
        )
        .into_response()),
        _ => Ok(reply),
    }
}

async fn get(id: String, pool: Pool) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match store::get(&connection(&pool).await?, id).await? {
        Some(user) => Ok(warp::reply::json(&user).into_response()),
        None => Err(user_not_found(id)),
    }
}

async fn replace(
    id: String,
    body: Result<Map<String, Value>, ApiError>,
    pool: Pool,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let fields = model::parse_replace(&body?)?;
    match store::replace(&connection(&pool).await?, id, &fields).await? {
        Some(user) => Ok(warp::reply::json(&user).into_response()),
        None => Err(user_not_found(id)),
    }
}

async fn patch(
    id: String,
    body: Result<Map<String, Value>, ApiError>,
    pool: Pool,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let changes = model::parse_patch(&body?)?;
    match store::patch(&connection(&pool).await?, id, &changes).await? {
        Some(user) => Ok(warp::reply::json(&user).into_response()),
        None => Err(user_not_found(id)),
    }
}

async fn delete(id: String, pool: Pool) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if store::delete(&connection(&pool).await?, id).await? {
        tracing::info!(user_id = id, "user deleted");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(user_not_found(id))
    }
}

/// 200 when the database answers within two seconds, 503 otherwise.
async fn health(pool: Pool) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_positive_integers() {
        assert_eq!(parse_id("42"), Ok(42));
        for bad in ["0", "-1", "abc", "1.5", "99999999999999999999", ""] {
            assert_eq!(
                parse_id(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }
}
