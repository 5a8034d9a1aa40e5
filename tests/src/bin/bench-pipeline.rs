//! End-to-end benchmark of the pipeline (commit in user_db → row in user_view), run by
//! `scripts/bench pipeline` on its own stack, with the release binaries of cdc-reader and the
//! projector as separate processes:
//!
//! 1. **Backlog**: N inserts (transactions of 1,000 rows) are committed while nothing reads them
//!    (the slot exists, so the WAL is kept); then the reader and the projector start together. The
//!    rate is N over the time from their start to the last row in user_view. With `--warm-up W`
//!    (default 0: none), a backlog of W inserts goes the same way first and the two services
//!    stop, so the timed backlog meets a Kafka node that has served traffic (as a pipeline
//!    catching up after an outage does) instead of one whose JVM still compiles its hot paths;
//!    the warm-up's own rate is printed too.
//! 2. **Steady load**: single-row updates committed at a fixed rate (default 1,000 changes/s, in
//!    transactions of 10 every 10 ms) for S seconds; each change's latency is the time from the
//!    return of its COMMIT to the `projected_at` of the view row that shows it. Meanwhile
//!    read-your-writes pairs, one after the other through user-api and post-api (release
//!    binaries): a user created, then read back at once with the write's `X-Source-LSN` as
//!    `X-Min-Source-LSN`; a pair's time is from sending the write to the read's answer.
//! 3. **Big transactions** (`--big-tx`, default 1,000,000 inserts, after one of half that size):
//!    the reader's and the projector's peak RSS after each, which must not grow with the
//!    transaction's size.
//! 4. **Limits**, with the services stopped: the *produce limit* (N records of the reader's record
//!    size, produced with the reader's producer settings to a fresh topic, first send to last
//!    acknowledgement) and the *apply limit* (the N final rows written into a fresh table shaped
//!    like user_view, indexes included, with COPY in one transaction).
//!
//! Prints a report and, last, `BENCH {json}`; with `CDC_BENCH_READER_JSON` (the BENCH object of
//! bench-reader, as `scripts/bench` passes it) that line carries the reader's figures too.

// A report printer: stdout is its output.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use e2e::{arg, connect, unique_suffix, workspace_binary, Stack, TestDb};
use futures_util::{SinkExt, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// A service binary running as a child process.
struct Service {
    child: tokio::process::Child,
    pid: u32,
    http: String,
}

impl Service {
    fn start(name: &str, env: &[(&str, String)]) -> anyhow::Result<Service> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen_var = match name {
            "cdc-reader" => "CDC_READER_HTTP_LISTEN",
            "user-api" => "USER_API_LISTEN",
            "post-api" => "POST_API_LISTEN",
            _ => "PROJECTOR_HTTP_LISTEN",
        };
        let bin = match std::env::var(format!(
            "CDC_BENCH_{}_BIN",
            name.replace('-', "_").to_uppercase()
        )) {
            Ok(path) => path.into(),
            Err(_) => workspace_binary(name)?,
        };
        let mut command = tokio::process::Command::new(bin);
        command
            .env(listen_var, format!("127.0.0.1:{port}"))
            .env(
                "RUST_LOG",
                std::env::var("CDC_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("pid")?;
        Ok(Service {
            child,
            pid,
            http: format!("http://127.0.0.1:{port}"),
        })
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        e2e::wait_for(
            "a service to be healthy",
            Duration::from_secs(60),
            || async {
                Ok(reqwest::get(format!("{}/health", self.http))
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            },
        )
        .await
    }

    /// (CPU seconds, peak RSS in MB) so far.
    fn usage(&self) -> (f64, f64) {
        let cpu = cpu_of(self.pid);
        let rss_kb: f64 = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0.0);
        (cpu, rss_kb / 1024.0)
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

/// CPU seconds (user + system) of process `pid` so far, 0 when it is gone.
fn cpu_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit(')').next()?.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            Some((tick(11) + tick(12)) / 100.0)
        })
        .unwrap_or(0.0)
}

/// CPU seconds so far of the Kafka node (`CDC_BENCH_KAFKA_PID`) and of the PostgreSQL postmaster
/// (`CDC_BENCH_PG_PID`) with its running backends; 0 where the variable is not set.
fn others_cpu() -> (f64, f64) {
    let pid = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    let kafka = pid("CDC_BENCH_KAFKA_PID").map_or(0.0, cpu_of);
    let postgres = pid("CDC_BENCH_PG_PID").map_or(0.0, |pm| {
        let children: f64 = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit(')')
                            .next()?
                            .split_whitespace()
                            .nth(1)?
                            .parse::<u32>()
                            .ok()
                    })
                    == Some(pm)
            })
            .map(cpu_of)
            .sum();
        cpu_of(pm) + children
    });
    (kafka, postgres)
}

