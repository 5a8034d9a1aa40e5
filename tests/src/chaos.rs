//! The chaos run: a mixed workload against user_db while the reader and the projector (the real
//! binaries, as child processes) are killed with SIGKILL at random moments, and, in the long
//! mode, PostgreSQL and the broker are restarted; then the run waits for convergence and checks
//! every guarantee. `scripts/chaos` runs it on a stack of its own; `scripts/test` runs the short
//! mode through `tests/tests/disruptive.rs`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::{read_topic, unique_suffix, workspace_binary, Control, Kafka, Pipeline, Stack, TestDb};

/// What to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Row changes to commit (at least).
    pub changes: u64,
    /// SIGKILLs of the reader or the projector, spread over the workload.
    pub kills: u32,
    /// Also restart PostgreSQL (immediate), through `control`.
    pub restarts: Option<Control>,
    /// With `restarts`, broker faults too: on the one-node Kafka a SIGKILL and a restart; on the
    /// three-node cluster (which the pipeline then runs on), in turn, the node coordinating the
    /// reader's transactions killed with SIGKILL for 15 s and a partition leader paused with
    /// SIGSTOP for 70 s.
    pub broker_faults: Option<Kafka>,
    /// Quiet time at the end before the retained WAL is measured.
    pub idle: Duration,
}

/// What happened, and what was found.
#[derive(Debug, Default)]
pub struct Summary {
    pub changes: u64,
    pub transactions: u64,
    pub reader_kills: u32,
    pub projector_kills: u32,
    pub postgres_restarts: u32,
    pub broker_kills: u32,
    pub broker_pauses: u32,
    pub records: usize,
    pub duplicates: usize,
    pub lost: i64,
    pub view_mismatch: Option<String>,
    pub converge_s: f64,
    pub workload_s: f64,
    pub confirmed_lag_bytes: i64,
    pub retained_wal_bytes: i64,
    pub violations: Vec<String>,
}

impl Summary {
    pub fn json(&self) -> Value {
        json!({
            "changes": self.changes, "transactions": self.transactions,
            "reader_kills": self.reader_kills, "projector_kills": self.projector_kills,
            "postgres_restarts": self.postgres_restarts, "broker_kills": self.broker_kills,
            "broker_pauses": self.broker_pauses,
            "records": self.records, "duplicates": self.duplicates, "lost": self.lost,
            "views_equal": self.view_mismatch.is_none(),
            "workload_s": (self.workload_s * 10.0).round() / 10.0,
            "converge_s": (self.converge_s * 10.0).round() / 10.0,
            "confirmed_lag_bytes": self.confirmed_lag_bytes,
            "retained_wal_bytes": self.retained_wal_bytes,
            "violations": self.violations,
        })
    }
}

/// A service binary as a child process.
struct Child {
    name: &'static str,
    env: Vec<(&'static str, String)>,
    process: Option<tokio::process::Child>,
}

impl Child {
    fn new(name: &'static str, env: Vec<(&'static str, String)>) -> Child {
        Child {
            name,
            env,
            process: None,
        }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let mut command = tokio::process::Command::new(workspace_binary(self.name)?);
        command
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .kill_on_drop(true);
        self.process = Some(
            command
                .spawn()
                .with_context(|| format!("starting {}", self.name))?,
        );
        Ok(())
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.process.take() {
            p.start_kill()?;
            p.wait().await?;
        }
        Ok(())
    }
}

