//! The user resource: its JSON shape and the validation of what clients send. Pure, no I/O.
//!
//! Bodies are parsed field by field from a JSON object rather than through a derived `Deserialize`,
//! so that every problem maps to the right status and names its field: a value of the wrong JSON
//! type or an unknown field is a 400, a rule broken by a well-typed value (or a missing required
//! field) is a 422.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::http::{check_fields, required, string_field, ApiError};

/// A user as stored in `user_db.users` and returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub department: String,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Active,
    Inactive,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "ACTIVE",
            Status::Inactive => "INACTIVE",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "ACTIVE" => Some(Status::Active),
            "INACTIVE" => Some(Status::Inactive),
            _ => None,
        }
    }
}

/// Every field of a user that a client sets (POST and PUT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFields {
    pub name: String,
    pub email: String,
    pub department: String,
    pub status: Status,
}

/// The fields a PATCH changes; `None` leaves the stored value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPatch {
    pub name: Option<String>,
    pub email: Option<String>,
    pub department: Option<String>,
    pub status: Option<Status>,
}

impl UserPatch {
    pub fn is_empty(&self) -> bool {
        *self == UserPatch::default()
    }
}

const FIELDS: [&str; 4] = ["name", "email", "department", "status"];
const READ_ONLY: [&str; 3] = ["id", "createdAt", "updatedAt"];

pub const NAME_MAX: usize = 100;
pub const DEPARTMENT_MAX: usize = 100;
pub const EMAIL_MAX: usize = 254;

/// Body of POST: name, email and department required; status defaults to ACTIVE.
pub fn parse_create(body: &Map<String, Value>) -> Result<UserFields, ApiError> {
    let patch = parse_patch(body)?;
    Ok(UserFields {
        name: patch.name.ok_or_else(|| required("name"))?,
        email: patch.email.ok_or_else(|| required("email"))?,
        department: patch.department.ok_or_else(|| required("department"))?,
        status: patch.status.unwrap_or(Status::Active),
    })
}

/// Body of PUT: a full replacement, every field required.
pub fn parse_replace(body: &Map<String, Value>) -> Result<UserFields, ApiError> {
    let patch = parse_patch(body)?;
    Ok(UserFields {
        name: patch.name.ok_or_else(|| required("name"))?,
        email: patch.email.ok_or_else(|| required("email"))?,
        department: patch.department.ok_or_else(|| required("department"))?,
        status: patch.status.ok_or_else(|| required("status"))?,
    })
}

/// Body of PATCH: any subset of the fields; `null` is not a value any field accepts.
pub fn parse_patch(body: &Map<String, Value>) -> Result<UserPatch, ApiError> {
    check_fields(body, &FIELDS, &READ_ONLY)?;
    // Every type first, then every rule: a body with a wrong type anywhere is a 400 whatever the
    // order of its fields.
    let name = string_field(body, "name")?;
    let email = string_field(body, "email")?;
    let department = string_field(body, "department")?;
    let status = string_field(body, "status")?;
    Ok(UserPatch {
        name: name
            .map(|v| validate_text("name", non_null("name", v)?, NAME_MAX))
            .transpose()?,
        email: email
            .map(|v| validate_email(non_null("email", v)?))
            .transpose()?,
        department: department
            .map(|v| validate_text("department", non_null("department", v)?, DEPARTMENT_MAX))
            .transpose()?,
        status: status
            .map(|v| {
                Status::parse(non_null("status", v)?)
                    .ok_or_else(|| ApiError::invalid("status", "status must be ACTIVE or INACTIVE"))
            })
            .transpose()?,
    })
}

fn non_null<'a>(field: &str, value: Option<&'a str>) -> Result<&'a str, ApiError> {
    value.ok_or_else(|| ApiError::invalid(field, format!("{field} must not be null")))
}

/// Trimmed, 1..=max characters, no control characters.
fn validate_text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    let len = value.chars().count();
    if len == 0 || len > max {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be 1 to {max} characters after trimming, got {len}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(value.to_owned())
}

