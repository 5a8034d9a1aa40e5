//! SQL of the post service against materialized_view_db: `posts` (its own table) read together
//! with `user_view` and `department_stats` (kept by the projector). Every call is one statement.

use tokio_postgres::Row;

use super::model::{DepartmentStats, Post, PostFields, ViewUser};
use crate::db::query_error;
use crate::http::{ApiError, Page};

type Db = deadpool_postgres::Client;

/// A post and its author as of now (a LEFT JOIN: the author may be gone).
const POST: &str = "p.id, p.title, p.content, p.author_id, u.name, u.email, u.department, \
                    p.created_at, p.updated_at";
const USER: &str = "user_id, name, email, department, status, created_at, updated_at";

/// The outcome of a write that needs the author to exist.
#[derive(Debug)]
pub enum Written {
    Post(Post),
    NoSuchPost,
    NoSuchAuthor,
}

pub async fn insert(db: &Db, f: &PostFields) -> Result<Written, ApiError> {
    let sql = format!(
        "WITH p AS (INSERT INTO posts (title, content, author_id) \
                    SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM user_view WHERE user_id = $3) \
                    RETURNING *) \
         SELECT {POST} FROM p LEFT JOIN user_view u ON u.user_id = p.author_id"
    );
    let row = db
        .query_opt(&sql, &[&f.title, &f.content, &f.author_id])
        .await
        .map_err(query_error)?;
    Ok(row.map_or(Written::NoSuchAuthor, |r| Written::Post(post(&r))))
}

pub async fn replace(db: &Db, id: i64, f: &PostFields) -> Result<Written, ApiError> {
    let sql = format!(
        "WITH p AS (UPDATE posts SET title = $2, content = $3, author_id = $4, updated_at = now() \
                    WHERE id = $1 AND EXISTS (SELECT 1 FROM user_view WHERE user_id = $4) \
                    RETURNING *), \
              e AS (SELECT EXISTS (SELECT 1 FROM posts WHERE id = $1) AS post) \
         SELECT e.post, {POST} FROM e LEFT JOIN p ON true \
         LEFT JOIN user_view u ON u.user_id = p.author_id"
    );
    let row = db
        .query_one(&sql, &[&id, &f.title, &f.content, &f.author_id])
        .await
        .map_err(query_error)?;
    let exists: bool = row.get(0);
    let updated: Option<i64> = row.get(1);
    Ok(match (exists, updated) {
        (_, Some(_)) => Written::Post(post_at(&row, 1)),
        (false, None) => Written::NoSuchPost,
        (true, None) => Written::NoSuchAuthor,
    })
}

pub async fn get(db: &Db, id: i64) -> Result<Option<Post>, ApiError> {
    let sql = format!(
        "SELECT {POST} FROM posts p LEFT JOIN user_view u ON u.user_id = p.author_id \
         WHERE p.id = $1"
    );
    let row = db.query_opt(&sql, &[&id]).await.map_err(query_error)?;
    Ok(row.as_ref().map(post))
}

pub async fn list(db: &Db, page: Page) -> Result<Vec<Post>, ApiError> {
    let sql = format!(
        "SELECT {POST} FROM posts p LEFT JOIN user_view u ON u.user_id = p.author_id \
         WHERE p.id > $1 ORDER BY p.id LIMIT $2"
    );
    let rows = db
        .query(&sql, &[&page.after, &page.fetch()])
        .await
        .map_err(query_error)?;
    Ok(rows.iter().map(post).collect())
}

/// Posts whose author is in `department` now.
pub async fn by_department(db: &Db, department: &str, page: Page) -> Result<Vec<Post>, ApiError> {
    let sql = format!(
        "SELECT {POST} FROM user_view u JOIN posts p ON p.author_id = u.user_id \
         WHERE u.department = $1 AND p.id > $2 ORDER BY p.id LIMIT $3"
    );
    let rows = db
        .query(&sql, &[&department, &page.after, &page.fetch()])
        .await
        .map_err(query_error)?;
    Ok(rows.iter().map(post).collect())
}

pub async fn delete(db: &Db, id: i64) -> Result<bool, ApiError> {
    let n = db
        .execute("DELETE FROM posts WHERE id = $1", &[&id])
        .await
        .map_err(query_error)?;
    Ok(n == 1)
}

/// Rows of user_view, optionally of one department.
pub async fn users(
    db: &Db,
    department: Option<&str>,
    page: Page,
) -> Result<Vec<ViewUser>, ApiError> {
    // Two statements rather than "$3 IS NULL OR ...", so each plan can use its index.
    let rows = match department {
        Some(d) => {
            let sql = format!(
                "SELECT {USER} FROM user_view WHERE department = $3 AND user_id > $1 \
                 ORDER BY user_id LIMIT $2"
            );
            db.query(&sql, &[&page.after, &page.fetch(), &d]).await
        }
        None => {
            let sql = format!(
                "SELECT {USER} FROM user_view WHERE user_id > $1 ORDER BY user_id LIMIT $2"
            );
            db.query(&sql, &[&page.after, &page.fetch()]).await
        }
    }
    .map_err(query_error)?;
    Ok(rows
        .iter()
        .map(|r| ViewUser {
            id: r.get(0),
            name: r.get(1),
            email: r.get(2),
            department: r.get(3),
            status: r.get(4),
            created_at: r.get(5),
            updated_at: r.get(6),
        })
        .collect())
}

pub async fn department_stats(db: &Db) -> Result<Vec<DepartmentStats>, ApiError> {
    let rows = db
        .query(
            "SELECT department, user_count, active_users, inactive_users, last_updated \
             FROM department_stats ORDER BY department",
            &[],
        )
        .await
        .map_err(query_error)?;
    Ok(rows
        .iter()
        .map(|r| DepartmentStats {
            department: r.get(0),
            user_count: r.get(1),
            active_users: r.get(2),
            inactive_users: r.get(3),
            last_updated: r.get(4),
        })
        .collect())
}

fn post(row: &Row) -> Post {
    post_at(row, 0)
}

/// A post from the [`POST`] columns starting at column `i`.
fn post_at(row: &Row, i: usize) -> Post {
    Post {
        id: row.get(i),
        title: row.get(i + 1),
        content: row.get(i + 2),
        author_id: row.get(i + 3),
        author_name: row.get(i + 4),
        author_email: row.get(i + 5),
        author_department: row.get(i + 6),
        created_at: row.get(i + 7),
        updated_at: row.get(i + 8),
    }
}
