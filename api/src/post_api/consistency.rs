//! Read-your-writes: `X-Min-Source-LSN`.
//!
//! A request that carries `X-Min-Source-LSN: <lsn>` (user-api's `X-Source-LSN` of a write) is
//! answered only from views that include every source transaction that committed at or before
//! that position: it waits, at most [`Consistency::timeout`], until the projector's
//! `projector_source_position` reaches it, and answers with `X-Source-LSN` set to the position the
//! views were at. When the bound passes: 503 `not_yet_consistent` with `Retry-After`. A value that
//! is not an LSN: 400. Requests without the header are not touched.
//!
//! One task polls the position (every [`POLL`]) while requests wait, and shares it with all of
//! them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use warp::http::StatusCode;
use warp::Filter;

use crate::http::{ApiError, Refused};

/// The request header.
pub const MIN_SOURCE_LSN: &str = "x-min-source-lsn";

/// How often the position is read while requests wait.
const POLL: Duration = Duration::from_millis(2);

/// Seconds a client is told to wait before retrying a request that timed out.
const RETRY_AFTER_SECS: u64 = 1;

/// Shared by every request of the service.
#[derive(Debug, Clone)]
pub struct Consistency {
    inner: Arc<Inner>,
    timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    /// The newest position read: every source transaction that ended at or before it is in the
    /// views (`None`: not known yet).
    position: tokio::sync::watch::Sender<Option<u64>>,
    waiting: AtomicUsize,
    wake: tokio::sync::Notify,
}

impl Consistency {
    /// Starts the poller (it reads only while requests wait) for the projector `group`.
    pub fn start(pool: Pool, group: String, timeout: Duration) -> Consistency {
        let inner = Arc::new(Inner {
            position: tokio::sync::watch::channel(None).0,
            waiting: AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
        });
        let poller = inner.clone();
        tokio::spawn(async move {
            let inner = poller;
            let mut failing = false;
            // Until the service drops its routes (then only this task holds `inner`).
            while Arc::strong_count(&inner) > 1 {
                if inner.waiting.load(Ordering::SeqCst) == 0 {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), inner.wake.notified()).await;
                    continue;
                }
                match read_position(&pool, &group).await {
                    Ok(position) => {
                        failing = false;
                        inner.position.send_if_modified(|known| {
                            let newer = position > *known;
                            if newer {
                                *known = position;
                            }
                            newer
                        });
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "reading projector_source_position failed");
                            failing = true;
                        }
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        });
        Consistency { inner, timeout }
    }

    /// Waits until the views include `min`; the position they were at then.
    async fn reach(&self, min: u64) -> Result<u64, ApiError> {
        let mut position = self.inner.position.subscribe();
        if let Some(known) = (*position.borrow()).filter(|p| *p >= min) {
            return Ok(known);
        }
        // Counted while waiting, also when the request goes away first (a client that hung up).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.inner.waiting);
        self.inner.wake.notify_one();
        let reached = tokio::time::timeout(
            self.timeout,
            position.wait_for(|p| p.is_some_and(|p| p >= min)),
        )
        .await;
        match reached {
            Ok(Ok(p)) => Ok((*p).unwrap_or(min)),
            Ok(Err(_)) => Err(ApiError::internal(&"the position poller stopped")),
            Err(_) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_yet_consistent",
                format!(
                    "the views have not reached {} within {:?}; retry later",
                    change_event::format_lsn(min),
                    self.timeout
                ),
            )
            .with_field("X-Min-Source-LSN")),
        }
    }

    /// Extracts the position the request waited for (`None` without the header); a refusal
    /// ([`Refused`]) when the header is malformed or the views did not get there in time.
    pub fn filter(&self) -> impl Filter<Extract = (Option<u64>,), Error = warp::Rejection> + Clone {
        let this = self.clone();
        warp::header::optional::<String>(MIN_SOURCE_LSN).and_then(move |min: Option<String>| {
            let this = this.clone();
            async move {
                let Some(min) = min else {
                    return Ok(None);
                };
                let min = parse(&min).map_err(|e| warp::reject::custom(Refused::new(e)))?;
                this.reach(min).await.map(Some).map_err(|e| {
                    let retry =
                        (e.status == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER_SECS);
                    warp::reject::custom(Refused {
                        error: e,
                        retry_after: retry,
                    })
                })
            }
        })
    }
}

fn parse(value: &str) -> Result<u64, ApiError> {
    change_event::parse_lsn(value.trim()).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_header",
            format!("X-Min-Source-LSN must be a PostgreSQL LSN such as 0/1A2B3C8, not {value:?}"),
        )
        .with_field("X-Min-Source-LSN")
    })
}

async fn read_position(pool: &Pool, group: &str) -> Result<Option<u64>, String> {
    let db = pool.get().await.map_err(|e| e.to_string())?;
    // One topic per projector group; should there be several, the least complete counts.
    let row = db
        .query_one(
            "SELECT CASE WHEN bool_and(complete_lsn IS NOT NULL) THEN min(complete_lsn)::text END \
             FROM projector_source_position WHERE consumer_group = $1",
            &[&group],
        )
        .await
        .map_err(|e| e.to_string())?;
    match row.get::<_, Option<&str>>(0) {
        None => Ok(None),
        Some(lsn) => change_event::parse_lsn(lsn)
            .map(Some)
            .ok_or_else(|| format!("projector_source_position holds {lsn:?}, not an LSN")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_as_lsns_or_are_refused() {
        assert_eq!(parse("0/1A2B3C8"), Ok(0x1A2_B3C8));
        assert_eq!(parse(" 16/B374D848 "), Ok(0x16_B374_D848));
        for bad in ["", "0", "1A2B3C8", "0/xyz", "-1/0", "0/1/2"] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.code, "invalid_header");
        }
    }
}
