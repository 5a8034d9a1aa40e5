//! `projector replay` against a real PostgreSQL and broker, with the projector running throughout:
//! a rebuild from the earliest offsets restores damaged views while the post API answers, and
//! repairs from an LSN, an offset and a timestamp re-apply exactly the events from there; and
//! `cdc-reader replay`, which refuses WAL the slot no longer has and streams again inside its
//! window without doubling anything in Kafka.

// Helpers of a test binary: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::{
    derived_differences, insert_bench_users, read_exactly, Pipeline, PostApi, Projector, Reader,
    Stack, TestDb,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// Runs `projector replay ARGS --yes` for `config`'s group, topic and database; (success, stderr).
async fn replay(config: &projector::Config, args: &[&str]) -> (bool, String) {
    let mut command = tokio::process::Command::new(e2e::workspace_binary("projector").unwrap());
    command
        .arg("replay")
        .args(args)
        .arg("--yes")
        .env("VIEW_DB_URL", &config.database_url)
        .env("KAFKA_BROKERS", &config.kafka_brokers)
        .env("PROJECTOR_TOPIC", &config.topic)
        .env("PROJECTOR_GROUP", &config.group);
    let (ok, _, stderr) = run(command).await;
    (ok, stderr)
}

/// A pipeline (reader and topic of `partitions` partitions) with a projector running, a client on
/// each database, and `rows` users written (`per_tx` a transaction) and projected.
struct Projected {
    p: Pipeline,
    projector: Projector,
    users: tokio_postgres::Client,
    view: tokio_postgres::Client,
}

impl Projected {
    async fn start(prefix: &str, partitions: i32, rows: i64, per_tx: i64) -> Projected {
        let p = Pipeline::start_with(Stack::from_env(), prefix, partitions)
            .await
            .unwrap();
        let projector = Projector::start(p.projector_config()).await.unwrap();
        let users = p.user_db.client().await.unwrap();
        let view = p.view_db.client().await.unwrap();
        insert_bench_users(&users, rows, per_tx).await.unwrap();
        p.converged(WAIT).await.unwrap();
        Projected {
            p,
            projector,
            users,
            view,
        }
    }
}

/// The end offset of each partition of `topic`.
fn end_offsets(brokers: &str, topic: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            (p.id(), high)
        })
        .collect()
}

