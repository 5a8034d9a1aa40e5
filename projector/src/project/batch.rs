//! Batching: which of the records in hand make the next view transaction. A view transaction
//! takes whole source transactions only, those complete in every partition (below the
//! [`Projector::frontier`]); past `--hold-max-kib` held, part of them goes into a view transaction
//! left open until they are complete.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::Instant;

use change_event::RecordPosition;

use super::{BatchError, Projector, Record};
use crate::source_position::Known;
use crate::{Error, Transactions};

/// The view transaction being written: what it holds so far.
#[derive(Debug)]
pub(super) struct ViewTx {
    pub(super) started: Instant,
    /// Some records written in it are no longer in hand (parts written while more than
    /// `--hold-max-kib` was held): when it fails, the partitions are read again from the stored
    /// offsets.
    pub(super) released: bool,
    /// Per partition: the last record written (by position) and the offset after it.
    pub(super) applied: HashMap<i32, RecordPosition>,
    pub(super) next: BTreeMap<i32, i64>,
    /// The highest source commit LSN written: the transaction commits only once every partition
    /// is complete past it.
    pub(super) through: Option<u64>,
    pub(super) events: u64,
    pub(super) dead: u64,
}

impl ViewTx {
    pub(super) fn new() -> ViewTx {
        ViewTx {
            started: Instant::now(),
            released: false,
            applied: HashMap::new(),
            next: BTreeMap::new(),
            through: None,
            events: 0,
            dead: 0,
        }
    }
}

/// Whether `r` belongs to a source transaction complete below `frontier` (records without a
/// position are never held back).
fn ready(r: &Record, frontier: Option<u64>) -> bool {
    frontier.is_none_or(|f| r.position.is_none_or(|p| p.commit_lsn < f))
}

/// What [`Projector::take_ready`] takes, given the `frontier` and, when a view transaction is
/// open, the highest commit LSN written in it (`open`).
fn take_view_tx(
    held: &mut Vec<Record>,
    frontier: Option<u64>,
    open: Option<Option<u64>>,
    max: usize,
) -> Option<Vec<Record>> {
    let through = open.flatten();
    if through.is_some_and(|t| frontier.is_some_and(|f| t >= f)) {
        return None;
    }
    let lsn = |r: &Record| r.position.map_or(0, |p| p.commit_lsn);
    let mut lsns: Vec<u64> = held
        .iter()
        .filter(|r| ready(r, frontier))
        .map(lsn)
        .collect();
    if lsns.is_empty() && open.is_none() {
        return None;
    }
    lsns.sort_unstable();
    // Below the transaction of the first record past the limit (the whole first transaction
    // when it alone is larger), and past every transaction the open one has parts of.
    let below = lsns
        .get(max)
        .map(|&at| if at > lsns[0] { at } else { lsns[0] + 1 })
        .map(|b| through.map_or(b, |t| b.max(t + 1)));
    let records = take_prefix(held, |r| {
        ready(r, frontier) && below.is_none_or(|b| lsn(r) < b)
    });
    // (Ready records behind one that is not, in their partition, wait with it.)
    (!records.is_empty() || open.is_some()).then_some(records)
}

/// Takes out of `held`, in order, each partition's records up to the first one `take` refuses
/// (a partition's records are applied in order).
fn take_prefix(held: &mut Vec<Record>, take: impl Fn(&Record) -> bool) -> Vec<Record> {
    let mut blocked = BTreeSet::new();
    let mut taken = Vec::new();
    let mut kept = Vec::with_capacity(held.len());
    for r in held.drain(..) {
        if !blocked.contains(&r.partition) && take(&r) {
            taken.push(r);
        } else {
            blocked.insert(r.partition);
            kept.push(r);
        }
    }
    *held = kept;
    taken
}