/// When a drained backlog's rows reached user_view, in seconds from the services' start.
struct Drained {
    first_row_s: f64,
    all_s: f64,
}

/// Starts the reader and the projector on a backlog of `rows` inserts (the last rows of users) and
/// waits for the last of them in user_view. The rows arrive in id order (one partition), so the
/// last id in user_view means all of them are; two index lookups per poll, not a count that would
/// compete for the cores it measures.
async fn drain(
    users: &tokio_postgres::Client,
    views: &tokio_postgres::Client,
    reader_env: &[(&str, String)],
    projector_env: &[(&str, String)],
    rows: i64,
) -> anyhow::Result<(Service, Service, Drained)> {
    let last_id: i64 = users
        .query_one("SELECT max(id) FROM users", &[])
        .await?
        .get(0);
    let first_id = last_id - rows + 1;
    let started = Instant::now();
    let reader = Service::start("cdc-reader", reader_env)?;
    let projector = Service::start("projector", projector_env)?;
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first_row: Option<f64> = None;
    loop {
        let row = views
            .query_one(
                "SELECT EXISTS (SELECT FROM user_view WHERE user_id >= $1), \
                        EXISTS (SELECT FROM user_view WHERE user_id = $2)",
                &[&first_id, &last_id],
            )
            .await?;
        if row.get::<_, bool>(0) && first_row.is_none() {
            first_row = Some(started.elapsed().as_secs_f64());
        }
        if row.get::<_, bool>(1) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the last of {rows} rows not in user_view within 900 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_s = started.elapsed().as_secs_f64();
    let drained = Drained {
        first_row_s: first_row.unwrap_or(all_s),
        all_s,
    };
    Ok((reader, projector, drained))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let changes = arg::<i64>("--changes", 1_000_000)?;
    let rate = arg::<i64>("--rate", 1000)?;
    let seconds = arg::<i64>("--seconds", 30)?;
    let big_tx = arg::<i64>("--big-tx", 1_000_000)?;
    let warm_up = arg::<i64>("--warm-up", 0)?;
    // `off` measures what the derived views cost: their notes on user_view are disabled, so the
    // projector's transactions leave post_stats, user_activity and department_performance alone.
    let derived = arg::<String>("--derived-views", "on".to_owned())?;
    if derived != "on" && derived != "off" {
        bail!("--derived-views is on or off, not {derived:?}");
    }
    if changes < rate * seconds {
        bail!("--changes ({changes}) must be at least --rate × --seconds: each steady-load change updates a distinct user");
    }
    let stack = Stack::from_env();

    let user_db = TestDb::create(&stack, "benchu", Some(schema::Database::UserDb)).await?;
    let view_db = TestDb::create(&stack, "benchv", Some(schema::Database::ViewDb)).await?;
    let users = connect(&user_db.url).await?;
    let views = connect(&view_db.url).await?;
    if derived == "off" {
        views
            .batch_execute("ALTER TABLE user_view DISABLE TRIGGER USER")
            .await?;
    }
    let topic = format!("bench-{}", unique_suffix());
    let reader_env = [
        ("CDC_READER_DATABASE_URL", user_db.url.clone()),
        ("CDC_READER_SLOT", "bench".to_owned()),
        ("CDC_READER_PUBLICATION", "bench".to_owned()),
        ("CDC_READER_TOPICS", format!("public.users={topic}")),
        ("KAFKA_BROKERS", stack.kafka_brokers.clone()),
    ];
    let group = format!("bench-{}", unique_suffix());
    let projector_env = [
        ("VIEW_DB_URL", view_db.url.clone()),
        ("KAFKA_BROKERS", stack.kafka_brokers.clone()),
        ("PROJECTOR_TOPIC", topic.clone()),
        ("PROJECTOR_GROUP", group.clone()),
    ];

    // The slot and publication first (a reader that starts on an empty table and stops), so the
    // backlog is kept in the WAL.
    let reader = Service::start("cdc-reader", &reader_env)?;
    reader.wait_healthy().await?;
    reader.stop().await?;

    // 0. The warm-up: a backlog through a fresh Kafka node, then the services stop.
    let warm_up_s = if warm_up > 0 {
        e2e::insert_bench_users(&users, warm_up, 1000).await?;
        let (reader, projector, drained) =
            drain(&users, &views, &reader_env, &projector_env, warm_up).await?;
        projector.stop().await?;
        reader.stop().await?;
        Some(drained.all_s)
    } else {
        None
    };

    let started = Instant::now();
    e2e::insert_bench_users(&users, changes, 1000).await?;
    let write_s = started.elapsed().as_secs_f64();
    let last_id: i64 = users
        .query_one("SELECT max(id) FROM users", &[])
        .await?
        .get(0);
    let first_id = last_id - changes + 1;

    // 1. The backlog, end to end.
    let others_before = others_cpu();
    let (reader, projector, drained) =
        drain(&users, &views, &reader_env, &projector_env, changes).await?;
    let backlog_s = drained.all_s;
    let others_after = others_cpu();
    let (kafka_cpu_backlog, postgres_cpu_backlog) = (
        others_after.0 - others_before.0,
        others_after.1 - others_before.1,
    );
    let backlog_rate = changes as f64 / backlog_s;
    let (reader_cpu_backlog, _) = reader.usage();
    let (projector_cpu_backlog, _) = projector.usage();
    // How many view transactions the backlog took, and how many were written while the one
    // before them committed.
    let view_txs = e2e::metric(&projector.http, "projector_batches_total").await?;
    let overlapped =
        e2e::metric(&projector.http, "projector_transactions_overlapped_total").await?;
    let first_row_s = drained.first_row_s;

    // 2. Steady load: `rate` single-row updates per second, in transactions of 10 every
    //    10,000/rate ms, each changing a distinct user's name to a unique marker.
    let per_tx = 10_i64;
    let interval = Duration::from_secs_f64(per_tx as f64 / rate as f64);
    let total = rate * seconds;
    let mut commits: HashMap<String, DateTime<Utc>> = HashMap::with_capacity(total as usize);
    let user_api = Service::start("user-api", &[("USER_DB_URL", user_db.url.clone())])?;
    let post_api = Service::start(
        "post-api",
        &[
            ("VIEW_DB_URL", view_db.url.clone()),
            ("POST_API_PROJECTOR_GROUP", group.clone()),
        ],
    )?;
    user_api.wait_healthy().await?;
    post_api.wait_healthy().await?;
    let pairs_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arrivals_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arrivals = kafka_arrivals(&stack.kafka_brokers, &topic, arrivals_stop.clone())?;
    let pairs = tokio::spawn(ryw_pairs(
        user_api.http.clone(),
        post_api.http.clone(),
        derived == "on",
        pairs_stop.clone(),
    ));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let load_started = Instant::now();
    let mut k = 0_i64;
    while k < total {
        tick.tick().await;
        let mut sql = String::from("BEGIN;");
        let mut markers = Vec::with_capacity(per_tx as usize);
        for _ in 0..per_tx {
            // Distinct rows within the run (ids 1..=changes exist).
            let id = 1 + k % changes;
            let marker = format!("lat {k}");
            sql.push_str(&format!(
                "UPDATE users SET name = '{marker}', updated_at = now() WHERE id = {id};"
            ));
            markers.push(marker);
            k += 1;
        }
        sql.push_str("COMMIT;");
        users.batch_execute(&sql).await?;
        let committed = Utc::now();
        for m in markers {
            commits.insert(m, committed);
        }
    }
    let load_s = load_started.elapsed().as_secs_f64();
    pairs_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ryw, ryw_refused) = pairs.await??;
    ryw.sort_by(f64::total_cmp);
    user_api.stop().await?;
    post_api.stop().await?;
    if ryw.is_empty() {
        bail!("no read-your-writes pair succeeded ({ryw_refused} refused)");
    }
    let (ryw_p50, ryw_p99) = (percentile(&ryw, 0.50), percentile(&ryw, 0.99));
    // Collect when each marker reached the view.
    let mut latencies = Vec::with_capacity(commits.len());
    let mut arrivals = Some(arrivals);
    let mut seen_in_kafka = Arrivals::new();
    // The two stages: commit → readable in Kafka (read_committed), then → the row written.
    let (mut to_kafka, mut from_kafka) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = views
            .query(
                "SELECT name, projected_at FROM user_view WHERE name LIKE 'lat %'",
                &[],
            )
            .await?;
        if rows.len() as i64 >= total || Instant::now() > deadline {
            // Every change in the view was readable in Kafka before.
            arrivals_stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(a) = arrivals.take() {
                seen_in_kafka = a.await?;
            }
            for r in rows {
                let name: String = r.get(0);
                let projected: DateTime<Utc> = r.get(1);
                let ms = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
                if let Some(c) = commits.get(&name) {
                    latencies.push(ms(projected - *c));
                    if let Some(k) = seen_in_kafka.get(&name) {
                        to_kafka.push(ms(*k - *c));
                        from_kafka.push(ms(projected - *k));
                    }
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if (latencies.len() as i64) < total {
        bail!(
            "only {} of {total} changes reached user_view",
            latencies.len()
        );
    }
    latencies.sort_by(f64::total_cmp);
    to_kafka.sort_by(f64::total_cmp);
    from_kafka.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    let (reader_cpu, reader_rss) = reader.usage();
    let (projector_cpu, projector_rss) = projector.usage();

    // 3. Big transactions, half of `--big-tx` rows and then all of them: peak RSS after each,
    //    which must not grow with the transaction's size.
    let mut big = Vec::new();
    for rows in [big_tx / 2, big_tx] {
        if rows == 0 {
            continue;
        }
        let before: i64 = views
            .query_one("SELECT count(*) FROM user_view", &[])
            .await?
            .get(0);
        users
            .execute(
                "INSERT INTO users (name, email, department, status)
                 SELECT 'Big tx ' || i, 'big' || $2 || '-' || i || '@example.org',
                        'Dept ' || (i % 20), 'ACTIVE'
                 FROM generate_series(1, $1::bigint) i",
                &[&rows, &rows.to_string()],
            )
            .await?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(900);
        loop {
            let count: i64 = views
                .query_one("SELECT count(*) FROM user_view", &[])
                .await?
                .get(0);
            if count >= before + rows {
                break;
            }
            if Instant::now() > deadline {
                bail!("the {rows}-row transaction did not reach user_view within 900 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        big.push((
            rows,
            started.elapsed().as_secs_f64(),
            reader.usage().1,
            projector.usage().1,
        ));
    }
    projector.stop().await?;
    reader.stop().await?;

    // 4. The limits, with nothing else running.
    let produce_rate = produce_limit(&stack, &topic, changes).await?;
    let apply_rate = apply_limit(&users, &views, first_id, changes).await?;
    let reader_json = e2e::bench::earlier_figures("CDC_BENCH_READER_JSON")?;
    let recvlogical_rate = reader_json["pg_recvlogical_changes_per_s"].as_f64();
    let slowest = [Some(produce_rate), Some(apply_rate), recvlogical_rate]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);

    println!("pipeline benchmark (commit in user_db → row in user_view), derived views {derived}");
    if let Some(w) = warm_up_s {
        println!(
            "  warm-up on the fresh Kafka node: {warm_up} inserts in user_view after {w:.2} s \
             ({:.0} changes/s); the services stopped",
            warm_up as f64 / w
        );
    }
    println!(
        "  backlog: {changes} inserts written in {write_s:.2} s, then reader + projector started"
    );
    println!("    first row in user_view after     {first_row_s:8.2} s");
    println!(
        "    all rows in user_view after      {backlog_s:8.2} s  {backlog_rate:10.0} changes/s"
    );
    println!(
        "    CPU: reader {reader_cpu_backlog:.2} s, projector {projector_cpu_backlog:.2} s, \
         Kafka {kafka_cpu_backlog:.2} s, PostgreSQL {postgres_cpu_backlog:.2} s \
         (of {:.2} s on 2 cores)",
        backlog_s * 2.0
    );
    println!(
        "    view transactions: {view_txs} ({overlapped} written while the one before committed)"
    );
    println!(
        "  steady load: {total} single-row updates at {rate}/s in {load_s:.2} s (transactions of {per_tx})"
    );
    println!(
        "    commit → user_view latency  p50 {p50:8.1} ms   p99 {p99:8.1} ms   max {max:8.1} ms"
    );
    println!(
        "      of which commit → readable in Kafka  p50 {:8.1} ms   p99 {:8.1} ms, then → user_view \
         p50 {:8.1} ms   p99 {:8.1} ms ({} markers seen in Kafka)",
        percentile(&to_kafka, 0.5),
        percentile(&to_kafka, 0.99),
        percentile(&from_kafka, 0.5),
        percentile(&from_kafka, 0.99),
        to_kafka.len()
    );
    println!(
        "    write-then-consistent-read pairs: {} (refused {ryw_refused})  p50 {ryw_p50:8.1} ms   p99 {ryw_p99:8.1} ms",
        ryw.len()
    );
    println!("  peak RSS: reader {reader_rss:.1} MB, projector {projector_rss:.1} MB");
    for (rows, secs, r, p) in &big {
        println!(
            "  one transaction of {rows} inserts: in user_view after {secs:.2} s; peak RSS since start: reader {r:.1} MB, projector {p:.1} MB"
        );
    }
    println!("  limits ({changes} changes, each measured alone):");
    println!(
        "    produce: the reader's records, its producer settings  {produce_rate:10.0} records/s"
    );
    println!("    apply: COPY of the final rows into a user_view copy    {apply_rate:10.0} rows/s");
    if let Some(r) = recvlogical_rate {
        println!("    decode: pg_recvlogical (bench-reader)                 {r:10.0} changes/s");
    }
    println!(
        "  end to end {backlog_rate:.0} changes/s = {:.2}× the slowest limit ({slowest:.0}/s)",
        backlog_rate / slowest
    );
    let round = |x: f64| x.round();
    let tenth = |x: f64| (x * 10.0).round() / 10.0;
    let mut bench = serde_json::json!({
        "changes": changes,
        "derived_views": derived == "on",
        "e2e_changes_per_s": round(backlog_rate),
        "produce_limit_per_s": round(produce_rate),
        "apply_limit_per_s": round(apply_rate),
        "e2e_vs_slowest_limit": (backlog_rate / slowest * 100.0).round() / 100.0,
        "latency_p50_ms": tenth(p50),
        "latency_p99_ms": tenth(p99),
        "ryw_p50_ms": tenth(ryw_p50),
        "ryw_p99_ms": tenth(ryw_p99),
        "reader_peak_rss_mb": tenth(reader_rss),
        "projector_peak_rss_mb": tenth(projector_rss),
    });
    for (rows, secs, r, p) in &big {
        bench[format!("reader_peak_rss_mb_after_{rows}_row_tx")] = tenth(*r).into();
        bench[format!("projector_peak_rss_mb_after_{rows}_row_tx")] = tenth(*p).into();
        bench[format!("tx_{rows}_rows_s")] = ((secs * 100.0).round() / 100.0).into();
    }
    for key in [
        "reader_changes_per_s",
        "reader_idempotent_changes_per_s",
        "reader_transactions_cost",
        "pg_recvlogical_changes_per_s",
        "reader_vs_recvlogical",
    ] {
        if let Some(v) = reader_json.get(key) {
            bench[key] = v.clone();
        }
    }
    let details = serde_json::json!({
        "backlog_s": (backlog_s * 100.0).round() / 100.0,
        "warm_up_changes": warm_up,
        "warm_up_changes_per_s": warm_up_s.map(|w| (warm_up as f64 / w).round()),
        "first_row_s": (first_row_s * 100.0).round() / 100.0,
        "steady_rate": rate,
        "steady_changes": total,
        "latency_max_ms": tenth(max),
        "latency_to_kafka_p50_ms": tenth(percentile(&to_kafka, 0.5)),
        "latency_to_kafka_p99_ms": tenth(percentile(&to_kafka, 0.99)),
        "latency_from_kafka_p50_ms": tenth(percentile(&from_kafka, 0.5)),
        "latency_from_kafka_p99_ms": tenth(percentile(&from_kafka, 0.99)),
        "ryw_pairs": ryw.len(),
        "ryw_refused": ryw_refused,
        "reader_cpu_s": reader_cpu,
        "projector_cpu_s": projector_cpu,
        "backlog_view_transactions": view_txs,
        "backlog_view_transactions_overlapped": overlapped,
        "backlog_cpu_s": {
            "reader": reader_cpu_backlog, "projector": projector_cpu_backlog,
            "kafka": (kafka_cpu_backlog * 100.0).round() / 100.0,
            "postgres": (postgres_cpu_backlog * 100.0).round() / 100.0,
        },
    });
    for (k, v) in details.as_object().into_iter().flatten() {
        bench[k] = v.clone();
    }
    println!("BENCH {bench}");
    Ok(())
}

/// When each marker was first readable in Kafka.
type Arrivals = HashMap<String, DateTime<Utc>>;

/// When each steady-load marker (`lat …` names) becomes readable in `topic` for a
/// `read_committed` consumer, from the topic's end now until `stop`.
fn kafka_arrivals(
    brokers: &str,
    topic: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<Arrivals>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;

    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-arrivals-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            assignment.add_partition_offset(topic, p.id(), rdkafka::Offset::End)?;
        }
    }
    consumer.assign(&assignment)?;
    Ok(tokio::task::spawn_blocking(move || {
        let mut seen = HashMap::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let now = Utc::now();
            // (A failed fetch is retried by the client; a record it misses counts nowhere.)
            let Some(value) = message.ok().and_then(|m| m.payload().map(<[u8]>::to_vec)) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&value) else {
                continue;
            };
            let after = v.get("payload").unwrap_or(&v).get("after");
            if let Some(name) = after.and_then(|a| a.get("name")).and_then(|n| n.as_str()) {
                if name.starts_with("lat ") {
                    seen.entry(name.to_owned()).or_insert(now);
                }
            }
        }
        seen
    }))
}

