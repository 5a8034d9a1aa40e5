//! Harness of the end-to-end suite: real PostgreSQL, real broker, real HTTP over TCP.
//!
//! `scripts/test` starts a private PostgreSQL cluster and a tansu broker and passes them in
//! `CDC_TEST_PG_URL` (a superuser URL) and `CDC_TEST_KAFKA_BROKERS`. Every test creates what it uses
//! with a random suffix ([`TestDb::create`]) and drops it afterwards, so tests run in parallel and
//! never see each other's state.

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

/// A lowercase random suffix for names of databases, slots, topics.
pub fn unique_suffix() -> String {
    Alphanumeric
        .sample_string(&mut rand::rng(), 10)
        .to_lowercase()
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

/// user-api running in this process on an ephemeral port, served over real TCP.
#[derive(Debug)]
pub struct UserApi {
    pub base_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), api::user_api::Error>>,
}

impl UserApi {
    pub async fn start(database_url: &str) -> anyhow::Result<UserApi> {
        Self::start_with(database_url, false).await
    }

    pub async fn start_with(database_url: &str, skip_migrations: bool) -> anyhow::Result<UserApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let config = api::user_api::Config {
            listen: listener.local_addr()?,
            database_url: database_url.to_owned(),
            db_pool_size: 8,
            skip_migrations,
            shutdown_timeout_secs: 5,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(api::user_api::run(config, listener, shutdown.clone()));
        Ok(UserApi {
            base_url,
            shutdown,
            task,
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
            .context("user-api did not stop within 10 s")?
            .context("user-api task panicked")?
            .context("user-api returned an error")
    }
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
