//! Kafka Connect with Debezium's connectors, run beside our reader: a client for the worker's REST
//! API and the connector settings the comparison tests and the benchmark share.
//!
//! `scripts/test` (and `scripts/bench debezium`) start a standalone worker with Debezium's
//! PostgreSQL source and JDBC sink on its plugin path (scripts/lib/stack.sh: `connect_start`) and pass
//! its REST address in `CDC_TEST_CONNECT_URL`.

use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Map, Value};

/// The settings under which Debezium's PostgreSQL connector writes the most natural JSON it can,
/// the one our events are compared with (docs/debezium.md).
pub const NATURAL_JSON: &[(&str, &str)] = &[
    ("plugin.name", "pgoutput"),
    // Plain JSON values and keys, as our reader writes them.
    (
        "key.converter",
        "org.apache.kafka.connect.json.JsonConverter",
    ),
    ("key.converter.schemas.enable", "false"),
    (
        "value.converter",
        "org.apache.kafka.connect.json.JsonConverter",
    ),
    ("value.converter.schemas.enable", "false"),
    // numeric as an exact string (the default is Connect's Decimal: base64 of the unscaled bytes).
    ("decimal.handling.mode", "string"),
    // bytea as base64 (the default, bytes, also comes out as base64 through JsonConverter).
    ("binary.handling.mode", "base64"),
    // Dates and times as ISO 8601 strings (the default: days and microseconds since the epoch).
    ("time.precision.mode", "isostring"),
    // Truncates as events (skipped by default).
    ("skipped.operations", "none"),
];

/// The worker's REST API.
#[derive(Debug, Clone)]
pub struct Connect {
    pub url: String,
    http: reqwest::Client,
}

impl Connect {
    /// The worker `scripts/test` started (`CDC_TEST_CONNECT_URL`).
    pub fn from_env() -> Connect {
        let url = std::env::var("CDC_TEST_CONNECT_URL").unwrap_or_else(|_| {
            panic!("CDC_TEST_CONNECT_URL is not set: run the suite through scripts/test, which starts Kafka Connect")
        });
        Connect::new(&url)
    }

    pub fn new(url: &str) -> Connect {
        Connect {
            url: url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Creates connector `name` with `config` and waits until it and its task run; the returned
    /// guard deletes it when dropped.
    pub async fn create(
        &self,
        name: &str,
        config: Map<String, Value>,
    ) -> anyhow::Result<Connector> {
        let response = self
            .http
            .put(format!("{}/connectors/{name}/config", self.url))
            .json(&config)
            .send()
            .await
            .with_context(|| format!("creating connector {name}"))?;
        let status = response.status();
        anyhow::ensure!(
            status.is_success(),
            "creating connector {name}: {status} {}",
            response.text().await.unwrap_or_default()
        );
        let connector = Connector {
            connect: self.clone(),
            name: name.to_owned(),
        };
        connector.wait_running(Duration::from_secs(60)).await?;
        Ok(connector)
    }
}

/// A connector on the worker, deleted when dropped.
#[derive(Debug)]
pub struct Connector {
    connect: Connect,
    pub name: String,
}

impl Connector {
    /// The states of the connector and of its tasks; fails when one of them failed (with its trace).
    pub async fn status(&self) -> anyhow::Result<(String, Vec<String>)> {
        let status: Value = self
            .connect
            .http
            .get(format!(
                "{}/connectors/{}/status",
                self.connect.url, self.name
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let state = |v: &Value| v["state"].as_str().unwrap_or("").to_owned();
        let tasks = status["tasks"].as_array().cloned().unwrap_or_default();
        if let Some(failed) = std::iter::once(&status["connector"])
            .chain(tasks.iter())
            .find(|s| state(s) == "FAILED")
        {
            anyhow::bail!(
                "connector {} failed: {}",
                self.name,
                failed["trace"].as_str().unwrap_or("(no trace)")
            );
        }
        Ok((
            state(&status["connector"]),
            tasks.iter().map(state).collect(),
        ))
    }

    async fn wait_running(&self, timeout: Duration) -> anyhow::Result<()> {
        crate::wait_for(
            &format!("connector {} to run", self.name),
            timeout,
            || async {
                let (connector, tasks) = self.status().await?;
                Ok((connector == "RUNNING"
                    && !tasks.is_empty()
                    && tasks.iter().all(|t| t == "RUNNING"))
                .then_some(()))
            },
        )
        .await
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        // Outside async context (also while unwinding): a thread of its own, a blocking request.
        let url = format!("{}/connectors/{}", self.connect.url, self.name);
        let name = self.name.clone();
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                reqwest::Client::new()
                    .delete(&url)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await?
                    .error_for_status()?;
                anyhow::Ok(())
            })
        });
        match deleted.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("deleting connector {name} failed: {e:#}"),
            Err(_) => eprintln!("deleting connector {name} panicked"),
        }
    }
}

