//! user-api: REST API of the user service (see `api::user_api`).

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "User service REST API over user_db.users")]
struct Args {
    #[command(flatten)]
    config: api::user_api::Config,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    service::main(args.config.listen, |listener, shutdown| {
        api::user_api::run(args.config, listener, shutdown)
    })
}
