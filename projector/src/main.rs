//! projector: folds the change events of user-events into materialized_view_db (see the library
//! docs). `projector replay ...` re-applies the topic from a point (see `projector::replay`).

use std::io::{BufRead, IsTerminal};

use anyhow::Context;
use clap::Parser;
use projector::replay::{self, From, Progress};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Fold user change events from Kafka into the user_view and department_stats tables \
             of materialized_view_db, exactly once (offsets are stored with the rows)",
    long_about = None,
    after_help = "Replay from a point (while the projector runs): projector replay --help"
)]
struct Args {
    #[command(flatten)]
    config: projector::Config,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Re-apply the topic's events from a point to the views, while the projector runs: \
             repair the live views in place (the projector pauses meanwhile), or --rebuild them \
             into fresh tables that are swapped in when complete",
    long_about = None
)]
struct ReplayArgs {
    #[command(flatten)]
    from: FromArgs,

    /// Build the views from scratch in fresh tables, swapped in when they have caught up (post-api
    /// readers see the old views until then). Without it, events from the start point are
    /// re-applied over the live views even where a row claims to reflect them already.
    #[arg(long)]
    rebuild: bool,

    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,

    #[command(flatten)]
    config: projector::Config,
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct FromArgs {
    /// Every partition from its first record.
    #[arg(long)]
    earliest: bool,
    /// The listed partitions from these offsets, the others left alone; or, as a bare OFFSET,
    /// every partition from that offset.
    #[arg(long, value_name = "PARTITION:OFFSET[,...]|OFFSET", value_parser = replay::parse_offset_arg)]
    offset: Option<From>,
    /// Every partition from its first record produced at or after this time.
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    timestamp: Option<chrono::DateTime<chrono::Utc>>,
    /// Every partition from its first event whose source commit LSN is at or after this.
    #[arg(long, value_name = "LSN", value_parser = parse_lsn)]
    lsn: Option<u64>,
}

impl FromArgs {
    fn from(&self) -> From {
        match (&self.offset, self.timestamp, self.lsn) {
            (Some(o), _, _) => o.clone(),
            (_, Some(t), _) => From::Timestamp(t),
            (_, _, Some(l)) => From::Lsn(l),
            _ => From::Earliest,
        }
    }
}

fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time such as 2026-11-24T08:00:00Z: {e}"))
}

fn parse_lsn(text: &str) -> Result<u64, String> {
    change_event::parse_lsn(text).ok_or_else(|| "not an LSN such as 0/16B3748".to_owned())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("replay") {
        let argv = std::iter::once("projector replay".to_owned()).chain(std::env::args().skip(2));
        let args = ReplayArgs::parse_from(argv);
        return replay_main(args);
    }
    let args = Args::parse();
    args.config.validate()?;
    service::main(args.config.http_listen, |listener, shutdown| {
        projector::run(args.config, listener, shutdown)
    })
}

fn replay_main(args: ReplayArgs) -> anyhow::Result<()> {
    args.config.validate()?;
    service::init_command_tracing();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let signals =
            service::cancel_on_signal(shutdown.clone()).context("installing signal handlers")?;
        let yes = args.yes;
        let confirm = move |plan: &replay::Plan| confirm(plan, yes);
        let started = std::time::Instant::now();
        let result = replay::replay(
            &args.config,
            args.from.from(),
            args.rebuild,
            confirm,
            report,
            &shutdown,
        )
        .await;
        shutdown.cancel();
        signals.abort();
        match result? {
            None => anyhow::bail!("not confirmed; nothing was done"),
            Some(s) => {
                eprintln!(
                    "replay done in {:.1} s: {} events read, {} rows written, {} deleted, {} not \
                     applicable (see the log)",
                    started.elapsed().as_secs_f64(),
                    s.events,
                    s.upserted,
                    s.deleted,
                    s.not_applied
                );
                Ok(())
            }
        }
    })
}

/// Shows the plan and asks; `--yes` answers for the user, and without a terminal to ask on the
/// answer is no.
fn confirm(plan: &replay::Plan, yes: bool) -> bool {
    eprintln!("{plan}");
    if yes {
        return true;
    }
    if !std::io::stdin().is_terminal() {
        eprintln!("No terminal to ask on: pass --yes to go ahead.");
        return false;
    }
    // stderr is not buffered: the question shows before the read.
    eprint!("Go ahead? [y/N] ");
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
}

fn report(p: Progress) {
    eprintln!("replayed {} of {} events", p.done, p.total);
}
