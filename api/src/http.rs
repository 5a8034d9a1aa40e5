//! HTTP plumbing shared by the REST services: the one error type clients see, bounded JSON bodies,
//! and the mapping of warp's own rejections (unknown route, wrong method) into that error format.

use std::collections::HashMap;
use std::convert::Infallible;

use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{Map, Value};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

/// user-api's answer to a write, and post-api's to a request that asked for a position: a WAL
/// position of the source database (PostgreSQL's text form).
pub const SOURCE_LSN: &str = "x-source-lsn";

/// Request bodies larger than this are refused with 413 before they are parsed.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An error as the client sees it: `{"error":{"code":..., "message":..., "field":...}}`.
///
/// Messages are written for clients; database error text never goes into one (it is logged instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 400: the body is not JSON, not an object, or a value has the wrong JSON type.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422: well-formed, but a value breaks a rule.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
        .with_field(field)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500 for the client; `detail` goes to the log only.
    pub fn internal(detail: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the service log",
        )
    }

    /// 503: a dependency (the database) cannot be reached right now; retrying later may work.
    pub fn unavailable(detail: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %detail, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is unavailable; retry later",
        )
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    field: Option<&'a str>,
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        warp::reply::with_status(warp::reply::json(&body), self.status).into_response()
    }
}

/// A request a filter refused before any handler ran (a malformed header, a wait that timed
/// out): answered with its error, and `Retry-After` when retrying later may help.
#[derive(Debug)]
pub struct Refused {
    pub error: ApiError,
    pub retry_after: Option<u64>,
}

impl Refused {
    pub fn new(error: ApiError) -> Self {
        Refused {
            error,
            retry_after: None,
        }
    }
}

impl warp::reject::Reject for Refused {}

/// Turns a handler's result into a response.
pub fn respond<R: Reply>(result: Result<R, ApiError>) -> Response {
    match result {
        Ok(reply) => reply.into_response(),
        Err(err) => err.into_response(),
    }
}

/// Extracts the request body as a JSON object, or the client error explaining why it is not one.
/// The body is read up to [`MAX_BODY_BYTES`] (chunked bodies included) and never further.
pub fn json_object(
) -> impl Filter<Extract = (Result<Map<String, Value>, ApiError>,), Error = Rejection> + Clone {
    json_object_limited(MAX_BODY_BYTES)
}

/// [`json_object`] with a body limit of `limit` bytes.
pub fn json_object_limited(
    limit: usize,
) -> impl Filter<Extract = (Result<Map<String, Value>, ApiError>,), Error = Rejection> + Clone {
    // The raw header: a value that is not valid text must be this request's 415, not a rejection
    // that warp could report as some other route's error.
    warp::header::headers_cloned()
        .and(warp::body::stream())
        .then(move |headers: warp::http::HeaderMap, body| async move {
            let content_type = match headers.get(warp::http::header::CONTENT_TYPE) {
                None => None,
                Some(v) => Some(v.to_str().map_err(|_| {
                    ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported_media_type",
                        "Content-Type is not valid text; expected application/json",
                    )
                })?),
            };
            check_content_type(content_type)?;
            let bytes = read_limited(body, limit).await?;
            parse_object(&bytes)
        })
}

fn check_content_type(content_type: Option<&str>) -> Result<(), ApiError> {
    let Some(ct) = content_type else {
        return Ok(());
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected Content-Type application/json, got {ct:?}"),
        ))
    }
}

async fn read_limited(
    body: impl Stream<Item = Result<impl Buf, warp::Error>>,
    limit: usize,
) -> Result<BytesMut, ApiError> {
    let mut body = std::pin::pin!(body);
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|err| {
            ApiError::bad_request("unreadable_body", format!("reading the body failed: {err}"))
        })?;
        if bytes.len() + chunk.remaining() > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {limit} bytes"),
            ));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            bytes.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(bytes)
}

