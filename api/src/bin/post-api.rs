//! post-api: REST API of the post service (see `api::post_api`).

use clap::Parser;

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
    service::main(args.config.listen, |listener, shutdown| {
        api::post_api::run(args.config, listener, shutdown)
    })
}
