//! `post_stats` (one row per author: how many posts, the first and the last), a derived view kept
//! by materialized_view_db itself (migration `0005_post_stats.sql`), served read-only:
//!
//! ```text
//! GET /api/posts/stats/authors?limit=&after=   200 (+ Link: next), by author id
//! GET /api/posts/stats/authors/{id}            200 | 404 (the author has no posts)
//! ```
//!
//! Authors deleted upstream keep their row: their posts stay.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::Row;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::db::{self, query_error};
use crate::http::{self, ApiError, Page};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorStats {
    pub author_id: i64,
    pub post_count: i64,
    pub first_post_at: DateTime<Utc>,
    pub last_post_at: DateTime<Utc>,
}

const COLUMNS: &str = "author_id, post_count, first_post_at, last_post_at";

pub fn routes(pool: Pool) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let db = warp::any().map(move || pool.clone());
    let list = warp::path!("api" / "posts" / "stats" / "authors")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(db.clone())
        .then(|q, db| async move { http::respond(list(q, db).await) });
    let one = warp::path!("api" / "posts" / "stats" / "authors" / String)
        .and(warp::get())
        .and(db)
        .then(|id, db| async move { http::respond(one(id, db).await) });
    list.or(one).unify()
}

async fn list(query: HashMap<String, String>, pool: Pool) -> Result<Response, ApiError> {
    let page = Page::from_query(&query)?;
    let rows = db::connection(&pool)
        .await?
        .query(
            &format!(
                "SELECT {COLUMNS} FROM post_stats WHERE author_id > $1 \
                 ORDER BY author_id LIMIT $2"
            ),
            &[&page.after, &page.fetch()],
        )
        .await
        .map_err(query_error)?;
    let stats: Vec<AuthorStats> = rows.iter().map(stats).collect();
    Ok(page.reply(stats, "/api/posts/stats/authors", |s| s.author_id))
}

async fn one(id: String, pool: Pool) -> Result<Response, ApiError> {
    let id = http::parse_id(&id, "author")?;
    let row = db::connection(&pool)
        .await?
        .query_opt(
            &format!("SELECT {COLUMNS} FROM post_stats WHERE author_id = $1"),
            &[&id],
        )
        .await
        .map_err(query_error)?;
    match row {
        Some(r) => Ok(warp::reply::json(&stats(&r)).into_response()),
        None => Err(ApiError::not_found(format!("author {id} has no posts")).with_field("id")),
    }
}

fn stats(r: &Row) -> AuthorStats {
    AuthorStats {
        author_id: r.get(0),
        post_count: r.get(1),
        first_post_at: r.get(2),
        last_post_at: r.get(3),
    }
}