/// What a connector needs to reach a database, from a `postgres://` URL.
struct Database {
    host: String,
    port: u16,
    user: String,
    password: String,
    name: String,
}

impl Database {
    fn of(url: &str) -> anyhow::Result<Database> {
        let pg: tokio_postgres::Config = url.parse().context("parsing the database URL")?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => anyhow::bail!("the database URL names no TCP host"),
        };
        Ok(Database {
            host,
            port: pg.get_ports().first().copied().unwrap_or(5432),
            user: pg.get_user().unwrap_or("postgres").to_owned(),
            password: pg
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
            name: pg.get_dbname().unwrap_or("postgres").to_owned(),
        })
    }
}

/// Debezium's PostgreSQL connector on database `database_url` (a URL with user and password),
/// capturing `tables` (`schema.table`) through its own slot and publication `slot`, its topics named
/// `<topic_prefix>.<schema>.<table>`, with [`NATURAL_JSON`] settings.
pub fn postgres_source(
    database_url: &str,
    slot: &str,
    topic_prefix: &str,
    tables: &[&str],
) -> anyhow::Result<Map<String, Value>> {
    let db = Database::of(database_url)?;
    let mut config = json!({
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "database.hostname": db.host,
        "database.port": db.port.to_string(),
        "database.user": db.user,
        "database.password": db.password,
        "database.dbname": db.name,
        "topic.prefix": topic_prefix,
        "slot.name": slot,
        "publication.name": slot,
        "publication.autocreate.mode": "filtered",
        "table.include.list": tables.join(","),
    });
    let map = config.as_object_mut().expect("an object");
    for (k, v) in NATURAL_JSON {
        map.insert((*k).to_owned(), Value::from(*v));
    }
    Ok(map.clone())
}

/// Debezium's JDBC sink, configured as its documentation says for Debezium change-event topics:
/// upserts keyed by the record key, deletes (and truncates) applied, the table created from the
/// records' schemas; it reads `topic` (keys and values with Connect schemas) as a `read_committed`
/// consumer into table `table` of `database_url`.
pub fn jdbc_sink(
    database_url: &str,
    topic: &str,
    table: &str,
) -> anyhow::Result<Map<String, Value>> {
    let db = Database::of(database_url)?;
    let config = json!({
        "connector.class": "io.debezium.connector.jdbc.JdbcSinkConnector",
        "tasks.max": "1",
        "topics": topic,
        "connection.url": format!("jdbc:postgresql://{}:{}/{}", db.host, db.port, db.name),
        "connection.username": db.user,
        "connection.password": db.password,
        "insert.mode": "upsert",
        "delete.enabled": "true",
        "truncate.enabled": "true",
        "primary.key.mode": "record_key",
        "schema.evolution": "basic",
        "collection.name.format": table,
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "true",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter.schemas.enable": "true",
        // Our topics are written in Kafka transactions.
        "consumer.override.isolation.level": "read_committed",
        "consumer.override.auto.offset.reset": "earliest",
    });
    Ok(config.as_object().cloned().unwrap_or_default())
}
