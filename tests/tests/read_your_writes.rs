//! Read-your-writes across services: every user-api write answers with `X-Source-LSN`; post-api
//! answers a request carrying it as `X-Min-Source-LSN` only from views that include the write
//! (waiting, bounded), on a three-partition topic whose other partitions may be idle, under
//! background writes and across a projector restart.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{Pipeline, PostApi, Projector, Stack, UserApi};
use serde_json::{json, Value};

struct Fixture {
    p: Pipeline,
    projector: Option<Projector>,
    users: UserApi,
    posts: PostApi,
    http: reqwest::Client,
}

async fn fixture(prefix: &str, partitions: i32, bound: Duration) -> Fixture {
    e2e::init_logs();
    let p = Pipeline::start_with(Stack::from_env(), prefix, partitions)
        .await
        .unwrap();
    let config = p.projector_config();
    let projector = Projector::start(config.clone()).await.unwrap();
    let users = UserApi::start(&p.user_db.url).await.unwrap();
    let posts = PostApi::start_for(&p.view_db.url, &config.group, bound)
        .await
        .unwrap();
    Fixture {
        p,
        projector: Some(projector),
        users,
        posts,
        http: reqwest::Client::new(),
    }
}

fn lsn_header(r: &reqwest::Response) -> Option<u64> {
    let text = r.headers().get("x-source-lsn")?.to_str().ok()?;
    change_event::parse_lsn(text)
}