/// Runs the workload with kills and restarts, waits for convergence and checks everything.
pub async fn run(stack: Stack, options: &Options) -> anyhow::Result<Summary> {
    let p = Pipeline::start_on(stack.clone(), "chaos").await?;
    // The in-process reader of the pipeline made the slot, publication and topic; the binaries
    // take over from here.
    let reader_config = p.reader.config.clone();
    let Pipeline {
        stack,
        user_db,
        view_db,
        topic,
        reader,
    } = p;
    reader.stop().await?;
    let mut reader = Child::new(
        "cdc-reader",
        vec![
            ("CDC_READER_DATABASE_URL", user_db.url.clone()),
            ("CDC_READER_SLOT", reader_config.slot.clone()),
            ("CDC_READER_PUBLICATION", reader_config.publication.clone()),
            ("CDC_READER_TOPICS", format!("public.users={topic}")),
            ("CDC_READER_HTTP_LISTEN", "127.0.0.1:0".into()),
            ("KAFKA_BROKERS", stack.kafka_brokers.clone()),
        ],
    );
    let mut projector = Child::new(
        "projector",
        vec![
            ("VIEW_DB_URL", view_db.url.clone()),
            ("KAFKA_BROKERS", stack.kafka_brokers.clone()),
            ("PROJECTOR_TOPIC", topic.clone()),
            ("PROJECTOR_GROUP", format!("chaos-{}", unique_suffix())),
            ("PROJECTOR_HTTP_LISTEN", "127.0.0.1:0".into()),
        ],
    );
    reader.start()?;
    projector.start()?;

    let mut summary = Summary::default();
    let started = Instant::now();
    let stop = CancellationToken::new();
    let workload = tokio::spawn(workload(user_db.url.clone(), options.changes, stop.clone()));

    // Kills (and restarts) at random moments while the workload runs.
    let mut rng_seed = rand::rng().random::<u64>();
    let mut kills = 0;
    // The workload goes on (past `changes` if need be) until the last kill.
    while kills < options.kills {
        rng_seed = rng_seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let pause = 200 + rng_seed % 1500;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if rng_seed % 2 == 0 {
            reader.kill().await?;
            reader.start()?;
            summary.reader_kills += 1;
        } else {
            projector.kill().await?;
            projector.start()?;
            summary.projector_kills += 1;
        }
        kills += 1;
        if let Some(control) = &options.restarts {
            // Of every six kills, the third is followed by a PostgreSQL restart and the sixth by
            // a broker crash.
            if kills % 6 == 3 {
                control.control(&["pg-restart", "immediate"]).await?;
                summary.postgres_restarts += 1;
            } else if kills % 6 == 0 {
                match options.broker_faults {
                    Some(Kafka::Single) => {
                        control.kafka(Kafka::Single, "kill", 1).await?;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        control.kafka(Kafka::Single, "start", 1).await?;
                        summary.broker_kills += 1;
                    }
                    Some(Kafka::Cluster) if summary.broker_kills <= summary.broker_pauses => {
                        let id = format!("cdc-reader.cdc.{}", reader_config.slot);
                        let node =
                            crate::transaction_coordinator(&stack.kafka_brokers, &id).await?;
                        control.kafka(Kafka::Cluster, "kill", node).await?;
                        tokio::time::sleep(Duration::from_secs(15)).await;
                        control.kafka(Kafka::Cluster, "start", node).await?;
                        summary.broker_kills += 1;
                    }
                    Some(Kafka::Cluster) => {
                        let node = crate::partition_leader(&stack.kafka_brokers, &topic, 0)?;
                        control.kafka(Kafka::Cluster, "pause", node).await?;
                        tokio::time::sleep(Duration::from_secs(70)).await;
                        control.kafka(Kafka::Cluster, "resume", node).await?;
                        summary.broker_pauses += 1;
                    }
                    None => {}
                }
            }
        }
    }
    stop.cancel();
    let (_, transactions) = workload.await??;
    summary.transactions = transactions;
    summary.workload_s = started.elapsed().as_secs_f64();

    // Convergence: the slot confirms the end of the workload and the views equal the source.
    let converging = Instant::now();
    let users = connect_retrying(&user_db).await?;
    let committed: i64 = users
        .query_one(
            "SELECT coalesce(sum(changes), 0)::bigint FROM chaos_commits",
            &[],
        )
        .await?
        .get(0);
    summary.changes = u64::try_from(committed).unwrap_or(0);
    let end: String = users
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    crate::wait_for(
        "the slot to confirm the workload",
        Duration::from_secs(600),
        || async {
            let row = users
                .query_opt(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
                    &[&reader_config.slot, &end],
                )
                .await?;
            Ok(row
                .and_then(|r| r.get::<_, Option<bool>>(0))
                .filter(|c| *c)
                .map(|_| ()))
        },
    )
    .await?;
    let views = connect_retrying(&view_db).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match crate::views_differ(&users, &views).await? {
            None => {
                summary.view_mismatch = None;
                break;
            }
            Some(d) if Instant::now() > deadline => {
                summary.view_mismatch = Some(d);
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    summary.converge_s = converging.elapsed().as_secs_f64();

    // Every change in the topic exactly once.
    let records = read_topic(&stack, &topic, 0, Duration::from_secs(120)).await?;
    summary.records = records.len();
    let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
    let mut state: BTreeMap<i64, Value> = BTreeMap::new();
    let mut sorted: Vec<_> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in &sorted {
        let Some(v) = &r.value else { continue };
        let position = (
            v["source"]["commit_lsn"].as_u64().unwrap_or(0),
            v["source"]["event_index"].as_u64().unwrap_or(0),
        );
        *seen.entry(position).or_default() += 1;
        let id = r
            .key
            .as_ref()
            .and_then(|k| k["id"].as_i64())
            .context("a record without an id key")?;
        match v["op"].as_str() {
            Some("d") => {
                state.remove(&id);
            }
            _ => {
                state.insert(id, v["after"]["name"].clone());
            }
        }
    }
    summary.duplicates = seen.values().map(|n| n - 1).sum();
    let distinct = seen.len() as i64;
    summary.lost = i64::try_from(summary.changes).unwrap_or(i64::MAX) - distinct;
    let table: BTreeMap<i64, Value> = users
        .query("SELECT id, name FROM users", &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, i64>(0), json!(r.get::<_, &str>(1))))
        .collect();
    if state != table {
        summary.violations.push(format!(
            "replaying the topic gives {} rows, the table has {}",
            state.len(),
            table.len()
        ));
    }

    // Idle: the slot keeps up with the WAL and does not hold on to it.
    tokio::time::sleep(options.idle).await;
    // Writes to a table outside the publication move the WAL on; an idle reader confirms past
    // them (from a keepalive) within a few status intervals. Measured then, or after 30 s.
    users
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS chaos_other (n int); INSERT INTO chaos_other VALUES (1);",
        )
        .await?;
    let written: String = users
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let passed = crate::wait_for(
        "the slot to pass the write elsewhere",
        Duration::from_secs(30),
        || {
            let users = &users;
            let (slot, written) = (&reader_config.slot, &written);
            async move {
                let row = users
                    .query_one(
                        "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                     WHERE slot_name = $1",
                        &[slot, written],
                    )
                    .await?;
                Ok(row.get::<_, Option<bool>>(0).unwrap_or(false).then_some(()))
            }
        },
    )
    .await;
    if let Err(e) = passed {
        // The lag check below reports it.
        eprintln!("{e:#}");
    }
    let row = users
        .query_one(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, \
                    (pg_current_wal_lsn() - restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&reader_config.slot],
        )
        .await?;
    summary.confirmed_lag_bytes = row.get::<_, Option<i64>>(0).unwrap_or(-1);
    summary.retained_wal_bytes = row.get::<_, Option<i64>>(1).unwrap_or(-1);

    if summary.duplicates > 0 {
        summary.violations.push(format!(
            "{} change records in the topic more than once",
            summary.duplicates
        ));
    }
    if summary.lost != 0 {
        summary.violations.push(format!(
            "{} changes committed, {distinct} distinct change records in the topic",
            summary.changes
        ));
    }
    if let Some(d) = &summary.view_mismatch {
        summary
            .violations
            .push(format!("views differ from the source: {d}"));
    }
    if !(0..1024 * 1024).contains(&summary.confirmed_lag_bytes) {
        summary.violations.push(format!(
            "the slot's confirmed position is {} bytes behind the WAL after the idle time",
            summary.confirmed_lag_bytes
        ));
    }
    reader.kill().await?;
    projector.kill().await?;
    Ok(summary)
}

