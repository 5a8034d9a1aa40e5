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

    #[command(flatten)]
    reader: ReaderArgs,
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

    #[command(flatten)]
    reader: ReaderArgs,
}

/// Where the running reader takes requests from, and how long to wait for it.
#[derive(clap::Args, Debug)]
struct ReaderArgs {
    /// The reader's database (its slot and its request tables).
    #[arg(long, env = "CDC_READER_DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// The reader's replication slot.
    #[arg(long, env = "CDC_READER_SLOT", default_value = "cdc_reader")]
    slot: String,

    /// Longest wait for the reader to finish, in seconds (the request stays when the wait ends).
    #[arg(long, default_value_t = 3600)]
    wait_secs: u64,
}

/// A request's state as the reader left it.
struct Progress {
    taken: bool,
    /// 'done', or why not; `None` while it runs.
    outcome: Option<String>,
    /// What to say when it is done.
    summary: String,
}

impl ReaderArgs {
    /// Runs `ask` on a connection to the reader's database: it records the request and returns a
    /// poll of its state, which is then awaited until the reader is done.
    fn ask<F>(&self, what: &str, ask: F) -> anyhow::Result<()>
    where
        F: for<'c> AsyncFnOnce(&'c tokio_postgres::Client) -> anyhow::Result<Poll<'c>>,
    {
        service::init_command_tracing();
        let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
        runtime.block_on(async {
            let (db, conn) = tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls)
                .await
                .context("connecting to the reader's database")?;
            service::spawn_connection(conn, "replay request");
            let mut poll = ask(&db).await?;
            let started = Instant::now();
            let mut said_waiting = false;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let p = poll().await?;
                match p.outcome.as_deref() {
                    Some("done") => {
                        eprintln!(
                            "{what} done in {:.1} s: {}",
                            started.elapsed().as_secs_f64(),
                            p.summary
                        );
                        return Ok(());
                    }
                    Some(other) => anyhow::bail!("the reader did not do the {what}: {other}"),
                    None => {}
                }
                if !p.taken && !said_waiting && started.elapsed() > Duration::from_secs(5) {
                    eprintln!(
                        "waiting for the reader of slot {} to take the request (is it running? \
                         busy with an earlier one?)",
                        self.slot
                    );
                    said_waiting = true;
                }
                if started.elapsed() > Duration::from_secs(self.wait_secs) {
                    anyhow::bail!(
                        "not done within {} s; the request stays, and the reader finishes it when \
                         it runs",
                        self.wait_secs
                    );
                }
            }
        })
    }
}

/// Reads a request's state.
type Poll<'c> = Box<
    dyn FnMut()
            -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Progress>> + 'c>>
        + 'c,
>;

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
    let slot = args.reader.slot.clone();
    let tables = args.tables.clone();
    args.reader.ask("snapshot", async move |db| {
        let asked = (!tables.is_empty()).then_some(tables.as_slice());
        let id = resnapshot::request(db, &slot, asked).await?;
        eprintln!(
            "asked the reader of slot {slot} for a snapshot of {} (request {id})",
            asked.map_or("every captured table".to_owned(), |t| t.join(", "))
        );
        let poll: Poll<'_> = Box::new(move || {
            Box::pin(async move {
                let (taken, outcome, rows) = resnapshot::status(db, id)
                    .await?
                    .context("the snapshot request disappeared")?;
                Ok(Progress {
                    taken,
                    outcome,
                    summary: format!("{} rows published", rows.unwrap_or(0)),
                })
            })
        });
        Ok(poll)
    })
}

fn replay_main(args: ReplayArgs) -> anyhow::Result<()> {
    let slot = args.reader.slot.clone();
    let from = args.from_lsn;
    args.reader.ask("replay", async move |db| {
        let window = replay::window(db, &slot).await?;
        let window = match replay::check(&slot, from, window) {
            Ok(w) => w,
            Err(refusal) => anyhow::bail!("{refusal}"),
        };
        replay::request(db, &slot, from, window.current).await?;
        eprintln!(
            "asked the reader of slot {slot} to publish the changes from {} (up to {}) again",
            change_event::format_lsn(from),
            change_event::format_lsn(window.current)
        );
        let poll: Poll<'_> = Box::new(move || {
            let slot = slot.clone();
            Box::pin(async move {
                let status = replay::status(db, &slot).await?.context(
                    "the replay request disappeared (another replay replaced and finished it?)",
                )?;
                Ok(Progress {
                    taken: status.started,
                    outcome: status.outcome,
                    summary: format!("{} records sent again", status.sent.unwrap_or(0)),
                })
            })
        });
        Ok(poll)
    })
}
