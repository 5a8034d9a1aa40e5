//! Harness of the end-to-end suite: real PostgreSQL, real broker, real HTTP over TCP.
//!
//! `scripts/test` starts a private PostgreSQL cluster and a one-node Apache Kafka and passes them in
//! `CDC_TEST_PG_URL` (a superuser URL) and `CDC_TEST_KAFKA_BROKERS`; the disruptive tests also get a
//! three-node Kafka cluster (`CDC_TEST_CLUSTER_KAFKA_BROKERS`) and a script to kill its nodes. Every test creates what it uses
//! with a random suffix ([`TestDb::create`]) and drops it afterwards, so tests run in parallel and
//! never see each other's state.

pub mod bench;
pub mod chaos;
pub mod config_docs;
pub mod connect;
pub mod full;

use std::time::Duration;

use anyhow::Context;
use rand::distr::{Alphanumeric, SampleString};
use tokio_util::sync::CancellationToken;

/// Where the stack started by `scripts/test` is.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Superuser connection URL of the test cluster (any database name; we replace it).
    pub pg_admin_url: String,
    pub kafka_brokers: String,
}

impl Stack {
    /// Reads the stack from the environment; fails loudly when the suite runs outside `scripts/test`.
    pub fn from_env() -> Stack {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the suite through scripts/test, which starts PostgreSQL and the broker")
            })
        };
        Stack {
            pg_admin_url: var("CDC_TEST_PG_URL"),
            kafka_brokers: var("CDC_TEST_KAFKA_BROKERS"),
        }
    }
}

/// The control script of the test stack (`CDC_TEST_CONTROL`, see scripts/lib/test-control.sh).
#[derive(Debug, Clone)]
pub struct Control {
    script: String,
}

/// Which Kafka of the test stack a control command acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kafka {
    /// The one-node Kafka every test uses (`CDC_TEST_KAFKA_BROKERS`).
    Single,
    /// The three-node cluster of the disruptive tests (`CDC_TEST_CLUSTER_KAFKA_BROKERS`).
    Cluster,
}

impl Control {
    pub fn from_env() -> Control {
        Control {
            script: std::env::var("CDC_TEST_CONTROL").unwrap_or_else(|_| {
                panic!("CDC_TEST_CONTROL is not set: run through scripts/test or scripts/chaos")
            }),
        }
    }

    /// Runs `test-control.sh ARGS` (restart PostgreSQL; kill, stop, start, pause a Kafka node).
    pub async fn control(&self, args: &[&str]) -> anyhow::Result<()> {
        let status = tokio::process::Command::new(&self.script)
            .args(args)
            .status()
            .await
            .with_context(|| format!("running {} {args:?}", self.script))?;
        anyhow::ensure!(
            status.success(),
            "{} {args:?} failed: {status}",
            self.script
        );
        Ok(())
    }

    /// `action` (kill, stop, start, pause, resume) on Kafka node `node` (from 1) of `kafka`.
    pub async fn kafka(&self, kafka: Kafka, action: &str, node: i32) -> anyhow::Result<()> {
        let which = match kafka {
            Kafka::Single => "kafka",
            Kafka::Cluster => "kafka-cluster",
        };
        self.control(&[which, action, &node.to_string()]).await
    }
}

/// The three-node Kafka cluster and the control script of the disruptive tests (see scripts/test).
#[derive(Debug, Clone)]
pub struct Disruptive {
    pub cluster_brokers: String,
    pub control: Control,
}

impl Disruptive {
    pub fn from_env() -> Disruptive {
        Disruptive {
            cluster_brokers: std::env::var("CDC_TEST_CLUSTER_KAFKA_BROKERS").unwrap_or_else(|_| {
                panic!(
                    "CDC_TEST_CLUSTER_KAFKA_BROKERS is not set: run the suite through scripts/test"
                )
            }),
            control: Control::from_env(),
        }
    }
}

/// Per partition of `topic`, as the cluster's metadata says: (partition, leader, in-sync replicas).
fn partition_states(brokers: &str, topic: &str) -> anyhow::Result<Vec<(i32, i32, usize)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions())
        .map(|p| (p.id(), p.leader(), p.isr().len()))
        .collect())
}

