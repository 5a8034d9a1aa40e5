//! user-api: REST API of the user service (see `api::user_api`).

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(version, about = "User service REST API over user_db.users")]
struct Args {
    #[command(flatten)]
    config: api::user_api::Config,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    service::init_tracing();
    tokio::runtime::Runtime::new()
        .context("starting the tokio runtime")?
        .block_on(async {
            let shutdown = CancellationToken::new();
            let signals = service::cancel_on_signal(shutdown.clone())
                .context("installing signal handlers")?;
            let listener = tokio::net::TcpListener::bind(args.config.listen)
                .await
                .with_context(|| format!("binding {}", args.config.listen))?;
            let result = api::user_api::run(args.config, listener, shutdown.clone()).await;
            shutdown.cancel();
            signals.await.context("signal task panicked")?;
            Ok(result?)
        })
}
