//! End-to-end benchmark of the pipeline (commit in user_db → row in user_view), run by
//! `scripts/bench pipeline` on its own stack, with the release binaries of cdc-reader and the
//! projector as separate processes:
//!
//! 1. **Backlog**: N inserts (transactions of 1,000 rows) are committed while nothing reads them
//!    (the slot exists, so the WAL is kept); then the reader and the projector start together. The
//!    rate is N over the time from their start to the last row in user_view.
//! 2. **Steady load**: single-row updates committed at a fixed rate (default 1,000 changes/s, in
//!    transactions of 10 every 10 ms) for S seconds; each change's latency is the time from the
//!    return of its COMMIT to the `projected_at` of the view row that shows it.
//!
//! Prints a report and, last, `BENCH {json}`.

// A report printer: stdout is its output.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use e2e::{arg, connect, unique_suffix, workspace_binary, Stack, TestDb};

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
            .env("RUST_LOG", "warn")
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
        let cpu = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit(')').next()?.to_owned();
                let f: Vec<&str> = rest.split_whitespace().collect();
                let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                Some((tick(11) + tick(12)) / 100.0)
            })
            .unwrap_or(0.0);
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let changes = arg::<i64>("--changes", 200_000)?;
    let rate = arg::<i64>("--rate", 1000)?;
    let seconds = arg::<i64>("--seconds", 30)?;
    if changes < rate * seconds {
        bail!("--changes ({changes}) must be at least --rate × --seconds: each steady-load change updates a distinct user");
    }
    let stack = Stack::from_env();

    let user_db = TestDb::create(&stack, "benchu", Some(schema::Database::UserDb)).await?;
    let view_db = TestDb::create(&stack, "benchv", Some(schema::Database::ViewDb)).await?;
    let users = connect(&user_db.url).await?;
    let views = connect(&view_db.url).await?;
    let topic = format!("bench-{}", unique_suffix());
    let reader_env = [
        ("CDC_READER_DATABASE_URL", user_db.url.clone()),
        ("CDC_READER_SLOT", "bench".to_owned()),
        ("CDC_READER_PUBLICATION", "bench".to_owned()),
        ("CDC_READER_TOPICS", format!("public.users={topic}")),
        ("KAFKA_BROKERS", stack.kafka_brokers.clone()),
    ];
    let projector_env = [
        ("VIEW_DB_URL", view_db.url.clone()),
        ("KAFKA_BROKERS", stack.kafka_brokers.clone()),
        ("PROJECTOR_TOPIC", topic.clone()),
        ("PROJECTOR_GROUP", format!("bench-{}", unique_suffix())),
    ];

    // The slot and publication first (a reader that starts on an empty table and stops), so the
    // backlog is kept in the WAL.
    let reader = Service::start("cdc-reader", &reader_env)?;
    reader.wait_healthy().await?;
    reader.stop().await?;

    let started = Instant::now();
    let mut done = 0;
    while done < changes {
        let n = 1000.min(changes - done);
        users
            .execute(
                "INSERT INTO users (name, email, department, status)
                 SELECT 'Bench user ' || i, 'bench' || i || '@example.org', 'Dept ' || (i % 20),
                        CASE WHEN i % 4 = 0 THEN 'INACTIVE' ELSE 'ACTIVE' END
                 FROM generate_series($1::bigint, $2::bigint) i",
                &[&(done + 1), &(done + n)],
            )
            .await?;
        done += n;
    }
    let write_s = started.elapsed().as_secs_f64();

    // 1. The backlog, end to end.
    let started = Instant::now();
    let reader = Service::start("cdc-reader", &reader_env)?;
    let projector = Service::start("projector", &projector_env)?;
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first_row: Option<f64> = None;
    loop {
        let count: i64 = views
            .query_one("SELECT count(*) FROM user_view", &[])
            .await?
            .get(0);
        if count > 0 && first_row.is_none() {
            first_row = Some(started.elapsed().as_secs_f64());
        }
        if count >= changes {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {count} of {changes} rows in user_view within 900 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backlog_s = started.elapsed().as_secs_f64();
    let backlog_rate = changes as f64 / backlog_s;
    let (reader_cpu_backlog, _) = reader.usage();
    let (projector_cpu_backlog, _) = projector.usage();
    let first_row_s = first_row.unwrap_or(backlog_s);

    // 2. Steady load: `rate` single-row updates per second, in transactions of 10 every
    //    10,000/rate ms, each changing a distinct user's name to a unique marker.
    let per_tx = 10_i64;
    let interval = Duration::from_secs_f64(per_tx as f64 / rate as f64);
    let total = rate * seconds;
    let mut commits: HashMap<String, DateTime<Utc>> = HashMap::with_capacity(total as usize);
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
    // Collect when each marker reached the view.
    let mut latencies = Vec::with_capacity(commits.len());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = views
            .query(
                "SELECT name, projected_at FROM user_view WHERE name LIKE 'lat %'",
                &[],
            )
            .await?;
        if rows.len() as i64 >= total || Instant::now() > deadline {
            for r in rows {
                let name: String = r.get(0);
                let projected: DateTime<Utc> = r.get(1);
                if let Some(c) = commits.get(&name) {
                    latencies
                        .push((projected - *c).num_microseconds().unwrap_or(0) as f64 / 1000.0);
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
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    let (reader_cpu, reader_rss) = reader.usage();
    let (projector_cpu, projector_rss) = projector.usage();
    projector.stop().await?;
    reader.stop().await?;

    println!("pipeline benchmark (commit in user_db → row in user_view)");
    println!(
        "  backlog: {changes} inserts written in {write_s:.2} s, then reader + projector started"
    );
    println!("    first row in user_view after     {first_row_s:8.2} s");
    println!(
        "    all rows in user_view after      {backlog_s:8.2} s  {backlog_rate:10.0} changes/s"
    );
    println!("    CPU: reader {reader_cpu_backlog:.2} s, projector {projector_cpu_backlog:.2} s");
    println!(
        "  steady load: {total} single-row updates at {rate}/s in {load_s:.2} s (transactions of {per_tx})"
    );
    println!(
        "    commit → user_view latency  p50 {p50:8.1} ms   p99 {p99:8.1} ms   max {max:8.1} ms"
    );
    println!("  peak RSS: reader {reader_rss:.1} MB, projector {projector_rss:.1} MB");
    println!(
        "BENCH {}",
        serde_json::json!({
            "backlog_changes": changes,
            "backlog_changes_per_s": backlog_rate.round(),
            "backlog_s": (backlog_s * 100.0).round() / 100.0,
            "steady_rate": rate,
            "steady_changes": total,
            "latency_p50_ms": (p50 * 10.0).round() / 10.0,
            "latency_p99_ms": (p99 * 10.0).round() / 10.0,
            "latency_max_ms": (max * 10.0).round() / 10.0,
            "reader_peak_rss_mb": (reader_rss * 10.0).round() / 10.0,
            "projector_peak_rss_mb": (projector_rss * 10.0).round() / 10.0,
            "reader_cpu_s": reader_cpu,
            "projector_cpu_s": projector_cpu,
        })
    );
    Ok(())
}