/// How many partitions `topic` has (0 when it does not exist).
pub fn partition_count(brokers: &str, topic: &str) -> anyhow::Result<i32> {
    Ok(i32::try_from(partition_states(brokers, topic)?.len())?)
}

/// The node id of the leader of `topic`'s `partition`, as the cluster's metadata says.
pub fn partition_leader(brokers: &str, topic: &str, partition: i32) -> anyhow::Result<i32> {
    partition_states(brokers, topic)?
        .into_iter()
        .find(|(p, leader, _)| *p == partition && *leader >= 0)
        .map(|(_, leader, _)| leader)
        .with_context(|| format!("{topic} [{partition}] has no leader"))
}

/// The node coordinating `transactional_id`'s transactions, as Kafka's own
/// `kafka-transactions describe` (through `scripts/kafka-tool`) says.
pub async fn transaction_coordinator(brokers: &str, transactional_id: &str) -> anyhow::Result<i32> {
    let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-tool");
    let out = tokio::process::Command::new(tool)
        .args([
            "transactions",
            "--bootstrap-server",
            brokers,
            "describe",
            "--transactional-id",
            transactional_id,
        ])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "kafka-transactions describe: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // CoordinatorId TransactionalId ProducerId ...
    stdout
        .lines()
        .filter_map(|l| {
            let mut cells = l.split_whitespace();
            let coordinator = cells.next()?.parse().ok()?;
            (cells.next()? == transactional_id).then_some(coordinator)
        })
        .next()
        .with_context(|| format!("no coordinator of {transactional_id} in: {stdout}"))
}

/// Records in all `partitions` of `topic` as a `read_uncommitted` consumer sees them: those of open
/// and aborted transactions included.
pub fn count_uncommitted(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("count-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut n, mut open) = (0, partitions);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while open > 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic} stalled"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(_)) => n += 1,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => open -= 1,
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(n)
}

/// Waits until the reader of `slot` in `db` recorded its initial snapshot as finished.
pub async fn wait_snapshot_done(db: &tokio_postgres::Client, slot: &str) -> anyhow::Result<()> {
    wait_for("the initial snapshot", Duration::from_secs(90), || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM cdc_reader_snapshots WHERE slot = $1",
                &[&slot],
            )
            .await?
            .get(0);
        Ok((n == 1).then_some(()))
    })
    .await
}

/// Waits (blocking) until the ends of `topic`'s first `partitions` partitions add up to more than
/// `above`, as a consumer with `isolation` (`read_committed`: the last stable offsets, so committed
/// transactions only; `read_uncommitted`: the high watermarks) sees them. Returns that sum.
pub fn wait_partition_ends(
    brokers: &str,
    topic: &str,
    partitions: i32,
    isolation: &str,
    above: i64,
) -> anyhow::Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let ends: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", isolation)
        .create()?;
    let started = std::time::Instant::now();
    loop {
        let mut sum = 0;
        for p in 0..partitions {
            sum += ends
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .map_or(0, |(_, high)| high);
        }
        if sum > above {
            return Ok(sum);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the ends of {topic} stayed at {sum} (want more than {above})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The reader binary as a child process (so it can be killed with SIGKILL), capturing the users
/// table of `db` into `topic` on `brokers`, with `env` on top.
pub fn reader_process(
    brokers: &str,
    db: &TestDb,
    topic: &str,
    env: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(workspace_binary("cdc-reader").expect("the cdc-reader binary"))
        .env("CDC_READER_DATABASE_URL", &db.url)
        .env("CDC_READER_SLOT", &db.name)
        .env("CDC_READER_PUBLICATION", &db.name)
        .env("CDC_READER_TOPICS", format!("public.users={topic}"))
        .env("CDC_READER_HTTP_LISTEN", "127.0.0.1:0")
        .env("KAFKA_BROKERS", brokers)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .spawn()
        .expect("the cdc-reader binary starts")
}

/// Whether every partition of `topic` has a leader and `replicas` in-sync replicas (what a rolling
/// restart waits for before it takes the next node down).
pub fn fully_in_sync(brokers: &str, topic: &str, replicas: usize) -> anyhow::Result<bool> {
    let states = partition_states(brokers, topic)?;
    Ok(!states.is_empty()
        && states
            .iter()
            .all(|(_, leader, isr)| *leader >= 0 && *isr == replicas))
}

/// Sends the logs of the services under test to the test's output (shown for failed tests), filtered
/// by `RUST_LOG` (default `warn`). Safe to call from every test.
pub fn init_logs() {
    init_logs_at("warn");
}

/// [`init_logs`] with `default` as the filter when `RUST_LOG` is not set.
pub fn init_logs_at(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_test_writer()
        .try_init();
}

/// The value after `name` on the command line (`--changes 1000`), or `default`. For the bench and
/// chaos binaries.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .map_err(|_| anyhow::anyhow!("{name} must be a number")),
        None => Ok(default),
    }
}

