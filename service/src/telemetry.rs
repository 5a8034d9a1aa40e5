//! The small HTTP endpoint every background service exposes: `/health` (200 while healthy, 503
//! otherwise, with a JSON body) and `/metrics` (Prometheus text format), plus a writer for that
//! format.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::{Filter, Reply};

/// What a service reports about itself.
pub trait Telemetry: Send + Sync + 'static {
    /// Healthy or not, and a JSON body that says why.
    fn health(&self) -> (bool, serde_json::Value);
    /// Prometheus text exposition.
    fn render(&self) -> String;
}

/// Serves `/health` and `/metrics` on `listener` until `shutdown`, in a task of its own.
pub fn spawn<T: Telemetry>(
    listener: tokio::net::TcpListener,
    telemetry: Arc<T>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve(listener, telemetry, shutdown))
}

async fn serve<T: Telemetry>(
    listener: tokio::net::TcpListener,
    telemetry: Arc<T>,
    shutdown: CancellationToken,
) {
    let t = telemetry.clone();
    let health = warp::path!("health").and(warp::get()).map(move || {
        let (up, body) = t.health();
        let code = if up {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        warp::reply::with_status(warp::reply::json(&body), code).into_response()
    });
    let t = telemetry;
    let prometheus = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(t.render(), "content-type", "text/plain; version=0.0.4")
            .into_response()
    });
    warp::serve(health.or(prometheus))
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run()
        .await;
}

/// Builds a Prometheus text exposition, one metric family at a time.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    /// One sample without labels.
    pub fn metric(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }

    /// One family with a sample per label value (`label="value"`).
    pub fn labelled<V: std::fmt::Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (String, V)>,
    ) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (l, v) in samples {
            let _ = writeln!(self.0, "{name}{{{label}=\"{l}\"}} {v}");
        }
    }

    /// A histogram from cumulative bucket counts (`(upper bound, count at or below)`), sum, count.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (le, n) in buckets {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            self.0,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
    }

    pub fn finish(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let mut e = Exposition::default();
        e.metric("x_total", "counter", "Things.", 3);
        e.labelled("lag", "gauge", "Lag.", "partition", [("0".to_owned(), 5)]);
        e.histogram("h_seconds", "H.", &[(0.1, 1), (1.0, 2)], 0.6, 3);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n\
             # HELP lag Lag.\n# TYPE lag gauge\nlag{partition=\"0\"} 5\n\
             # HELP h_seconds H.\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{le=\"0.1\"} 1\nh_seconds_bucket{le=\"1\"} 2\n\
             h_seconds_bucket{le=\"+Inf\"} 3\nh_seconds_sum 0.6\nh_seconds_count 3\n"
        );
    }
}
