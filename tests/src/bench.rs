//! Helpers of the benchmarks (`tests/src/bin/bench-*.rs`): a reader process draining a slot, the
//! span of a topic's records, and what a process used (CPU time, peak RSS) from /proc.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;

use crate::{unique_suffix, Stack, TestDb};

/// The publication of a [`backlog`]'s users table.
pub const PUBLICATION: &str = "bench";

/// A backlog for readers to drain: a fresh user_db with publication [`PUBLICATION`] and a
/// pgoutput slot per name in `slots`, all made before any write so that every slot faces the same
/// WAL, then `changes` inserts in transactions of `tx_rows`.
#[derive(Debug)]
pub struct Backlog {
    pub db: TestDb,
    pub client: tokio_postgres::Client,
    /// Seconds the inserts took.
    pub write_s: f64,
}

pub async fn backlog(
    stack: &Stack,
    prefix: &str,
    slots: &[&str],
    changes: i64,
    tx_rows: i64,
) -> anyhow::Result<Backlog> {
    let db = TestDb::create(stack, prefix, Some(schema::Database::UserDb)).await?;
    let client = crate::connect(&db.url).await?;
    // One statement each: a slot cannot be created in a transaction that wrote.
    client
        .execute(
            format!("CREATE PUBLICATION {PUBLICATION} FOR TABLE users").as_str(),
            &[],
        )
        .await?;
    for slot in slots {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await?;
    }
    let started = Instant::now();
    crate::insert_bench_users(&client, changes, tx_rows).await?;
    Ok(Backlog {
        db,
        client,
        write_s: started.elapsed().as_secs_f64(),
    })
}

/// One drain of the WAL by the reader binary.
#[derive(Debug)]
pub struct ReaderRun {
    /// Changes/s from the first to the last record's Kafka timestamp.
    pub rate: f64,
    pub span_s: f64,
    /// From the process start to the last record consumed (`read_committed`).
    pub wall_s: f64,
    pub cpu_s: f64,
    pub rss_mb: f64,
    /// Kafka transactions (batches) and the seconds spent committing them.
    pub commits: f64,
    pub commit_s: f64,
}

/// The reader binary streaming `slot` (of `publication`) into a fresh topic with `delivery`, until
/// all `changes` are consumed.
pub async fn run_reader(
    stack: &Stack,
    reader_bin: &str,
    db: &TestDb,
    publication: &str,
    slot: &str,
    delivery: &str,
    changes: i64,
) -> anyhow::Result<ReaderRun> {
    let topic = format!("bench-{}", unique_suffix());
    let http_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut reader = tokio::process::Command::new(reader_bin)
        .env("CDC_READER_DATABASE_URL", &db.url)
        .env("CDC_READER_SLOT", slot)
        .env("CDC_READER_DELIVERY", delivery)
        .env("CDC_READER_PUBLICATION", publication)
        .env("CDC_READER_TOPICS", format!("public.users={topic}"))
        .env("CDC_READER_SNAPSHOT", "never")
        .env("KAFKA_BROKERS", &stack.kafka_brokers)
        .env("CDC_READER_HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting cdc-reader")?;
    let pid = reader.id().context("reader pid")?;
    let started = Instant::now();

    let (first_ts, last_ts) = drain(
        &stack.kafka_brokers,
        &topic,
        changes,
        Duration::from_secs(600),
    )
    .await?;
    let reader_wall_s = started.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds(pid)?;
    // How many Kafka transactions (batches) that took, and the time spent committing them.
    let metrics = reqwest::get(format!("http://127.0.0.1:{http_port}/metrics"))
        .await?
        .text()
        .await?;
    let metric = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let commits = metric("cdc_reader_kafka_commits_total");
    let commit_s = metric("cdc_reader_kafka_commit_seconds_total");
    let rss_mb = peak_rss_mb(pid)?;
    // A graceful stop (so a profiler wrapping the reader can write its data).
    let stopped = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    if !stopped.is_ok_and(|s| s.success())
        || tokio::time::timeout(Duration::from_secs(20), reader.wait())
            .await
            .is_err()
    {
        eprintln!("the reader did not stop on SIGTERM; killing it");
        reader.kill().await?;
    }

    let span_s = ((last_ts - first_ts).max(1)) as f64 / 1000.0;
    Ok(ReaderRun {
        rate: changes as f64 / span_s,
        span_s,
        wall_s: reader_wall_s,
        cpu_s,
        rss_mb,
        commits,
        commit_s,
    })
}

/// Reads `topic` (created by someone else, perhaps not yet) as a `read_committed` consumer until
/// `n` records arrived; returns the Kafka timestamps (ms) of the first and the last.
pub async fn drain(
    brokers: &str,
    topic: &str,
    n: i64,
    timeout: Duration,
) -> anyhow::Result<(i64, i64)> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut subscribed = false;
    let (mut first_ts, mut last_ts, mut count) = (i64::MAX, 0_i64, 0_i64);
    let deadline = Instant::now() + timeout;
    while count < n {
        if Instant::now() > deadline {
            bail!("{topic}: only {count} of {n} records within {timeout:?}");
        }
        if !subscribed {
            // Subscribe once the topic exists.
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
            if md
                .topics()
                .iter()
                .any(|t| t.name() == topic && !t.partitions().is_empty())
            {
                consumer.subscribe(&[topic])?;
                subscribed = true;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let m = match tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            Ok(m) => m?,
            Err(_) => continue,
        };
        let ts = m.timestamp().to_millis().unwrap_or(0);
        first_ts = first_ts.min(ts);
        last_ts = last_ts.max(ts);
        count += 1;
    }
    Ok((first_ts, last_ts))
}

/// CPU seconds process `pid` used so far (utime + stime, in clock ticks of 1/100 s on Linux).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(stat
        .rsplit(')')
        .next()
        .map(|rest| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (tick(11) + tick(12)) / 100.0
        })
        .unwrap_or(0.0))
}

/// Peak resident memory of process `pid` so far (VmHWM), in MB.
pub fn peak_rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(kb as f64 / 1024.0)
}

/// The `BENCH` object an earlier step of `scripts/bench` handed on in the environment variable
/// `var` (an empty object when it is unset or empty); an error when it is not a JSON object, so
/// that no figure of the earlier step goes missing from the report unnoticed.
pub fn earlier_figures(var: &str) -> anyhow::Result<serde_json::Value> {
    let text = match std::env::var(var) {
        Ok(text) if !text.trim().is_empty() => text,
        _ => return Ok(serde_json::json!({})),
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{var} is not JSON: {text:?}"))?;
    anyhow::ensure!(value.is_object(), "{var} is not a JSON object: {text:?}");
    Ok(value)
}
