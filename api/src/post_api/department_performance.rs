//! `department_performance` (one row per department of user_view: users, active users, the posts
//! of its users now, posts per active user, its last post), a derived view kept by
//! materialized_view_db itself (migration `0007_department_performance.sql`), served read-only:
//!
//! ```text
//! GET /api/posts/stats/departments/performance          200, every department by name
//! GET /api/posts/stats/departments/performance/{dept}   200 | 404 (no user in it)
//! ```

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::Row;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::model;
use crate::db::{self, query_error};
use crate::http::{self, ApiError};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DepartmentPerformance {
    pub department: String,
    pub user_count: i64,
    pub active_users: i64,
    pub post_count: i64,
    /// Null when the department has no active user.
    pub posts_per_active_user: Option<f64>,
    pub last_post_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "department, user_count, active_users, post_count, \
                       posts_per_active_user::float8, last_post_at";

pub fn routes(pool: Pool) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let db = warp::any().map(move || pool.clone());
    let all = warp::path!("api" / "posts" / "stats" / "departments" / "performance")
        .and(warp::get())
        .and(db.clone())
        .then(|db| async move { http::respond(all(db).await) });
    let one = warp::path!("api" / "posts" / "stats" / "departments" / "performance" / String)
        .and(warp::get())
        .and(db)
        .then(|d, db| async move { http::respond(one(d, db).await) });
    all.or(one).unify()
}

async fn all(pool: Pool) -> Result<Response, ApiError> {
    let rows = db::connection(&pool)
        .await?
        .query(
            &format!("SELECT {COLUMNS} FROM department_performance ORDER BY department"),
            &[],
        )
        .await
        .map_err(query_error)?;
    let all: Vec<DepartmentPerformance> = rows.iter().map(performance).collect();
    Ok(warp::reply::json(&all).into_response())
}

async fn one(department: String, pool: Pool) -> Result<Response, ApiError> {
    let department = model::parse_department(&department)?;
    let row = db::connection(&pool)
        .await?
        .query_opt(
            &format!("SELECT {COLUMNS} FROM department_performance WHERE department = $1"),
            &[&department],
        )
        .await
        .map_err(query_error)?;
    match row {
        Some(r) => Ok(warp::reply::json(&performance(&r)).into_response()),
        None => Err(ApiError::not_found(format!(
            "department {department:?} has no users in user_view"
        ))
        .with_field("department")),
    }
}

fn performance(r: &Row) -> DepartmentPerformance {
    DepartmentPerformance {
        department: r.get(0),
        user_count: r.get(1),
        active_users: r.get(2),
        post_count: r.get(3),
        posts_per_active_user: r.get(4),
        last_post_at: r.get(5),
    }
}
