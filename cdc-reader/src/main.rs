//! cdc-reader: streams the PostgreSQL WAL of the captured tables to Kafka (see the library docs).

use clap::Parser;

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
    service::main(args.config.http_listen, |listener, shutdown| {
        cdc_reader::run(args.config, listener, shutdown)
    })
}
