//! `cdc-reader replay --from-lsn`: the running reader streams again from an earlier WAL position.
//!
//! A logical slot decodes only from its confirmed position on; `--wal-replay-window-bytes N` keeps
//! that position up to N bytes behind what Kafka has, so a replay can reach back that far. The
//! request goes through the database (`cdc_reader_replays`, one row per slot): the reader takes it
//! within a second, commits what it has open, and starts the next session from the requested LSN:
//! every change from there is published again (consumers see those changes twice; the projector
//! skips what its views already reflect). The request is done once Kafka has everything up to the
//! WAL's end at the time it was made. One taken and not done (its reader stopped, or lost the slot
//! to another) is run again from its start by the reader streaming the slot next.

use change_event::{format_lsn, parse_lsn};
use tokio_postgres::Client;

pub use crate::control::Replay;
use crate::decode::Lsn;
use crate::setup::{pg, SetupError};

/// Where a slot can decode from, and where the WAL is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The slot's confirmed position: the oldest LSN a replay can start from.
    pub oldest: Lsn,
    /// The current WAL write position.
    pub current: Lsn,
}

/// Why a replay cannot start where it was asked to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "cannot replay from {requested}: slot {slot} can decode only from {oldest} on (its \
         confirmed position; PostgreSQL keeps nothing older for logical decoding).\n\
         Alternatives:\n  \
         - `projector replay --lsn {requested}` re-applies to the views what Kafka still has from \
         there;\n  \
         - `cdc-reader snapshot` publishes every row's current state again.\n\
         To reach further back next time, run the reader with --wal-replay-window-bytes N (it keeps \
         the slot up to N bytes of WAL behind what Kafka has).",
        requested = format_lsn(*requested),
        oldest = format_lsn(*oldest)
    )]
    NotRetained {
        slot: String,
        requested: Lsn,
        oldest: Lsn,
    },
    #[error(
        "cannot replay from {requested}: the WAL ends at {current}",
        requested = format_lsn(*requested),
        current = format_lsn(*current)
    )]
    Future { requested: Lsn, current: Lsn },
    #[error(
        "slot {0} does not exist: the reader creates it on its first start; nothing to replay"
    )]
    NoSlot(String),
}

/// Whether a replay of `slot` from `from` can start, given where the slot stands.
pub fn check(slot: &str, from: Lsn, window: Option<Window>) -> Result<Window, Refusal> {
    let w = window.ok_or_else(|| Refusal::NoSlot(slot.to_owned()))?;
    if from < w.oldest {
        return Err(Refusal::NotRetained {
            slot: slot.to_owned(),
            requested: from,
            oldest: w.oldest,
        });
    }
    if from > w.current {
        return Err(Refusal::Future {
            requested: from,
            current: w.current,
        });
    }
    Ok(w)
}

/// The slot's confirmed position and the current WAL position; `None` without the slot.
pub async fn window(db: &Client, slot: &str) -> Result<Option<Window>, SetupError> {
    let row = db
        .query_opt(
            "SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("reading the slot's position"))?;
    Ok(row.map(|r| Window {
        oldest: r.get::<_, Option<&str>>(0).and_then(parse_lsn).unwrap_or(0),
        current: parse_lsn(r.get(1)).unwrap_or(0),
    }))
}

/// Records a request (replacing an earlier one of the slot) to replay from `from` up to `until`.
pub async fn request(db: &Client, slot: &str, from: Lsn, until: Lsn) -> Result<(), SetupError> {
    db.execute(
        "INSERT INTO cdc_reader_replays (slot, from_lsn, until_lsn) \
         VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn) \
         ON CONFLICT (slot) DO UPDATE SET from_lsn = excluded.from_lsn, \
           until_lsn = excluded.until_lsn, requested_at = now(), started_at = NULL, \
           done_at = NULL, outcome = NULL, records_skipped = NULL, records_sent = NULL",
        &[&slot, &format_lsn(from), &format_lsn(until)],
    )
    .await
    .map_err(pg("recording the replay request"))?;
    Ok(())
}

/// A request's state, for the command that waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub started: bool,
    pub outcome: Option<String>,
    pub skipped: Option<i64>,
    pub sent: Option<i64>,
}