/// Trimmed; `local@domain` with an RFC 5321-sized, dot-atom local part and a domain of at least two
/// DNS labels. Case is kept as given (uniqueness ignores it).
fn validate_email(value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    let invalid = |why: &str| ApiError::invalid("email", format!("email is not valid: {why}"));
    if value.chars().count() > EMAIL_MAX {
        return Err(invalid("longer than 254 characters"));
    }
    let Some((local, domain)) = value.rsplit_once('@') else {
        return Err(invalid("missing @"));
    };
    if local.is_empty() || local.len() > 64 {
        return Err(invalid("the part before @ must be 1 to 64 bytes"));
    }
    // Non-ASCII letters and digits are allowed (internationalized addresses); invisible and
    // look-alike characters (spaces, format and control characters) are not.
    let intl = |c: char| !c.is_ascii() && c.is_alphanumeric();
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~-".contains(c) || intl(c);
    if local
        .split('.')
        .any(|atom| atom.is_empty() || !atom.chars().all(atext))
    {
        return Err(invalid(
            "the part before @ has a character or dot that is not allowed",
        ));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err(invalid("the domain needs a dot"));
    }
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || intl(c))
    };
    if !labels.iter().all(label_ok) {
        return Err(invalid("the domain is not a valid host name"));
    }
    if labels
        .last()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(invalid("the domain must not end in a number"));
    }
    Ok(value.to_owned())
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

    fn err(r: Result<impl std::fmt::Debug, ApiError>) -> (StatusCode, Option<String>) {
        let e = r.unwrap_err();
        (e.status, e.field)
    }

    const UNPROCESSABLE: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;

    #[test]
    fn create_trims_and_defaults_status() {
        let u = parse_create(&obj(json!({
            "name": "  Ann Lee ", "email": " Ann@Example.org ", "department": " R&D "
        })))
        .unwrap();
        assert_eq!(
            u,
            UserFields {
                name: "Ann Lee".into(),
                email: "Ann@Example.org".into(),
                department: "R&D".into(),
                status: Status::Active
            }
        );
    }

    #[test]
    fn create_requires_fields() {
        for missing in ["name", "email", "department"] {
            let mut body = obj(json!({"name": "a", "email": "a@b.co", "department": "d"}));
            body.remove(missing);
            assert_eq!(
                err(parse_create(&body)),
                (UNPROCESSABLE, Some(missing.to_owned()))
            );
        }
    }

    #[test]
    fn replace_requires_status_too() {
        let body = obj(json!({"name": "a", "email": "a@b.co", "department": "d"}));
        assert_eq!(
            err(parse_replace(&body)),
            (UNPROCESSABLE, Some("status".into()))
        );
    }

    #[test]
    fn lengths_are_counted_in_characters_after_trimming() {
        let ok = "é".repeat(100);
        assert!(validate_text("name", &format!("  {ok}  "), NAME_MAX).is_ok());
        assert!(validate_text("name", &"é".repeat(101), NAME_MAX).is_err());
        assert!(validate_text("name", "   ", NAME_MAX).is_err());
        assert!(validate_text("name", "a\u{0}b", NAME_MAX).is_err());
    }

    #[test]
    fn emails() {
        for good in [
            "a@b.co",
            "first.last+tag@sub.example.org",
            "o'hara@example.ie",
            "user@xn--bcher-kva.example",
            "üser@bücher.de",
        ] {
            assert!(validate_email(good).is_ok(), "{good}");
        }
        let long_local = format!("{}@example.org", "a".repeat(65));
        // Every part within its own limit, 255 characters in all.
        let just_too_long = format!(
            "{}@{}.{}.{}",
            "a".repeat(64),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62)
        );
        assert_eq!(just_too_long.len(), 255);
        let longest = &just_too_long[1..];
        assert!(validate_email(longest).is_ok(), "254 characters must pass");
        let long_total = format!("a@{}.org", "b".repeat(250));
        for bad in [
            "",
            "plain",
            "@example.org",
            "a@",
            "a@localhost",
            "a..b@example.org",
            ".a@example.org",
            "a b@example.org",
            "a@-example.org",
            "a@example..org",
            "a@1.2.3.4",
            "a@b@example.org",
            long_local.as_str(),
            long_total.as_str(),
            just_too_long.as_str(),
            "ann\u{200B}@example.org",
            "ann@exa\u{00A0}mple.org",
            "ann\u{202E}@example.org",
        ] {
            assert!(validate_email(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn wrong_types_are_400_and_rules_422() {
        assert_eq!(
            err(parse_patch(&obj(json!({"name": 5})))),
            (StatusCode::BAD_REQUEST, Some("name".into()))
        );
        assert_eq!(
            err(parse_patch(&obj(json!({"status": true})))),
            (StatusCode::BAD_REQUEST, Some("status".into()))
        );
        assert_eq!(
            err(parse_patch(&obj(json!({"status": "active"})))),
            (UNPROCESSABLE, Some("status".into()))
        );
        assert_eq!(
            err(parse_patch(&obj(json!({"name": null})))),
            (UNPROCESSABLE, Some("name".into()))
        );
    }

    #[test]
    fn a_wrong_type_is_400_even_after_a_broken_rule() {
        assert_eq!(
            err(parse_patch(&obj(json!({"name": "", "email": 5})))),
            (StatusCode::BAD_REQUEST, Some("email".into()))
        );
    }

    #[test]
    fn unknown_and_read_only_fields_are_rejected() {
        for key in ["id", "createdAt", "nickname"] {
            let e = parse_patch(&obj(json!({ key: "x" }))).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, "unknown_field")
            );
            assert_eq!(e.field.as_deref(), Some(key));
        }
    }

    #[test]
    fn patch_keeps_only_given_fields() {
        let p = parse_patch(&obj(json!({"status": "INACTIVE"}))).unwrap();
        assert_eq!(
            p,
            UserPatch {
                status: Some(Status::Inactive),
                ..UserPatch::default()
            }
        );
        assert!(parse_patch(&Map::new()).unwrap().is_empty());
    }

    #[test]
    fn serializes_camel_case_with_rfc3339() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let u = User {
            id: 7,
            name: "n".into(),
            email: "e@x.io".into(),
            department: "d".into(),
            status: Status::Inactive,
            created_at: t,
            updated_at: t,
        };
        assert_eq!(
            serde_json::to_value(&u).unwrap(),
            json!({"id": 7, "name": "n", "email": "e@x.io", "department": "d",
                   "status": "INACTIVE", "createdAt": "2026-01-02T03:04:05.123456Z",
                   "updatedAt": "2026-01-02T03:04:05.123456Z"})
        );
    }
}
