//! The chaos run (see `e2e::chaos`), on the stack `scripts/chaos` starts. Prints a summary and,
//! last, `CHAOS {json}`; exits 1 on any violation.
//!
//! ```text
//! chaos [--changes N] [--kills K] [--long [--no-broker-restarts]]
//! ```
//! `--long` runs on the stack's three-node Kafka cluster and also restarts PostgreSQL, kills the
//! node coordinating the reader's transactions with SIGKILL (and starts it again) and pauses a
//! partition leader for 70 s, in turn, and idles a minute before measuring the WAL the slot
//! retains; `--no-broker-restarts` leaves Kafka alone (and on the one-node Kafka).

// A report printer: stdout is its output.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use e2e::chaos::{self, Options};
use e2e::{arg, Control, Disruptive, Kafka, Stack};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let long = std::env::args().any(|a| a == "--long");
    let broker_faults = long && !std::env::args().any(|a| a == "--no-broker-restarts");
    let options = Options {
        changes: arg::<u64>("--changes", if long { 100_000 } else { 20_000 })?,
        kills: u32::try_from(arg::<u64>("--kills", if long { 24 } else { 8 })?)?,
        restarts: long.then(Control::from_env),
        broker_faults: broker_faults.then_some(Kafka::Cluster),
        idle: Duration::from_secs(if long { 60 } else { 10 }),
    };
    let mut stack = Stack::from_env();
    if broker_faults {
        stack.kafka_brokers = Disruptive::from_env().cluster_brokers;
    }
    let s = chaos::run(stack, &options).await?;
    println!("chaos run ({})", if long { "long" } else { "short" });
    println!(
        "  changes committed       {:>10} in {} transactions, {:.1} s",
        s.changes, s.transactions, s.workload_s
    );
    println!(
        "  kills                   {:>10} reader, {} projector (SIGKILL)",
        s.reader_kills, s.projector_kills
    );
    println!(
        "  restarts                {:>10} PostgreSQL, {} Kafka node SIGKILLs, {} 70 s pauses",
        s.postgres_restarts, s.broker_kills, s.broker_pauses
    );
    println!("  records in the topic    {:>10}", s.records);
    println!("  duplicates              {:>10}", s.duplicates);
    println!("  lost                    {:>10}", s.lost);
    println!(
        "  views equal the source  {:>10}",
        s.view_mismatch.is_none()
    );
    println!("  time to converge        {:>10.1} s", s.converge_s);
    println!(
        "  slot behind the WAL     {:>10} bytes after the idle time",
        s.confirmed_lag_bytes
    );
    println!(
        "  WAL the slot retains    {:>10} bytes",
        s.retained_wal_bytes
    );
    for v in &s.violations {
        println!("  VIOLATION: {v}");
    }
    println!("CHAOS {}", s.json());
    if !s.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