impl Projector<'_> {
    /// The source commit LSN below which every positioned partition's records are all in hand
    /// (applied, written or held): a source transaction that committed below it is complete, and
    /// its records can be applied without tearing it. Per partition that is the end of the
    /// newest reader position whose last record of it is in hand (see [`crate::source_position`]), or
    /// the commit LSN of the last record in hand (a partition is in commit order). `None`: no
    /// limit (a replay, which has no reader positions to go by; a topic whose writer commits no
    /// positions; `--transactions batches`).
    fn frontier(&self, held: &[Record]) -> Option<u64> {
        self.complete_through(held)
            .map(|c| c.into_values().min().unwrap_or(u64::MAX))
    }

    /// Per positioned partition, the source commit LSN below which its records are all in hand
    /// (see [`Projector::frontier`]); `None`: no limit.
    fn complete_through(&self, held: &[Record]) -> Option<BTreeMap<i32, u64>> {
        let follower = self.mode.follower()?;
        if self.config.transactions == Transactions::Batches {
            return None;
        }
        match follower.known() {
            Known::Positions => {}
            // Read the positions first (the projector's first moments).
            Known::Loading => return Some(self.positions.keys().map(|&p| (p, 0)).collect()),
            // Nothing to go by (a reader without Kafka transactions): batches as they come.
            Known::None => return None,
        }
        let mut last: HashMap<i32, RecordPosition> = HashMap::new();
        let written = (self.view_tx.iter().chain(&self.committing)).flat_map(|v| v.applied.iter());
        for (&partition, &position) in self.applied.iter().chain(written) {
            let e = last.entry(partition).or_insert(position);
            *e = (*e).max(position);
        }
        for r in held {
            if let Some(position) = r.position {
                let e = last.entry(r.partition).or_insert(position);
                *e = (*e).max(position);
            }
        }
        let through = self.positions.keys().map(|&partition| {
            let last = last.get(&partition).copied();
            let complete = [
                self.complete.get(&partition).copied(),
                follower.complete(partition, last),
                last.map(|p| p.commit_lsn),
            ];
            (partition, complete.into_iter().flatten().max().unwrap_or(0))
        });
        Some(through.collect())
    }

    /// Writes what `held` allows. The records of the source transactions complete in every
    /// partition (see [`Projector::frontier`]) are committed, in view transactions of whole
    /// source transactions, with what an open one holds already. When more than
    /// `--hold-max-kib` stays held (a source transaction larger than that, or a partition far
    /// behind the others), the older half of it goes into a view transaction left open, which
    /// commits once they are complete; while it is open, only records it needs are written in
    /// parts, and past the limit the partitions complete past it are paused until it commits.
    /// Ok(false) on shutdown.
    pub(super) async fn step(&mut self, held: &mut Vec<Record>) -> Result<bool, Error> {
        if !self.commit_ready(held).await? {
            return Ok(false);
        }
        if self.reread {
            return Ok(true);
        }
        let through = self.view_tx.as_ref().map(|v| v.through);
        if through.is_none() {
            self.resume_ahead();
        }
        let bytes: u64 = held.iter().map(Record::size).sum();
        let full = bytes >= self.config.hold_max_kib.saturating_mul(1024);
        if let Some(Some(through)) = through {
            self.pause_ahead(held, through, full);
        }
        if !full {
            return Ok(true);
        }
        let upto = match through.flatten() {
            // Only what the open transaction waits for: a part past its end would move the end.
            Some(through) => through,
            None => {
                let frontier = self.frontier(held);
                let mut waiting: Vec<u64> = held
                    .iter()
                    .filter(|r| !ready(r, frontier))
                    .filter_map(|r| r.position.map(|p| p.commit_lsn))
                    .collect();
                waiting.sort_unstable();
                let Some(&upto) = waiting.get(waiting.len() / 2) else {
                    return Ok(true);
                };
                upto
            }
        };
        let records = take_prefix(held, |r| r.position.is_none_or(|p| p.commit_lsn <= upto));
        if records.is_empty() {
            return Ok(true);
        }
        tracing::debug!(
            events = records.len(),
            held = held.len(),
            "writing part of a view transaction before its source transactions are complete"
        );
        self.metrics.parts.fetch_add(1, Ordering::Relaxed);
        self.apply(records, false).await
    }

    /// While the open view transaction ends at `through`: past the hold limit (`full`), pauses
    /// the partitions complete past it; resumes those paused that are no longer known to be (the
    /// reader positions that said so were dropped from the follower's window, and only their
    /// next records would say it again).
    fn pause_ahead(&mut self, held: &[Record], through: u64, full: bool) {
        let Some(complete) = self.complete_through(held) else {
            return;
        };
        let behind: Vec<i32> = self
            .ahead
            .iter()
            .copied()
            .filter(|p| complete.get(p).is_none_or(|&c| c <= through))
            .collect();
        if !behind.is_empty() {
            self.pause(&behind, false);
            for p in &behind {
                self.ahead.remove(p);
            }
        }
        if !full {
            return;
        }
        let ahead: Vec<i32> = complete
            .into_iter()
            .filter(|&(p, c)| c > through && !self.ahead.contains(&p))
            .map(|(p, _)| p)
            .collect();
        if !ahead.is_empty() {
            tracing::debug!(
                ?ahead,
                through,
                "pausing partitions complete past the open view transaction"
            );
            self.pause(&ahead, true);
            self.ahead.extend(ahead);
        }
    }

    /// Resumes the partitions [`Projector::pause_ahead`] paused.
    fn resume_ahead(&mut self) {
        let ahead: Vec<i32> = std::mem::take(&mut self.ahead).into_iter().collect();
        self.pause(&ahead, false);
    }

    /// Commits view transactions of the ready records (and what the open one holds), each of at
    /// most `--batch-max-events` events unless a source transaction has more, while there are
    /// some. Ok(false) on shutdown.
    pub(super) async fn commit_ready(&mut self, held: &mut Vec<Record>) -> Result<bool, Error> {
        // (After a view transaction with parts was lost, nothing more until the partitions are
        // read again: a later commit would store offsets past its records.)
        while !self.reread {
            let fresh = self.view_tx.is_none();
            let Some(records) = self.take_ready(held) else {
                break;
            };
            // (A view transaction with parts written before commits alone: its records are not
            // all in hand.)
            let done = if fresh && self.mode.is_live() {
                self.apply_pipelined(records, held).await?
            } else {
                self.apply(records, true).await?
            };
            if !done {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The records of the next view transaction, taken out of `held`: the ready records of the
    /// oldest source transactions, at most `--batch-max-events` of them unless the first
    /// transaction has more, and every ready record of the transactions the open view
    /// transaction (committed with them) has parts of. `None` when there is nothing to commit,
    /// or the open view transaction holds transactions not yet complete.
    pub(super) fn take_ready(&self, held: &mut Vec<Record>) -> Option<Vec<Record>> {
        let frontier = self.frontier(held);
        let open = self.view_tx.as_ref().map(|v| v.through);
        take_view_tx(held, frontier, open, self.config.batch_max_events as usize)
    }

    /// One attempt at one view transaction of what [`Projector::commit_ready`] commits, for the
    /// shutdown; the number of records committed.
    pub(super) async fn try_commit_ready(
        &mut self,
        held: &mut Vec<Record>,
    ) -> Result<usize, BatchError> {
        let Some(records) = self.take_ready(held) else {
            return Ok(0);
        };
        self.write(&records).await?;
        let events = self.view_tx.as_ref().map_or(0, |v| v.events);
        self.commit_view_tx().await?;
        Ok(usize::try_from(events).unwrap_or(usize::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Change;

    fn record(partition: i32, offset: i64, commit_lsn: Option<u64>) -> Record {
        Record {
            partition,
            offset,
            timestamp_ms: None,
            position: commit_lsn.map(|commit_lsn| RecordPosition {
                commit_lsn,
                event_index: 0,
                sub: 0,
            }),
            key: None,
            value: None,
            decoded: Ok(Change::Tombstone),
        }
    }

    #[test]
    fn records_are_taken_in_each_partitions_order_up_to_the_first_held_back() {
        let mut held = vec![
            record(0, 1, Some(10)),
            record(1, 1, Some(10)),
            record(0, 2, Some(30)),
            record(1, 2, Some(20)),
            // Ready, but after a record of its partition held back.
            record(0, 3, None),
            record(1, 3, Some(25)),
        ];
        let taken = take_prefix(&mut held, |r| ready(r, Some(30)));
        let at = |rs: &[Record]| {
            rs.iter()
                .map(|r| (r.partition, r.offset))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(&taken), [(0, 1), (1, 1), (1, 2), (1, 3)]);
        assert_eq!(at(&held), [(0, 2), (0, 3)]);
        // Without a frontier (a replay) everything is ready.
        assert_eq!(take_prefix(&mut held, |r| ready(r, None)).len(), 2);
        assert!(held.is_empty());
    }

    #[test]
    fn view_transactions_take_whole_transactions_up_to_the_limit() {
        let at = |rs: &[Record]| {
            rs.iter()
                .map(|r| (r.partition, r.offset))
                .collect::<Vec<_>>()
        };
        // Three transactions of three records each on one partition; at most 4 records: the
        // first transaction only (the second would pass the limit).
        let mut held: Vec<Record> = (0..9)
            .map(|i| record(0, i, Some(10 * (1 + i as u64 / 3))))
            .collect();
        let taken = take_view_tx(&mut held, Some(100), None, 4).unwrap();
        assert_eq!(at(&taken), [(0, 0), (0, 1), (0, 2)]);
        // A transaction larger than the limit is taken whole.
        let taken = take_view_tx(&mut held, Some(100), None, 2).unwrap();
        assert_eq!(taken.len(), 3);
        // Nothing at or past the frontier.
        assert!(take_view_tx(&mut held, Some(30), None, 10).is_none());
        assert_eq!(held.len(), 3);
    }

    #[test]
    fn an_open_view_transaction_commits_with_every_record_of_its_transactions() {
        // Parts of transactions 150 and 200 written (through 200); partition 1 then brings 6
        // records of 150 and 2 of 200. With a limit of 1 the commit still takes all of them.
        let mut held: Vec<Record> = (0..6)
            .map(|i| record(1, i, Some(150)))
            .chain((6..8).map(|i| record(1, i, Some(200))))
            .collect();
        let taken = take_view_tx(&mut held, Some(250), Some(Some(200)), 1).unwrap();
        assert_eq!(taken.len(), 8);
        // Not before every partition is complete past it.
        let mut held = vec![record(1, 0, Some(150))];
        assert!(take_view_tx(&mut held, Some(200), Some(Some(200)), 1).is_none());
        // An open transaction with nothing more to add is committed (empty list).
        let mut held = Vec::new();
        assert_eq!(
            take_view_tx(&mut held, Some(250), Some(Some(200)), 1).map(|r| r.len()),
            Some(0)
        );
    }

    #[test]
    fn ready_records_behind_one_held_back_give_nothing_to_commit() {
        // A record without a position after one not yet complete: nothing to take (an empty
        // view transaction would be committed over and over).
        let mut held = vec![record(0, 0, Some(200)), record(0, 1, None)];
        assert!(take_view_tx(&mut held, Some(150), None, 10).is_none());
        assert_eq!(held.len(), 2);
    }
}