/// Names of `user_view` by id.
async fn view_names(view: &tokio_postgres::Client) -> BTreeMap<i64, String> {
    view.query("SELECT user_id, name FROM user_view", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn a_rebuild_from_earliest_restores_a_damaged_view_while_the_post_api_answers() {
    let Projected {
        p,
        projector,
        users,
        view,
    } = Projected::start("replay_rebuild", 1, 20_000, 2_000).await;

    // Damage the view: rows gone, rows altered, counts made to match.
    view.batch_execute(
        "DELETE FROM user_view WHERE user_id % 100 = 0;
         UPDATE user_view SET name = 'damaged', department = 'Nowhere' WHERE user_id % 100 = 1;
         DELETE FROM department_stats;
         INSERT INTO department_stats (department, user_count, active_users, inactive_users)
         SELECT department, count(*), count(*) FILTER (WHERE status = 'ACTIVE'),
                count(*) FILTER (WHERE status <> 'ACTIVE')
         FROM user_view GROUP BY department;",
    )
    .await
    .unwrap();
    let damaged_rows: i64 = view
        .query_one("SELECT count(*) FROM user_view", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(damaged_rows, 19_800);

    // A privilege someone granted on the view goes with it.
    view.batch_execute("GRANT SELECT ON user_view TO PUBLIC")
        .await
        .unwrap();

    // Readers throughout: every answer is the old view or the rebuilt one, never a partial one.
    let api = PostApi::start(&p.view_db.url).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let url = api.url("/api/posts/stats/departments");
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut totals = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let body: Value = r.json().await.unwrap();
                let total: i64 = body
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["userCount"].as_i64().unwrap())
                    .sum();
                totals.push(total);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            totals
        })
    };
    // The source keeps changing during the rebuild (totals unchanged: status flips of rows the
    // damage left alone).
    let writer = {
        let stop = stop.clone();
        let users = p.user_db.client().await.unwrap();
        tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                i += 37;
                if (i % 20_000 + 1) % 100 <= 1 {
                    continue;
                }
                users
                    .execute(
                        "UPDATE users SET status = CASE status WHEN 'ACTIVE' THEN 'INACTIVE' \
                         ELSE 'ACTIVE' END, updated_at = now() WHERE id = $1",
                        &[&(i % 20_000 + 1)],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let (ok, stderr) = replay(&projector.config, &["--earliest", "--rebuild"]).await;
    assert!(ok, "the rebuild failed: {stderr}");
    assert!(stderr.contains("replay done"), "{stderr}");
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let totals = reader.await.unwrap();
    p.converged(WAIT).await.unwrap();

    assert!(totals.len() > 10, "only {} answers", totals.len());
    // The damaged view's 19,800 users until the swap, the rebuilt 20,000 after it.
    let unexpected: Vec<&i64> = totals
        .iter()
        .filter(|t| **t != 19_800 && **t != 20_000)
        .collect();
    assert!(unexpected.is_empty(), "readers saw totals {unexpected:?}");
    assert_eq!(totals.first(), Some(&19_800));
    assert_eq!(totals.last(), Some(&20_000));
    let leftovers: i64 = view
        .query_one(
            "SELECT count(*) FROM pg_namespace \
             WHERE nspname IN ('projector_rebuild', 'projector_retired')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "the rebuild left its schemas behind");
    let acl: String = view
        .query_one(
            "SELECT relacl::text FROM pg_class WHERE oid = 'user_view'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(acl.contains(",=r/"), "the grant to PUBLIC was lost: {acl}");
    // Something else depending on the tables stops a rebuild rather than being dropped with them.
    view.batch_execute("CREATE VIEW reporting AS SELECT user_id FROM user_view")
        .await
        .unwrap();
    let (ok, stderr) = replay(&projector.config, &["--earliest", "--rebuild"]).await;
    assert!(!ok && stderr.contains("depend"), "{stderr}");
    let still: i64 = view
        .query_one("SELECT count(*) FROM reporting", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 20_000);
    // The projector goes on with the new tables.
    users
        .execute(
            "UPDATE users SET name = 'after the rebuild' WHERE id = 5",
            &[],
        )
        .await
        .unwrap();
    p.converged(WAIT).await.unwrap();
    projector.stop().await.unwrap();
    api.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// Damage in each derived view: a count off, a row missing, a row too many, a department's
/// numbers wrong.
const DAMAGE_DERIVED: &str = "
    UPDATE post_stats SET post_count = post_count + 5 WHERE author_id = 3;
    DELETE FROM user_activity WHERE user_id = 6;
    INSERT INTO user_activity (user_id, name, department, status, post_count,
                               last_profile_change_at)
    VALUES (777777, 'ghost', 'Nowhere', 'ACTIVE', 1, now());
    UPDATE department_performance SET user_count = 0, last_post_at = NULL;";

#[tokio::test]
async fn a_repair_and_a_rebuild_restore_damaged_rows_of_the_derived_views() {
    let Projected {
        p,
        projector,
        users,
        view,
    } = Projected::start("replay_derived", 1, 300, 100).await;
    view.batch_execute(
        "INSERT INTO posts (title, content, author_id) \
         SELECT 't', 'c', user_id FROM user_view, generate_series(1, user_id % 4) \
         WHERE user_id % 3 = 0; \
         INSERT INTO posts (title, content, author_id) VALUES ('orphan', 'c', 999999);",
    )
    .await
    .unwrap();
    assert_eq!(derived_differences(&view).await.unwrap(), vec![]);

    view.batch_execute(DAMAGE_DERIVED).await.unwrap();
    let damaged: Vec<String> = derived_differences(&view)
        .await
        .unwrap()
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    assert_eq!(
        damaged,
        ["post_stats", "user_activity", "department_performance"]
    );
    let (ok, stderr) = replay(&projector.config, &["--earliest"]).await;
    assert!(ok, "the repair failed: {stderr}");
    assert_eq!(derived_differences(&view).await.unwrap(), vec![]);

    // A rebuild, while posts keep being written (they wait for the swap, then go on).
    view.batch_execute(DAMAGE_DERIVED).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let posts = p.view_db.client().await.unwrap();
        tokio::spawn(async move {
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let author = i64::try_from(written % 300).unwrap() + 1;
                written += posts
                    .execute(
                        "INSERT INTO posts (title, content, author_id) \
                         SELECT 'during', 'c', $1 \
                         WHERE EXISTS (SELECT 1 FROM user_view WHERE user_id = $1)",
                        &[&author],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written
        })
    };
    let (ok, stderr) = replay(&projector.config, &["--earliest", "--rebuild"]).await;
    assert!(ok, "the rebuild failed: {stderr}");
    stop.store(true, Ordering::Relaxed);
    assert!(writer.await.unwrap() > 0);
    assert_eq!(derived_differences(&view).await.unwrap(), vec![]);

    // The new user_view carries the triggers and the definitions read it: changes from both
    // sides keep the derived views exact.
    users
        .batch_execute(
            "UPDATE users SET department = 'Moved', status = 'INACTIVE' WHERE id IN (3, 6); \
             DELETE FROM users WHERE id = 9;",
        )
        .await
        .unwrap();
    p.converged(WAIT).await.unwrap();
    view.batch_execute(
        "INSERT INTO posts (title, content, author_id) VALUES ('after', 'c', 3); \
         DELETE FROM posts WHERE author_id = 6;",
    )
    .await
    .unwrap();
    assert_eq!(derived_differences(&view).await.unwrap(), vec![]);
    let moved: (i64, i64) = view
        .query_one(
            "SELECT user_count, post_count FROM department_performance WHERE department = 'Moved'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    let expected: i64 = view
        .query_one("SELECT count(*) FROM posts WHERE author_id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(moved, (2, expected));
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

#[tokio::test]
async fn a_replay_from_an_lsn_repairs_rows_changed_after_it_and_no_others() {
    let Projected {
        p,
        projector,
        users,
        view,
    } = Projected::start("replay_lsn", 1, 200, 200).await;
    let lsn: String = users
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    users
        .execute(
            "UPDATE users SET name = 'changed ' || id, department = 'Moved' WHERE id <= 20",
            &[],
        )
        .await
        .unwrap();
    p.converged(WAIT).await.unwrap();

    // Damage rows changed after the LSN (1..=10) and rows not changed since (101..=110).
    view.batch_execute(
        "UPDATE user_view SET name = 'damaged', department = 'Nowhere', status = 'INACTIVE' \
         WHERE user_id <= 10 OR user_id BETWEEN 101 AND 110",
    )
    .await
    .unwrap();

    let (ok, stderr) = replay(&projector.config, &["--lsn", &lsn]).await;
    assert!(ok, "the replay failed: {stderr}");
    let names = view_names(&view).await;
    for id in 1..=20 {
        assert_eq!(names[&id], format!("changed {id}"), "user {id}");
    }
    for id in 101..=110 {
        assert_eq!(
            names[&id], "damaged",
            "user {id} changed before the LSN: not replayed"
        );
    }
    // The counts follow the view as it now is.
    let mismatched: i64 = view
        .query_one(
            "SELECT count(*) FROM (SELECT department, count(*) AS u FROM user_view \
             GROUP BY department) v FULL JOIN department_stats s USING (department) \
             WHERE v.u IS DISTINCT FROM s.user_count",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0);
    // The projector got its partitions back.
    users
        .execute("UPDATE users SET name = 'later' WHERE id = 150", &[])
        .await
        .unwrap();
    e2e::wait_for("the projector to apply after the replay", WAIT, || async {
        Ok(view_names(&view)
            .await
            .get(&150)
            .is_some_and(|n| n == "later")
            .then_some(()))
    })
    .await
    .unwrap();
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

#[tokio::test]
async fn replays_from_offsets_and_from_a_timestamp_re_apply_what_came_from_there() {
    let Projected {
        p,
        projector,
        users,
        view,
    } = Projected::start("replay_offset", 1, 300, 300).await;
    let before_update = end_offsets(&p.stack.kafka_brokers, &p.topic);
    // Every insert's record was produced before this (the views have them all).
    let after_insert = chrono::Utc::now();
    users
        .execute("UPDATE users SET name = 'second ' || id", &[])
        .await
        .unwrap();
    p.converged(WAIT).await.unwrap();
    let damage = "UPDATE user_view SET name = 'damaged'";

    // From the offsets where the updates begin: every row is back.
    view.batch_execute(damage).await.unwrap();
    let offsets: Vec<String> = before_update
        .iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect();
    let (ok, stderr) = replay(&projector.config, &["--offset", &offsets.join(",")]).await;
    assert!(ok, "the replay failed: {stderr}");
    p.converged(WAIT).await.unwrap();

    // From a time after the inserts: the same.
    view.batch_execute(damage).await.unwrap();
    let (ok, stderr) = replay(
        &projector.config,
        &["--timestamp", &after_insert.to_rfc3339()],
    )
    .await;
    assert!(ok, "the replay failed: {stderr}");
    p.converged(WAIT).await.unwrap();

    // From where the projector stands (the topic's end): nothing to re-apply, the damage stays.
    view.batch_execute(damage).await.unwrap();
    let offsets: Vec<String> = view
        .query(
            "SELECT partition || ':' || next_offset FROM projector_offsets WHERE topic = $1",
            &[&p.topic],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (ok, stderr) = replay(&projector.config, &["--offset", &offsets.join(",")]).await;
    assert!(ok, "the replay failed: {stderr}");
    assert!(view_names(&view).await.values().all(|n| n == "damaged"));

    // Bad requests are refused with a reason.
    let (ok, stderr) = replay(&projector.config, &["--offset", "99:0"]).await;
    assert!(
        !ok && stderr.contains("partition 99 does not exist"),
        "{stderr}"
    );
    let (ok, stderr) = replay(&projector.config, &["--offset", "0:999999999"]).await;
    assert!(
        !ok && stderr.contains("outside what the topic holds"),
        "{stderr}"
    );
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// Runs `scripts/kafka-replay.sh ARGS` with the workspace's binaries; (success, stdout, stderr).
async fn kafka_replay(view_db_url: &str, args: &[&str]) -> (bool, String, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = e2e::workspace_binary("projector").unwrap();
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(root.join("scripts/kafka-replay.sh"))
        .args(args)
        .env("CDC_BIN_DIR", bin.parent().unwrap())
        .env("VIEW_DB_URL", view_db_url);
    run(command).await
}

/// Runs `cdc-reader ARGS` against `config`'s database and slot; (success, stdout, stderr).
async fn reader_command(config: &cdc_reader::Config, args: &[&str]) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(e2e::workspace_binary("cdc-reader").unwrap());
    command
        .args(args)
        .args(["--wait-secs", "150"])
        .env("CDC_READER_DATABASE_URL", &config.database_url)
        .env("CDC_READER_SLOT", &config.slot);
    run(command).await
}

/// Runs `command` (no stdin, logs at warn unless RUST_LOG says otherwise) for at most three
/// minutes; (success, stdout, stderr). A command still running then fails the test with what it
/// printed so far.
async fn run(mut command: tokio::process::Command) -> (bool, String, String) {
    let what = format!("{command:?}");
    let base = std::env::temp_dir().join(format!("replay-test-{}", e2e::unique_suffix()));
    let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
    let mut child = command
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(180), child.wait()).await;
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    std::fs::remove_file(&err_path).unwrap();
    let status = status.unwrap_or_else(|_| panic!("{what} still running after 3 min: {stderr}"));
    (status.unwrap().success(), stdout, stderr)
}

#[tokio::test]
async fn kafka_replay_sh_prints_the_topic_and_replays_a_group() {
    let Projected {
        p,
        projector,
        users,
        view,
    } = Projected::start("replay_script", 1, 50, 50).await;
    let brokers = p.stack.kafka_brokers.as_str();
    let topic = p.topic.as_str();
    // One change after the 50 inserts, at offset 50: the repair below starts there.
    users
        .execute("UPDATE users SET name = 'renamed' WHERE id = 1", &[])
        .await
        .unwrap();
    e2e::wait_for("the update in the topic", WAIT, || async {
        Ok((end_offsets(brokers, topic)[&0] > 50).then_some(()))
    })
    .await
    .unwrap();
    p.converged(WAIT).await.unwrap();

    // Print mode: partition:offset, key and value of each record, then exit.
    let (ok, stdout, stderr) = kafka_replay(
        &p.view_db.url,
        &["-t", topic, "-s", brokers, "-o", "earliest"],
    )
    .await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 50, "{} lines: {stdout}", lines.len());
    for (i, line) in lines.iter().take(50).enumerate() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields[0], format!("0:{i}"), "{line}");
        let key: Value = serde_json::from_str(fields[1]).unwrap();
        let value: Value = serde_json::from_str(fields[2]).unwrap();
        assert_eq!(key["id"], value["after"]["id"], "{line}");
        assert_eq!(value["op"], "c", "{line}");
    }

    // -r without -y and without a terminal to ask on: refused, nothing done.
    view.batch_execute("UPDATE user_view SET name = 'damaged'")
        .await
        .unwrap();
    let group = projector.config.group.as_str();
    let (ok, _, stderr) = kafka_replay(
        &p.view_db.url,
        &["-t", topic, "-s", brokers, "-o", "earliest", "-r", group],
    )
    .await;
    assert!(!ok && stderr.contains("pass --yes"), "{stderr}");
    assert!(view_names(&view).await.values().all(|n| n == "damaged"));

    // -r from earliest: a rebuild.
    let (ok, _, stderr) = kafka_replay(
        &p.view_db.url,
        &[
            "-t", topic, "-s", brokers, "-o", "earliest", "-r", group, "-y",
        ],
    )
    .await;
    assert!(ok && stderr.contains("Rebuild the views"), "{stderr}");
    p.converged(WAIT).await.unwrap();

    // -r from an offset of one partition: a repair from there.
    view.batch_execute("UPDATE user_view SET name = 'damaged' WHERE user_id = 1")
        .await
        .unwrap();
    let (ok, _, stderr) = kafka_replay(
        &p.view_db.url,
        &[
            "-t", topic, "-s", brokers, "-o", "50", "-p", "0", "-r", group, "-y",
        ],
    )
    .await;
    assert!(ok && stderr.contains("Re-apply"), "{stderr}");
    p.converged(WAIT).await.unwrap();
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// An LSN in PostgreSQL's text form (`16/B374D848`) as a number.
fn lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some(u64::from_str_radix(high, 16).ok()? << 32 | u64::from_str_radix(low, 16).ok()?)
}

async fn current_lsn(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// The slot's confirmed position, once it is past `lsn`.
async fn confirmed_past(db: &tokio_postgres::Client, slot: &str, lsn: &str) -> String {
    e2e::wait_for("the slot to confirm past the writes", WAIT, || async {
        let row = db
            .query_one(
                "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn > $2::text::pg_lsn \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &lsn],
            )
            .await?;
        Ok(row.get::<_, bool>(1).then(|| row.get::<_, String>(0)))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_reader_refuses_to_replay_wal_its_slot_no_longer_has() {
    let p = Pipeline::start("replay_refused").await.unwrap();
    let users = p.user_db.client().await.unwrap();
    let before = current_lsn(&users).await;
    insert_bench_users(&users, 10, 10).await.unwrap();
    read_exactly(&p.stack, &p.topic, 10, WAIT).await.unwrap();
    let oldest = confirmed_past(&users, &p.reader.config.slot, &before).await;

    let (ok, _, stderr) =
        reader_command(&p.reader.config, &["replay", "--from-lsn", &before]).await;
    assert!(!ok, "{stderr}");
    // The slot's position as the command saw it: at least what it was a moment before (an idle
    // slot moves on with the WAL other databases of the cluster write).
    let named = stderr
        .split("can decode only from ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(lsn);
    let oldest = lsn(&oldest).unwrap();
    assert!(
        named.is_some_and(|named| named >= oldest),
        "no position at or after {oldest} named in: {stderr}"
    );
    for part in [
        format!("cannot replay from {before}"),
        format!("projector replay --lsn {before}"),
        "cdc-reader snapshot".to_owned(),
        "--wal-replay-window-bytes".to_owned(),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in: {stderr}");
    }
    let asked: i64 = users
        .query_one("SELECT count(*) FROM cdc_reader_replays", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(asked, 0, "a refused replay is not asked of the reader");
    read_exactly(&p.stack, &p.topic, 10, WAIT).await.unwrap();
    p.reader.stop().await.unwrap();
}

/// A reader of `users` into a fresh topic, streaming, with a 64 MiB WAL replay window.
async fn streaming_with_a_window(
    name: &str,
) -> (Stack, TestDb, String, cdc_reader::Config, Reader) {
    let stack = Stack::from_env();
    let user_db = TestDb::create(&stack, name, Some(schema::Database::UserDb))
        .await
        .unwrap();
    let topic = format!("t-users-{}", e2e::unique_suffix());
    let mut config = Reader::config(
        &stack,
        &user_db,
        &["public.users"],
        &[format!("public.users={topic}")],
    );
    config.wal_replay_window_bytes = 64 << 20;
    let reader = Reader::start(config.clone()).await.unwrap();
    reader.wait_streaming().await.unwrap();
    (stack, user_db, topic, config, reader)
}

#[tokio::test]
async fn the_reader_replays_inside_its_window_publishing_those_changes_again() {
    let (stack, user_db, topic, config, reader) = streaming_with_a_window("replay_window").await;
    let users = user_db.client().await.unwrap();
    let before = current_lsn(&users).await;
    insert_bench_users(&users, 100, 10).await.unwrap();
    read_exactly(&stack, &topic, 100, WAIT).await.unwrap();
    // The slot stays behind what Kafka has.
    let confirmed_behind: bool = users
        .query_one(
            "SELECT confirmed_flush_lsn <= $2::text::pg_lsn FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&config.slot, &before],
        )
        .await
        .unwrap()
        .get(0);
    assert!(confirmed_behind);

    let (ok, _, stderr) = reader_command(&config, &["replay", "--from-lsn", &before]).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("100 records sent again"), "{stderr}");
    // The same 100 changes once more, in the same order, after the first ones.
    let records = read_exactly(&stack, &topic, 200, WAIT).await.unwrap();
    let change = |r: &e2e::Received| (r.key.clone(), r.value.as_ref().map(|v| v["after"].clone()));
    let first: Vec<_> = records[..100].iter().map(change).collect();
    let again: Vec<_> = records[100..].iter().map(change).collect();
    assert_eq!(first, again);
    // Streaming goes on after the replay.
    users
        .execute(
            "INSERT INTO users (name, email, department) VALUES ('after', 'after@example.org', 'Ops')",
            &[],
        )
        .await
        .unwrap();
    read_exactly(&stack, &topic, 201, WAIT).await.unwrap();
    reader.stop().await.unwrap();
}

/// A second reader waiting for the slot (a rolling deploy) must leave requests to the one that
/// streams: one it took could not run until it held the slot. Three replays in a row, each run
/// by the streaming reader.
#[tokio::test]
async fn a_reader_waiting_for_the_slot_leaves_replays_to_the_one_streaming() {
    let (stack, user_db, topic, config, reader) = streaming_with_a_window("replay_standby").await;
    let standby = Reader::start(config.clone()).await.unwrap();
    let users = user_db.client().await.unwrap();
    let before = current_lsn(&users).await;
    insert_bench_users(&users, 100, 10).await.unwrap();
    read_exactly(&stack, &topic, 100, WAIT).await.unwrap();
    for round in 1..=3 {
        let (ok, _, stderr) = reader_command(&config, &["replay", "--from-lsn", &before]).await;
        assert!(ok, "replay {round}: {stderr}");
        assert!(
            stderr.contains("100 records sent again"),
            "replay {round}: {stderr}"
        );
        read_exactly(&stack, &topic, 100 * (round + 1), WAIT)
            .await
            .unwrap();
    }
    standby.stop().await.unwrap();
    reader.stop().await.unwrap();
}

/// A reader stopped after it took a replay request, before it finished it: the reader waiting for
/// the slot takes over and runs the replay again, and the request is closed (it stayed started and
/// never done before). The same holds for a new process, and for a standby that wins the slot while
/// the streaming reader rewinds.
#[tokio::test]
async fn a_replay_the_reader_did_not_finish_is_run_by_the_next_reader() {
    let (stack, user_db, topic, config, reader) =
        streaming_with_a_window("replay_unfinished").await;
    let standby = Reader::start(config.clone()).await.unwrap();
    let users = user_db.client().await.unwrap();
    let before = current_lsn(&users).await;
    insert_bench_users(&users, 2_000, 100).await.unwrap();
    read_exactly(&stack, &topic, 2_000, WAIT).await.unwrap();
    let command = tokio::spawn({
        let config = config.clone();
        async move { reader_command(&config, &["replay", "--from-lsn", &before]).await }
    });
    e2e::wait_for("the reader to take the replay request", WAIT, || async {
        let started: Option<bool> = users
            .query_opt(
                "SELECT started_at IS NOT NULL FROM cdc_reader_replays WHERE slot = $1",
                &[&config.slot],
            )
            .await?
            .map(|r| r.get(0));
        Ok(started.filter(|s| *s))
    })
    .await
    .unwrap();
    let requested_at: String = users
        .query_one(
            "SELECT requested_at::text FROM cdc_reader_replays WHERE slot = $1",
            &[&config.slot],
        )
        .await
        .unwrap()
        .get(0);
    reader.stop().await.unwrap();
    let (ok, _, stderr) = command.await.unwrap();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("2000 records sent again"), "{stderr}");
    // Every row at least twice (the stopped reader may have sent part of it already).
    let records = e2e::read_topic(&stack, &topic, 1, WAIT).await.unwrap();
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &records {
        *seen
            .entry(r.value.as_ref().unwrap()["after"]["id"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 2_000);
    assert!(seen.values().all(|n| *n >= 2), "a row not sent again");
    // The same request, closed once.
    let row = users
        .query_one(
            "SELECT requested_at::text, outcome FROM cdc_reader_replays WHERE slot = $1",
            &[&config.slot],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), requested_at);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("done"));
    standby.stop().await.unwrap();
}

#[tokio::test]
async fn an_on_demand_snapshot_while_streaming_gives_every_row_and_keeps_the_views_exact() {
    e2e::init_logs();
    let Projected {
        p,
        projector,
        users,
        view,
    } = Projected::start("resnapshot", 1, 6_000, 1_000).await;
    // Where the snapshot's records will start, at the latest.
    let start: BTreeMap<i32, i64> = view
        .query(
            "SELECT partition, next_offset FROM projector_offsets WHERE topic = $1",
            &[&p.topic],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    // Changes all over the key range while the snapshot reads it.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let users = p.user_db.client().await.unwrap();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                e2e::random_workload(&users, 5, 10).await.unwrap();
            }
        })
    };
    let (ok, _, stderr) =
        reader_command(&p.reader.config, &["snapshot", "--table", "public.users"]).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("rows published"), "{stderr}");
    if let Err(e) = p.converged(WAIT).await {
        // (Seen twice, not reproduced since: what the topic holds of the rows that differ.)
        explain_differences(&p, &view, &projector).await;
        panic!("{e}");
    }
    assert_eq!(
        p.reader
            .metric("cdc_reader_reconnects_total")
            .await
            .unwrap(),
        0.0
    );

    let records = e2e::read_topic(&p.stack, &p.topic, 1, WAIT).await.unwrap();
    // Every partition stays in position order (consumers rely on per-key order).
    assert_positions_in_order(&records);
    let incremental = records
        .iter()
        .filter(|r| {
            r.value
                .as_ref()
                .is_some_and(|v| v["source"]["snapshot"] == "incremental")
        })
        .count();
    assert!(incremental > 4_000, "only {incremental} snapshot records");

    // A consumer starting where the snapshot began gets the whole table.
    assert_topic_from_gives_the_table(&records, &start, &users).await;

    // A table the reader does not capture is refused.
    let (ok, _, stderr) =
        reader_command(&p.reader.config, &["snapshot", "--table", "public.nope"]).await;
    assert!(!ok && stderr.contains("not captured"), "{stderr}");
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

/// Folds `records` from the `start` offsets by position, as the projector does, and compares the
/// result with `users`: a consumer starting there must get the whole table.
async fn assert_topic_from_gives_the_table(
    records: &[e2e::Received],
    start: &BTreeMap<i32, i64>,
    users: &tokio_postgres::Client,
) {
    let mut state: BTreeMap<i64, ((u64, u64), Option<Value>)> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.offset >= start.get(&r.partition).copied().unwrap_or(0))
    {
        let Some(v) = &r.value else { continue };
        let at = (
            v["source"]["commit_lsn"].as_u64().unwrap(),
            v["source"]["event_index"].as_u64().unwrap(),
        );
        let id = r.key.as_ref().unwrap()["id"].as_i64().unwrap();
        if state.get(&id).is_some_and(|(p, _)| *p >= at) {
            continue;
        }
        let row = (v["op"] != "d").then(|| v["after"].clone());
        state.insert(id, (at, row));
    }
    let folded: BTreeMap<i64, String> = state
        .into_iter()
        .filter_map(|(id, (_, row))| Some((id, row?["name"].as_str()?.to_owned())))
        .collect();
    let source: BTreeMap<i64, String> = users
        .query("SELECT id, name FROM users", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let missing: Vec<&i64> = source
        .keys()
        .filter(|id| !folded.contains_key(id))
        .collect();
    let extra: Vec<&i64> = folded
        .keys()
        .filter(|id| !source.contains_key(id))
        .collect();
    let changed: Vec<&i64> = source
        .iter()
        .filter(|(id, name)| folded.get(id).is_some_and(|n| n != *name))
        .map(|(id, _)| id)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && changed.is_empty(),
        "the topic from the snapshot on differs from the table: {} missing ({:?}...), {} extra \
         ({:?}...), {} different ({:?}...); {} records, start {start:?}",
        missing.len(),
        &missing[..missing.len().min(20)],
        extra.len(),
        &extra[..extra.len().min(20)],
        changed.len(),
        &changed[..changed.len().min(20)],
        records.len(),
    );
}

/// The records of each partition are in position order (consumers rely on per-key order).
fn assert_positions_in_order(records: &[e2e::Received]) {
    let mut last: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
    for r in records {
        let Some(v) = &r.value else { continue };
        let at = (
            v["source"]["commit_lsn"].as_u64().unwrap(),
            v["source"]["event_index"].as_u64().unwrap(),
        );
        if let Some(before) = last.insert(r.partition, at) {
            assert!(
                before <= at,
                "partition {} went from {before:?} to {at:?}",
                r.partition
            );
        }
    }
}

/// Prints the projector's health and the users whose row in user_view is not their row in users,
/// with every record of them in the topic: whether the reader published a change, or the projector
/// did not apply it (stuck, or ignored it).
async fn explain_differences(p: &Pipeline, view: &tokio_postgres::Client, projector: &Projector) {
    let health = reqwest::get(format!("{}/health", projector.http_url)).await;
    match health {
        Ok(r) => eprintln!("projector /health: {}", r.text().await.unwrap_or_default()),
        Err(e) => eprintln!("projector /health: {e}"),
    }
    let users = p.user_db.client().await.unwrap();
    let mut differ = Vec::new();
    for row in users
        .query("SELECT id, name, department FROM users", &[])
        .await
        .unwrap()
    {
        let (id, name, department): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
        let in_view = view
            .query_opt(
                "SELECT name, department, source_lsn::text, source_seq FROM user_view \
                 WHERE user_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .map(|v| {
                let at = (v.get::<_, String>(2), v.get::<_, i64>(3));
                (v.get::<_, String>(0), v.get::<_, String>(1), at)
            });
        if in_view
            .as_ref()
            .is_none_or(|(n, d, _)| (n, d) != (&name, &department))
        {
            eprintln!("user {id}: users ({name:?}, {department:?}), user_view {in_view:?}");
            differ.push(id);
        }
    }
    for r in e2e::read_topic(&p.stack, &p.topic, 1, WAIT).await.unwrap() {
        let id = r.key.as_ref().and_then(|k| k["id"].as_i64());
        if id.is_some_and(|id| differ.contains(&id)) {
            let v = r.value.unwrap_or_default();
            eprintln!(
                "  user {id:?} at {}:{} op {} snapshot {} lsn {} index {} name {} department {}",
                r.partition,
                r.offset,
                v["op"],
                v["source"]["snapshot"],
                v["source"]["commit_lsn"],
                v["source"]["event_index"],
                v["after"]["name"],
                v["after"]["department"]
            );
        }
    }
}

/// The projector's stored offsets of `topic`: where the topic ends, as far as it applied.
async fn stored_offsets(view: &tokio_postgres::Client, topic: &str) -> BTreeMap<i32, i64> {
    view.query(
        "SELECT partition, next_offset FROM projector_offsets WHERE topic = $1",
        &[&topic],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test]
async fn an_on_demand_snapshot_survives_a_reader_handover() {
    let Projected {
        mut p,
        projector,
        users,
        view,
    } = Projected::start("resnapshot_restart", 1, 50_000, 10_000).await;
    let start = stored_offsets(&view, &p.topic).await;

    let config = p.reader.config.clone();
    let command = tokio::spawn(async move { reader_command(&config, &["snapshot"]).await });
    e2e::wait_for("the reader to take the snapshot", WAIT, || async {
        let started: Option<bool> = users
            .query_opt(
                "SELECT started_at IS NOT NULL FROM cdc_reader_snapshot_requests",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        Ok(started.unwrap_or(false).then_some(()))
    })
    .await
    .unwrap();
    // Let the first reader publish a chunk or more.
    e2e::wait_for("the first snapshot chunk in the topic", WAIT, || async {
        let end = end_offsets(&p.stack.kafka_brokers, &p.topic);
        Ok((end[&0] > start[&0] + 2_048).then_some(()))
    })
    .await
    .unwrap();
    // A second reader waits for the slot; the first stops mid-snapshot; the second takes the
    // request again, while the WAL it re-reads holds the first run's watermarks.
    let next = Reader::start(p.reader.config.clone()).await.unwrap();
    let first = std::mem::replace(&mut p.reader, next);
    let stopped_at: chrono::DateTime<chrono::Utc> =
        users.query_one("SELECT now()", &[]).await.unwrap().get(0);
    first.stop().await.unwrap();
    p.reader.wait_streaming().await.unwrap();
    users
        .execute("UPDATE users SET name = 'during' WHERE id % 1000 = 7", &[])
        .await
        .unwrap();
    let (ok, _, stderr) = command.await.unwrap();
    assert!(ok, "{stderr}");
    let retaken: bool = users
        .query_one(
            "SELECT started_at > $1 FROM cdc_reader_snapshot_requests",
            &[&stopped_at],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        retaken,
        "the first reader finished the snapshot before it stopped: nothing tested"
    );
    p.converged(WAIT).await.unwrap();
    let records = e2e::read_topic(&p.stack, &p.topic, 1, WAIT).await.unwrap();
    assert_positions_in_order(&records);
    assert_topic_from_gives_the_table(&records, &start, &users).await;
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}

#[tokio::test]
async fn replays_cover_every_partition_of_a_partitioned_topic() {
    let Projected {
        p,
        projector,
        users,
        view,
    } = Projected::start("replay_parts", 3, 3_000, 500).await;
    e2e::random_workload(&users, 50, 20).await.unwrap();
    p.converged(WAIT).await.unwrap();
    let offsets = stored_offsets(&view, &p.topic).await;
    assert_eq!(offsets.len(), 3, "{offsets:?}");
    assert!(offsets.values().all(|o| *o > 0), "{offsets:?}");
    let damage = "DELETE FROM user_view WHERE user_id % 7 = 0; \
                  UPDATE user_view SET name = 'damaged' WHERE user_id % 7 = 1";

    // A rebuild from earliest restores every partition's rows.
    view.batch_execute(damage).await.unwrap();
    let (ok, stderr) = replay(&projector.config, &["--earliest", "--rebuild"]).await;
    assert!(ok, "{stderr}");
    p.converged(WAIT).await.unwrap();

    // A rebuild from some partitions only would lose the others' rows: refused, nothing done.
    view.batch_execute(damage).await.unwrap();
    let (ok, stderr) = replay(&projector.config, &["--offset", "0:0,1:0", "--rebuild"]).await;
    assert!(!ok && stderr.contains("reads every partition"), "{stderr}");
    // A repair from the start of every partition mends the same damage in place.
    let (ok, stderr) = replay(&projector.config, &["--offset", "0"]).await;
    assert!(ok, "{stderr}");
    p.converged(WAIT).await.unwrap();
    projector.stop().await.unwrap();
    p.reader.stop().await.unwrap();
}
