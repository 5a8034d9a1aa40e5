//! projector: folds the change events of user-events into materialized_view_db (see the library
//! docs).

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Fold user change events from Kafka into the user_view and department_stats tables \
             of materialized_view_db, exactly once (offsets are stored with the rows)",
    long_about = None
)]
struct Args {
    #[command(flatten)]
    config: projector::Config,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.config.validate()?;
    service::init_tracing();
    tokio::runtime::Runtime::new()
        .context("starting the tokio runtime")?
        .block_on(async {
            let shutdown = CancellationToken::new();
            let signals = service::cancel_on_signal(shutdown.clone())
                .context("installing signal handlers")?;
            let listener = service::telemetry::bind(args.config.http_listen)
                .await
                .with_context(|| format!("binding {}", args.config.http_listen))?;
            let result = projector::run(args.config, listener, shutdown.clone()).await;
            shutdown.cancel();
            signals.await.context("signal task panicked")?;
            Ok(result?)
        })
}