pub async fn status(db: &Client, slot: &str) -> Result<Option<Status>, SetupError> {
    let row = db
        .query_opt(
            "SELECT started_at IS NOT NULL, outcome, records_skipped, records_sent \
             FROM cdc_reader_replays WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(pg("reading the replay request"))?;
    Ok(row.map(|r| Status {
        started: r.get(0),
        outcome: r.get(1),
        skipped: r.get(2),
        sent: r.get(3),
    }))
}

/// Takes the slot's pending request, if any, to stream again from its `from`; `running` is the
/// one this process runs, if any. A request started but not finished by another reader (it lost
/// the slot, or was killed) or an earlier run of this one is taken again: its replay starts over. A request the slot can no
/// longer serve (its position moved past `from` since, or will: `reported` is the position this
/// reader is about to report) is closed as refused.
pub async fn take(
    db: &Client,
    slot: &str,
    reported: Lsn,
    running: Option<&str>,
) -> Result<Option<Replay>, SetupError> {
    let Some(row) = db
        .query_opt(
            "SELECT from_lsn::text, requested_at::text, started_at IS NOT NULL \
             FROM cdc_reader_replays \
             WHERE slot = $1 AND done_at IS NULL AND requested_at::text IS DISTINCT FROM $2",
            &[&slot, &running],
        )
        .await
        .map_err(pg("looking for a replay request"))?
    else {
        return Ok(None);
    };
    let from = parse_lsn(row.get(0)).unwrap_or(0);
    let request: String = row.get(1);
    let started: bool = row.get(2);
    let window = window(db, slot).await?.map(|w| Window {
        oldest: w.oldest.max(reported),
        ..w
    });
    match check(slot, from, window) {
        Ok(_) => {
            let n = db
                .execute(
                    "UPDATE cdc_reader_replays SET started_at = now() \
                     WHERE slot = $1 AND requested_at::text = $2",
                    &[&slot, &request],
                )
                .await
                .map_err(pg("starting the replay"))?;
            if n == 0 {
                // Replaced by a newer request since: taken next round.
                return Ok(None);
            }
            if started {
                tracing::info!(slot, from = %format_lsn(from),
                    "a replay started before (by a reader that lost the slot or was stopped) is not \
                     done: streaming again from its start");
            } else {
                tracing::info!(slot, from = %format_lsn(from), "replay requested: streaming again from there");
            }
            Ok(Some(Replay { from, request }))
        }
        Err(refusal) => {
            refuse(db, slot, &request, &refusal).await?;
            Ok(None)
        }
    }
}

/// Closes the slot's request `request` (its `requested_at`) as refused.
pub async fn refuse(
    db: &Client,
    slot: &str,
    request: &str,
    refusal: &Refusal,
) -> Result<(), SetupError> {
    tracing::warn!(slot, error = %refusal, "replay request refused");
    db.execute(
        "UPDATE cdc_reader_replays SET started_at = coalesce(started_at, now()), \
           done_at = now(), outcome = $2 \
         WHERE slot = $1 AND requested_at::text = $3 AND done_at IS NULL",
        &[&slot, &format!("refused: {refusal}"), &request],
    )
    .await
    .map_err(pg("refusing the replay"))?;
    Ok(())
}

/// Closes the slot's running request `request` once Kafka has acknowledged everything up to its
/// end.
pub async fn finish(
    db: &Client,
    slot: &str,
    request: &str,
    acknowledged: Lsn,
    skipped: u64,
    sent: u64,
) -> Result<bool, SetupError> {
    let skipped = i64::try_from(skipped).unwrap_or(i64::MAX);
    let sent = i64::try_from(sent).unwrap_or(i64::MAX);
    let n = db
        .execute(
            "UPDATE cdc_reader_replays SET done_at = now(), outcome = 'done', \
               records_skipped = $3, records_sent = $4 \
             WHERE slot = $1 AND started_at IS NOT NULL AND done_at IS NULL \
               AND until_lsn <= $2::text::pg_lsn AND requested_at::text = $5",
            &[&slot, &format_lsn(acknowledged), &skipped, &sent, &request],
        )
        .await
        .map_err(pg("finishing the replay"))?;
    if n > 0 {
        tracing::info!(slot, skipped, sent, "replay done");
    }
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_needs_the_wal_between_the_slot_and_now() {
        let window = Window {
            oldest: 1000,
            current: 5000,
        };
        let w = Some(window);
        assert_eq!(check("s", 1000, w), Ok(window));
        assert_eq!(check("s", 4000, w), Ok(window));
        let refusal = check("s", 999, w).unwrap_err();
        let text = refusal.to_string();
        for part in [
            "0/3E7",
            "0/3E8",
            "projector replay --lsn 0/3E7",
            "cdc-reader snapshot",
            "--wal-replay-window-bytes",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
        assert!(matches!(check("s", 5001, w), Err(Refusal::Future { .. })));
        assert!(matches!(check("s", 1, None), Err(Refusal::NoSlot(_))));
    }
}