/// Parses `bytes` as a JSON object (400 otherwise).
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::bad_request(
            "malformed_json",
            format!("expected a JSON object, got {}", json_type(&other)),
        )),
        Err(err) => Err(ApiError::bad_request(
            "malformed_json",
            format!("request body is not valid JSON: {err}"),
        )),
    }
}

/// 400 `unknown_field` for a key of `body` outside `accepted`, saying when it is one the server sets
/// (`read_only`).
pub fn check_fields(
    body: &Map<String, Value>,
    accepted: &[&str],
    read_only: &[&str],
) -> Result<(), ApiError> {
    let Some(key) = body.keys().find(|k| !accepted.contains(&k.as_str())) else {
        return Ok(());
    };
    let message = if read_only.contains(&key.as_str()) {
        format!("field {key:?} is set by the server and cannot be written")
    } else {
        format!(
            "unknown field {key:?}; accepted fields: {}",
            accepted.join(", ")
        )
    };
    Err(ApiError::bad_request("unknown_field", message).with_field(key.as_str()))
}

/// The value of a string field: `None` when absent, `Some(None)` when null, 400 `invalid_type`
/// when neither a string nor null.
pub fn string_field<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<Option<&'a str>>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(Some(s))),
        Some(Value::Null) => Ok(Some(None)),
        Some(other) => Err(ApiError::bad_request(
            "invalid_type",
            format!("{field} must be a string, got {}", json_type(other)),
        )
        .with_field(field)),
    }
}

/// 422: a required field is missing.
pub fn required(field: &str) -> ApiError {
    ApiError::invalid(field, format!("{field} is required"))
}

/// The JSON type name of a value, for error messages.
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A positive integer id from a path segment (400 naming `what` otherwise).
pub fn parse_id(id: &str, what: &str) -> Result<i64, ApiError> {
    match id.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ApiError::bad_request(
            "invalid_id",
            format!("{what} id must be a positive integer, got {id:?}"),
        )
        .with_field("id")),
    }
}

/// Default and largest page size of list endpoints.
pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 1000;

/// Keyset paging of list endpoints: `?limit=` (1..=1000, default 50) and `?after=` (the last id of
/// the previous page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    pub after: i64,
}

impl Page {
    /// Reads `limit` and `after`; any other parameter is a 400.
    pub fn from_query(query: &HashMap<String, String>) -> Result<Page, ApiError> {
        let mut page = Page {
            limit: DEFAULT_PAGE,
            after: 0,
        };
        for (key, value) in query {
            let number = || {
                value.parse::<i64>().map_err(|_| {
                    ApiError::bad_request("invalid_query", format!("{key} must be an integer"))
                        .with_field(key.as_str())
                })
            };
            match key.as_str() {
                "limit" => page.limit = number()?,
                "after" => page.after = number()?,
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!("unknown query parameter {key:?}; accepted: limit, after"),
                    )
                    .with_field(key.as_str()))
                }
            }
        }
        if !(1..=MAX_PAGE).contains(&page.limit) {
            return Err(ApiError::invalid(
                "limit",
                format!("limit must be between 1 and {MAX_PAGE}"),
            ));
        }
        if page.after < 0 {
            return Err(ApiError::invalid("after", "after must not be negative"));
        }
        Ok(page)
    }

    /// Rows to fetch: one more than the page, which tells whether a next page exists.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }

    /// The JSON array of the page (at most `limit` of `items`, fetched with [`Page::fetch`]) with
    /// a `Link: <path?limit=&after=>; rel="next"` header when more follow.
    pub fn reply<T: Serialize>(
        &self,
        mut items: Vec<T>,
        path: &str,
        id: impl Fn(&T) -> i64,
    ) -> Response {
        let more = items.len() as i64 > self.limit;
        items.truncate(usize::try_from(self.limit).unwrap_or(usize::MAX));
        let reply = warp::reply::json(&items).into_response();
        match items.last() {
            Some(last) if more => warp::reply::with_header(
                reply,
                "link",
                format!(
                    "<{path}?limit={}&after={}>; rel=\"next\"",
                    self.limit,
                    id(last)
                ),
            )
            .into_response(),
            _ => reply,
        }
    }
}