/// Read-your-writes pairs until `stop`: a user created through user-api, then read back through
/// post-api with the write's `X-Source-LSN` as `X-Min-Source-LSN` (its activity; without the
/// derived views, its department of its own). Each pair's time in ms, and how many reads were
/// refused (not 200 with the user: a stale or timed-out answer).
async fn ryw_pairs(
    user_api: String,
    post_api: String,
    derived: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let http = reqwest::Client::new();
    let mut times = Vec::new();
    let mut refused = 0;
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let started = Instant::now();
        let created = http
            .post(format!("{user_api}/api/users"))
            .json(&serde_json::json!({"name": format!("ryw {n}"),
                "email": format!("ryw{n}@bench.example.org"), "department": format!("Reads{n}")}))
            .send()
            .await?;
        if created.status() != 201 {
            bail!("creating a user answered {}", created.status());
        }
        let lsn = created
            .headers()
            .get("x-source-lsn")
            .context("user-api's answer has no X-Source-LSN")?
            .to_str()?
            .to_owned();
        let id = created.json::<serde_json::Value>().await?["id"]
            .as_i64()
            .context("no id")?;
        let path = if derived {
            format!("/api/posts/users/{id}/activity")
        } else {
            format!("/api/posts/users/department/Reads{n}")
        };
        let read = http
            .get(format!("{post_api}{path}"))
            .header("X-Min-Source-LSN", lsn)
            .send()
            .await?;
        let seen = read.status() == 200 && read.text().await?.contains(&format!("\"ryw {n}\""));
        if seen {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        } else {
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((times, refused))
}

/// `n` records shaped like the reader's (the first record of `topic` as the value, keys like its
/// keys), produced with the reader's producer settings to a fresh topic: first send to last
/// acknowledgement.
async fn produce_limit(stack: &Stack, topic: &str, n: i64) -> anyhow::Result<f64> {
    let sample = e2e::read_first(stack, topic, Duration::from_secs(30)).await?;
    let value = serde_json::to_vec(sample.value.as_ref().context("a tombstone first")?)?;
    let settings = cdc_reader::publish::KafkaSettings {
        brokers: stack.kafka_brokers.clone(),
        overrides: Vec::new(),
        topic_partitions: 1,
        topic_replication_factor: -1,
        topic_config: Vec::new(),
        delivery: cdc_reader::publish::Delivery::AtLeastOnce,
        transactional_id: String::new(),
        position_topic: String::new(),
        transaction_gap: Duration::ZERO,
    };
    let limit_topic = format!("bench-produce-{}", unique_suffix());
    cdc_reader::publish::ensure_topics(&settings, std::slice::from_ref(&limit_topic)).await?;
    let producer: FutureProducer = cdc_reader::publish::client_config(&settings).create()?;
    let started = Instant::now();
    let mut acks = futures_util::stream::FuturesUnordered::new();
    for i in 0..n {
        let key = format!("{{\"id\":{}}}", i + 1);
        loop {
            match producer.send_result(
                FutureRecord::to(&limit_topic)
                    .key(key.as_bytes())
                    .payload(&value)
                    .partition(0),
            ) {
                Ok(ack) => {
                    acks.push(ack);
                    break;
                }
                // librdkafka's queue is full: wait for an acknowledgement to make room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    let ack = acks
                        .next()
                        .await
                        .context("librdkafka's queue is full with nothing in flight")?;
                    ack?.map_err(|(e, _)| e)?;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?.map_err(|(e, _)| e)?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The final rows of the `n` users from `first_id` on, written the fastest plain way: COPY into a
/// fresh table shaped like user_view (its indexes included), in one transaction.
async fn apply_limit(
    users: &tokio_postgres::Client,
    views: &tokio_postgres::Client,
    first_id: i64,
    n: i64,
) -> anyhow::Result<f64> {
    let last_id = first_id + n - 1;
    let out = users
        .copy_out(&*format!(
            "COPY (SELECT id, name, email, department, status, created_at, updated_at, \
                          pg_current_wal_lsn(), 0 FROM users WHERE id BETWEEN {first_id} AND {last_id} \
                          ORDER BY id) TO STDOUT"
        ))
        .await?;
    let chunks: Vec<bytes::Bytes> = out
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    views
        .batch_execute("CREATE TABLE apply_limit (LIKE user_view INCLUDING ALL)")
        .await?;
    let started = Instant::now();
    views.batch_execute("BEGIN").await?;
    let sink = views
        .copy_in(
            "COPY apply_limit (user_id, name, email, department, status, created_at, updated_at, \
             source_lsn, source_seq) FROM STDIN",
        )
        .await?;
    futures_util::pin_mut!(sink);
    for chunk in chunks {
        sink.send(chunk).await?;
    }
    let rows = sink.finish().await?;
    views.batch_execute("COMMIT").await?;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(rows == n as u64, "COPY wrote {rows} rows, not {n}");
    views.batch_execute("DROP TABLE apply_limit").await?;
    Ok(n as f64 / seconds)
}
