//! SQL against `user_db.users`: the only table the user service writes. Every statement is one
//! round trip; every write is a single statement, so a rejected request writes nothing.

use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use super::model::{Status, User, UserFields, UserPatch};
use crate::http::ApiError;

const COLUMNS: &str = "id, name, email, department, status, created_at, updated_at";
const EMAIL_UNIQUE_INDEX: &str = "users_email_lower_key";

pub async fn insert(db: &deadpool_postgres::Client, u: &UserFields) -> Result<User, ApiError> {
    let sql = format!(
        "INSERT INTO users (name, email, department, status) VALUES ($1, $2, $3, $4) \
         RETURNING {COLUMNS}"
    );
    let row = db
        .query_one(
            &sql,
            &[&u.name, &u.email, &u.department, &u.status.as_str()],
        )
        .await
        .map_err(write_error)?;
    user(&row)
}

pub async fn get(db: &deadpool_postgres::Client, id: i64) -> Result<Option<User>, ApiError> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
    let row = db
        .query_opt(&sql, &[&id])
        .await
        .map_err(crate::db::query_error)?;
    row.as_ref().map(user).transpose()
}

/// Users with `id > after`, in id order, at most `limit`.
pub async fn list(
    db: &deadpool_postgres::Client,
    after: i64,
    limit: i64,
) -> Result<Vec<User>, ApiError> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2");
    let rows = db
        .query(&sql, &[&after, &limit])
        .await
        .map_err(crate::db::query_error)?;
    rows.iter().map(user).collect()
}

pub async fn replace(
    db: &deadpool_postgres::Client,
    id: i64,
    u: &UserFields,
) -> Result<Option<User>, ApiError> {
    let sql = format!(
        "UPDATE users SET name = $2, email = $3, department = $4, status = $5, updated_at = now() \
         WHERE id = $1 RETURNING {COLUMNS}"
    );
    let row = db
        .query_opt(
            &sql,
            &[&id, &u.name, &u.email, &u.department, &u.status.as_str()],
        )
        .await
        .map_err(write_error)?;
    row.as_ref().map(user).transpose()
}

/// Changes the given fields only; an empty patch reads the user and writes nothing.
pub async fn patch(
    db: &deadpool_postgres::Client,
    id: i64,
    p: &UserPatch,
) -> Result<Option<User>, ApiError> {
    if p.is_empty() {
        return get(db, id).await;
    }
    let sql = format!(
        "UPDATE users SET name = coalesce($2, name), email = coalesce($3, email), \
         department = coalesce($4, department), status = coalesce($5, status), \
         updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
    );
    let row = db
        .query_opt(
            &sql,
            &[
                &id,
                &p.name,
                &p.email,
                &p.department,
                &p.status.map(Status::as_str),
            ],
        )
        .await
        .map_err(write_error)?;
    row.as_ref().map(user).transpose()
}

pub async fn delete(db: &deadpool_postgres::Client, id: i64) -> Result<bool, ApiError> {
    let n = db
        .execute("DELETE FROM users WHERE id = $1", &[&id])
        .await
        .map_err(write_error)?;
    Ok(n == 1)
}

/// A WAL position at or after the commit of every write this connection made: the value of
/// `X-Source-LSN`. With synchronous commit (the default) the commit was flushed before it
/// returned, so the flush position is at or after it and within what logical replication has
/// sent; with `synchronous_commit = off` only the insert position is sure to be past it.
pub async fn written_lsn(db: &deadpool_postgres::Client) -> Result<String, ApiError> {
    let row = db
        .query_one(
            "SELECT (CASE WHEN current_setting('synchronous_commit') = 'off' \
                          THEN pg_current_wal_insert_lsn() \
                          ELSE pg_current_wal_flush_lsn() END)::text",
            &[],
        )
        .await
        .map_err(crate::db::query_error)?;
    Ok(row.get(0))
}

fn user(row: &Row) -> Result<User, ApiError> {
    let status: &str = row.get(4);
    let status = Status::parse(status)
        .ok_or_else(|| ApiError::internal(&format_args!("users row has status {status:?}")))?;
    Ok(User {
        id: row.get(0),
        name: row.get(1),
        email: row.get(2),
        department: row.get(3),
        status,
        created_at: row.get(5),
        updated_at: row.get(6),
    })
}

fn write_error(err: tokio_postgres::Error) -> ApiError {
    if let Some(db) = err.as_db_error() {
        if *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some(EMAIL_UNIQUE_INDEX) {
            return ApiError::new(
                warp::http::StatusCode::CONFLICT,
                "duplicate_email",
                "a user with this email already exists",
            )
            .with_field("email");
        }
    }
    crate::db::query_error(err)
}
