//! post-api: the post service's REST API over materialized_view_db. Posts are its own table;
//! users and department counts are the views the projector keeps.
//!
//! ```text
//! POST   /api/posts                         201 + Location | 422 (no such author)
//! GET    /api/posts?limit=&after=           200 (+ Link: next)
//! GET    /api/posts/{id}                    200 | 404
//! PUT    /api/posts/{id}                    200 | 404 | 422
//! DELETE /api/posts/{id}                    204 | 404
//! GET    /api/posts/users                   user_view, paged
//! GET    /api/posts/users/department/{d}    user_view rows of one department, paged
//! GET    /api/posts/by-department/{d}       posts whose author is in {d} now, paged
//! GET    /api/posts/stats/departments       department_stats
//! GET    /api/posts/stats/authors[/{id}]    post_stats, paged (derived view: [`post_stats`])
//! GET    /api/posts/users/{id}/activity     user_activity ([`user_activity`])
//! GET    /api/posts/stats/departments/performance[/{d}]
//!                                           department_performance ([`department_performance`])
//! GET    /health                            200 | 503
//! ```
//!
//! Every `/api/...` request may carry `X-Min-Source-LSN` (read-your-writes, [`consistency`]): it
//! is then answered from views that include that position, with `X-Source-LSN` set to theirs.
//!
//! Every post in a response carries `authorName`, `authorEmail` and `authorDepartment`, read from
//! user_view in the same query, so an update of the author shows as soon as it is projected (and
//! the fields are null once the author is deleted). [`model`] validates (pure), [`store`] holds the
//! SQL. The derived views (tables materialized_view_db keeps equal to a definition over `posts` and
//! `user_view` at every commit) have a module each.

pub mod consistency;
pub mod department_performance;
pub mod model;
pub mod post_stats;
mod store;
pub mod user_activity;

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

use self::consistency::Consistency;
use self::store::Written;
use crate::db;
use crate::http::{self, ApiError, Page};
use crate::serve;

/// Settings of post-api; every flag can also come from the environment variable named beside it.
#[derive(clap::Args, Clone)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "POST_API_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: SocketAddr,
    /// Connection URL of materialized_view_db.
    #[arg(long, env = "VIEW_DB_URL", hide_env_values = true)]
    pub database_url: String,
    /// Maximum number of database connections.
    #[arg(long, env = "POST_API_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub db_pool_size: u16,
    /// Do not apply migrations on start (when a separate `migrate` step owns the schema).
    #[arg(long, env = "POST_API_SKIP_MIGRATIONS")]
    pub skip_migrations: bool,
    /// Longest time to let in-flight requests finish after a shutdown signal.
    #[arg(long, env = "POST_API_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,
    /// The projector's consumer group (`PROJECTOR_GROUP`), whose position `X-Min-Source-LSN`
    /// waits for.
    #[arg(
        long,
        env = "POST_API_PROJECTOR_GROUP",
        default_value = "post-service-streams"
    )]
    pub projector_group: String,
    /// Longest wait for the views to reach a request's `X-Min-Source-LSN`, in milliseconds;
    /// then 503 `not_yet_consistent`.
    #[arg(long, env = "POST_API_CONSISTENCY_TIMEOUT_MS", default_value_t = 5000)]
    pub consistency_timeout_ms: u64,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL may carry a password.
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("db_pool_size", &self.db_pool_size)
            .field("skip_migrations", &self.skip_migrations)
            .field("shutdown_timeout_secs", &self.shutdown_timeout_secs)
            .field("projector_group", &self.projector_group)
            .field("consistency_timeout_ms", &self.consistency_timeout_ms)
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
        name: "post-api",
        database: schema::Database::ViewDb,
        database_url: &config.database_url,
        pool_size: config.db_pool_size,
        skip_migrations: config.skip_migrations,
        drain: Duration::from_secs(config.shutdown_timeout_secs),
    };
    let group = config.projector_group.clone();
    let timeout = Duration::from_millis(config.consistency_timeout_ms);
    serve::run(service, listener, shutdown, move |pool| {
        let consistency = Consistency::start(pool.clone(), group, timeout);
        routes(pool, &consistency)
    })
    .await
}

