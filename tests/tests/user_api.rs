//! user-api over real HTTP against a real PostgreSQL database of its own.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use e2e::{Stack, TestDb, UserApi};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Fixture {
    db: TestDb,
    api: UserApi,
    http: reqwest::Client,
}

async fn fixture(prefix: &str) -> Fixture {
    let stack = Stack::from_env();
    // No migrations here: user-api applies them on start, which is part of what is tested.
    let db = TestDb::create(&stack, prefix, None).await.unwrap();
    let api = UserApi::start(&db.url).await.unwrap();
    Fixture {
        db,
        api,
        http: reqwest::Client::new(),
    }
}

impl Fixture {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.api.url(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        };
        (status, value)
    }

    async fn post(&self, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, "/api/users", Some(body))
            .await
    }

    async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let resp = self
            .http
            .request(method, self.api.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    /// Every row of users, in id order, as JSON (for "nothing changed" checks).
    async fn rows(&self) -> Vec<Value> {
        let db = self.db.client().await.unwrap();
        db.query(
            "SELECT id, name, email, department, status, created_at::text, updated_at::text \
             FROM users ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            json!([
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4),
                r.get::<_, String>(5),
                r.get::<_, String>(6)
            ])
        })
        .collect()
    }

    async fn stop(self) {
        self.api.stop().await.unwrap();
    }
}

fn ann() -> Value {
    json!({"name": "Ann Lee", "email": "ann@example.org", "department": "Engineering"})
}

/// Asserts the `{"error":{code,message,field}}` shape and returns (code, field).
fn error_of(body: &Value) -> (String, Option<String>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {body}"
    );
    (
        e["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no code: {body}"))
            .to_owned(),
        e["field"].as_str().map(str::to_owned),
    )
}

