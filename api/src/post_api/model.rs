//! The post resource and the read models of the post service, and the validation of what clients
//! send. Pure, no I/O.
//!
//! Posts are parsed field by field, like users: a value of the wrong JSON type or an unknown field
//! is a 400, a broken rule (or a missing required field) is a 422.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::http::{check_fields, json_type, required, string_field, ApiError};

/// A post with its author's current data from user_view (null once the author is gone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Post {
    pub id: i64,
    pub title: String,
    pub content: String,
    pub author_id: i64,
    pub author_name: Option<String>,
    pub author_email: Option<String>,
    pub author_department: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A user as the post service sees it (a row of user_view), in the user API's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewUser {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub department: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A row of department_stats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DepartmentStats {
    pub department: String,
    pub user_count: i64,
    pub active_users: i64,
    pub inactive_users: i64,
    pub last_updated: DateTime<Utc>,
}

/// What a client sets on a post (POST and PUT: every field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostFields {
    pub title: String,
    pub content: String,
    pub author_id: i64,
}

const FIELDS: [&str; 3] = ["title", "content", "authorId"];
const READ_ONLY: [&str; 6] = [
    "id",
    "createdAt",
    "updatedAt",
    "authorName",
    "authorEmail",
    "authorDepartment",
];

pub const TITLE_MAX: usize = 200;
pub const CONTENT_MAX: usize = 20_000;

/// Bodies up to this size are read: 20,000 characters of content may take 80 KB in UTF-8, more
/// when escaped in JSON.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Body of POST and PUT.
pub fn parse_post(body: &Map<String, Value>) -> Result<PostFields, ApiError> {
    check_fields(body, &FIELDS, &READ_ONLY)?;
    // Every type first, then every rule.
    // Absent and null are both "missing" here (a 422).
    let title = string_field(body, "title")?.flatten();
    let content = string_field(body, "content")?.flatten();
    let author_id = match body.get("authorId") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_i64().filter(|_| n.is_i64()).ok_or_else(|| {
            ApiError::invalid(
                "authorId",
                format!("authorId must be a whole number, got {n}"),
            )
        })?),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_type",
                format!("authorId must be a number, got {}", json_type(other)),
            )
            .with_field("authorId"))
        }
    };
    let title = title.ok_or_else(|| required("title"))?.trim();
    let len = title.chars().count();
    if len == 0 || len > TITLE_MAX {
        return Err(ApiError::invalid(
            "title",
            format!("title must be 1 to {TITLE_MAX} characters after trimming, got {len}"),
        ));
    }
    if title.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "title",
            "title must not contain control characters",
        ));
    }
    let content = content.ok_or_else(|| required("content"))?;
    let len = content.chars().count();
    if len > CONTENT_MAX {
        return Err(ApiError::invalid(
            "content",
            format!("content must be at most {CONTENT_MAX} characters, got {len}"),
        ));
    }
    if content
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(ApiError::invalid(
            "content",
            "content must not contain control characters other than newlines and tabs",
        ));
    }
    let author_id = author_id.ok_or_else(|| required("authorId"))?;
    if author_id <= 0 {
        return Err(ApiError::invalid(
            "authorId",
            "authorId must be a positive user id",
        ));
    }
    Ok(PostFields {
        title: title.to_owned(),
        content: content.to_owned(),
        author_id,
    })
}

/// A department from a path segment: percent-decoded UTF-8, 1 to 100 characters.
pub fn parse_department(segment: &str) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_department",
                "department is not valid UTF-8 once percent-decoded",
            )
            .with_field("department")
        })?;
    let len = decoded.chars().count();
    if len == 0 || len > 100 {
        return Err(ApiError::bad_request(
            "invalid_department",
            format!("department must be 1 to 100 characters, got {len}"),
        )
        .with_field("department"));
    }
    Ok(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use warp::http::StatusCode;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn err(v: Value) -> (StatusCode, Option<String>) {
        let e = parse_post(&obj(v)).unwrap_err();
        (e.status, e.field)
    }

    const UNPROCESSABLE: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;
    const BAD: StatusCode = StatusCode::BAD_REQUEST;

    #[test]
    fn a_valid_post_is_trimmed() {
        let p = parse_post(&obj(
            json!({"title": "  안녕 ", "content": "line\nline\t", "authorId": 7}),
        ))
        .unwrap();
        assert_eq!(
            p,
            PostFields {
                title: "안녕".into(),
                content: "line\nline\t".into(),
                author_id: 7
            }
        );
        let empty = parse_post(&obj(json!({"title": "t", "content": "", "authorId": 1})));
        assert!(empty.is_ok(), "content may be empty");
    }

    #[test]
    fn rules_are_422_and_name_the_field() {
        let ok = json!({"title": "t", "content": "c", "authorId": 1});
        let with = |k: &str, v: Value| {
            let mut o = ok.clone();
            o[k] = v;
            o
        };
        let without = |k: &str| {
            let mut o = ok.clone();
            o.as_object_mut().unwrap().remove(k);
            o
        };
        for (body, field) in [
            (with("title", json!("   ")), "title"),
            (with("title", json!("x".repeat(201))), "title"),
            (with("title", json!("a\u{7}b")), "title"),
            (with("content", json!("x".repeat(20_001))), "content"),
            (with("content", json!("a\u{0}b")), "content"),
            (with("authorId", json!(0)), "authorId"),
            (with("authorId", json!(-3)), "authorId"),
            (with("authorId", json!(1.5)), "authorId"),
            (with("authorId", json!(null)), "authorId"),
            (without("title"), "title"),
            (without("content"), "content"),
            (without("authorId"), "authorId"),
        ] {
            assert_eq!(
                err(body.clone()),
                (UNPROCESSABLE, Some(field.into())),
                "{body}"
            );
        }
        assert!(parse_post(&obj(with("title", json!("x".repeat(200))))).is_ok());
        assert!(parse_post(&obj(with("content", json!("한".repeat(20_000))))).is_ok());
    }

    #[test]
    fn types_and_unknown_fields_are_400() {
        for (body, field) in [
            (json!({"title": 1, "content": "c", "authorId": 1}), "title"),
            (
                json!({"title": "t", "content": ["c"], "authorId": 1}),
                "content",
            ),
            (
                json!({"title": "t", "content": "c", "authorId": "1"}),
                "authorId",
            ),
            (
                json!({"title": "t", "content": "c", "authorId": 1, "tags": []}),
                "tags",
            ),
            (
                json!({"title": "t", "content": "c", "authorId": 1, "authorName": "x"}),
                "authorName",
            ),
        ] {
            assert_eq!(err(body.clone()), (BAD, Some(field.into())), "{body}");
        }
    }

    #[test]
    fn departments_are_percent_decoded() {
        assert_eq!(parse_department("R%26D").unwrap(), "R&D");
        assert_eq!(
            parse_department("%EA%B0%9C%EB%B0%9C%ED%8C%80").unwrap(),
            "개발팀"
        );
        assert_eq!(parse_department("Sales").unwrap(), "Sales");
        assert!(parse_department("%FF").is_err());
        assert!(parse_department("").is_err());
    }
}
