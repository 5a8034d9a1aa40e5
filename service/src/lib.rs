//! What every binary of the pipeline does around its `run` function: logging to stderr through
//! `tracing`, one root shutdown token cancelled by SIGINT/SIGTERM, capped exponential backoff for
//! retries, and one-line error chains for logs. With the `kafka` feature, [`kafka`] holds the
//! rdkafka client context that routes librdkafka's logs into `tracing`; [`telemetry`] serves
//! `/health` and `/metrics`.

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod telemetry;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Logs to stderr through `tracing`; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    init_tracing_at("info");
}

/// Tracing for a command a person runs (a replay, a snapshot request): warnings and errors unless
/// `RUST_LOG` says otherwise, so its own output stays readable.
pub fn init_command_tracing() {
    init_tracing_at("warn");
}

fn init_tracing_at(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The `main` of every service binary: tracing, a runtime, one shutdown token cancelled by
/// SIGINT/SIGTERM, a listener bound on `addr` (so a taken port fails start-up), then
/// `run(listener, shutdown)` until it returns.
pub fn main<F, Fut, E>(addr: std::net::SocketAddr, run: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    use anyhow::Context;
    init_tracing();
    tokio::runtime::Runtime::new()
        .context("starting the tokio runtime")?
        .block_on(async {
            let shutdown = CancellationToken::new();
            let signals =
                cancel_on_signal(shutdown.clone()).context("installing signal handlers")?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let result = run(listener, shutdown.clone()).await;
            shutdown.cancel();
            signals.await.context("signal task panicked")?;
            Ok(result?)
        })
}

/// Cancels `token` on the first SIGINT or SIGTERM. Returns the handle of the watching task.
pub fn cancel_on_signal(token: CancellationToken) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            biased;
            () = token.cancelled() => return,
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        token.cancel();
    }))
}

/// True for PostgreSQL errors that may go away by themselves: the connection was lost, or the server
/// is shutting down, starting or out of connections (SQLSTATE 08xxx, 57Pxx, 53300). Anything else
/// the server says (permissions, timeouts, missing objects, bad SQL) will be said again.
pub fn is_transient_pg(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }
        None => std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// An error and its sources on one line, for logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Runs a PostgreSQL connection (`tokio_postgres::connect`'s second half) on a task of its own;
/// an error it ends with is logged as a warning naming `what` it serves.
pub fn spawn_connection<F>(connection: F, what: &'static str) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, connection = what, "a database connection ended with an error");
        }
    })
}

/// Runs `call`, which blocks (a Kafka client's metadata, watermark or seek call: up to its
/// timeout), on the blocking pool, off the async runtime's worker threads. A panic in it goes on
/// in the caller.
pub async fn blocking<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(call).await {
        Ok(t) => t,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("a blocking call did not finish: {e}"),
        },
    }
}

/// Locks `mutex`, also after a thread panicked while holding it. The state behind the services'
/// mutexes is simple (a first error, counters, an assignment): a panic elsewhere (which is logged)
/// must not turn it into "nothing" — an empty assignment, a delivery failure not reported.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Capped exponential backoff: 100 ms, 200 ms, ... up to `max`; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The delay to wait now; doubles the next one.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Waits the next delay; false when `shutdown` was cancelled first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