/// A lowercase random suffix for names of databases, slots, topics.
pub fn unique_suffix() -> String {
    Alphanumeric
        .sample_string(&mut rand::rng(), 10)
        .to_lowercase()
}

/// How far `client`'s server has flushed its WAL (`pg_current_wal_flush_lsn()`): every change
/// committed before is at or below it.
pub async fn wal_flush_lsn(client: &tokio_postgres::Client) -> anyhow::Result<u64> {
    let lsn: String = client
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?
        .get(0);
    change_event::parse_lsn(&lsn).with_context(|| format!("not an LSN: {lsn}"))
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{db}")
}

/// Connects with tokio-postgres and drives the connection in a task.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("test connection ended with an error: {e}");
        }
    });
    Ok(client)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

/// A private database for one test, dropped (with its connections) when the value is dropped.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// Creates `t_<prefix>_<random>` and applies `database`'s migrations to it, when given.
    pub async fn create(
        stack: &Stack,
        prefix: &str,
        database: Option<schema::Database>,
    ) -> anyhow::Result<TestDb> {
        let name = format!("t_{prefix}_{}", unique_suffix());
        let admin = connect(&stack.pg_admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let db = TestDb {
            url: with_database(&stack.pg_admin_url, &name),
            admin_url: stack.pg_admin_url.clone(),
            name,
        };
        if let Some(database) = database {
            let mut client = connect(&db.url).await?;
            schema::migrate(&mut client, database).await?;
        }
        Ok(db)
    }

    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async context (also while unwinding from a failed assertion), so the
        // cleanup gets its own thread and runtime.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let admin = connect(&admin_url).await?;
                // Replication slots keep a database from being dropped; their walsenders are
                // ended first (a reader under test may have been abandoned mid-stream).
                for _ in 0..50 {
                    admin
                        .execute(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                             WHERE database = $1 AND active_pid IS NOT NULL",
                            &[&name],
                        )
                        .await?;
                    let dropped = admin
                        .execute(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                             WHERE database = $1 AND active_pid IS NULL",
                            &[&name],
                        )
                        .await;
                    let left: i64 = admin
                        .query_one(
                            "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                            &[&name],
                        )
                        .await?
                        .get(0);
                    if dropped.is_ok() && left == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("dropping test database {} failed: {e:#}", self.name),
            Err(_) => eprintln!("dropping test database {} panicked", self.name),
        }
    }
}

/// A REST service running in this process on an ephemeral port, served over real TCP. `S` says
/// which ([`User`] or [`Post`]).
#[derive(Debug)]
pub struct HttpService<S> {
    pub base_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), api::serve::Error>>,
    service: std::marker::PhantomData<S>,
}

/// Marks user-api.
#[derive(Debug)]
pub struct User;
/// Marks post-api.
#[derive(Debug)]
pub struct Post;

/// user-api over a test database.
pub type UserApi = HttpService<User>;
/// post-api over a test view database.
pub type PostApi = HttpService<Post>;

impl UserApi {
    pub async fn start(database_url: &str) -> anyhow::Result<UserApi> {
        Self::start_with(database_url, false).await
    }

