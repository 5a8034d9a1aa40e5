//! `user_activity` (one row per user of user_view: their profile, their posts, when they last did
//! either), a derived view kept by materialized_view_db itself (migration
//! `0006_user_activity.sql`), served read-only:
//!
//! ```text
//! GET /api/posts/users/{id}/activity   200 | 404 (no such user in user_view)
//! ```

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::db::{self, query_error};
use crate::http::{self, ApiError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserActivity {
    pub user_id: i64,
    pub name: String,
    pub department: String,
    pub status: String,
    pub post_count: i64,
    pub last_post_at: Option<DateTime<Utc>>,
    pub last_profile_change_at: DateTime<Utc>,
    pub last_activity_at: DateTime<Utc>,
}

pub fn routes(pool: Pool) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "posts" / "users" / String / "activity")
        .and(warp::get())
        .and(warp::any().map(move || pool.clone()))
        .then(|id, db| async move { http::respond(one(id, db).await) })
}

async fn one(id: String, pool: Pool) -> Result<Response, ApiError> {
    let id = http::parse_id(&id, "user")?;
    let row = db::connection(&pool)
        .await?
        .query_opt(
            "SELECT user_id, name, department, status, post_count, last_post_at, \
                    last_profile_change_at, last_activity_at \
             FROM user_activity WHERE user_id = $1",
            &[&id],
        )
        .await
        .map_err(query_error)?;
    let Some(r) = row else {
        return Err(ApiError::not_found(format!(
            "user {id} does not exist (no such user in user_view)"
        ))
        .with_field("id"));
    };
    let activity = UserActivity {
        user_id: r.get(0),
        name: r.get(1),
        department: r.get(2),
        status: r.get(3),
        post_count: r.get(4),
        last_post_at: r.get(5),
        last_profile_change_at: r.get(6),
        last_activity_at: r.get(7),
    };
    Ok(warp::reply::json(&activity).into_response())
}
