//! cdc-reader: streams the PostgreSQL WAL of the captured tables to Kafka (see the library docs).
//! `cdc-reader replay --from-lsn LSN` asks the running reader to stream again from an earlier LSN;
//! `cdc-reader snapshot [--table T]` asks it to publish the rows of its tables again.

use std::time::{Duration, Instant};

use anyhow::Context;
use cdc_reader::replay;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Stream row changes of PostgreSQL tables (logical replication, pgoutput) to Kafka as \
             Debezium-style JSON change events",
    long_about = None,
    after_help = "Stream again from an earlier WAL position: cdc-reader replay --help\n\
                  Publish the rows again, while streaming: cdc-reader snapshot --help"
)]
struct Args {
    #[command(flatten)]
    config: cdc_reader::Config,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Ask the running reader to publish again the changes from LSN on: it streams from there \
             and sends only what Kafka lacks. The slot must still decode from LSN (see the \
             reader's --wal-replay-window-bytes); otherwise this refuses and says what else to do",
    long_about = None
)]
struct ReplayArgs {
    /// Where to stream from, e.g. 0/16B3748.
    #[arg(long, value_name = "LSN", value_parser = parse_lsn)]
    from_lsn: u64,

    /// The reader's database (only the slot's position and the request table are used).
    #[arg(long, env = "CDC_READER_DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// The reader's replication slot.
    #[arg(long, env = "CDC_READER_SLOT", default_value = "cdc_reader")]
    slot: String,

    /// Longest wait for the reader to finish, in seconds (the request stays when the wait ends).
    #[arg(long, default_value_t = 3600)]
    wait_secs: u64,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Ask the running reader to publish the current rows of captured tables again (op \"r\", \
             source.snapshot \"incremental\"), while it keeps streaming; waits until Kafka has them",
    long_about = None
)]
struct SnapshotArgs {
    /// A table to snapshot, as schema.table (repeatable); without it, every table the reader
    /// captures.
    #[arg(long = "table", value_name = "SCHEMA.TABLE")]
    tables: Vec<String>,

    /// The reader's database.
    #[arg(long, env = "CDC_READER_DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// The reader's replication slot.
    #[arg(long, env = "CDC_READER_SLOT", default_value = "cdc_reader")]
    slot: String,

    /// Longest wait for the reader to finish, in seconds (the request stays when the wait ends).
    #[arg(long, default_value_t = 3600)]
    wait_secs: u64,
}

fn parse_lsn(text: &str) -> Result<u64, String> {
    change_event::parse_lsn(text).ok_or_else(|| "not an LSN such as 0/16B3748".to_owned())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("replay") {
        let argv = std::iter::once("cdc-reader replay".to_owned()).chain(std::env::args().skip(2));
        return replay_main(ReplayArgs::parse_from(argv));
    }
    if std::env::args().nth(1).as_deref() == Some("snapshot") {
        let argv =
            std::iter::once("cdc-reader snapshot".to_owned()).chain(std::env::args().skip(2));
        return snapshot_main(SnapshotArgs::parse_from(argv));
    }
    let args = Args::parse();
    args.config.validate()?;
    service::main(args.config.http_listen, |listener, shutdown| {
        cdc_reader::run(args.config, listener, shutdown)
    })
}

fn snapshot_main(args: SnapshotArgs) -> anyhow::Result<()> {
    use cdc_reader::resnapshot;
    for t in &args.tables {
        cdc_reader::setup::split_table(t)?;
    }
    service::init_tracing();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let (db, conn) = tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls)
            .await
            .context("connecting to the reader's database")?;
        tokio::spawn(conn);
        let tables = (!args.tables.is_empty()).then_some(args.tables.as_slice());
        let id = resnapshot::request(&db, &args.slot, tables).await?;
        eprintln!(
            "asked the reader of slot {} for a snapshot of {} (request {id})",
            args.slot,
            tables.map_or("every captured table".to_owned(), |t| t.join(", "))
        );
        let started = Instant::now();
        let mut said_waiting = false;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (taken, outcome, rows) = resnapshot::status(&db, id)
                .await?
                .context("the snapshot request disappeared")?;
            match outcome.as_deref() {
                Some("done") => {
                    eprintln!(
                        "snapshot done in {:.1} s: {} rows published",
                        started.elapsed().as_secs_f64(),
                        rows.unwrap_or(0)
                    );
                    return Ok(());
                }
                Some(other) => anyhow::bail!("the reader did not take the snapshot: {other}"),
                None => {}
            }
            if !taken && !said_waiting && started.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "waiting for the reader of slot {} to take the request (is it running? an \
                     earlier snapshot still running?)",
                    args.slot
                );
                said_waiting = true;
            }
            if started.elapsed() > Duration::from_secs(args.wait_secs) {
                anyhow::bail!(
                    "not done within {} s; the request stays, and the reader finishes it when it runs",
                    args.wait_secs
                );
            }
        }
    })
}

fn replay_main(args: ReplayArgs) -> anyhow::Result<()> {
    service::init_tracing();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let (db, conn) = tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls)
            .await
            .context("connecting to the reader's database")?;
        tokio::spawn(conn);
        let window = replay::window(&db, &args.slot).await?;
        let window = match replay::check(&args.slot, args.from_lsn, window) {
            Ok(w) => w,
            Err(refusal) => anyhow::bail!("{refusal}"),
        };
        replay::request(&db, &args.slot, args.from_lsn, window.current).await?;
        eprintln!(
            "asked the reader of slot {} to stream again from {} (up to {}); Kafka gets only what it lacks",
            args.slot,
            change_event::format_lsn(args.from_lsn),
            change_event::format_lsn(window.current)
        );
        let started = Instant::now();
        let mut said_waiting = false;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let status = replay::status(&db, &args.slot)
                .await?
                .context("the replay request disappeared (another replay replaced and finished it?)")?;
            match status.outcome.as_deref() {
                Some("done") => {
                    eprintln!(
                        "replay done in {:.1} s: {} records Kafka had already (not sent again), {} sent",
                        started.elapsed().as_secs_f64(),
                        status.skipped.unwrap_or(0),
                        status.sent.unwrap_or(0)
                    );
                    return Ok(());
                }
                Some(other) => anyhow::bail!("the reader did not replay: {other}"),
                None => {}
            }
            if !status.started && !said_waiting && started.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "waiting for the reader of slot {} to take the request (is it running?)",
                    args.slot
                );
                said_waiting = true;
            }
            if started.elapsed() > Duration::from_secs(args.wait_secs) {
                anyhow::bail!(
                    "not done within {} s; the request stays, and the reader finishes it when it runs",
                    args.wait_secs
                );
            }
        }
    })
}