    pub async fn start_with(database_url: &str, skip_migrations: bool) -> anyhow::Result<UserApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let config = api::user_api::Config {
            listen: listener.local_addr()?,
            database_url: database_url.to_owned(),
            db_pool_size: 8,
            skip_migrations,
            shutdown_timeout_secs: 5,
        };
        HttpService::spawn(listener, |l, s| api::user_api::run(config, l, s))
    }
}

impl PostApi {
    pub async fn start(database_url: &str) -> anyhow::Result<PostApi> {
        Self::start_configured(database_url, |_| {}).await
    }

    /// post-api whose `X-Min-Source-LSN` waits for the projector group `group`, at most `timeout`.
    pub async fn start_for(
        database_url: &str,
        group: &str,
        timeout: Duration,
    ) -> anyhow::Result<PostApi> {
        Self::start_configured(database_url, |c| {
            c.projector_group = group.to_owned();
            c.consistency_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        })
        .await
    }

    pub async fn start_configured(
        database_url: &str,
        configure: impl FnOnce(&mut api::post_api::Config),
    ) -> anyhow::Result<PostApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut config = api::post_api::Config {
            listen: listener.local_addr()?,
            database_url: database_url.to_owned(),
            db_pool_size: 8,
            skip_migrations: false,
            shutdown_timeout_secs: 5,
            projector_group: "post-service-streams".to_owned(),
            consistency_timeout_ms: 5000,
        };
        configure(&mut config);
        HttpService::spawn(listener, |l, s| api::post_api::run(config, l, s))
    }
}

impl<S> HttpService<S> {
    fn spawn<F, Fut>(listener: tokio::net::TcpListener, run: F) -> anyhow::Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), api::serve::Error>> + Send + 'static,
    {
        let base_url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(listener, shutdown.clone()));
        Ok(HttpService {
            base_url,
            shutdown,
            task,
            service: std::marker::PhantomData,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Signals shutdown and waits for the server to drain; fails if it did not stop cleanly.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("the service did not stop within 10 s")?
            .context("the service task panicked")?
            .context("the service returned an error")
    }
}

/// cdc-reader running in this process against a test database, with its own slot, publication
/// and topics, and its telemetry on an ephemeral port.
#[derive(Debug)]
pub struct Reader {
    pub http_url: String,
    pub config: cdc_reader::Config,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), cdc_reader::Error>>,
}

impl Reader {
    /// A configuration capturing `tables` of `db` into `topic_map` (`schema.table=topic` entries),
    /// with a slot and publication named after the database.
    pub fn config(
        stack: &Stack,
        db: &TestDb,
        tables: &[&str],
        topic_map: &[String],
    ) -> cdc_reader::Config {
        cdc_reader::Config {
            database_url: db.url.clone(),
            slot: db.name.clone(),
            publication: db.name.clone(),
            tables: tables.iter().map(|t| (*t).to_owned()).collect(),
            topics: topic_map.to_vec(),
            server_name: "cdc".to_owned(),
            kafka_brokers: stack.kafka_brokers.clone(),
            producer_config: Vec::new(),
            topic_partitions: 1,
            topic_replication_factor: -1,
            topic_config: vec![
                "cleanup.policy=delete".to_owned(),
                "retention.ms=-1".to_owned(),
            ],
            schemas: false,
            delivery: cdc_reader::publish::Delivery::ExactlyOnce,
            transactional_id: None,
            position_topic: "cdc-reader-positions".to_owned(),
            commit_interval_ms: 100,
            transaction_gap_ms: 8,
            max_in_flight: 50_000,
            status_interval_ms: 100,
            snapshot: cdc_reader::config::SnapshotMode::Initial,
            wal_replay_window_bytes: 0,
            http_listen: "127.0.0.1:0".parse().expect("a valid address"),
        }
    }