async fn connect_retrying(db: &TestDb) -> anyhow::Result<tokio_postgres::Client> {
    crate::wait_for(
        "PostgreSQL to accept connections",
        Duration::from_secs(60),
        || async { Ok(db.client().await.ok()) },
    )
    .await
}

/// Commits at least `changes` row changes, and goes on until `stop`; returns (changes,
/// transactions): inserts, updates and deletes in transactions of 1 to 5,000 rows, and a few hot
/// keys updated over and over.
async fn workload(
    url: String,
    changes: u64,
    stop: CancellationToken,
) -> anyhow::Result<(u64, u64)> {
    let mut done = 0_u64;
    let mut transactions = 0_u64;
    crate::connect(&url)
        .await?
        .batch_execute("CREATE TABLE IF NOT EXISTS chaos_commits (changes bigint NOT NULL)")
        .await?;
    let mut client: Option<tokio_postgres::Client> = None;
    let departments = ["Engineering", "Sales", "Ops", "Design", "Legal"];
    while done < changes || !stop.is_cancelled() {
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            client = crate::connect(&url).await.ok();
            if client.is_none() {
                // PostgreSQL restarting.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let Some(db) = client.as_mut() else { continue };
        // The plan of one transaction, made before any await (the generator is not Send).
        let plan: Vec<(u8, i64, &str, bool)> = {
            let mut rng = rand::rng();
            let size = match rng.random_range(0..100) {
                0..=59 => 1,
                60..=89 => rng.random_range(2..50),
                90..=97 => rng.random_range(50..500),
                _ => rng.random_range(500..=5000),
            };
            (0..size)
                .map(|_| {
                    (
                        rng.random_range(0..10),
                        rng.random_range(1..=5),
                        departments[rng.random_range(0..departments.len())],
                        rng.random_bool(0.7),
                    )
                })
                .collect()
        };
        let result: Result<u64, tokio_postgres::Error> = async {
            let tx = db.transaction().await?;
            let mut n = 0;
            let inserts = plan.iter().filter(|s| s.0 <= 4).count() as i64;
            if inserts > 0 {
                // One statement for all of the transaction's inserts.
                let tag = unique_suffix();
                n += tx
                    .execute(
                        "INSERT INTO users (name, email, department, status) \
                         SELECT 'c' || i, $1 || '-' || i || '@example.org', \
                                (ARRAY['Engineering','Sales','Ops','Design','Legal'])[1 + i % 5], \
                                CASE WHEN i % 3 = 0 THEN 'INACTIVE' ELSE 'ACTIVE' END \
                         FROM generate_series(1, $2::bigint) i",
                        &[&tag, &inserts],
                    )
                    .await?;
            }
            for (kind, hot, dept, active) in plan.iter().filter(|s| s.0 > 4) {
                let status = if *active { "ACTIVE" } else { "INACTIVE" };
                n += match kind {
                    // Hot keys: the few oldest users, changed again and again.
                    5..=6 => {
                        tx.execute(
                            "UPDATE users SET name = 'hot ' || floor(random() * 1e6)::text, department = $2, status = $3, \
                             updated_at = now() WHERE id = (SELECT id FROM users ORDER BY id \
                             OFFSET $1 LIMIT 1)",
                            &[&(hot - 1), dept, &status],
                        )
                        .await?
                    }
                    7..=8 => {
                        tx.execute(
                            "UPDATE users SET department = $1, status = $2, updated_at = now() \
                             WHERE id = (SELECT id FROM users ORDER BY id DESC OFFSET $3 LIMIT 1)",
                            &[dept, &status, &(hot * 7)],
                        )
                        .await?
                    }
                    _ => {
                        tx.execute(
                            "DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY id DESC \
                             OFFSET $1 LIMIT 1)",
                            &[&(hot * 3)],
                        )
                        .await?
                    }
                };
            }
            // Counted in the same transaction: what committed is known exactly afterwards, even
            // when a restart cuts the answer to COMMIT off.
            let changes = i64::try_from(n).unwrap_or(i64::MAX);
            tx.execute("INSERT INTO chaos_commits (changes) VALUES ($1)", &[&changes])
                .await?;
            tx.commit().await?;
            Ok(n)
        }
        .await;
        match result {
            Ok(n) => {
                done += n;
                transactions += 1;
            }
            // A restart in the middle: the transaction may or may not have committed; the
            // committed total is counted from chaos_commits at the end.
            Err(e) if service::is_transient_pg(&e) => client = None,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((done, transactions))
}
