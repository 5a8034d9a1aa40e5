//! Benchmark of cdc-reader against the decode limit, run by `scripts/bench` on its own stack.
//!
//! 1. A fresh database with the users table, a publication and two slots created before any
//!    write, so both consumers face the same WAL.
//! 2. N inserts in transactions of 1,000 rows.
//! 3. `pg_recvlogical` (pgoutput, same publication) drains slot 1 to the workload's end LSN: the
//!    rate PostgreSQL can decode and ship this WAL at.
//! 4. The cdc-reader binary streams slot 2 into a fresh topic with Kafka transactions (its default,
//!    exactly once); its rate is N over the time between the first and the last record's Kafka
//!    timestamp, and its peak RSS is read from /proc.
//! 5. The same with the idempotent producer alone (`CDC_READER_DELIVERY=at-least-once`) on slot 3,
//!    into another topic: what the transactions cost. Each mode runs twice (A B B A, on four
//!    slots); the faster run of each counts.
//!
//! Prints a report and, last, `BENCH {json}`.

// A report printer: stdout is its output.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use anyhow::{bail, Context};
use e2e::bench::{backlog, run_reader, Backlog, ReaderRun, PUBLICATION};
use e2e::{arg, Stack};

const TX_ROWS: i64 = 1000;

/// The reader's runs: a slot each, with Kafka transactions and with the idempotent producer alone.
const RUNS: [(&str, &str); 4] = [
    ("bench_reader", "exactly-once"),
    ("bench_reader_idempotent", "at-least-once"),
    ("bench_reader_idempotent_2", "at-least-once"),
    ("bench_reader_2", "exactly-once"),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let changes = arg::<i64>("--changes", 1_000_000)?;
    let stack = Stack::from_env();
    let pg_bin = std::env::var("CDC_BENCH_PG_BIN").context("CDC_BENCH_PG_BIN")?;
    let reader_bin = std::env::var("CDC_BENCH_READER_BIN").context("CDC_BENCH_READER_BIN")?;

    let publication = PUBLICATION;
    let slots: Vec<&str> = std::iter::once("bench_recvlogical")
        .chain(RUNS.iter().map(|(slot, _)| *slot))
        .collect();
    let Backlog {
        db,
        client,
        write_s,
    } = backlog(&stack, "bench", &slots, changes, TX_ROWS).await?;
    let end_lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);

    // Decode limit: pg_recvlogical draining the same WAL to the end position.
    let started = Instant::now();
    let status = tokio::process::Command::new(format!("{pg_bin}/pg_recvlogical"))
        .arg("--dbname")
        .arg(&db.url)
        .args(["--slot", "bench_recvlogical", "--start", "--no-loop"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={publication}"))
        .args(["--endpos", &end_lsn, "-f", "/dev/null"])
        .status()
        .await
        .context("running pg_recvlogical")?;
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    let recvlogical_s = started.elapsed().as_secs_f64();

    // Each mode twice, in the order A B B A, so that a machine growing faster or slower during
    // the run favours neither; the faster of its two runs counts.
    let mut txn: Option<ReaderRun> = None;
    let mut idem: Option<ReaderRun> = None;
    for (slot, delivery) in RUNS {
        let run = run_reader(
            &stack,
            &reader_bin,
            &db,
            publication,
            slot,
            delivery,
            changes,
        )
        .await?;
        let best = if delivery == "exactly-once" {
            &mut txn
        } else {
            &mut idem
        };
        println!("  ({delivery} on {slot}: {:.0} changes/s)", run.rate);
        if best.as_ref().is_none_or(|b| run.rate > b.rate) {
            *best = Some(run);
        }
    }
    let (txn, idem) = (txn.context("no run")?, idem.context("no run")?);

    let recv_rate = changes as f64 / recvlogical_s;
    let reader_rate = txn.rate;
    println!("cdc-reader benchmark: {changes} inserts in transactions of {TX_ROWS}");
    println!("  workload written in            {write_s:8.2} s");
    println!("  pg_recvlogical (decode limit)  {recvlogical_s:8.2} s  {recv_rate:10.0} changes/s");
    for (name, run) in [("transactions", &txn), ("idempotent only", &idem)] {
        println!("  cdc-reader, {name}:");
        println!(
            "    first→last in Kafka          {:8.2} s  {:10.0} changes/s  ({:.2}× pg_recvlogical)",
            run.span_s,
            run.rate,
            run.rate / recv_rate
        );
        println!("    start→all consumed           {:8.2} s", run.wall_s);
        println!("    CPU time                     {:8.2} s", run.cpu_s);
        println!("    peak RSS                     {:8.1} MB", run.rss_mb);
        println!(
            "    batches committed            {:8.0}    {:.2} s committing",
            run.commits, run.commit_s
        );
    }
    let cost = 1.0 - txn.rate / idem.rate;
    println!(
        "  transactions cost              {:8.1} % of the idempotent rate",
        cost * 100.0
    );
    println!(
        "BENCH {}",
        serde_json::json!({
            "changes": changes,
            "reader_changes_per_s": reader_rate.round(),
            "reader_idempotent_changes_per_s": idem.rate.round(),
            "reader_transactions_cost": (cost * 1000.0).round() / 1000.0,
            "pg_recvlogical_changes_per_s": recv_rate.round(),
            "reader_vs_recvlogical": (reader_rate / recv_rate * 100.0).round() / 100.0,
            "reader_wall_s": (txn.wall_s * 100.0).round() / 100.0,
            "reader_cpu_s": txn.cpu_s,
            "reader_idempotent_cpu_s": idem.cpu_s,
            "reader_kafka_transactions": txn.commits,
            "reader_commit_s": (txn.commit_s * 100.0).round() / 100.0,
            "reader_peak_rss_mb": (txn.rss_mb * 10.0).round() / 10.0,
        })
    );
    Ok(())
}