/// A user-api write: its status, body and `X-Source-LSN`.
async fn write(
    f: &Fixture,
    method: reqwest::Method,
    path: &str,
    body: &Value,
) -> (u16, Value, u64) {
    let r = f
        .http
        .request(method, f.users.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    let lsn = lsn_header(&r).expect("a write answers with X-Source-LSN");
    (r.status().as_u16(), r.json().await.unwrap(), lsn)
}

/// A post-api request that must see `lsn`: status, body, the `X-Source-LSN` it answered with,
/// and how long it took.
async fn consistent(
    f: &Fixture,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    lsn: &str,
) -> (u16, Value, Option<u64>, Duration) {
    let started = Instant::now();
    let mut request = f
        .http
        .request(method, f.posts.url(path))
        .header("X-Min-Source-LSN", lsn);
    if let Some(body) = body {
        request = request.json(body);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let answered = lsn_header(&r);
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body, answered, started.elapsed())
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

/// 200 write-then-read pairs: a user created (or renamed) through user-api and read back at once
/// through post-api with the write's position, or a post written for the new user at once. The
/// first 20 run with nothing else written (two of the three partitions idle), the rest under
/// background writes, and the projector restarts half-way. No answer is stale.
#[tokio::test]
async fn writes_are_read_back_at_once_through_the_views_under_load_and_a_projector_restart() {
    let mut f = fixture("ryw", 3, Duration::from_secs(10)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let background_writes = Arc::new(AtomicU64::new(0));
    let mut background = None;
    let mut latencies = Vec::new();
    let mut stale = Vec::new();
    for i in 0..200 {
        if i == 20 {
            let db = f.p.user_db.client().await.unwrap();
            let (stop, writes) = (stop.clone(), background_writes.clone());
            background = Some(tokio::spawn(async move {
                let mut n = 0_i64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    db.execute(
                        "INSERT INTO users (name, email, department) VALUES ($1, $2, 'Background')",
                        &[&format!("bg {n}"), &format!("bg{n}@example.org")],
                    )
                    .await
                    .unwrap();
                    if n % 3 == 0 {
                        db.execute(
                            "UPDATE users SET status = CASE status WHEN 'ACTIVE' THEN 'INACTIVE' \
                             ELSE 'ACTIVE' END WHERE email = $1",
                            &[&format!("bg{}@example.org", n / 2)],
                        )
                        .await
                        .unwrap();
                    }
                    writes.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        if i == 100 {
            // A restarted projector answers from its stored position on.
            f.projector.take().unwrap().stop().await.unwrap();
            f.projector = Some(Projector::start(f.p.projector_config()).await.unwrap());
        }
        let (status, user, lsn) = write(
            &f,
            reqwest::Method::POST,
            "/api/users",
            &json!({"name": format!("ryw {i}"), "email": format!("ryw{i}@example.org"),
                    "department": "Reads"}),
        )
        .await;
        assert_eq!(status, 201, "{user}");
        let id = user["id"].as_i64().unwrap();
        let mut lsn = change_event::format_lsn(lsn);
        let mut name = format!("ryw {i}");
        if i % 3 == 1 {
            // An update read back: the new name, not the old one.
            name = format!("ryw {i} renamed");
            let (status, _, renamed) = write(
                &f,
                reqwest::Method::PATCH,
                &format!("/api/users/{id}"),
                &json!({"name": name}),
            )
            .await;
            assert_eq!(status, 200);
            lsn = change_event::format_lsn(renamed);
        }
        let (status, body, answered, took) = if i % 3 == 2 {
            // A post for a user created a moment ago: accepted, not 422.
            consistent(
                &f,
                reqwest::Method::POST,
                "/api/posts",
                Some(&json!({"title": format!("by {id}"), "content": "", "authorId": id})),
                &lsn,
            )
            .await
        } else {
            consistent(
                &f,
                reqwest::Method::GET,
                &format!("/api/posts/users/{id}/activity"),
                None,
                &lsn,
            )
            .await
        };
        latencies.push(took);
        let fresh = match i % 3 {
            2 => status == 201 && body["authorName"] == json!(name),
            _ => status == 200 && body["name"] == json!(name),
        };
        if !fresh {
            stale.push((i, status, body));
        }
        let requested = change_event::parse_lsn(&lsn).unwrap();
        assert!(
            answered.is_some_and(|a| a >= requested),
            "pair {i}: answered at {answered:?}, asked for {requested}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    background.unwrap().await.unwrap();
    latencies.sort();
    eprintln!(
        "200 write-then-read pairs ({} background writes): p50 {:?}, p99 {:?}, max {:?}",
        background_writes.load(Ordering::Relaxed),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
    assert!(stale.is_empty(), "stale answers: {stale:?}");
    f.users.stop().await.unwrap();
    f.posts.stop().await.unwrap();
    f.projector.take().unwrap().stop().await.unwrap();
    f.p.reader.stop().await.unwrap();
}

/// A position the views cannot reach yet is answered 503 `not_yet_consistent` with `Retry-After`
/// once the bound has passed (and not much later); a malformed one is 400; without the header
/// nothing changes.
#[tokio::test]
async fn a_position_not_reached_in_time_is_503_and_a_malformed_one_400() {
    let bound = Duration::from_secs(1);
    let f = fixture("ryw_bound", 1, bound).await;
    let (status, user, lsn) = write(
        &f,
        reqwest::Method::POST,
        "/api/users",
        &json!({"name": "bound", "email": "bound@example.org", "department": "Reads"}),
    )
    .await;
    assert_eq!(status, 201, "{user}");
    // (The first answer may take longer than this test's short bound: a fresh pipeline.)
    let answered = e2e::wait_for(
        "the views to reach the write",
        Duration::from_secs(30),
        || async {
            let (status, _, answered, _) = consistent(
                &f,
                reqwest::Method::GET,
                "/api/posts/stats/departments",
                None,
                &change_event::format_lsn(lsn),
            )
            .await;
            Ok((status == 200).then_some(answered))
        },
    )
    .await
    .unwrap();
    assert!(answered.is_some_and(|a| a >= lsn));

    // A gigabyte of WAL from now: not there within the bound.
    let future = change_event::format_lsn(lsn + (1 << 30));
    let started = Instant::now();
    let r = f
        .http
        .get(f.posts.url("/api/posts/stats/departments"))
        .header("X-Min-Source-LSN", &future)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_yet_consistent", "{body}");
    eprintln!("a position from the future answered 503 after {took:?} (bound {bound:?})");
    assert!(
        took >= bound && took <= bound.mul_f64(1.1),
        "503 after {took:?}, bound {bound:?}"
    );

    for bad in ["", "yesterday", "0/ZZ", "1A2B3C8", "0/1/2"] {
        let r = f
            .http
            .get(f.posts.url("/api/posts/stats/departments"))
            .header("X-Min-Source-LSN", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_header", "{bad:?}: {body}");
        assert_eq!(body["error"]["field"], "X-Min-Source-LSN");
    }

    let r = f
        .http
        .get(f.posts.url("/api/posts/stats/departments"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-source-lsn").is_none());
    f.users.stop().await.unwrap();
    f.posts.stop().await.unwrap();
    f.projector.unwrap().stop().await.unwrap();
    f.p.reader.stop().await.unwrap();
}

/// After a projector restart with every partition idle (no record since), a position that only
/// the reader's idle watermark reaches (writes to a table it does not capture) is answered: the
/// restarted projector knows how far each partition was applied.
#[tokio::test]
async fn after_a_restart_idle_partitions_follow_the_readers_idle_position() {
    let mut f = fixture("ryw_idle", 3, Duration::from_secs(10)).await;
    for i in 0..6 {
        let (status, _, lsn) = write(
            &f,
            reqwest::Method::POST,
            "/api/users",
            &json!({"name": format!("idle {i}"), "email": format!("idle{i}@example.org"),
                    "department": "Reads"}),
        )
        .await;
        assert_eq!(status, 201);
        let (status, _, _, _) = consistent(
            &f,
            reqwest::Method::GET,
            "/api/posts/stats/departments",
            None,
            &change_event::format_lsn(lsn),
        )
        .await;
        assert_eq!(status, 200);
    }
    f.projector.take().unwrap().stop().await.unwrap();
    f.projector = Some(Projector::start(f.p.projector_config()).await.unwrap());
    let db = f.p.user_db.client().await.unwrap();
    db.batch_execute("CREATE TABLE uncaptured (id serial PRIMARY KEY, v text)")
        .await
        .unwrap();
    for i in 0..20 {
        db.execute(
            "INSERT INTO uncaptured (v) VALUES ($1)",
            &[&format!("v{i}")],
        )
        .await
        .unwrap();
    }
    let lsn = e2e::wal_flush_lsn(&db).await.unwrap();
    let (status, body, answered, took) = consistent(
        &f,
        reqwest::Method::GET,
        "/api/posts/stats/departments",
        None,
        &change_event::format_lsn(lsn),
    )
    .await;
    eprintln!("a position past the last captured change answered {status} after {took:?}");
    assert_eq!(status, 200, "{body}");
    assert!(answered.is_some_and(|a| a >= lsn));
    f.users.stop().await.unwrap();
    f.posts.stop().await.unwrap();
    f.projector.take().unwrap().stop().await.unwrap();
    f.p.reader.stop().await.unwrap();
}
