//! kafka-print against the broker scripts/test starts: prints every record once and exits at the
//! end of the topic; -o and -p select where to start.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn brokers() -> String {
    std::env::var("CDC_TEST_KAFKA_BROKERS")
        .expect("CDC_TEST_KAFKA_BROKERS is not set: run the suite through scripts/test")
}

fn print(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kafka-print"))
        .args(["-s", &brokers()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn prints_keys_values_and_tombstones_then_exits() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("t-print-{}-{nanos}", std::process::id());
    let config = {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", brokers());
        c
    };
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap()
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    let producer: FutureProducer = config.create().unwrap();
    for i in 0..3 {
        let value = format!("{{\"n\":{i}}}");
        producer
            .send(
                FutureRecord::to(&topic).key("{\"id\":1}").payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer
        .send(
            FutureRecord::<str, str>::to(&topic).key("{\"id\":1}"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let (ok, out, err) = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || print(&["-t", &topic, "-o", "earliest"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "0:0\t{\"id\":1}\t{\"n\":0}",
            "0:1\t{\"id\":1}\t{\"n\":1}",
            "0:2\t{\"id\":1}\t{\"n\":2}",
            "0:3\t{\"id\":1}\tnull"
        ]
    );

    let (ok, out, _) = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || print(&["-t", &topic, "-o", "2", "-p", "0"])
    })
    .await
    .unwrap();
    assert!(ok);
    assert_eq!(out.lines().count(), 2);

    let (ok, _, err) =
        tokio::task::spawn_blocking(|| print(&["-t", "no-such-topic-here", "-o", "earliest"]))
            .await
            .unwrap();
    assert!(!ok);
    assert!(
        err.contains("not found") || err.contains("Unknown"),
        "{err}"
    );
}
