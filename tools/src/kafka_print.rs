//! kafka-print: prints the records of a topic (key and value, one record per line) from an offset,
//! and exits at the end of the topic unless asked to follow. Works with any Kafka-protocol broker.
//!
//! ```text
//! kafka-print -t user-events -o earliest
//! 0:3  {"id":3}  {"before":null,"after":{...},"op":"c",...}
//! ```

// A printer: stdout is its output.
#![allow(clippy::print_stdout)]

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Print the records of a topic: partition:offset, key, value"
)]
struct Args {
    /// Topic to read.
    #[arg(short = 't', long)]
    topic: String,
    /// Bootstrap servers.
    #[arg(
        short = 's',
        long,
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:19092"
    )]
    servers: String,
    /// Where to start: earliest, latest, or an offset (in every partition read).
    #[arg(short = 'o', long, default_value = "earliest")]
    offset: String,
    /// Only this partition.
    #[arg(short = 'p', long)]
    partition: Option<i32>,
    /// Keep waiting for new records instead of exiting at the end of the topic.
    #[arg(short = 'f', long)]
    follow: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let start = match args.offset.as_str() {
        "earliest" | "beginning" => Offset::Beginning,
        "latest" | "end" => Offset::End,
        n => Offset::Offset(
            n.parse()
                .with_context(|| format!("-o {n}: expected earliest, latest or a number"))?,
        ),
    };
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &args.servers)
        .set("group.id", "kafka-print")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating the Kafka client")?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(&args.topic), timeout)
        .with_context(|| format!("reading metadata of {}", args.topic))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == args.topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .filter(|p| args.partition.is_none_or(|want| want == *p))
        .collect();
    if partitions.is_empty() {
        bail!(
            "topic {} (partition {:?}) not found on {}",
            args.topic,
            args.partition,
            args.servers
        );
    }
    let mut assignment = TopicPartitionList::new();
    for &p in &partitions {
        assignment.add_partition_offset(&args.topic, p, start)?;
    }
    consumer.assign(&assignment)?;
    // Partitions read to their end (the consumer reports it: offset gaps such as transaction
    // markers need no arithmetic).
    let mut at_end = HashSet::new();
    let mut out = std::io::stdout().lock();
    loop {
        if !args.follow && (at_end.len() == partitions.len() || matches!(start, Offset::End)) {
            return Ok(());
        }
        let m = match consumer.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
                continue;
            }
            Some(m) => m,
        };
        let m = m.context("reading a record")?;
        fn text(b: Option<&[u8]>) -> std::borrow::Cow<'_, str> {
            b.map_or("null".into(), String::from_utf8_lossy)
        }
        writeln!(
            out,
            "{}:{}\t{}\t{}",
            m.partition(),
            m.offset(),
            text(m.key()),
            text(m.payload())
        )?;
        at_end.remove(&m.partition());
    }
}
