//! post-api: REST API of the post service (see `api::post_api`).

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Post service REST API: posts, and the user views kept by the projector, in materialized_view_db"
)]
struct Args {
    #[command(flatten)]
    config: api::post_api::Config,
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
            let result = api::post_api::run(args.config, listener, shutdown.clone()).await;
            shutdown.cancel();
            signals.await.context("signal task panicked")?;
            Ok(result?)
        })
}