    pub async fn start(config: cdc_reader::Config) -> anyhow::Result<Reader> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(cdc_reader::run(config.clone(), listener, shutdown.clone()));
        Ok(Reader {
            http_url,
            config,
            shutdown,
            task,
        })
    }

    /// Waits until /health says the reader is streaming.
    pub async fn wait_streaming(&self) -> anyhow::Result<()> {
        let url = format!("{}/health", self.http_url);
        wait_for("the reader to stream", Duration::from_secs(30), || {
            let probe = reqwest::get(url.clone());
            async move {
                Ok(probe
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            }
        })
        .await
    }

    /// The value of one Prometheus metric.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        metric(&self.http_url, name).await
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the reader did not stop within 30 s")?
            .context("the reader task panicked")?
            .context("the reader returned an error")
    }

    /// Waits up to `timeout` for the reader to stop by itself (it halts on errors it cannot
    /// retry) and returns what it returned.
    pub async fn halted(self, timeout: Duration) -> anyhow::Result<Result<(), cdc_reader::Error>> {
        tokio::time::timeout(timeout, self.task)
            .await
            .context("the reader did not halt")?
            .context("the reader task panicked")
    }
}

/// The value of one Prometheus metric served at `{http_url}/metrics`.
pub async fn metric(http_url: &str, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{http_url}/metrics"))
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("metric {name} not found"))
}

/// The projector running in this process against a test view database, with its telemetry on an
/// ephemeral port.
#[derive(Debug)]
pub struct Projector {
    pub http_url: String,
    pub config: projector::Config,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), projector::Error>>,
}

impl Projector {
    /// A configuration consuming `topic` into `view_db` as a consumer group of its own.
    pub fn config(stack: &Stack, view_db: &TestDb, topic: &str) -> projector::Config {
        projector::Config {
            database_url: view_db.url.clone(),
            kafka_brokers: stack.kafka_brokers.clone(),
            topic: topic.to_owned(),
            group: format!("{}-projector", view_db.name),
            position_topic: "cdc-reader-positions".to_owned(),
            dead_letter_topic: None,
            source_table: "public.users".to_owned(),
            batch_max_events: 5000,
            batch_max_wait_ms: 0,
            hold_max_kib: 16384,
            transactions: projector::config::Transactions::Whole,
            consumer_config: Vec::new(),
            http_listen: "127.0.0.1:0".parse().expect("a valid address"),
            skip_migrations: false,
        }
    }

    pub async fn start(config: projector::Config) -> anyhow::Result<Projector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(projector::run(config.clone(), listener, shutdown.clone()));
        Ok(Projector {
            http_url,
            config,
            shutdown,
            task,
        })
    }

    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        metric(&self.http_url, name).await
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the projector did not stop within 30 s")?
            .context("the projector task panicked")?
            .context("the projector returned an error")
    }

    /// Waits up to `timeout` for the projector to stop by itself (it halts on errors it cannot
    /// retry) and returns what it returned.
    pub async fn halted(self, timeout: Duration) -> anyhow::Result<Result<(), projector::Error>> {
        tokio::time::timeout(timeout, self.task)
            .await
            .context("the projector did not halt")?
            .context("the projector task panicked")
    }
}

/// user_db with a reader, materialized_view_db for a projector, one topic between them.
#[derive(Debug)]
pub struct Pipeline {
    pub stack: Stack,
    pub user_db: TestDb,
    pub view_db: TestDb,
    pub topic: String,
    pub reader: Reader,
}

impl Pipeline {
    /// Creates both databases (migrated) and a topic, and starts a reader; the projector is the
    /// caller's, from [`Pipeline::projector_config`].
    pub async fn start(prefix: &str) -> anyhow::Result<Pipeline> {
        Self::start_on(Stack::from_env(), prefix).await
    }

    /// [`Pipeline::start`] on the given stack (e.g. the three-node cluster).
    pub async fn start_on(stack: Stack, prefix: &str) -> anyhow::Result<Pipeline> {
        Self::start_with(stack, prefix, 1).await
    }

    /// [`Pipeline::start_on`] with a topic of `partitions` partitions.
    pub async fn start_with(
        stack: Stack,
        prefix: &str,
        partitions: i32,
    ) -> anyhow::Result<Pipeline> {
        Self::start_configured(stack, prefix, partitions, |_| {}).await
    }

