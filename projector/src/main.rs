//! projector: folds the change events of user-events into materialized_view_db (see the library
//! docs).

use clap::Parser;

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
    service::main(args.config.http_listen, |listener, shutdown| {
        projector::run(args.config, listener, shutdown)
    })
}