/// Every route of the service, with JSON errors for rejections and an access log.
pub fn routes(
    pool: Pool,
    consistency: &Consistency,
) -> impl Filter<Extract = (impl Reply,), Error = std::convert::Infallible> + Clone {
    let db = {
        let pool = pool.clone();
        warp::any().map(move || pool.clone())
    };
    let posts = warp::path!("api" / "posts");
    let post = warp::path!("api" / "posts" / String);
    let query = warp::query::<HashMap<String, String>>();
    let body = || http::json_object_limited(model::MAX_BODY_BYTES);

    // The fixed paths come before /api/posts/{id}, which would otherwise take "users" for an id.
    let all_users = warp::path!("api" / "posts" / "users")
        .and(warp::get())
        .and(query)
        .and(db.clone())
        .then(|q, db| async move { http::respond(users(None, q, db).await) });
    let users_in = warp::path!("api" / "posts" / "users" / "department" / String)
        .and(warp::get())
        .and(query)
        .and(db.clone())
        .then(|d, q, db| async move { http::respond(users(Some(d), q, db).await) });
    let by_department = warp::path!("api" / "posts" / "by-department" / String)
        .and(warp::get())
        .and(query)
        .and(db.clone())
        .then(|d, q, db| async move { http::respond(by_department(d, q, db).await) });
    let stats = warp::path!("api" / "posts" / "stats" / "departments")
        .and(warp::get())
        .and(db.clone())
        .then(|db| async move { http::respond(stats(db).await) });
    let create = posts
        .and(warp::post())
        .and(body())
        .and(db.clone())
        .then(|body, db| async move { http::respond(create(body, db).await) });
    let list = posts
        .and(warp::get())
        .and(query)
        .and(db.clone())
        .then(|q, db| async move { http::respond(list(q, db).await) });
    let get = post
        .and(warp::get())
        .and(db.clone())
        .then(|id, db| async move { http::respond(get(id, db).await) });
    let replace = post
        .and(warp::put())
        .and(body())
        .and(db.clone())
        .then(|id, body, db| async move { http::respond(replace(id, body, db).await) });
    let delete = post
        .and(warp::delete())
        .and(db.clone())
        .then(|id, db| async move { http::respond(delete(id, db).await) });
    let health = warp::path!("health")
        .and(warp::get())
        .and(db)
        .then(db::health);
    let derived = post_stats::routes(pool.clone())
        .or(user_activity::routes(pool.clone()))
        .unify()
        .or(department_performance::routes(pool))
        .unify();

    let api = all_users
        .or(users_in)
        .unify()
        .or(by_department)
        .unify()
        .or(stats)
        .unify()
        .or(derived)
        .unify()
        .or(create)
        .unify()
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(replace)
        .unify()
        .or(delete)
        .unify();
    // Waits first when asked to (X-Min-Source-LSN), and says how far the views were.
    let api = consistency
        .filter()
        .and(api)
        .map(|reached: Option<u64>, mut response: Response| {
            if let Some(lsn) = reached {
                if let Ok(value) = warp::http::HeaderValue::from_str(&change_event::format_lsn(lsn))
                {
                    response.headers_mut().insert(http::SOURCE_LSN, value);
                }
            }
            response
        });
    api.or(health)
        .unify()
        .recover(http::recover)
        .unify()
        .with(http::access_log("post-api"))
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    http::parse_id(id, "post")
}

fn post_not_found(id: i64) -> ApiError {
    ApiError::not_found(format!("post {id} does not exist")).with_field("id")
}

fn author_not_found(author_id: i64) -> ApiError {
    ApiError::invalid(
        "authorId",
        format!("author {author_id} does not exist (no such user in user_view)"),
    )
}

async fn create(
    body: Result<Map<String, Value>, ApiError>,
    pool: Pool,
) -> Result<Response, ApiError> {
    let fields = model::parse_post(&body?)?;
    match store::insert(&db::connection(&pool).await?, &fields).await? {
        Written::Post(post) => {
            tracing::info!(
                post_id = post.id,
                author_id = post.author_id,
                "post created"
            );
            let location = format!("/api/posts/{}", post.id);
            Ok(warp::reply::with_header(
                warp::reply::with_status(warp::reply::json(&post), StatusCode::CREATED),
                "location",
                location,
            )
            .into_response())
        }
        Written::NoSuchAuthor | Written::NoSuchPost => Err(author_not_found(fields.author_id)),
    }
}

async fn list(query: HashMap<String, String>, pool: Pool) -> Result<Response, ApiError> {
    let page = Page::from_query(&query)?;
    let posts = store::list(&db::connection(&pool).await?, page).await?;
    Ok(page.reply(posts, "/api/posts", |p| p.id))
}

async fn get(id: String, pool: Pool) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match store::get(&db::connection(&pool).await?, id).await? {
        Some(post) => Ok(warp::reply::json(&post).into_response()),
        None => Err(post_not_found(id)),
    }
}

async fn replace(
    id: String,
    body: Result<Map<String, Value>, ApiError>,
    pool: Pool,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let fields = model::parse_post(&body?)?;
    match store::replace(&db::connection(&pool).await?, id, &fields).await? {
        Written::Post(post) => Ok(warp::reply::json(&post).into_response()),
        Written::NoSuchPost => Err(post_not_found(id)),
        Written::NoSuchAuthor => Err(author_not_found(fields.author_id)),
    }
}

async fn delete(id: String, pool: Pool) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if store::delete(&db::connection(&pool).await?, id).await? {
        tracing::info!(post_id = id, "post deleted");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(post_not_found(id))
    }
}

async fn users(
    department: Option<String>,
    query: HashMap<String, String>,
    pool: Pool,
) -> Result<Response, ApiError> {
    let page = Page::from_query(&query)?;
    let department = department
        .as_deref()
        .map(model::parse_department)
        .transpose()?;
    let path = match &department {
        Some(_) => "users/department",
        None => "users",
    };
    let users = store::users(&db::connection(&pool).await?, department.as_deref(), page).await?;
    let path = match &department {
        Some(d) => format!("/api/posts/{path}/{}", encode_segment(d)),
        None => format!("/api/posts/{path}"),
    };
    Ok(page.reply(users, &path, |u| u.id))
}

async fn by_department(
    department: String,
    query: HashMap<String, String>,
    pool: Pool,
) -> Result<Response, ApiError> {
    let page = Page::from_query(&query)?;
    let department = model::parse_department(&department)?;
    let posts = store::by_department(&db::connection(&pool).await?, &department, page).await?;
    let path = format!("/api/posts/by-department/{}", encode_segment(&department));
    Ok(page.reply(posts, &path, |p| p.id))
}

async fn stats(pool: Pool) -> Result<Response, ApiError> {
    let stats = store::department_stats(&db::connection(&pool).await?).await?;
    Ok(warp::reply::json(&stats).into_response())
}

/// Percent-encodes a path segment for `Link` headers.
fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