    /// [`Pipeline::start_with`], the reader's configuration changed by `configure` first.
    pub async fn start_configured(
        stack: Stack,
        prefix: &str,
        partitions: i32,
        configure: impl FnOnce(&mut cdc_reader::Config),
    ) -> anyhow::Result<Pipeline> {
        let user_db = TestDb::create(
            &stack,
            &format!("{prefix}_u"),
            Some(schema::Database::UserDb),
        )
        .await?;
        let view_db = TestDb::create(
            &stack,
            &format!("{prefix}_v"),
            Some(schema::Database::ViewDb),
        )
        .await?;
        let topic = format!("t-users-{}", unique_suffix());
        let mut config = Reader::config(
            &stack,
            &user_db,
            &["public.users"],
            &[format!("public.users={topic}")],
        );
        config.topic_partitions = partitions;
        configure(&mut config);
        let reader = Reader::start(config).await?;
        reader.wait_streaming().await?;
        Ok(Pipeline {
            stack,
            user_db,
            view_db,
            topic,
            reader,
        })
    }

    pub fn projector_config(&self) -> projector::Config {
        Projector::config(&self.stack, &self.view_db, &self.topic)
    }

    /// Waits up to `timeout` until user_view equals users column for column and department_stats
    /// equals the GROUP BY of both; the error says how they still differ.
    pub async fn converged(&self, timeout: Duration) -> anyhow::Result<()> {
        let users = self.user_db.client().await?;
        let views = self.view_db.client().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Some(difference) = views_differ(&users, &views).await? else {
                return Ok(());
            };
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the views did not converge within {timeout:?}: {difference}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How materialized_view_db's views differ from user_db's users, if they do.
pub async fn views_differ(
    users: &tokio_postgres::Client,
    views: &tokio_postgres::Client,
) -> anyhow::Result<Option<String>> {
    let source = rows(
        users,
        "SELECT id, name, email, department, status, created_at, updated_at FROM users ORDER BY id",
    )
    .await?;
    let view = rows(
        views,
        "SELECT user_id AS id, name, email, department, status, created_at, updated_at \
         FROM user_view ORDER BY user_id",
    )
    .await?;
    if source != view {
        let first = source
            .iter()
            .zip(&view)
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("; first difference {a:?} / {b:?}"));
        return Ok(Some(format!(
            "{} rows in users, {} in user_view{}",
            source.len(),
            view.len(),
            first.unwrap_or_default()
        )));
    }
    let group_by = "SELECT department, count(*) AS user_count, \
                    count(*) FILTER (WHERE status = 'ACTIVE') AS active_users, \
                    count(*) FILTER (WHERE status <> 'ACTIVE') AS inactive_users FROM {} \
                    GROUP BY department ORDER BY department";
    let expected = rows(users, &group_by.replace("{}", "users")).await?;
    let from_view = rows(views, &group_by.replace("{}", "user_view")).await?;
    let stats = rows(
        views,
        "SELECT department, user_count, active_users, inactive_users \
         FROM department_stats ORDER BY department",
    )
    .await?;
    if stats != expected || stats != from_view {
        return Ok(Some(format!(
            "department_stats {stats:?}, expected {expected:?}"
        )));
    }
    let derived = derived_differences(views).await?;
    Ok((!derived.is_empty())
        .then(|| format!("derived views differ from their definitions: {derived:?}")))
}

/// Each derived view of materialized_view_db (`derived_views`: post_stats, user_activity, ...)
/// whose table differs from its `<name>_definition`, with the number of rows in one and not the
/// other; all compared in one REPEATABLE READ snapshot. `views` must not be in a transaction.
pub async fn derived_differences(
    views: &tokio_postgres::Client,
) -> anyhow::Result<Vec<(String, i64)>> {
    let names: Vec<String> = views
        .query("SELECT name FROM derived_views ORDER BY position", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    anyhow::ensure!(
        !names.is_empty(),
        "materialized_view_db lists no derived views"
    );
    let counts: Vec<String> = names
        .iter()
        .map(|n| {
            let (t, d) = (quote_ident(n), quote_ident(&format!("{n}_definition")));
            let literal = n.replace('\'', "''");
            format!(
                "SELECT '{literal}'::text, count(*) FROM \
                 ((TABLE {t} EXCEPT ALL TABLE {d}) UNION ALL (TABLE {d} EXCEPT ALL TABLE {t})) x"
            )
        })
        .collect();
    views
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let result = views.query(&counts.join(" UNION ALL "), &[]).await;
    views.batch_execute("COMMIT").await?;
    Ok(result?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .filter(|(_, n)| *n > 0)
        .collect())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Every row of `sql` as JSON texts of its columns, for comparisons across databases.
pub async fn rows(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let wrapped = format!("SELECT to_jsonb(r)::text FROM ({sql}) r");
    let mut out = Vec::new();
    for r in client.query(&wrapped, &[]).await? {
        let v: serde_json::Value = serde_json::from_str(r.get::<_, &str>(0))?;
        let object = v.as_object().context("a row is a JSON object")?;
        out.push(object.values().map(serde_json::Value::to_string).collect());
    }
    Ok(out)
}

pub const DEPARTMENTS: [&str; 5] = ["Engineering", "Sales", "Ops", "Design", "Legal"];

/// Random inserts, updates and deletes of `users`, in `transactions` transactions of 1 to `max_tx`
/// statements each.
pub async fn random_workload(
    db: &tokio_postgres::Client,
    transactions: usize,
    max_tx: usize,
) -> anyhow::Result<()> {
    use rand::Rng;
    let sqls = {
        let mut sqls = Vec::with_capacity(transactions);
        let mut rng = rand::rng();
        for t in 0..transactions {
            let size = rng.random_range(1..=max_tx);
            let mut sql = String::from("BEGIN;");
            for i in 0..size {
                let dept = DEPARTMENTS[rng.random_range(0..DEPARTMENTS.len())];
                let status = if rng.random_bool(0.7) {
                    "ACTIVE"
                } else {
                    "INACTIVE"
                };
                match rng.random_range(0..10) {
                0..=4 => sql.push_str(&format!(
                    "INSERT INTO users (name, email, department, status) \
                     VALUES ('n{t}_{i}', 'u{t}_{i}_{}@example.org', '{dept}', '{status}');",
                    unique_suffix()
                )),
                5..=7 => sql.push_str(&format!(
                    "UPDATE users SET department = '{dept}', status = '{status}', \
                     name = name || '.', updated_at = now() \
                     WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1);"
                )),
                _ => sql.push_str(
                    "DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1);",
                ),
            }
            }
            sql.push_str("COMMIT;");
            sqls.push(sql);
        }
        sqls
    };
    // The generator is not Send; the statements are made first, then run.
    for sql in sqls {
        db.batch_execute(&sql).await?;
    }
    Ok(())
}

/// A binary of the workspace, built next to the running test (`scripts/test` builds them all
/// first).
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    // Tests live in target/<profile>/deps/, binaries (the benches too) in target/<profile>/.
    let mut dir = exe
        .parent()
        .context("the running binary has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} does not exist: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    Ok(path)
}

/// One record read back from Kafka: key and value parsed as JSON (`None` when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub key: Option<serde_json::Value>,
    pub value: Option<serde_json::Value>,
    pub partition: i32,
    pub offset: i64,
    /// The reader's `cdc.position` header (`commit_lsn:event_index:sub`), when there is one.
    pub position: Option<String>,
}

impl Received {
    /// Key and value parsed as JSON.
    fn of(m: &impl rdkafka::Message) -> anyhow::Result<Received> {
        use rdkafka::message::Headers;
        let json = |b: Option<&[u8]>| b.map(serde_json::from_slice).transpose();
        let position = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "cdc.position")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        Ok(Received {
            key: json(m.key())?,
            value: json(m.payload())?,
            partition: m.partition(),
            offset: m.offset(),
            position,
        })
    }
}

/// Writes `n` users (`Bench user i`, 20 departments, every fourth INACTIVE) in transactions of
/// `per_tx` rows: the benchmarks' workload. `i` goes on from the highest id in the table (from 1
/// in an empty one), so a second call adds users with other emails.
pub async fn insert_bench_users(
    client: &tokio_postgres::Client,
    n: i64,
    per_tx: i64,
) -> anyhow::Result<()> {
    let first: i64 = client
        .query_one("SELECT coalesce(max(id), 0) FROM users", &[])
        .await?
        .get(0);
    let n = first + n;
    let mut done = first;
    while done < n {
        let rows = per_tx.min(n - done);
        client
            .execute(
                "INSERT INTO users (name, email, department, status)
                 SELECT 'Bench user ' || i, 'bench' || i || '@example.org', 'Dept ' || (i % 20),
                        CASE WHEN i % 4 = 0 THEN 'INACTIVE' ELSE 'ACTIVE' END
                 FROM generate_series($1::bigint, $2::bigint) i",
                &[&(done + 1), &(done + rows)],
            )
            .await?;
        done += rows;
    }
    Ok(())
}

/// Reads `topic` from the beginning, as a `read_committed` consumer, until it has at least `n`
/// records and reached the end of every partition (so extra records show up too); fails after
/// `timeout`.
pub async fn read_topic(
    stack: &Stack,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Received>> {
    read_topic_from(&stack.kafka_brokers, topic, n, timeout).await
}

/// [`read_topic`] on the Kafka at `brokers`.
pub async fn read_topic_from(
    brokers: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Received>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::Message;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("t-read-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()?;
    consumer.subscribe(&[topic])?;
    let partitions = wait_for("the topic's partitions", timeout, || async {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let n = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        Ok((n > 0).then_some(n))
    })
    .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    // Partitions read to their end since their last record.
    let mut at_end = std::collections::HashSet::new();
    while out.len() < n || at_end.len() < partitions {
        let next = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .with_context(|| {
                format!(
                    "{topic}: {} of {n} records and the end of {} of {partitions} partitions within {timeout:?}",
                    out.len(),
                    at_end.len()
                )
            })?;
        match next {
            Ok(m) => {
                at_end.remove(&m.partition());
                out.push(Received::of(&m)?);
            }
            Err(KafkaError::PartitionEOF(p)) => {
                at_end.insert(p);
            }
            // A topic another process is about to create (e.g. Debezium's, created on its first
            // record): reported before it exists, then read as soon as it does.
            Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The position the reader with `transactional_id` committed last, as the value in the position
/// topic holds it (`{"end_lsn", "position", "partitions"}`); `None` when it committed none.
pub async fn committed_position(
    brokers: &str,
    position_topic: &str,
    transactional_id: &str,
    timeout: Duration,
) -> anyhow::Result<Option<serde_json::Value>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::error::KafkaError;
    use rdkafka::Message;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("t-positions-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()?;
    let partition = cdc_reader::publish::position_partition(
        transactional_id,
        partition_count(brokers, position_topic)?,
    );
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(position_topic, partition, rdkafka::Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut last = None;
    loop {
        let next = tokio::time::timeout(timeout, consumer.recv())
            .await
            .with_context(|| format!("{position_topic}: no end within {timeout:?}"))?;
        match next {
            Ok(m) if m.key() == Some(transactional_id.as_bytes()) => {
                last = m.payload().map(serde_json::from_slice).transpose()?;
            }
            Ok(_) => {}
            Err(KafkaError::PartitionEOF(_)) => return Ok(last),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The first record of `topic` (partition 0 first), within `timeout`.
pub async fn read_first(stack: &Stack, topic: &str, timeout: Duration) -> anyhow::Result<Received> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("group.id", format!("t-read-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let m = tokio::time::timeout(timeout, consumer.recv())
        .await
        .with_context(|| format!("{topic}: no record within {timeout:?}"))??;
    Received::of(&m)
}

/// Like [`read_topic`], and the topic must hold exactly `n` records: none missing, none extra.
pub async fn read_exactly(
    stack: &Stack,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Received>> {
    let records = read_topic(stack, topic, n, timeout).await?;
    anyhow::ensure!(
        records.len() == n,
        "{topic} holds {} records, expected exactly {n}",
        records.len()
    );
    Ok(records)
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5/postgres", "t_x"),
            "postgres://u:p@127.0.0.1:5/t_x"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:1/db"),
            "postgres://***@h:1/db"
        );
    }
}
