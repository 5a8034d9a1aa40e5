//! The Apache Kafka that `scripts/test` (and `scripts/dev`) start, as the pipeline uses it: topic
//! creation, idempotent produce with per-key order, consumer groups with manual commits, and the
//! tools users inspect it with. If a Kafka upgrade changes one, this fails before anything subtler
//! does.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use e2e::{unique_suffix, Stack};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn create_topic(stack: &Stack, partitions: i32) -> String {
    let topic = format!("t-broker-{}", unique_suffix());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
    topic
}

fn producer(stack: &Stack) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

fn consumer(stack: &Stack, group: &str, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    c
}

/// (key, value) of the next record, within [`TIMEOUT`].
async fn next(c: &StreamConsumer) -> (String, String, i32, i64) {
    let m = tokio::time::timeout(TIMEOUT, c.recv())
        .await
        .expect("no record within the timeout")
        .unwrap();
    let text = |b: Option<&[u8]>| String::from_utf8(b.unwrap().to_vec()).unwrap();
    (text(m.key()), text(m.payload()), m.partition(), m.offset())
}

#[tokio::test]
async fn keyed_records_arrive_once_and_in_order_per_key() {
    let stack = Stack::from_env();
    let topic = create_topic(&stack, 3).await;
    let p = producer(&stack);
    let keys = 6;
    let per_key = 20;
    let sends =
        (0..per_key).flat_map(|seq| (0..keys).map(move |k| (format!("k{k}"), format!("{seq}"))));
    // All in flight at once, as a real publisher would have them.
    let deliveries = futures_util::future::join_all(sends.map(|(k, v)| {
        let p = &p;
        let topic = &topic;
        async move {
            p.send(FutureRecord::to(topic).key(&k).payload(&v), TIMEOUT)
                .await
                .map_err(|(e, _)| e)
                .unwrap()
        }
    }))
    .await;
    assert_eq!(deliveries.len(), keys * per_key);

    let c = consumer(&stack, &format!("g-{}", unique_suffix()), &topic);
    let mut last: HashMap<String, (i32, i64)> = HashMap::new();
    for _ in 0..keys * per_key {
        let (key, value, partition, _) = next(&c).await;
        let seq: i64 = value.parse().unwrap();
        let prev = last.insert(key.clone(), (partition, seq));
        match prev {
            None => assert_eq!(seq, 0, "{key} started at {seq}"),
            Some((prev_partition, prev_seq)) => {
                assert_eq!(prev_partition, partition, "{key} moved partitions");
                assert_eq!(seq, prev_seq + 1, "{key}: {prev_seq} then {seq}");
            }
        }
    }
    assert!(last.values().all(|&(_, seq)| seq == per_key as i64 - 1));
}

#[tokio::test]
async fn a_group_resumes_after_its_committed_offset() {
    let stack = Stack::from_env();
    let topic = create_topic(&stack, 1).await;
    let p = producer(&stack);
    for i in 0..20 {
        let v = i.to_string();
        p.send(FutureRecord::to(&topic).key("k").payload(&v), TIMEOUT)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let group = format!("g-{}", unique_suffix());
    {
        let c = consumer(&stack, &group, &topic);
        for want in 0..10 {
            let (_, value, _, _) = next(&c).await;
            assert_eq!(value, want.to_string());
        }
        // Commits "offset of this message + 1" for its partition.
        let m = tokio::time::timeout(TIMEOUT, c.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload(), Some(&b"10"[..]));
        c.commit_message(&m, CommitMode::Sync).unwrap();
    }

    let c = consumer(&stack, &group, &topic);
    let (_, value, _, offset) = next(&c).await;
    assert_eq!((value.as_str(), offset), ("11", 11));
}

/// The tools users know read what the pipeline writes: Debian's kcat and Kafka's own
/// `kafka-topics` (through `scripts/kafka-tool`, from the broker's jars).
#[tokio::test]
async fn kcat_and_kafkas_own_tools_read_the_topic() {
    let stack = Stack::from_env();
    let topic = create_topic(&stack, 2).await;
    let p = producer(&stack);
    for i in 0..4 {
        let (k, v) = (format!("{{\"id\":{i}}}"), format!("{{\"n\":{i}}}"));
        p.send(FutureRecord::to(&topic).key(&k).payload(&v), TIMEOUT)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let kcat = tokio::process::Command::new("kcat")
        .args(["-b", &stack.kafka_brokers, "-C", "-t", &topic])
        .args(["-o", "beginning", "-e", "-q", "-f", "%k %s\\n"])
        .output()
        .await
        .expect("kcat is not installed (scripts/test installs it with apt)");
    assert!(
        kcat.status.success(),
        "{}",
        String::from_utf8_lossy(&kcat.stderr)
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&kcat.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        (0..4)
            .map(|i| format!("{{\"id\":{i}}} {{\"n\":{i}}}"))
            .collect::<Vec<_>>()
    );

    let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-tool");
    let topics = tokio::process::Command::new(tool)
        .args(["topics", "--bootstrap-server", &stack.kafka_brokers])
        .args(["--describe", "--topic", &topic])
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&topics.stdout);
    assert!(
        topics.status.success() && out.contains("PartitionCount: 2"),
        "{out}"
    );
}
