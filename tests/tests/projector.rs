//! The projector against a real PostgreSQL and broker: the views follow `users` exactly, bad events
//! go to the dead-letter topic, and a projector killed mid-batch loses and doubles nothing.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use e2e::{random_workload, unique_suffix, Pipeline, Projector, UserApi, DEPARTMENTS};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn the_views_equal_the_source_under_a_random_workload() {
    let p = Pipeline::start("proj_random").await.unwrap();
    let projector = Projector::start(p.projector_config()).await.unwrap();
    let db = p.user_db.client().await.unwrap();
    let api = UserApi::start(&p.user_db.url).await.unwrap();
    let http = reqwest::Client::new();

    // Mixed transaction sizes over SQL, interleaved with requests through the user API.
    for round in 0..4 {
        let (transactions, size) = [(300, 1), (100, 5), (20, 50), (4, 500)][round];
        random_workload(&db, transactions, size).await.unwrap();
        for i in 0..25 {
            let dept = DEPARTMENTS[i % DEPARTMENTS.len()];
            let created: Value = http
                .post(api.url("/api/users"))
                .json(&json!({"name": format!("api {round} {i}"),
                              "email": format!("api{round}_{i}_{}@example.org", unique_suffix()),
                              "department": dept}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = created["id"].as_i64().unwrap();
            if i % 3 == 0 {
                let r = http
                    .patch(api.url(&format!("/api/users/{id}")))
                    .json(&json!({"status": "INACTIVE", "department": "Ops"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
            if i % 5 == 0 {
                let r = http
                    .delete(api.url(&format!("/api/users/{id}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204);
            }
        }
    }
    p.converged(WAIT).await.unwrap();
    let users: i64 = db
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert!(users > 100, "the workload left {users} users");
    assert_eq!(
        projector
            .metric("projector_dead_lettered_total")
            .await
            .unwrap(),
        0.0
    );
    projector.stop().await.unwrap();
    api.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// A change event as the reader writes it, for hand-made records.
fn event(op: &str, after: Value) -> Value {
    json!({
        "before": null, "after": after, "op": op, "ts_ms": 1,
        "source": {"version": "0.1.0", "connector": "postgresql", "name": "cdc", "db": "user_db",
                   "schema": "public", "table": "users", "txId": 1, "lsn": 1, "sequence": null,
                   "ts_ms": 1, "snapshot": "false", "commit_lsn": 1, "event_index": 0}
    })
}

fn user_json(id: Value) -> Value {
    json!({"id": id, "name": "n", "email": "e@example.org", "department": "Ops",
           "status": "ACTIVE", "created_at": "2026-01-01T00:00:00Z",
           "updated_at": "2026-01-01T00:00:00Z"})
}

#[tokio::test]
async fn bad_events_go_to_the_dead_letter_topic_and_the_projector_keeps_going() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::Message;

    e2e::init_logs();
    let p = Pipeline::start("proj_dlq").await.unwrap();
    let projector = Projector::start(p.projector_config()).await.unwrap();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.stack.kafka_brokers)
        .create()
        .unwrap();
    let mut missing_email = user_json(json!(5));
    missing_email.as_object_mut().unwrap().remove("email");
    let bad: Vec<(Option<Value>, String, &str)> = vec![
        (
            Some(json!({"id": 1})),
            "not json at all".to_owned(),
            "not_an_event",
        ),
        (None, event("c", user_json(json!(5))).to_string(), "bad_key"),
        (
            Some(json!({"id": 5})),
            event("x", user_json(json!(5))).to_string(),
            "not_an_event",
        ),
        (
            Some(json!({"id": 5})),
            event("c", missing_email).to_string(),
            "missing_column",
        ),
        (
            Some(json!({"id": 5})),
            event("c", user_json(json!("5"))).to_string(),
            "bad_column",
        ),
    ];
    let mut offsets = Vec::new();
    for (key, value, _) in &bad {
        let key = key.as_ref().map(Value::to_string);
        let mut record = FutureRecord::to(&p.topic).payload(value.as_str());
        if let Some(k) = &key {
            record = record.key(k.as_str());
        }
        let delivery = producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        offsets.push((delivery.partition, delivery.offset));
    }
    // A good change after the bad ones still gets through.
    let db = p.user_db.client().await.unwrap();
    db.batch_execute(
        "INSERT INTO users (name, email, department) VALUES ('after', 'after@example.org', 'Ops')",
    )
    .await
    .unwrap();
    p.converged(WAIT).await.unwrap();

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.stack.kafka_brokers)
        .set("group.id", format!("t-dlq-{}", unique_suffix()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{}.dlq", p.topic)]).unwrap();
    for ((key, value, kind), (partition, offset)) in bad.iter().zip(&offsets) {
        let m = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.payload(),
            Some(value.as_bytes()),
            "the record goes unchanged"
        );
        assert_eq!(
            m.key().map(|k| serde_json::from_slice::<Value>(k).unwrap()),
            key.clone()
        );
        let headers = m.headers().unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("dlq.error.kind").as_deref(), Some(*kind));
        assert_eq!(
            header("dlq.source.topic").as_deref(),
            Some(p.topic.as_str())
        );
        assert_eq!(header("dlq.source.partition"), Some(partition.to_string()));
        assert_eq!(header("dlq.source.offset"), Some(offset.to_string()));
        assert!(!header("dlq.error").unwrap_or_default().is_empty());
    }
    assert_eq!(
        projector
            .metric("projector_dead_lettered_total")
            .await
            .unwrap(),
        bad.len() as f64
    );
    // The offsets moved past the bad records: a restart does not dead-letter them again.
    projector.stop().await.unwrap();
    let projector = Projector::start(p.projector_config()).await.unwrap();
    db.batch_execute(
        "INSERT INTO users (name, email, department) VALUES ('again', 'again@example.org', 'Ops')",
    )
    .await
    .unwrap();
    p.converged(WAIT).await.unwrap();
    assert_eq!(
        projector
            .metric("projector_dead_lettered_total")
            .await
            .unwrap(),
        0.0
    );
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// Random workloads against `p`'s user_db until the token is cancelled.
async fn keep_writing(
    p: &Pipeline,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let writer = p.user_db.client().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let workload = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.is_cancelled() {
                random_workload(&writer, 5, 40).await?;
            }
            anyhow::Ok(())
        }
    });
    (stop, workload)
}

/// The projector binary as a child process, so it can be killed with SIGKILL.
async fn spawn_projector(config: &projector::Config) -> tokio::process::Child {
    spawn_projector_serving(config, &[]).await.0
}

/// [`spawn_projector`] with more environment, and the URL of its `/metrics`.
async fn spawn_projector_serving(
    config: &projector::Config,
    env: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(e2e::workspace_binary("projector").unwrap())
        .env("VIEW_DB_URL", &config.database_url)
        .env("KAFKA_BROKERS", &config.kafka_brokers)
        .env("PROJECTOR_TOPIC", &config.topic)
        .env("PROJECTOR_GROUP", &config.group)
        .env("PROJECTOR_BATCH_MAX_EVENTS", "500")
        // The group hands a killed member's partition on after this.
        .env("PROJECTOR_CONSUMER_CONFIG", "session.timeout.ms=6000")
        .env("PROJECTOR_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, format!("http://127.0.0.1:{port}"))
}

#[tokio::test]
async fn a_projector_killed_mid_batch_neither_loses_nor_doubles() {
    use rand::Rng;

    let p = Pipeline::start("proj_kill").await.unwrap();
    let config = p.projector_config();
    let mut child = spawn_projector(&config).await;
    // Writes go on for the whole test, so every kill lands in a stream of batches.
    let (stop, workload) = keep_writing(&p).await;
    let views = p.view_db.client().await.unwrap();
    let applied = || async {
        views
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM projector_offsets",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut kills_while_working = 0;
    let mut last = 0;
    for _ in 0..4 {
        // Kill only a projector that is applying: once this process has moved the offsets.
        let deadline = tokio::time::Instant::now() + WAIT;
        while applied().await <= last && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pause = rand::rng().random_range(0..300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        let now = applied().await;
        if now > last && !workload.is_finished() {
            kills_while_working += 1;
        }
        last = now;
        child = spawn_projector(&config).await;
    }
    stop.cancel();
    workload.await.unwrap().unwrap();
    p.converged(Duration::from_secs(120)).await.unwrap();
    assert!(
        kills_while_working >= 3,
        "only {kills_while_working} kills hit a working projector"
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// `user_db.cdc_slot_status` and `materialized_view_db.projector_status` after a workload: the slot
/// confirmed what was applied, and the projector's row says where it is and how fresh it was.
#[tokio::test]
async fn the_inspection_views_show_where_the_pipeline_is() {
    let p = Pipeline::start("proj_status").await.unwrap();
    let config = p.projector_config();
    let group = config.group.clone();
    let projector = Projector::start(config).await.unwrap();
    let db = p.user_db.client().await.unwrap();
    random_workload(&db, 20, 50).await.unwrap();
    p.converged(WAIT).await.unwrap();
    let records = e2e::read_topic(&p.stack, &p.topic, 1, WAIT).await.unwrap();
    let last_lsn = records
        .iter()
        .rev()
        .find_map(|r| r.value.as_ref()?["source"]["commit_lsn"].as_i64())
        .unwrap();
    // Offsets count the transaction markers too: the next offset follows the last record.
    let end = records.last().unwrap().offset + 1;

    // The projector: next offset = after the topic's last record, its source LSN, fresh.
    let views = p.view_db.client().await.unwrap();
    let status = e2e::wait_for("the projector's status", WAIT, || {
        let views = &views;
        let group = &group;
        async move {
            let row = views
                .query_opt(
                    "SELECT partition, next_offset, \
                            applied_source_lsn = '0/0'::pg_lsn + $2::bigint::numeric, \
                            extract(epoch FROM freshness)::float8, \
                            extract(epoch FROM since_last_apply)::float8 \
                       FROM projector_status WHERE consumer_group = $1",
                    &[group, &last_lsn],
                )
                .await?;
            Ok(row.filter(|r| r.get::<_, i64>(1) == end))
        }
    })
    .await
    .unwrap();
    assert_eq!(status.get::<_, i32>(0), 0);
    assert!(
        status.get::<_, bool>(2),
        "applied_source_lsn is the last record's"
    );
    let freshness: f64 = status.get(3);
    assert!((0.0..30.0).contains(&freshness), "freshness {freshness} s");
    assert!(status.get::<_, f64>(4) >= 0.0);

    // The slot: active, snapshot done, confirmed past everything applied, lag within retained WAL.
    let slot = e2e::wait_for("the slot to confirm the workload", WAIT, || {
        let db = &db;
        let slot = p.user_db.name.clone();
        async move {
            let row = db
                .query_one(
                    "SELECT active, initial_snapshot, lag_bytes, retained_wal_bytes, \
                            confirmed_flush_lsn >= '0/0'::pg_lsn + $2::bigint::numeric \
                       FROM cdc_slot_status WHERE slot_name = $1",
                    &[&slot, &last_lsn],
                )
                .await?;
            Ok(row.get::<_, bool>(4).then_some(row))
        }
    })
    .await
    .unwrap();
    assert!(slot.get::<_, bool>(0), "the reader holds the slot");
    assert_eq!(slot.get::<_, &str>(1), "done");
    let (lag, retained): (i64, i64) = (slot.get(2), slot.get(3));
    assert!(
        0 <= lag && lag <= retained,
        "lag {lag}, retained {retained}"
    );

    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// `scripts/kafka-tool consumer-groups --describe --members` on the test Kafka: per member of
/// `group`, its number of partitions.
async fn group_members(brokers: &str, group: &str) -> Vec<usize> {
    let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-tool");
    let out = tokio::process::Command::new(tool)
        .args([
            "consumer-groups",
            "--bootstrap-server",
            brokers,
            "--describe",
            "--members",
            "--group",
            group,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // GROUP CONSUMER-ID HOST CLIENT-ID #PARTITIONS
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(group))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect()
}

/// Three projectors of one group (`--transactions per-member`) share a six-partition topic; one is
/// killed with SIGKILL while the group applies a steady workload; its partitions move to the other
/// two and the views stay exact.
#[tokio::test]
async fn three_projectors_share_the_partitions_and_survive_a_member_killed_mid_batch() {
    let p = Pipeline::start_with(e2e::Stack::from_env(), "proj_scale", 6)
        .await
        .unwrap();
    let config = p.projector_config();
    let mut members = Vec::new();
    for _ in 0..3 {
        let env = [("PROJECTOR_TRANSACTIONS", "per-member")];
        members.push(spawn_projector_serving(&config, &env).await.0);
    }
    let (stop, workload) = keep_writing(&p).await;
    // The group has settled when three members hold two partitions each (the sticky assignor
    // balances them).
    let brokers = config.kafka_brokers.clone();
    let shares = e2e::wait_for("three members with two partitions each", WAIT, || async {
        let shares = group_members(&brokers, &config.group).await;
        Ok((shares == [2, 2, 2]).then_some(shares))
    })
    .await
    .unwrap();
    assert_eq!(shares.iter().sum::<usize>(), 6);

    // Kill one while it applies: once the group has moved the offsets since.
    let views = p.view_db.client().await.unwrap();
    applies_more(&views, "the group").await;
    let mut killed = members.remove(0);
    killed.start_kill().unwrap();
    killed.wait().await.unwrap();

    // Its partitions go to the two left (after the session timeout), and the views stay exact.
    let shares = e2e::wait_for("two members with three partitions each", WAIT, || async {
        let shares = group_members(&brokers, &config.group).await;
        Ok((shares.len() == 2 && shares.iter().sum::<usize>() == 6).then_some(shares))
    })
    .await
    .unwrap();
    assert_eq!(shares, [3, 3]);
    // The two go on applying the running workload before it stops.
    applies_more(&views, "the two members").await;
    stop.cancel();
    workload.await.unwrap().unwrap();
    p.converged(Duration::from_secs(120)).await.unwrap();
    for mut m in members {
        m.start_kill().unwrap();
        m.wait().await.unwrap();
    }
    p.reader.stop().await.unwrap();
}

/// Waits until the offsets stored with the views move on (`who` applies more).
async fn applies_more(views: &tokio_postgres::Client, who: &str) {
    let applied = || async {
        views
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM projector_offsets",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let before = applied().await;
    e2e::wait_for(&format!("{who} to apply more"), WAIT, || async {
        Ok((applied().await > before).then_some(()))
    })
    .await
    .unwrap();
}

/// The `state` in a projector's /health.
async fn projector_state(http: &str) -> anyhow::Result<String> {
    let health: serde_json::Value = reqwest::get(format!("{http}/health")).await?.json().await?;
    Ok(health["state"].as_str().unwrap_or_default().to_owned())
}

/// Waits until the projector serving `http` reports `state`.
async fn wait_for_state(http: &str, state: &str) {
    e2e::wait_for(&format!("a projector in state {state}"), WAIT, || async {
        Ok((projector_state(http).await.ok().as_deref() == Some(state)).then_some(()))
    })
    .await
    .unwrap();
}

/// Two projectors of one group in whole-transaction mode (the default) on a three-partition
/// topic: one applies, the other stands by instead of taking some of the partitions (then both
/// would wait for ever); killed with SIGKILL, the first is replaced by the second.
#[tokio::test]
async fn a_second_projector_in_whole_transaction_mode_stands_by_and_takes_over() {
    let p = Pipeline::start_with(e2e::Stack::from_env(), "proj_standby", 3)
        .await
        .unwrap();
    let config = p.projector_config();
    let (mut first, first_http) = spawn_projector_serving(&config, &[]).await;
    wait_for_state(&first_http, "running").await;
    let (mut second, second_http) = spawn_projector_serving(&config, &[]).await;
    wait_for_state(&second_http, "standby").await;
    let views = p.view_db.client().await.unwrap();
    let (stop, workload) = keep_writing(&p).await;
    applies_more(&views, "the first projector").await;
    stop.cancel();
    workload.await.unwrap().unwrap();
    p.converged(WAIT).await.unwrap();
    assert_eq!(projector_state(&second_http).await.unwrap(), "standby");
    assert_eq!(
        group_members(&config.kafka_brokers, &config.group).await,
        [3],
        "only the applying projector is in the group"
    );

    let (stop, workload) = keep_writing(&p).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    wait_for_state(&second_http, "running").await;
    // It applies the running workload, not only what is left once it stops.
    applies_more(&views, "the second projector").await;
    stop.cancel();
    workload.await.unwrap().unwrap();
    p.converged(Duration::from_secs(120)).await.unwrap();
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// Views applied further than the topic reaches (it was deleted and created again): the projector
/// stops with an error that names the partition and the way out, and applies nothing.
#[tokio::test]
async fn a_stored_offset_past_the_end_of_the_topic_stops_the_projector() {
    let p = Pipeline::start("proj_past_end").await.unwrap();
    let db = p.user_db.client().await.unwrap();
    random_workload(&db, 3, 10).await.unwrap();
    let config = p.projector_config();
    let projector = Projector::start(config.clone()).await.unwrap();
    p.converged(WAIT).await.unwrap();
    projector.stop().await.unwrap();
    // As if the topic had been recreated: the stored position lies beyond its end.
    let views = p.view_db.client().await.unwrap();
    views
        .execute(
            "UPDATE projector_offsets SET next_offset = next_offset + 1000",
            &[],
        )
        .await
        .unwrap();
    let before = e2e::rows(&views, "SELECT * FROM user_view ORDER BY user_id")
        .await
        .unwrap();
    random_workload(&db, 1, 5).await.unwrap();
    let error = Projector::start(config)
        .await
        .unwrap()
        .halted(WAIT)
        .await
        .unwrap()
        .expect_err("the projector went on past a stored offset beyond the topic's end");
    let text = format!("{error}");
    assert!(
        matches!(error, projector::Error::OffsetPastEnd { partition: 0, .. })
            && text.contains("projector replay --earliest --rebuild"),
        "{text}"
    );
    let after = e2e::rows(&views, "SELECT * FROM user_view ORDER BY user_id")
        .await
        .unwrap();
    assert_eq!(before, after, "the projector applied something");
    p.reader.stop().await.unwrap();
}

/// Another applier of the partition (a member that lost it in a rebalance and commits late, or an
/// offset set by hand) stores an offset past the records of the view transaction the projector is
/// committing: that transaction rolls back, and the partition is read again from the stored offset
/// (the records below it are the other applier's), never committed over it.
#[tokio::test]
async fn an_offset_another_applier_stored_meanwhile_wins_over_the_view_transaction() {
    let p = Pipeline::start("proj_moved").await.unwrap();
    let db = p.user_db.client().await.unwrap();
    e2e::insert_bench_users(&db, 5, 5).await.unwrap();
    let config = p.projector_config();
    let projector = Projector::start(config.clone()).await.unwrap();
    p.converged(WAIT).await.unwrap();
    // The other applier holds the stored offset of partition 0...
    let mut other = p.view_db.client().await.unwrap();
    let tx = other.transaction().await.unwrap();
    let key = (&config.group, &config.topic);
    tx.query_one(
        "SELECT next_offset FROM projector_offsets \
         WHERE consumer_group = $1 AND topic = $2 AND partition = 0 FOR UPDATE",
        &[key.0, key.1],
    )
    .await
    .unwrap();
    // ...while three users are created in one source transaction, and the projector's view
    // transaction of them waits for it at its commit.
    db.execute(
        "INSERT INTO users (name, email, department) \
         SELECT 'late ' || i, 'late' || i || '@example.org', 'Late' FROM generate_series(1, 3) i",
        &[],
    )
    .await
    .unwrap();
    let mut records = e2e::read_topic(&p.stack, &p.topic, 8, WAIT).await.unwrap();
    records.sort_by_key(|r| r.offset);
    let late: Vec<(i64, i64)> = records[5..]
        .iter()
        .map(|r| (r.offset, r.key.as_ref().unwrap()["id"].as_i64().unwrap()))
        .collect();
    let views = p.view_db.client().await.unwrap();
    let database = p.view_db.name.clone();
    e2e::wait_for("the projector to wait for the stored offset", WAIT, || {
        let (views, database) = (&views, &database);
        async move {
            let waiting: i64 = views
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = $1 AND wait_event_type = 'Lock'",
                    &[database],
                )
                .await?
                .get(0);
            Ok((waiting > 0).then_some(()))
        }
    })
    .await
    .unwrap();
    // The other applier applied the first two (as far as the offsets say) and commits.
    tx.execute(
        "UPDATE projector_offsets SET next_offset = $3 \
         WHERE consumer_group = $1 AND topic = $2 AND partition = 0",
        &[key.0, key.1, &late[2].0],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let in_view = |id: i64| {
        let views = &views;
        async move {
            let n: i64 = views
                .query_one("SELECT count(*) FROM user_view WHERE user_id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            n == 1
        }
    };
    e2e::wait_for("the third user in user_view", WAIT, || async {
        Ok(in_view(late[2].1).await.then_some(()))
    })
    .await
    .unwrap();
    assert!(
        !in_view(late[0].1).await && !in_view(late[1].1).await,
        "the projector committed records below the offset another applier stored"
    );
    let errors = projector.metric("projector_errors_total").await.unwrap();
    assert!(
        errors >= 1.0,
        "the rolled-back view transaction was not counted"
    );
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// Users of the two departments [`moves_between_two_departments`] moves between, each.
const PAIR: i64 = 1000;

/// Transactions that each move as many users from PairA to PairB as back, in random order, some
/// larger than a projector batch (500 events), until the token is cancelled. Every state the
/// source passes through has PAIR users in each department: any other count in department_stats
/// is a source transaction half applied.
async fn moves_between_two_departments(
    p: &Pipeline,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<u64>>,
) {
    use rand::Rng;

    let mut writer = p.user_db.client().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let workload = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut transactions = 0;
            while !stop.is_cancelled() {
                let n: i64 = if rand::rng().random_bool(0.1) {
                    rand::rng().random_range(300..=400)
                } else {
                    rand::rng().random_range(1..=20)
                };
                let (first, second) = if rand::rng().random_bool(0.5) {
                    ("PairA", "PairB")
                } else {
                    ("PairB", "PairA")
                };
                let tx = writer.transaction().await?;
                let mut moved: Vec<i64> = Vec::new();
                for (from, to) in [(first, second), (second, first)] {
                    let rows = tx
                        .query(
                            "UPDATE users SET department = $2 WHERE id IN \
                               (SELECT id FROM users WHERE department = $1 AND id <> ALL($4) \
                                ORDER BY random() LIMIT $3) \
                             RETURNING id",
                            &[&from, &to, &n, &moved],
                        )
                        .await?;
                    moved.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
                }
                tx.commit().await?;
                transactions += 1;
            }
            anyhow::Ok(transactions)
        }
    });
    (stop, workload)
}

/// A reader polling department_stats while transactions move users between two departments never
/// sees a count the source never had, while the projector is killed with SIGKILL and restarted.
async fn whole_source_transactions(partitions: i32) {
    use rand::Rng;

    let p = Pipeline::start_with(
        e2e::Stack::from_env(),
        &format!("proj_whole{partitions}"),
        partitions,
    )
    .await
    .unwrap();
    let db = p.user_db.client().await.unwrap();
    db.execute(
        "INSERT INTO users (name, email, department) \
         SELECT 'Pair user ' || i, 'pair' || i || '@example.org', \
                CASE WHEN i % 2 = 0 THEN 'PairA' ELSE 'PairB' END \
         FROM generate_series(1, $1::bigint) i",
        &[&(2 * PAIR)],
    )
    .await
    .unwrap();
    let config = p.projector_config();
    // Transactions of 600 to 800 changes are more than it holds: they are written in parts.
    let env = [("PROJECTOR_HOLD_MAX_KIB", "128")];
    let (mut child, mut http) = spawn_projector_serving(&config, &env).await;
    p.converged(WAIT).await.unwrap();

    let views = p.view_db.client().await.unwrap();
    let polling = tokio_util::sync::CancellationToken::new();
    let poller = tokio::spawn({
        let polling = polling.clone();
        async move {
            let (mut polls, mut bad, mut seen) = (0u64, 0u64, Vec::new());
            while !polling.is_cancelled() {
                let rows = views
                    .query(
                        "SELECT department, user_count FROM department_stats \
                         WHERE department IN ('PairA', 'PairB') ORDER BY 1",
                        &[],
                    )
                    .await
                    .unwrap();
                let counts: Vec<(String, i64)> =
                    rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                polls += 1;
                if counts != [("PairA".to_owned(), PAIR), ("PairB".to_owned(), PAIR)] {
                    bad += 1;
                    if seen.len() < 10 && !seen.contains(&counts) {
                        seen.push(counts);
                    }
                }
            }
            (polls, bad, seen)
        }
    });
    let (stop, workload) = moves_between_two_departments(&p).await;
    // Each projector is killed at a random moment of the writes once it has committed a view
    // transaction since its start (a restarted one catching up on several partitions must not
    // keep its view transaction open while the writes go on); parts of view transactions
    // written, summed over the killed projectors.
    let mut parts = 0.0;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        while e2e::metric(&http, "projector_batches_total")
            .await
            .unwrap_or(0.0)
            < 1.0
        {
            assert!(
                started.elapsed() < Duration::from_secs(25),
                "a restarted projector committed nothing in 25 s of steady writes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("committed {:?} after its start", started.elapsed());
        let pause = rand::rng().random_range(0..2000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        parts += e2e::metric(&http, "projector_transaction_parts_total")
            .await
            .unwrap();
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        (child, http) = spawn_projector_serving(&config, &env).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let transactions = workload.await.unwrap().unwrap();
    let converging = std::time::Instant::now();
    p.converged(Duration::from_secs(120)).await.unwrap();
    let converged_in = converging.elapsed();
    polling.cancel();
    let (polls, bad, seen) = poller.await.unwrap();
    eprintln!(
        "{partitions} partition(s): {transactions} transactions, {polls} polls, {parts} parts \
         of larger transactions written before the kills; converged {converged_in:?} after the \
         writes"
    );
    assert!(transactions > 50, "only {transactions} transactions");
    assert!(polls > 100, "only {polls} polls");
    assert!(parts > 0.0, "no source transaction was written in parts");
    assert!(
        bad == 0,
        "department_stats showed states the source never had in {bad} of {polls} polls \
         ({transactions} transactions), e.g. {seen:?}"
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    p.reader.stop().await.unwrap();
}

#[tokio::test]
async fn views_never_show_half_a_source_transaction_on_one_partition() {
    whole_source_transactions(1).await;
}

#[tokio::test]
async fn views_never_show_half_a_source_transaction_on_three_partitions() {
    whole_source_transactions(3).await;
}

/// A reader without Kafka transactions commits no positions: the projector cannot tell when a
/// source transaction is complete, says so, and applies batches as they come (the last changes
/// too, with nothing after them).
#[tokio::test]
async fn a_topic_without_reader_positions_is_still_applied_to_its_last_change() {
    let p = Pipeline::start_configured(e2e::Stack::from_env(), "proj_nopos", 3, |c| {
        c.delivery = cdc_reader::publish::Delivery::AtLeastOnce;
    })
    .await
    .unwrap();
    let projector = Projector::start(p.projector_config()).await.unwrap();
    let db = p.user_db.client().await.unwrap();
    random_workload(&db, 20, 10).await.unwrap();
    p.converged(WAIT).await.unwrap();
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}
