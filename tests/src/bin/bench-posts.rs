//! post-api under many writers, run by `scripts/bench posts` on its own stack: the release
//! post-api binary as a process (its default pool of 16 connections) on a materialized_view_db
//! with `--users` users in user_view; `--writers` concurrent clients (200) each send
//! `POST /api/posts` for a random author, one after the other, for `--seconds` (20) after a 3 s
//! warm-up. Every post also updates post_stats, user_activity and department_performance in its
//! transaction; at the end each must still equal its definition. `--derived-views off` disables
//! their notes on posts, to measure what they cost.
//!
//! Prints a report and, last, `BENCH {json}` (posts_per_s, post_p50_ms, post_p99_ms, ...; merged
//! into `CDC_BENCH_MERGE_JSON`, a BENCH object of an earlier step, when set).

// A report printer: stdout is its output.
#![allow(clippy::print_stdout)]

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use e2e::{arg, derived_differences, workspace_binary, Stack, TestDb};
use rand::Rng;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let users = arg::<i64>("--users", 10_000)?;
    let writers = arg::<usize>("--writers", 200)?;
    let seconds = arg::<u64>("--seconds", 20)?;
    if users < 1 || writers < 1 || seconds < 1 {
        bail!("--users, --writers and --seconds must be at least 1");
    }
    // `off` measures what the derived views cost a post: their notes on posts are disabled.
    let derived = arg::<String>("--derived-views", "on".to_owned())?;
    if derived != "on" && derived != "off" {
        bail!("--derived-views is on or off, not {derived:?}");
    }
    let stack = Stack::from_env();
    let view_db = TestDb::create(&stack, "benchp", Some(schema::Database::ViewDb)).await?;
    let views = view_db.client().await?;
    views
        .execute(
            "INSERT INTO user_view (user_id, name, email, department, status, created_at, \
                                    updated_at, source_lsn, source_seq) \
             SELECT i, 'Bench user ' || i, 'bench' || i || '@example.org', 'Dept ' || (i % 20), \
                    CASE WHEN i % 4 = 0 THEN 'INACTIVE' ELSE 'ACTIVE' END, now(), now(), '0/1', 0 \
             FROM generate_series(1, $1::bigint) i",
            &[&users],
        )
        .await?;

    if derived == "off" {
        views
            .batch_execute("ALTER TABLE posts DISABLE TRIGGER USER")
            .await?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bin = match std::env::var("CDC_BENCH_POST_API_BIN") {
        Ok(path) => path.into(),
        Err(_) => workspace_binary("post-api")?,
    };
    let mut server = tokio::process::Command::new(bin)
        .env("POST_API_LISTEN", format!("127.0.0.1:{port}"))
        .env("VIEW_DB_URL", &view_db.url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting post-api")?;
    let base = format!("http://127.0.0.1:{port}");
    e2e::wait_for("post-api to be healthy", Duration::from_secs(60), || {
        let url = format!("{base}/health");
        async move {
            Ok(reqwest::get(url)
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        }
    })
    .await?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(writers)
        .build()?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(writers);
    for _ in 0..writers {
        let (http, url, measuring, stop) = (
            http.clone(),
            format!("{base}/api/posts"),
            measuring.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut failures) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                let author = rand::rng().random_range(1..=users);
                let started = Instant::now();
                let ok = http
                    .post(&url)
                    .json(&serde_json::json!({"title": "bench", "content": "a post",
                                              "authorId": author}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 201);
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        failures += 1;
                    }
                }
            }
            (latencies, failures)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut failures) = (Vec::new(), 0);
    for t in tasks {
        let (l, f) = t.await?;
        latencies.extend(l);
        failures += f;
    }
    if let Err(e) = server.kill().await {
        eprintln!("stopping post-api failed: {e}");
    }
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let rate = latencies.len() as f64 / elapsed;
    let differences = if derived == "on" {
        derived_differences(&views).await?
    } else {
        Vec::new()
    };
    let posts: i64 = views
        .query_one("SELECT count(*) FROM posts", &[])
        .await?
        .get(0);

    println!(
        "post-api benchmark: {writers} concurrent writers of POST /api/posts, {users} users, \
         derived views {derived}"
    );
    println!(
        "  {} posts in {elapsed:.1} s = {rate:.0} posts/s, {failures} failed",
        latencies.len()
    );
    println!(
        "  latency p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    println!(
        "  {posts} posts in the table; derived views equal to their definitions: {}",
        if differences.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO {differences:?}")
        }
    );
    let tenth = |x: f64| (x * 10.0).round() / 10.0;
    let mut bench = e2e::bench::earlier_figures("CDC_BENCH_MERGE_JSON")?;
    for (k, v) in [
        ("post_writers", serde_json::json!(writers)),
        ("posts_per_s", serde_json::json!(rate.round())),
        ("post_p50_ms", serde_json::json!(tenth(at(0.5)))),
        ("post_p99_ms", serde_json::json!(tenth(at(0.99)))),
        ("post_max_ms", serde_json::json!(tenth(at(1.0)))),
        ("post_failures", serde_json::json!(failures)),
        ("post_derived_views", serde_json::json!(derived == "on")),
    ] {
        bench[k] = v;
    }
    println!("BENCH {bench}");
    if !differences.is_empty() || failures > 0 {
        bail!("post-api failed requests or left a derived view unequal to its definition");
    }
    Ok(())
}
