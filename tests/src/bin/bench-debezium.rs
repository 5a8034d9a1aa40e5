//! Our reader against Debezium, run by `scripts/bench debezium` (and `all`) on its own stack: the
//! same backlog, the same PostgreSQL, the same one-node Kafka.
//!
//! 1. A fresh database with the users table, one publication and two slots created before any
//!    write, so both readers face the same WAL.
//! 2. N inserts in transactions of 1,000 rows, then VACUUM and CHECKPOINT (not during a drain).
//! 3. The cdc-reader binary drains its slot into a fresh topic (its defaults: Kafka transactions,
//!    acks=all, idempotence, lz4).
//! 4. Debezium's PostgreSQL connector, in the Kafka Connect worker the script started, drains the
//!    other slot into its topic, its producer with acks=all, idempotence and lz4 as well, tuned
//!    for throughput as its documentation advises (larger `max.batch.size` and `max.queue.size`,
//!    a shorter `poll.interval.ms`; producer batches as large as ours).
//!
//! Each rate is N over the time between the first and the last record's Kafka timestamp; CPU is
//! the process's (for Debezium the worker's, while it drained), peak RSS the process's high-water
//! mark. Prints a report and, last, `BENCH {json}` (merged into `CDC_BENCH_MERGE_JSON`, a BENCH
//! object of an earlier step, when set).

// A report printer: stdout is its output.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::bench::{backlog, cpu_seconds, drain, peak_rss_mb, run_reader, Backlog, PUBLICATION};
use e2e::connect::{postgres_source, Connect};
use e2e::{arg, unique_suffix, Stack};
use serde_json::{json, Value};

const TX_ROWS: i64 = 1000;

/// Debezium's settings for this run beyond [`e2e::connect::NATURAL_JSON`].
const DEBEZIUM_TUNING: &[(&str, &str)] = &[
    // The slot and publication made before the workload; no snapshot: the backlog is the WAL.
    ("publication.name", PUBLICATION),
    ("publication.autocreate.mode", "disabled"),
    ("snapshot.mode", "no_data"),
    // Throughput: bigger batches from the queue, a deeper queue, shorter waits when it is empty
    // (defaults 2048, 8192, 500 ms).
    ("max.batch.size", "16384"),
    ("max.queue.size", "65536"),
    ("poll.interval.ms", "50"),
    // The producer as ours: acks=all, idempotence, lz4, ~1 MB batches; 5 ms linger (the Java
    // client's default, which favours its throughput; ours runs with none, as its commits wait
    // for every record anyway).
    ("producer.override.acks", "all"),
    ("producer.override.enable.idempotence", "true"),
    ("producer.override.compression.type", "lz4"),
    ("producer.override.linger.ms", "5"),
    ("producer.override.batch.size", "1000000"),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let changes = arg::<i64>("--changes", 1_000_000)?;
    let stack = Stack::from_env();
    let reader_bin = std::env::var("CDC_BENCH_READER_BIN").context("CDC_BENCH_READER_BIN")?;
    let worker: u32 = std::env::var("CDC_BENCH_CONNECT_PID")
        .context("CDC_BENCH_CONNECT_PID")?
        .parse()
        .context("CDC_BENCH_CONNECT_PID")?;
    let connect_api = Connect::from_env();

    let Backlog {
        db,
        client,
        write_s,
    } = backlog(
        &stack,
        "bench_dbz",
        &["bench_ours", "bench_debezium"],
        changes,
        TX_ROWS,
    )
    .await?;
    // Neither reader shares the machine with autovacuum's first pass over the new rows or with a
    // checkpoint the workload triggered.
    client.batch_execute("VACUUM (ANALYZE) users").await?;
    client.batch_execute("CHECKPOINT").await?;

    let ours = run_reader(
        &stack,
        &reader_bin,
        &db,
        PUBLICATION,
        "bench_ours",
        "exactly-once",
        changes,
    )
    .await?;

    let prefix = format!("bench{}", unique_suffix());
    let mut config = postgres_source(&db.url, "bench_debezium", &prefix, &["public.users"])?;
    for (k, v) in DEBEZIUM_TUNING {
        config.insert((*k).to_owned(), Value::from(*v));
    }
    let idle_rss_mb = peak_rss_mb(worker)?;
    let cpu_before = cpu_seconds(worker)?;
    let started = Instant::now();
    let connector = connect_api
        .create(&format!("bench-{prefix}"), config)
        .await?;
    let (first_ts, last_ts) = drain(
        &stack.kafka_brokers,
        &format!("{prefix}.public.users"),
        changes,
        Duration::from_secs(1800),
    )
    .await?;
    let dbz_wall_s = started.elapsed().as_secs_f64();
    let dbz_cpu_s = cpu_seconds(worker)? - cpu_before;
    let dbz_rss_mb = peak_rss_mb(worker)?;
    connector.status().await?;
    drop(connector);
    let dbz_span_s = ((last_ts - first_ts).max(1)) as f64 / 1000.0;
    let dbz_rate = changes as f64 / dbz_span_s;

    println!("our reader beside Debezium: {changes} inserts in transactions of {TX_ROWS}, one backlog, one Kafka");
    println!("  workload written in               {write_s:8.2} s");
    println!("  cdc-reader (Kafka transactions):");
    println!(
        "    first→last in Kafka             {:8.2} s  {:10.0} changes/s",
        ours.span_s, ours.rate
    );
    println!("    start→all consumed              {:8.2} s", ours.wall_s);
    println!("    CPU time                        {:8.2} s", ours.cpu_s);
    println!("    peak RSS                        {:8.1} MB", ours.rss_mb);
    println!("  Debezium 3.6.1 in Kafka Connect 4.3.1 (standalone worker):");
    println!("    first→last in Kafka             {dbz_span_s:8.2} s  {dbz_rate:10.0} changes/s");
    println!("    connector created→all consumed  {dbz_wall_s:8.2} s");
    println!("    CPU time (the worker, meanwhile){dbz_cpu_s:8.2} s");
    println!("    peak RSS (the worker)           {dbz_rss_mb:8.1} MB  ({idle_rss_mb:.1} MB before the connector)");
    println!(
        "  ours vs Debezium                  {:8.2}× the changes/s, {:.2}× the CPU, {:.2}× the memory",
        ours.rate / dbz_rate,
        ours.cpu_s / dbz_cpu_s,
        ours.rss_mb / dbz_rss_mb
    );

    let mut bench = e2e::bench::earlier_figures("CDC_BENCH_MERGE_JSON")?;
    if bench.get("changes").is_none() {
        bench["changes"] = json!(changes);
    }
    let round = |v: f64, places: i32| {
        let f = 10_f64.powi(places);
        (v * f).round() / f
    };
    for (k, v) in [
        ("debezium_changes_per_s", dbz_rate.round()),
        ("reader_vs_debezium", round(ours.rate / dbz_rate, 2)),
        ("debezium_cpu_s", round(dbz_cpu_s, 2)),
        ("debezium_peak_rss_mb", round(dbz_rss_mb, 1)),
        ("reader_beside_debezium_changes_per_s", ours.rate.round()),
        ("reader_beside_debezium_cpu_s", round(ours.cpu_s, 2)),
        ("reader_beside_debezium_peak_rss_mb", round(ours.rss_mb, 1)),
    ] {
        bench[k] = v.into();
    }
    println!("BENCH {bench}");
    Ok(())
}