/// Serves `routes` on `listener` until `shutdown`, then lets in-flight requests finish for at
/// most `drain`; false when they did not.
pub async fn serve<F>(
    routes: F,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    drain: std::time::Duration,
) -> bool
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let server = warp::serve(routes)
        .incoming(listener)
        .graceful({
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        })
        .run();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        () = &mut server => return true,
        () = shutdown.cancelled() => {}
    }
    tokio::time::timeout(drain, server).await.is_ok()
}

/// Maps warp's rejections (no route matched, wrong method, bad query string) to the error format.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    // Specific causes first: warp reports the rejection of every route tried, and a path that
    // matched with a bad query or header must not come back as "wrong method" from another route.
    if let Some(refused) = rejection.find::<Refused>() {
        let mut response = refused.error.clone().into_response();
        if let Some(secs) = refused.retry_after {
            response.headers_mut().insert(
                warp::http::header::RETRY_AFTER,
                warp::http::HeaderValue::from(secs),
            );
        }
        return Ok(response);
    }
    let err = if let Some(e) = rejection.find::<warp::reject::InvalidQuery>() {
        ApiError::bad_request("invalid_query", e.to_string())
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request("invalid_header", e.to_string())
    } else if rejection.is_not_found() {
        ApiError::not_found("no such resource")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this resource",
        )
    } else {
        ApiError::internal(&format_args!("unhandled rejection: {rejection:?}"))
    };
    Ok(err.into_response())
}

/// Logs one line per request with method, path, status and latency.
pub fn access_log(service: &'static str) -> warp::log::Log<impl Fn(warp::log::Info<'_>) + Clone> {
    warp::log::custom(move |info| {
        tracing::info!(
            service,
            method = %info.method(),
            path = info.path(),
            status = info.status().as_u16(),
            elapsed_ms = info.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert!(check_content_type(None).is_ok());
        assert!(check_content_type(Some("application/json")).is_ok());
        assert!(check_content_type(Some("Application/JSON; charset=utf-8")).is_ok());
        assert!(check_content_type(Some("application/merge-patch+json")).is_ok());
        let err = check_content_type(Some("application/x-www-form-urlencoded")).unwrap_err();
        assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn ids_are_positive_integers() {
        assert_eq!(parse_id("42", "user"), Ok(42));
        for bad in ["0", "-1", "abc", "1.5", "99999999999999999999", ""] {
            assert_eq!(
                parse_id(bad, "user").unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn pages() {
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(
            Page::from_query(&q(&[])),
            Ok(Page {
                limit: DEFAULT_PAGE,
                after: 0
            })
        );
        assert_eq!(
            Page::from_query(&q(&[("limit", "5"), ("after", "9")])),
            Ok(Page { limit: 5, after: 9 })
        );
        for (bad, status) in [
            (q(&[("limit", "0")]), StatusCode::UNPROCESSABLE_ENTITY),
            (q(&[("limit", "1001")]), StatusCode::UNPROCESSABLE_ENTITY),
            (q(&[("after", "-1")]), StatusCode::UNPROCESSABLE_ENTITY),
            (q(&[("limit", "x")]), StatusCode::BAD_REQUEST),
            (q(&[("page", "2")]), StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(
                Page::from_query(&bad).unwrap_err().status,
                status,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn objects_only() {
        assert!(parse_object(br#"{"a":1}"#).is_ok());
        for bad in [&b"[1]"[..], b"42", b"null", b"{", b"", b"{\"a\":}"] {
            let err = parse_object(bad).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert_eq!(err.code, "malformed_json");
        }
    }

    #[tokio::test]
    async fn body_limit_counts_every_chunk() {
        let chunks = |n: usize| {
            futures_util::stream::iter(
                (0..n).map(|_| Ok::<_, warp::Error>(bytes::Bytes::from_static(&[b' '; 1000]))),
            )
        };
        assert_eq!(
            read_limited(chunks(5), 5000).await.map(|b| b.len()),
            Ok(5000)
        );
        let err = read_limited(chunks(6), 5000).await.unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
