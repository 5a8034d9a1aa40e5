//! Applying: records written into the view transaction (a range the database refuses for its data
//! halved until the event is alone, and that one dead-lettered), the transaction committed with
//! the offsets and `complete_lsn`, retried or read again when it fails.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use change_event::RecordPosition;

use super::{connected, BatchError, DeadLetterTopic, Projector, Record, Remedy, ViewTx};
use crate::apply::{ApplyError, Complete, Item, Outcome, Store};
use crate::dead_letter::Letter;
use crate::events::Change;
use crate::{telemetry, Error};

impl Projector<'_> {
    /// Writes `records` into the view transaction and, when `commit`, commits it, retrying what
    /// can be retried: from memory when every record of the transaction is still in hand, by
    /// reading the partitions again from the stored offsets when some are not. Ok(false) on
    /// shutdown.
    pub(super) async fn apply(
        &mut self,
        records: Vec<Record>,
        commit: bool,
    ) -> Result<bool, Error> {
        loop {
            let attempt = async {
                self.write(&records).await?;
                if commit {
                    self.commit_view_tx().await?;
                } else if let Some(v) = &mut self.view_tx {
                    v.released = true;
                }
                Ok::<_, BatchError>(())
            }
            .await;
            let Err(error) = attempt else {
                return Ok(true);
            };
            let released = self.view_tx.as_ref().is_some_and(|v| v.released) || !commit;
            let reread = error.remedy() == Remedy::Reread;
            self.abandon().await;
            if !self.failed(error).await? {
                return Ok(false);
            }
            if released || reread {
                // Read every partition again from the stored offsets (records held are read
                // again too).
                self.reread = true;
                self.positioned_generation = u64::MAX;
                return Ok(true);
            }
        }
    }

    /// Commits `records` as a view transaction, and the view transactions that follow it in
    /// `held`, two in flight: while one commits on one connection, the next is written on the
    /// other. The next one goes ahead only when it cannot depend on what the one committing
    /// wrote (no user in both, no truncate in either: it reads nothing the other changed);
    /// it commits after it, and not at all when that one fails. What PostgreSQL does at a view
    /// transaction's commit (the derived views' refresh) then overlaps with the next one's
    /// writes. Records of a view transaction that failed are put back in `held`, or read again.
    /// Ok(false) on shutdown.
    pub(super) async fn apply_pipelined(
        &mut self,
        records: Vec<Record>,
        held: &mut Vec<Record>,
    ) -> Result<bool, Error> {
        if let Err(error) = self.write(&records).await {
            return self.recover(error, vec![records], held).await;
        }
        let mut written = records;
        loop {
            // The next view transaction comes from what is in hand and what the consumer has
            // fetched (not once shutdown was asked for: this one commits alone).
            let stopping = self.shutdown.is_cancelled();
            if !stopping && held.len() < self.config.batch_max_events as usize {
                self.take_fetched(held).await?;
            }
            let (Some(v), Some(mut store)) = (self.view_tx.take(), self.store.take()) else {
                return Ok(true);
            };
            let completes = self.completes(&v.applied);
            self.committing = Some(v);
            self.store = self.spare.take();
            let next = match if stopping {
                None
            } else {
                self.take_ready(held)
            } {
                Some(b) if independent(&written, &b) => Some(b),
                Some(b) => {
                    // After this one commits.
                    held.splice(0..0, b);
                    None
                }
                None => None,
            };
            let (committed, wrote) = match &next {
                Some(b) => {
                    self.metrics.overlapped.fetch_add(1, Ordering::Relaxed);
                    let (c, w) = tokio::join!(store.commit(&completes), self.write(b));
                    (c, Some(w))
                }
                None => (store.commit(&completes).await, None),
            };
            let v = self.committing.take().expect("set above");
            self.spare = Some(store);
            match committed {
                Ok(outcome) => self.committed(v, outcome, &completes),
                Err(error) => {
                    // (The next one, written meanwhile, must not commit without it.)
                    let again = std::iter::once(written).chain(next).collect();
                    return self.recover(error.into(), again, held).await;
                }
            }
            let Some(b) = next else {
                return Ok(true);
            };
            if let Some(Err(error)) = wrote {
                return self.recover(error, vec![b], held).await;
            }
            written = b;
        }
    }

    /// After a view transaction of `batches` failed: it is abandoned, and its records are taken
    /// again, in order, before what was held behind them, or read again from the stored offsets
    /// when another applier moved them. Ok(false) on shutdown.
    async fn recover(
        &mut self,
        error: BatchError,
        batches: Vec<Vec<Record>>,
        held: &mut Vec<Record>,
    ) -> Result<bool, Error> {
        let reread = error.remedy() == Remedy::Reread;
        self.abandon().await;
        if !self.failed(error).await? {
            return Ok(false);
        }
        if reread {
            self.reread = true;
            self.positioned_generation = u64::MAX;
        } else {
            held.splice(0..0, batches.into_iter().flatten());
        }
        Ok(true)
    }

    /// Writes `records` into the view transaction, dead letters first. A range the database
    /// refuses for its data is halved, inside the transaction, until the event is alone; that one
    /// is dead-lettered.
    pub(super) async fn write(&mut self, records: &[Record]) -> Result<(), BatchError> {
        self.ensure_dead_letter_topic().await?;
        let mut todo = Vec::new();
        todo.push(0..records.len());
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            let error = match self.write_chunk(&records[range.clone()], None).await {
                Ok(()) => continue,
                Err(e) => e,
            };
            let open = self.store.as_ref().is_some_and(Store::in_transaction);
            if error.remedy() != Remedy::Isolate || !open {
                return Err(error);
            }
            if range.len() > 1 {
                let mid = range.start + range.len() / 2;
                // Stack: the first half is written first, keeping the order.
                todo.push(mid..range.end);
                todo.push(range.start..mid);
                tracing::warn!(error = %service::error_chain(&error), events = range.len(),
                    "the database refused a batch; writing it in halves to find the event");
            } else {
                let reason = service::error_chain(&error);
                self.write_chunk(&records[range], Some(&reason)).await?;
            }
        }
        Ok(())
    }

    /// Writes `records` into the view transaction; with `refused`, only their offsets (the
    /// database refused them for that reason: they are dead-lettered).
    async fn write_chunk(
        &mut self,
        records: &[Record],
        refused: Option<&str>,
    ) -> Result<(), BatchError> {
        let items: Vec<Item> = records
            .iter()
            .map(|r| Item {
                partition: r.partition,
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                position: r.position,
                change: match refused {
                    Some(_) => None,
                    None => r.decoded.as_ref().ok().cloned(),
                },
            })
            .collect();
        let open = self.view_tx.is_some();
        let store = connected(&mut self.store, &self.config.database_url, &self.target).await?;
        if open && !store.in_transaction() {
            return Err(ApplyError::TransactionLost.into());
        }
        let bad = store.write(&items).await?;
        let letters: Vec<Letter<'_>> = match refused {
            Some(reason) => records
                .iter()
                .map(|r| letter(r, "database_refused", reason.to_owned()))
                .collect(),
            None => records
                .iter()
                .filter_map(|r| {
                    let e = r.decoded.as_ref().err()?;
                    Some(letter(r, e.kind(), e.to_string()))
                })
                .chain(
                    bad.iter()
                        .map(|(i, e)| letter(&records[*i], e.kind(), e.to_string())),
                )
                .collect(),
        };
        if !letters.is_empty() {
            match self.mode.dead_letters() {
                Some(d) => d.send_all(&letters).await.map_err(BatchError::DeadLetter)?,
                None => not_applied(&letters),
            }
        }
        let v = self.view_tx.get_or_insert_with(ViewTx::new);
        v.dead += letters.len() as u64;
        v.events += records.len() as u64;
        for r in records {
            let next = v.next.entry(r.partition).or_insert(r.offset + 1);
            *next = (*next).max(r.offset + 1);
            if let Some(p) = r.position {
                let last = v.applied.entry(r.partition).or_insert(p);
                *last = (*last).max(p);
                v.through = v.through.max(Some(p.commit_lsn));
            }
        }
        Ok(())
    }

    /// Commits the view transaction with the partitions' `complete_lsn`.
    pub(super) async fn commit_view_tx(&mut self) -> Result<(), BatchError> {
        let Some(v) = &self.view_tx else {
            return Ok(());
        };
        let completes = self.completes(&v.applied);
        let store = connected(&mut self.store, &self.config.database_url, &self.target).await?;
        if !store.in_transaction() {
            return Err(ApplyError::TransactionLost.into());
        }
        let outcome = store.commit(&completes).await?;
        let Some(v) = self.view_tx.take() else {
            return Ok(());
        };
        self.committed(v, outcome, &completes);
        Ok(())
    }

    /// After `v` committed with `completes`: the counts, `complete_lsn` and the offsets to
    /// mirror to Kafka.
    fn committed(&mut self, v: ViewTx, outcome: Outcome, completes: &[Complete]) {
        let m = self.metrics;
        m.events.fetch_add(v.events, Ordering::Relaxed);
        m.upserted
            .fetch_add(outcome.upserted as u64, Ordering::Relaxed);
        m.deleted
            .fetch_add(outcome.deleted as u64, Ordering::Relaxed);
        m.truncates
            .fetch_add(outcome.truncates as u64, Ordering::Relaxed);
        m.ignored
            .fetch_add(outcome.ignored as u64, Ordering::Relaxed);
        m.dead_lettered.fetch_add(v.dead, Ordering::Relaxed);
        if let Some(lsn) = outcome.last_lsn {
            m.last_applied_lsn.fetch_max(lsn, Ordering::Relaxed);
        }
        m.record_batch(v.started.elapsed());
        m.set_state(telemetry::State::Running);
        self.backoff.reset();
        self.completed(v.applied, completes);
        self.commit_to_kafka(&v.next);
    }

    /// Abandons the open view transaction, if any.
    pub(super) async fn abandon(&mut self) {
        self.view_tx = None;
        if let Some(store) = &mut self.store {
            store.rollback().await;
        }
    }

    async fn ensure_dead_letter_topic(&mut self) -> Result<(), BatchError> {
        let Some(d) = self.mode.dead_letters() else {
            return Ok(());
        };
        let exists = match std::mem::replace(&mut self.dead_letter_topic, DeadLetterTopic::Unknown)
        {
            DeadLetterTopic::Ready => true,
            DeadLetterTopic::Creating(task) => {
                let outcome = task.await.map_err(|e| e.to_string());
                match outcome.and_then(|created| created.map_err(|e| e.to_string())) {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(%error, "creating the dead-letter topic failed; trying again");
                        false
                    }
                }
            }
            DeadLetterTopic::Unknown => false,
        };
        if !exists {
            d.ensure_topic(&self.config.kafka_brokers)
                .await
                .map_err(BatchError::DeadLetter)?;
        }
        self.dead_letter_topic = DeadLetterTopic::Ready;
        Ok(())
    }

    /// The `complete_lsn` every positioned partition reaches once `written` (the last record of
    /// each partition in the view transaction) is applied, where it rises (see
    /// [`crate::source_position`]).
    fn completes(&self, written: &HashMap<i32, RecordPosition>) -> Vec<Complete> {
        let Some(follower) = self.mode.follower() else {
            return Vec::new();
        };
        let mut completes = Vec::new();
        for (&partition, cursor) in &self.positions {
            let last = written
                .get(&partition)
                .copied()
                .max(self.applied.get(&partition).copied());
            let Some(complete_lsn) = follower.complete(partition, last) else {
                continue;
            };
            if self
                .complete
                .get(&partition)
                .is_none_or(|stored| complete_lsn > *stored)
            {
                completes.push(Complete {
                    partition,
                    // Only for a partition without a row (nothing of it applied yet): the
                    // cursor may be past records of a batch still being applied.
                    next_offset: self
                        .positioned_at
                        .get(&partition)
                        .copied()
                        .unwrap_or(cursor.next),
                    complete_lsn,
                });
            }
        }
        completes
    }

    /// After a commit: what [`Projector::completes`] said is now stored.
    fn completed(&mut self, applied: HashMap<i32, RecordPosition>, completes: &[Complete]) {
        for (partition, position) in applied {
            let last = self.applied.entry(partition).or_insert(position);
            *last = (*last).max(position);
        }
        for c in completes {
            self.complete.insert(c.partition, c.complete_lsn);
        }
    }

    /// Between batches: raises the `complete_lsn` of partitions the reader's newest positions
    /// say are complete further (idle ones, or ones whose last records came before the position
    /// did), and stores the topic's partition count when it is new. Ok(false) on shutdown.
    pub(super) async fn raise_complete(&mut self) -> Result<bool, Error> {
        let Some(follower) = self.mode.follower() else {
            return Ok(true);
        };
        // (A view transaction open on the connection would take these writes in.)
        if self.positions.is_empty() || self.view_tx.is_some() {
            return Ok(true);
        }
        let partitions = follower.partitions.load(Ordering::SeqCst);
        if partitions > 0 && self.topic_partitions_stored != Some(partitions) {
            let stored = match self.connected().await {
                Ok(store) => store.set_topic_partitions(partitions).await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(()) => self.topic_partitions_stored = Some(partitions),
                Err(e) => {
                    if !self.failed(BatchError::Apply(e)).await? {
                        return Ok(false);
                    }
                }
            }
        }
        let completes = self.completes(&HashMap::new());
        if completes.is_empty() {
            return Ok(true);
        }
        loop {
            let raised = match self.connected().await {
                Ok(store) => store.raise_complete(&completes).await,
                Err(e) => Err(e),
            };
            match raised {
                Ok(()) => {
                    self.completed(HashMap::new(), &completes);
                    return Ok(true);
                }
                Err(e) => {
                    if !self.failed(BatchError::Apply(e)).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }
}

/// A replay does not dead-letter again what the projector dead-lettered when it first met it.
fn not_applied(letters: &[Letter<'_>]) {
    for l in letters {
        tracing::warn!(partition = l.partition, offset = l.offset, kind = l.kind, error = %l.error,
            "replay: an event that cannot be applied (dead-lettered when it was first consumed)");
    }
}

fn letter<'a>(r: &'a Record, kind: &'static str, error: String) -> Letter<'a> {
    Letter {
        partition: r.partition,
        offset: r.offset,
        key: r.key.as_deref(),
        value: r.value.as_deref(),
        kind,
        error,
    }
}

/// Whether view transactions of `a` and then `b` can be written side by side: `b` reads no row
/// `a` writes (no user in both), and neither truncates.
fn independent(a: &[Record], b: &[Record]) -> bool {
    fn users(records: &[Record]) -> Option<HashSet<i64>> {
        let mut users = HashSet::with_capacity(records.len());
        for r in records {
            match &r.decoded {
                Ok(Change::Upsert { row, .. }) => users.insert(row.id),
                Ok(Change::Delete { id, .. }) => users.insert(*id),
                Ok(Change::Truncate { .. }) => return None,
                Ok(Change::Tombstone) | Err(_) => false,
            };
        }
        Some(users)
    }
    match (users(a), users(b)) {
        (Some(a), Some(b)) => a.is_disjoint(&b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use change_event::Position;

    use super::*;
    use crate::events::PartialRow;

    fn record(offset: i64, change: Change) -> Record {
        Record {
            partition: 0,
            offset,
            timestamp_ms: None,
            position: None,
            key: None,
            value: None,
            decoded: Ok(change),
        }
    }

    fn upsert(offset: i64, id: i64) -> Record {
        let row = PartialRow {
            id,
            name: None,
            email: None,
            department: None,
            status: None,
            created_at: None,
            updated_at: None,
        };
        record(
            offset,
            Change::Upsert {
                row,
                position: at(offset),
            },
        )
    }

    fn at(offset: i64) -> Position {
        Position {
            commit_lsn: offset as u64,
            event_index: 0,
        }
    }

    #[test]
    fn view_transactions_go_side_by_side_only_without_a_user_in_common_or_a_truncate() {
        let a = [upsert(1, 10), upsert(2, 11)];
        assert!(independent(
            &a,
            &[upsert(3, 12), record(4, Change::Tombstone)]
        ));
        // The same user, updated or deleted.
        assert!(!independent(&a, &[upsert(3, 12), upsert(4, 11)]));
        let delete = record(
            3,
            Change::Delete {
                id: 10,
                position: at(3),
            },
        );
        assert!(!independent(&a, &[delete]));
        // A truncate on either side.
        let truncate = || record(5, Change::Truncate { position: at(5) });
        assert!(!independent(&a, &[truncate()]));
        assert!(!independent(&[truncate()], &[upsert(6, 13)]));
        // A record that is not an event touches no user.
        let mut bad = upsert(3, 10);
        bad.decoded = Err(crate::events::BadEvent::Empty);
        assert!(independent(&a, &[bad]));
    }
}
