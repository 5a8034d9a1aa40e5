//! user-api: the user service's REST API over `user_db.users`, the only table it writes.
//!
//! ```text
//! POST   /api/users          201 + Location    GET    /api/users?limit=&after=   200 (+ Link: next)
//! GET    /api/users/{id}     200 | 404         PUT    /api/users/{id}            200 | 404 (all fields)
//! PATCH  /api/users/{id}     200 | 404 (given fields only)
//! DELETE /api/users/{id}     204 | 404         GET    /health                    200 | 503
//! ```
//!
//! Every successful write answers with `X-Source-LSN`: a WAL position at or after its commit
//! (PostgreSQL's text form, `0/1A2B3C8`). Sent to post-api as `X-Min-Source-LSN`, it makes the
//! answer wait until the views include the write (read-your-writes).
//!
//! [`model`] parses and validates bodies (pure), [`store`] holds the SQL; this module wires them to
//! HTTP. Errors use the format of [`crate::http::ApiError`].

pub mod model;
mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::db;
use crate::http::{self, ApiError, Page};
use crate::serve;

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

pub use crate::serve::Error;

/// Serves the API on `listener` until `shutdown` is cancelled, then drains in-flight requests.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let service = serve::Service {
        name: "user-api",
        database: schema::Database::UserDb,
        database_url: &config.database_url,
        pool_size: config.db_pool_size,
        skip_migrations: config.skip_migrations,
        drain: Duration::from_secs(config.shutdown_timeout_secs),
    };
    serve::run(service, listener, shutdown, routes).await
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
    let health = warp::path!("health")
        .and(warp::get())
        .and(db)
        .then(db::health);

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

fn parse_id(id: &str) -> Result<i64, ApiError> {
    http::parse_id(id, "user")
}

fn user_not_found(id: i64) -> ApiError {
    ApiError::not_found(format!("user {id} does not exist")).with_field("id")
}

async fn create(
    body: Result<Map<String, Value>, ApiError>,
    pool: Pool,
) -> Result<Response, ApiError> {
    let fields = model::parse_create(&body?)?;
    let db = db::connection(&pool).await?;
    let user = store::insert(&db, &fields).await?;
    tracing::info!(user_id = user.id, "user created");
    let location = format!("/api/users/{}", user.id);
    written(
        &db,
        warp::reply::with_header(
            warp::reply::with_status(warp::reply::json(&user), StatusCode::CREATED),
            "location",
            location,
        ),
    )
    .await
}

/// `reply` to a successful write, with its `X-Source-LSN`.
async fn written(db: &deadpool_postgres::Client, reply: impl Reply) -> Result<Response, ApiError> {
    let lsn = store::written_lsn(db).await?;
    Ok(warp::reply::with_header(reply, http::SOURCE_LSN, lsn).into_response())
}

async fn list(query: HashMap<String, String>, pool: Pool) -> Result<Response, ApiError> {
    let page = Page::from_query(&query)?;
    let users = store::list(&db::connection(&pool).await?, page.after, page.fetch()).await?;
    Ok(page.reply(users, "/api/users", |u| u.id))
}

async fn get(id: String, pool: Pool) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match store::get(&db::connection(&pool).await?, id).await? {
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
    let db = db::connection(&pool).await?;
    match store::replace(&db, id, &fields).await? {
        Some(user) => written(&db, warp::reply::json(&user)).await,
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
    let db = db::connection(&pool).await?;
    match store::patch(&db, id, &changes).await? {
        Some(user) => written(&db, warp::reply::json(&user)).await,
        None => Err(user_not_found(id)),
    }
}

async fn delete(id: String, pool: Pool) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let db = db::connection(&pool).await?;
    if store::delete(&db, id).await? {
        tracing::info!(user_id = id, "user deleted");
        written(&db, StatusCode::NO_CONTENT).await
    } else {
        Err(user_not_found(id))
    }
}
