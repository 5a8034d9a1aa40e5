//! cdc-reader: streams the PostgreSQL WAL of the captured tables to Kafka (see the library docs).

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Stream row changes of PostgreSQL tables (logical replication, pgoutput) to Kafka as \
             Debezium-style JSON change events",
    long_about = None
)]
struct Args {
    #[command(flatten)]
    config: cdc_reader::Config,
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
            let result = cdc_reader::run(args.config, listener, shutdown.clone()).await;
            shutdown.cancel();
            signals.await.context("signal task panicked")?;
            Ok(result?)
        })
}
