//! What the reader and the projector do when PostgreSQL restarts or the broker goes away. These
//! tests restart shared infrastructure, so scripts/test runs them last and one at a time.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::{read_exactly, Disruptive, Pipeline, Projector, Stack, TestDb};

const WAIT: Duration = Duration::from_secs(90);

/// Distinct emails of the created rows in `topic`, which must hold exactly `n` records: none
/// lost, none sent twice.
async fn emails(stack: &Stack, topic: &str, n: usize) -> BTreeSet<String> {
    read_exactly(stack, topic, n, WAIT)
        .await
        .unwrap()
        .iter()
        .filter_map(|r| {
            r.value.as_ref()?["after"]["email"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

async fn insert(db: &TestDb, tag: &str, n: i64) {
    // A fresh connection each time: the previous one may have died with a restart.
    let client = e2e::wait_for("PostgreSQL to accept connections", WAIT, || async {
        Ok(db.client().await.ok())
    })
    .await
    .unwrap();
    client
        .execute(
            "INSERT INTO users (name, email, department) \
             SELECT 'R', $1 || '-' || i || '@example.org', 'D' FROM generate_series(1, $2::bigint) i",
            &[&tag, &n],
        )
        .await
        .unwrap();
}

/// A reader and a projector on the durable broker.
async fn setup(prefix: &str, brokers: &str) -> (Pipeline, Projector) {
    let mut stack = Stack::from_env();
    stack.kafka_brokers = brokers.to_owned();
    let p = Pipeline::start_on(stack, prefix).await.unwrap();
    let projector = Projector::start(p.projector_config()).await.unwrap();
    (p, projector)
}

#[tokio::test]
async fn postgres_restarts_fast_and_immediate_lose_nothing() {
    let control = Disruptive::from_env();
    let (p, projector) = setup("restart_pg", &control.durable_brokers).await;
    let (stack, db, topic, reader) = (&p.stack, &p.user_db, &p.topic, &p.reader);
    insert(db, "a", 100).await;
    assert_eq!(emails(stack, topic, 100).await.len(), 100);

    control.control(&["pg-restart", "fast"]).await.unwrap();
    insert(db, "b", 100).await;
    control.control(&["pg-restart", "immediate"]).await.unwrap();
    insert(db, "c", 100).await;

    // Every change arrives once, also those sent but not confirmed when the connection died.
    assert_eq!(
        emails(stack, topic, 300).await.len(),
        300,
        "a change was lost"
    );
    reader.wait_streaming().await.unwrap();
    assert!(reader.metric("cdc_reader_reconnects_total").await.unwrap() >= 2.0);
    // The projector lost its view database twice and caught up, exactly.
    p.converged(WAIT).await.unwrap();
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

#[tokio::test]
async fn the_broker_away_for_30_s_loses_nothing_and_the_slot_holds_the_wal() {
    let control = Disruptive::from_env();
    let (p, projector) = setup("broker_away", &control.durable_brokers).await;
    let (stack, db, topic) = (&p.stack, &p.user_db, &p.topic);
    insert(db, "a", 100).await;
    assert_eq!(emails(stack, topic, 100).await.len(), 100);

    control.control(&["broker-stop"]).await.unwrap();
    // b's rows, and a WAL position inside their transaction: the commit comes after it, so a
    // reader that confirmed b would have moved the slot past it.
    let mut client = db.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO users (name, email, department) \
         SELECT 'R', 'b-' || i || '@example.org', 'D' FROM generate_series(1, 100) i",
        &[],
    )
    .await
    .unwrap();
    let written: String = tx
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    // The outage itself: thirty seconds without a broker.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn < $2::text::pg_lsn, \
                    ($2::text::pg_lsn - confirmed_flush_lsn)::float8 \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name, &written],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the slot was confirmed past changes Kafka never acknowledged"
    );
    // The reader reports the WAL the slot holds back (it measures every 5 s).
    let held_back: f64 = row.get(1);
    let reported = p.reader.metric("cdc_reader_slot_lag_bytes").await.unwrap();
    assert!(
        reported >= held_back,
        "cdc_reader_slot_lag_bytes {reported} < the {held_back} bytes held back"
    );

    control.control(&["broker-start"]).await.unwrap();
    assert_eq!(
        emails(stack, topic, 200).await.len(),
        200,
        "a change was lost"
    );
    // And the backlog confirmed once delivered.
    e2e::wait_for("the slot to pass the writes", WAIT, || async {
        let row = client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name, &written],
            )
            .await?;
        Ok(row.get::<_, bool>(0).then_some(()))
    })
    .await
    .unwrap();
    // The projector rode out the outage and caught up, exactly.
    p.converged(WAIT).await.unwrap();
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// `scripts/chaos` in its short mode: SIGKILLs of the reader and the projector under a mixed
/// workload, then every guarantee checked.
#[tokio::test]
async fn chaos_short_run_finds_no_violation() {
    let options = e2e::chaos::Options {
        changes: 10_000,
        kills: 6,
        restarts: None,
        broker_restarts: false,
        idle: Duration::from_secs(5),
    };
    let summary = e2e::chaos::run(Stack::from_env(), &options).await.unwrap();
    eprintln!("chaos summary: {}", summary.json());
    assert!(
        summary.reader_kills + summary.projector_kills >= 3,
        "{}",
        summary.json()
    );
    assert!(summary.violations.is_empty(), "{}", summary.json());
}
