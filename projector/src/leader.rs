//! One applying projector per group and topic when whole source transactions are applied.
//!
//! A source transaction's events may land on several partitions, and only a member holding every
//! partition can apply it whole. Two members of one group would each get some of the partitions
//! and both wait for ever, so in `--transactions whole` a projector first takes a session
//! advisory lock in materialized_view_db (the live projector's lock key, the pseudo-partition
//! [`LEADER`]), and only its holder joins the consumer group; the others stand by (`/health`
//! state `standby`) and try again every second. The lock goes with the holder's connection: a
//! projector killed with SIGKILL, or cut off from the database, frees it, and a standby takes
//! over (the group then hands it the partitions once the old member's session has run out).
//! Losing the connection also ends this projector's term: it stops consuming, leaves the group
//! and stands by again. (The lock only spares the partitions a split; what is applied stays
//! exact without it: the group and the per-partition batch locks keep two appliers apart.)

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The second key of the leader lock: partitions are numbered from 0, a replay takes -1 under
/// its own key.
const LEADER: i32 = -2;

/// How often a standby asks for the lock, and the leader checks its connection.
const INTERVAL: Duration = Duration::from_secs(1);

/// How long the leader's check of its connection may take before the lock counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The lock held; [`Term::lost`] is cancelled when it is no longer (or on shutdown).
#[derive(Debug)]
pub struct Term {
    pub lost: CancellationToken,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for Term {
    fn drop(&mut self) {
        // The watch owns the connection: ending it releases the lock.
        self.watch.abort();
    }
}

/// Waits until this process holds the leader lock of `key`, calling `standby` once when another
/// holds it. `None` on shutdown.
pub async fn acquire(
    url: &str,
    key: &str,
    shutdown: &CancellationToken,
    mut standby: impl FnMut(),
) -> Option<Term> {
    let mut backoff = service::Backoff::new(INTERVAL, Duration::from_secs(10));
    let mut waiting = false;
    loop {
        let (client, connection) = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "connecting to materialized_view_db for the leader lock failed; retrying");
                if !backoff.wait(shutdown).await {
                    return None;
                }
                continue;
            }
        };
        let ended = CancellationToken::new();
        let connection = tokio::spawn({
            let ended = ended.clone();
            async move {
                if let Err(error) = connection.await {
                    tracing::warn!(%error, "the leader lock's connection ended");
                }
                ended.cancel();
            }
        });
        // The server keeps the lock until it sees the connection gone: a holder whose host died
        // or was cut off (no FIN) is detected in ~11 s, not after the OS's 2 hours of TCP
        // keepalive (no effect over a Unix socket, where that cannot happen).
        if let Err(error) = client
            .batch_execute(
                "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
                 SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000",
            )
            .await
        {
            tracing::warn!(%error, "setting TCP keepalives on the leader lock's connection failed");
        }
        loop {
            match try_lock(&client, key).await {
                Ok(true) => {
                    tracing::info!(
                        key,
                        "holding the leader lock: this projector applies the topic"
                    );
                    let lost = shutdown.child_token();
                    let watch = tokio::spawn(watch(client, connection, ended, lost.clone()));
                    return Some(Term { lost, watch });
                }
                Ok(false) => {
                    if !waiting {
                        waiting = true;
                        tracing::info!(
                            key,
                            "another projector of this group applies the topic (whole source \
                             transactions need one member with every partition): standing by"
                        );
                        standby();
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "asking for the leader lock failed; reconnecting");
                    connection.abort();
                    break;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = ended.cancelled() => break,
                () = tokio::time::sleep(INTERVAL) => {}
            }
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}

async fn try_lock(client: &Client, key: &str) -> Result<bool, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext($1), $2)",
            &[&key, &LEADER],
        )
        .await
        .map(|row| row.get(0))
}

/// Keeps the lock's connection and checks it; cancels `lost` when it ends or stops answering.
async fn watch(
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    ended: CancellationToken,
    lost: CancellationToken,
) {
    loop {
        tokio::select! {
            () = lost.cancelled() => break,
            () = ended.cancelled() => {
                tracing::warn!("the leader lock's connection is gone: standing down");
                break;
            }
            () = tokio::time::sleep(INTERVAL) => {}
        }
        match tokio::time::timeout(CHECK_TIMEOUT, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "the leader lock's connection failed: standing down");
                break;
            }
            Err(_) => {
                tracing::warn!(
                    "the leader lock's connection did not answer in {CHECK_TIMEOUT:?}: standing down"
                );
                break;
            }
        }
    }
    lost.cancel();
    connection.abort();
}