#[tokio::test]
async fn create_answers_201_with_location_and_stores_the_row() {
    let f = fixture("create").await;
    let resp = f
        .http
        .post(f.api.url("/api/users"))
        .json(
            &json!({"name": "  Ann Lee ", "email": "Ann@Example.org", "department": "Engineering"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let user: Value = resp.json().await.unwrap();
    let id = user["id"].as_i64().unwrap();
    assert_eq!(location, format!("/api/users/{id}"));
    assert_eq!(user["name"], "Ann Lee");
    assert_eq!(user["email"], "Ann@Example.org");
    assert_eq!(user["department"], "Engineering");
    assert_eq!(user["status"], "ACTIVE");
    for ts in ["createdAt", "updatedAt"] {
        let s = user[ts].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{ts}={s}: {e}"));
    }

    // Stored in user_db.users exactly as returned.
    let db = f.db.client().await.unwrap();
    let row = db
        .query_one(
            "SELECT name, email, department, status FROM users WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2),
            row.get::<_, String>(3)
        ),
        (
            "Ann Lee".into(),
            "Ann@Example.org".into(),
            "Engineering".into(),
            "ACTIVE".into()
        )
    );

    // And readable back through the Location.
    let (status, got) = f.send(reqwest::Method::GET, &location, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, user);
    f.stop().await;
}

#[tokio::test]
async fn validation_rules_answer_422_with_the_field_and_write_nothing() {
    let f = fixture("validate").await;
    let (status, existing) = f.post(ann()).await;
    assert_eq!(status, StatusCode::CREATED);
    let before = f.rows().await;

    let long = "x".repeat(101);
    // 255 characters, every part within its own limit: only the total is too long.
    let long_email = format!(
        "{}@{}.{}.{}",
        "a".repeat(64),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(62)
    );
    let cases = [
        (
            json!({"name": "", "email": "b@example.org", "department": "D"}),
            "name",
        ),
        (
            json!({"name": "   ", "email": "b@example.org", "department": "D"}),
            "name",
        ),
        (
            json!({"name": long, "email": "b@example.org", "department": "D"}),
            "name",
        ),
        (json!({"email": "b@example.org", "department": "D"}), "name"),
        (
            json!({"name": null, "email": "b@example.org", "department": "D"}),
            "name",
        ),
        (
            json!({"name": "B", "email": "not-an-email", "department": "D"}),
            "email",
        ),
        (
            json!({"name": "B", "email": "b@localhost", "department": "D"}),
            "email",
        ),
        (
            json!({"name": "B", "email": long_email, "department": "D"}),
            "email",
        ),
        (json!({"name": "B", "department": "D"}), "email"),
        (
            json!({"name": "B", "email": "b@example.org", "department": " "}),
            "department",
        ),
        (
            json!({"name": "B", "email": "b@example.org", "department": long}),
            "department",
        ),
        (json!({"name": "B", "email": "b@example.org"}), "department"),
        (
            json!({"name": "B", "email": "b@example.org", "department": "D", "status": "DELETED"}),
            "status",
        ),
        (
            json!({"name": "B", "email": "b@example.org", "department": "D", "status": "active"}),
            "status",
        ),
    ];
    for (body, field) in &cases {
        let (status, err) = f.post(body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_eq!(
            error_of(&err),
            ("validation_failed".into(), Some((*field).into())),
            "{body}"
        );
    }

    // The same rules apply to PUT and PATCH of an existing user.
    let path = format!("/api/users/{}", existing["id"]);
    for (body, field) in &cases[..3] {
        let (status, err) = f
            .send(reqwest::Method::PATCH, &path, Some(body.clone()))
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "PATCH {body}: {err}"
        );
        assert_eq!(error_of(&err).1.as_deref(), Some(*field));
    }
    let (status, err) = f
        .send(
            reqwest::Method::PUT,
            &path,
            Some(json!({"name": "B", "email": "b@example.org", "department": "D"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "PUT without status: {err}"
    );
    assert_eq!(error_of(&err).1.as_deref(), Some("status"));

    assert_eq!(
        f.rows().await,
        before,
        "a rejected request changed the table"
    );
    f.stop().await;
}

#[tokio::test]
async fn malformed_bodies_answer_4xx_and_write_nothing() {
    let f = fixture("malformed").await;
    let (_, existing) = f.post(ann()).await;
    let path = format!("/api/users/{}", existing["id"]);
    let before = f.rows().await;
    let post = reqwest::Method::POST;

    let (status, err) = f
        .raw(
            post.clone(),
            "/api/users",
            "application/json",
            b"{\"name\": ".to_vec(),
        )
        .await;
    assert_eq!(
        (status, error_of(&err).0.as_str()),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );
    let (status, err) = f
        .raw(
            post.clone(),
            "/api/users",
            "application/json",
            b"[1,2]".to_vec(),
        )
        .await;
    assert_eq!(
        (status, error_of(&err).0.as_str()),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );
    let (status, err) = f
        .raw(post.clone(), "/api/users", "application/json", Vec::new())
        .await;
    assert_eq!(
        (status, error_of(&err).0.as_str()),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );

    // Wrong JSON types.
    let (status, err) = f
        .post(json!({"name": 42, "email": "b@example.org", "department": "D"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&err), ("invalid_type".into(), Some("name".into())));
    let (status, err) = f
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"status": ["ACTIVE"]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_of(&err),
        ("invalid_type".into(), Some("status".into()))
    );

    // Unknown and server-owned fields.
    let mut extra = ann();
    extra["nickname"] = json!("annie");
    let (status, err) = f.post(extra).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_of(&err),
        ("unknown_field".into(), Some("nickname".into()))
    );
    let (status, err) = f
        .send(reqwest::Method::PATCH, &path, Some(json!({"id": 99})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&err), ("unknown_field".into(), Some("id".into())));

    // Over 64 KiB: 413, even when the JSON would otherwise be valid.
    let mut big = ann();
    big["name"] = json!("n".repeat(70 * 1024));
    let (status, err) = f.post(big).await;
    assert_eq!(
        (status, error_of(&err).0.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );

    // Not JSON at all.
    let (status, err) = f
        .raw(
            post,
            "/api/users",
            "application/x-www-form-urlencoded",
            b"name=a".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{err}");
    // A Content-Type that is not even text is this request's 415, not another route's 405.
    let resp = f
        .http
        .post(f.api.url("/api/users"))
        .header(
            "content-type",
            reqwest::header::HeaderValue::from_bytes(b"application/\xffjson").unwrap(),
        )
        .body(serde_json::to_vec(&ann()).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    assert_eq!(
        f.rows().await,
        before,
        "a rejected request changed the table"
    );
    f.stop().await;
}

#[tokio::test]
async fn unknown_ids_routes_and_methods() {
    let f = fixture("notfound").await;
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let (status, err) = f.send(method.clone(), "/api/users/987654", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method}");
        assert_eq!(error_of(&err), ("not_found".into(), Some("id".into())));
    }
    let full =
        json!({"name": "A", "email": "a@example.org", "department": "D", "status": "ACTIVE"});
    let (status, _) = f
        .send(reqwest::Method::PUT, "/api/users/987654", Some(full))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = f
        .send(
            reqwest::Method::PATCH,
            "/api/users/987654",
            Some(json!({"name": "A"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, err) = f.send(reqwest::Method::GET, "/api/users/abc", None).await;
    assert_eq!(
        (status, error_of(&err).0.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_id")
    );
    let (status, err) = f
        .send(reqwest::Method::GET, "/api/nothing-here", None)
        .await;
    assert_eq!(
        (status, error_of(&err).0.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (status, err) = f.send(reqwest::Method::DELETE, "/api/users", None).await;
    assert_eq!(
        (status, error_of(&err).0.as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    assert!(f.rows().await.is_empty());
    f.stop().await;
}

#[tokio::test]
async fn put_replaces_every_field_and_patch_only_the_given_ones() {
    let f = fixture("update").await;
    let (_, created) = f.post(ann()).await;
    let path = format!("/api/users/{}", created["id"]);

    let (status, patched) = f
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"status": "INACTIVE"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["status"], "INACTIVE");
    for kept in ["id", "name", "email", "department", "createdAt"] {
        assert_eq!(patched[kept], created[kept], "PATCH changed {kept}");
    }
    assert!(
        parse_ts(&patched["updatedAt"]) > parse_ts(&created["updatedAt"]),
        "updatedAt did not advance"
    );

    let (status, same) = f.send(reqwest::Method::PATCH, &path, Some(json!({}))).await;
    assert_eq!(
        (status, &same),
        (StatusCode::OK, &patched),
        "an empty PATCH changed something"
    );

    let replacement = json!({"name": "Ann Smith", "email": "ann.smith@example.org", "department": "Sales", "status": "ACTIVE"});
    let (status, replaced) = f.send(reqwest::Method::PUT, &path, Some(replacement)).await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(
        (
            &replaced["name"],
            &replaced["email"],
            &replaced["department"],
            &replaced["status"]
        ),
        (
            &json!("Ann Smith"),
            &json!("ann.smith@example.org"),
            &json!("Sales"),
            &json!("ACTIVE")
        )
    );
    assert_eq!(replaced["createdAt"], created["createdAt"]);

    let (_, stored) = f.send(reqwest::Method::GET, &path, None).await;
    assert_eq!(stored, replaced);
    let rows = f.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][1], "Ann Smith");
    f.stop().await;
}

fn parse_ts(v: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn emails_are_unique_ignoring_case() {
    let f = fixture("dup").await;
    let (_, ann_row) = f.post(ann()).await;
    let (_, bob) = f
        .post(json!({"name": "Bob", "email": "bob@example.org", "department": "Sales"}))
        .await;
    let before = f.rows().await;

    let (status, err) = f
        .post(json!({"name": "Other", "email": "ANN@EXAMPLE.ORG", "department": "Ops"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        error_of(&err),
        ("duplicate_email".into(), Some("email".into()))
    );

    let bob_path = format!("/api/users/{}", bob["id"]);
    let (status, _) = f
        .send(
            reqwest::Method::PATCH,
            &bob_path,
            Some(json!({"email": "Ann@example.org"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let full = json!({"name": "Bob", "email": "ann@example.ORG", "department": "Sales", "status": "ACTIVE"});
    let (status, _) = f.send(reqwest::Method::PUT, &bob_path, Some(full)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(f.rows().await, before);

    // A user may change the case of their own email.
    let ann_path = format!("/api/users/{}", ann_row["id"]);
    let (status, _) = f
        .send(
            reqwest::Method::PATCH,
            &ann_path,
            Some(json!({"email": "ANN@example.org"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    f.stop().await;
}

#[tokio::test]
async fn concurrent_creates_with_one_email_have_exactly_one_winner() {
    let f = fixture("race").await;
    let attempts = 24;
    let requests = (0..attempts).map(|i| {
        let email = if i % 2 == 0 {
            "Racer@Example.org"
        } else {
            "racer@example.ORG"
        };
        f.post(json!({"name": format!("Racer {i}"), "email": email, "department": "D"}))
    });
    let results = join_all(requests).await;
    let created = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let conflicts = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, conflicts), (1, attempts - 1), "{results:?}");
    assert_eq!(f.rows().await.len(), 1);
    f.stop().await;
}

#[tokio::test]
async fn list_pages_by_id_with_a_next_link() {
    let f = fixture("paging").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let (status, u) = f
            .post(json!({"name": format!("U{i}"), "email": format!("u{i}@example.org"), "department": "D"}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(u["id"].as_i64().unwrap());
    }

    let mut seen = Vec::new();
    let mut next = Some("/api/users?limit=3".to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let resp = f.http.get(f.api.url(&path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        next = resp.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with("; rel=\"next\""), "{l}");
            l[l.find('<').unwrap() + 1..l.find('>').unwrap()].to_owned()
        });
        let page: Vec<Value> = resp.json().await.unwrap();
        assert!(page.len() <= 3);
        seen.extend(page.iter().map(|u| u["id"].as_i64().unwrap()));
        pages += 1;
        assert!(pages <= 3, "more pages than rows warrant");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "pages must cover every user once, in id order");

    let (status, all) = f.send(reqwest::Method::GET, "/api/users", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all.as_array().unwrap().len(), 7);
    let unique: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), 7);

    for (query, status, code) in [
        (
            "limit=0",
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            "limit=1001",
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        ("limit=abc", StatusCode::BAD_REQUEST, "invalid_query"),
        (
            "after=-1",
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        ("offset=3", StatusCode::BAD_REQUEST, "invalid_query"),
    ] {
        let (got, err) = f
            .send(reqwest::Method::GET, &format!("/api/users?{query}"), None)
            .await;
        assert_eq!((got, error_of(&err).0.as_str()), (status, code), "{query}");
    }
    f.stop().await;
}

#[tokio::test]
async fn delete_answers_204_then_404() {
    let f = fixture("delete").await;
    let (_, u) = f.post(ann()).await;
    let path = format!("/api/users/{}", u["id"]);
    let resp = f.http.delete(f.api.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());
    let (status, _) = f.send(reqwest::Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = f.send(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(f.rows().await.is_empty());

    // The email is free again.
    let (status, _) = f.post(ann()).await;
    assert_eq!(status, StatusCode::CREATED);
    f.stop().await;
}

#[tokio::test]
async fn health_reports_database_reachability() {
    let f = fixture("health").await;
    let (status, body) = f.send(reqwest::Method::GET, "/health", None).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"status": "UP", "database": "UP"}))
    );
    f.stop().await;

    // A database nobody listens on: the service still starts (migrations skipped) and says DOWN.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let api = UserApi::start_with(&format!("postgres://nobody:x@127.0.0.1:{port}/none"), true)
        .await
        .unwrap();
    let resp = reqwest::get(api.url("/health")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.json::<Value>().await.unwrap()["database"], "DOWN");
    // Requests that need the database say so instead of hanging or crashing.
    let resp = reqwest::get(api.url("/api/users")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    api.stop().await.unwrap();
}

#[tokio::test]
async fn migrations_are_recorded_once_and_rerunning_is_a_no_op() {
    let stack = Stack::from_env();
    for database in [schema::Database::UserDb, schema::Database::ViewDb] {
        let db = TestDb::create(&stack, "migrate", None).await.unwrap();
        let mut client = db.client().await.unwrap();
        let first = schema::migrate(&mut client, database).await.unwrap();
        let expected: Vec<i32> = database.migrations().iter().map(|m| m.version).collect();
        assert_eq!(first, expected);
        assert!(schema::migrate(&mut client, database)
            .await
            .unwrap()
            .is_empty());
        let n: i64 = client
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n as usize, expected.len());

        // A recorded migration whose text differs is refused, not silently skipped.
        client
            .execute(
                "UPDATE schema_migrations SET checksum = 'edited' WHERE version = $1",
                &[&expected[0]],
            )
            .await
            .unwrap();
        let err = schema::migrate(&mut client, database).await.unwrap_err();
        assert!(matches!(err, schema::MigrateError::Changed { .. }), "{err}");
    }
}

#[tokio::test]
async fn concurrent_migrators_serialize() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack, "migrate_race", None).await.unwrap();
    let runs = (0..4).map(|_| async {
        let mut client = db.client().await.unwrap();
        schema::migrate(&mut client, schema::Database::ViewDb)
            .await
            .unwrap()
    });
    let applied: Vec<Vec<i32>> = join_all(runs).await;
    assert_eq!(
        applied.iter().filter(|a| !a.is_empty()).count(),
        1,
        "{applied:?}"
    );
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let Fixture { db, api, http } = fixture("drain").await;
    let resp = http
        .post(api.url("/api/users"))
        .json(&ann())
        .send()
        .await
        .unwrap();
    let id = resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap();

    // Hold the row's lock so that a PATCH waits inside the database.
    let mut locker = db.client().await.unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .unwrap();
    let patch = tokio::spawn({
        let req = http
            .patch(api.url(&format!("/api/users/{id}")))
            .json(&json!({"status": "INACTIVE"}));
        async move { req.send().await }
    });
    let observer = db.client().await.unwrap();
    e2e::wait_for("the PATCH to wait on the row lock", Duration::from_secs(10), || async {
        let n: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                &[&db.name],
            )
            .await?
            .get(0);
        Ok((n > 0).then_some(()))
    })
    .await
    .unwrap();

    // Shut down while the request is in flight; the listener closes first.
    api.begin_stop();
    let health = api.url("/health");
    e2e::wait_for("the listener to close", Duration::from_secs(10), || {
        let probe = reqwest::Client::new().get(&health).send();
        async move { Ok(probe.await.is_err().then_some(())) }
    })
    .await
    .unwrap();

    // The request in flight still completes, and its write is there.
    lock.commit().await.unwrap();
    let resp = patch
        .await
        .unwrap()
        .expect("the in-flight request was cut off");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "INACTIVE");
    api.stop().await.unwrap();
    let status: String = observer
        .query_one("SELECT status FROM users WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "INACTIVE");
}
