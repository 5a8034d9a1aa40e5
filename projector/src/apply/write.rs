//! The statements of one part of a view transaction: the offsets, `complete_lsn`, the truncate
//! floor, and the segment between truncates folded against the rows' current state and written
//! with `unnest` arrays.

use std::collections::{BTreeMap, HashMap, HashSet};

use change_event::{format_lsn, parse_lsn, Position};
use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::statements::Statements;
use super::{sql, ApplyError, Complete, Item, Outcome, Target};
use crate::events::{self, BadEvent, Change, Current, Final, Status, UserRow};

pub(super) async fn write_complete(
    db: &impl tokio_postgres::GenericClient,
    s: &Statements,
    t: &Target,
    completes: &[Complete],
) -> Result<(), ApplyError> {
    if completes.is_empty() || t.replay {
        return Ok(());
    }
    let parts: Vec<i32> = completes.iter().map(|c| c.partition).collect();
    let offsets: Vec<i64> = completes.iter().map(|c| c.next_offset).collect();
    let lsns: Vec<String> = completes
        .iter()
        .map(|c| format_lsn(c.complete_lsn))
        .collect();
    db.execute(&s.complete, &[&t.group, &t.topic, &parts, &offsets, &lsns])
        .await
        .map_err(sql("storing how far the views are complete"))?;
    Ok(())
}

fn position_of(lsn: &str, seq: i64) -> Result<Position, ApplyError> {
    Ok(Position {
        commit_lsn: parse_lsn(lsn).ok_or_else(|| ApplyError::BadLsn(lsn.to_owned()))?,
        event_index: u64::try_from(seq).unwrap_or(0),
    })
}

fn seq(p: Position) -> i64 {
    i64::try_from(p.event_index).unwrap_or(i64::MAX)
}

async fn floor(db: &Client, s: &Statements, table: &str) -> Result<Option<Position>, ApplyError> {
    let row = db
        .query_opt(&s.floor, &[&table])
        .await
        .map_err(sql("reading the last truncate"))?;
    row.map(|r| position_of(r.get(0), r.get(1))).transpose()
}

pub(super) async fn truncate_views(
    db: &Client,
    s: &Statements,
    t: &Target,
    position: Position,
    outcome: &mut Outcome,
) -> Result<(), ApplyError> {
    let table = t.source_table.as_str();
    if !t.replay && floor(db, s, table).await?.is_some_and(|f| position <= f) {
        outcome.ignored += 1;
        return Ok(());
    }
    let lsn = format_lsn(position.commit_lsn);
    let seq = seq(position);
    db.execute(&s.truncate_rows, &[&lsn, &seq])
        .await
        .map_err(sql("truncating user_view"))?;
    db.execute(&s.drop_empty, &[])
        .await
        .map_err(sql("dropping empty departments"))?;
    db.execute(&s.truncate_deletions, &[&lsn, &seq])
        .await
        .map_err(sql("truncating user_view_deletions"))?;
    db.execute(&s.truncate_floor, &[&table, &lsn, &seq])
        .await
        .map_err(sql("recording the truncate"))?;
    outcome.truncates += 1;
    Ok(())
}

pub(super) async fn write_segment(
    db: &Client,
    s: &Statements,
    t: &Target,
    segment: &[Item],
    first_index: usize,
    outcome: &mut Outcome,
    bad: &mut Vec<(usize, BadEvent)>,
) -> Result<(), ApplyError> {
    let ids: Vec<i64> = segment
        .iter()
        .filter_map(|i| match i.change.as_ref()? {
            Change::Upsert { row, .. } => Some(row.id),
            Change::Delete { id, .. } => Some(*id),
            Change::Truncate { .. } | Change::Tombstone => None,
        })
        .collect::<HashSet<i64>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    // Three reads, pipelined on the one connection.
    let (rows, deletions, floor) = tokio::try_join!(
        async {
            db.query(&s.rows, &[&ids])
                .await
                .map_err(sql("reading current rows"))
        },
        async {
            db.query(&s.deletions, &[&ids])
                .await
                .map_err(sql("reading deletions"))
        },
        floor(db, s, &t.source_table),
    )?;
    let mut current = HashMap::with_capacity(rows.len() + deletions.len());
    for r in deletions {
        current.insert(
            r.get::<_, i64>(0),
            Current::Deleted(position_of(r.get(1), r.get(2))?),
        );
    }
    for r in rows {
        let status: &str = r.get(4);
        let row = UserRow {
            id: r.get(0),
            name: r.get(1),
            email: r.get(2),
            department: r.get(3),
            // The projector writes only the two values; anything else was put there by hand and
            // counts as inactive, as department_stats has always counted it.
            status: Status::parse(status).unwrap_or(Status::Inactive),
            created_at: r.get(5),
            updated_at: r.get(6),
        };
        current.insert(row.id, Current::Row(row, position_of(r.get(7), r.get(8))?));
    }
    // Dead-lettered records stay in as no-ops, so indexes keep matching the segment.
    let changes: Vec<Change> = segment
        .iter()
        .map(|i| i.change.clone().unwrap_or(Change::Tombstone))
        .collect();
    if t.replay {
        // Whatever the rows claim, the replayed events come after it (not after the last
        // truncate, though: what it removed stays removed).
        let unclaimed = Position {
            commit_lsn: 0,
            event_index: 0,
        };
        for c in current.values_mut() {
            match c {
                Current::Row(_, p) | Current::Deleted(p) => *p = unclaimed,
            }
        }
    }
    let folded = events::fold(&current, floor, &changes);
    outcome.ignored += folded.ignored;
    bad.extend(folded.bad.into_iter().map(|(i, e)| (first_index + i, e)));

    let mut up = Upserts::default();
    let (mut del_ids, mut del_lsns, mut del_seqs) = (Vec::new(), Vec::new(), Vec::new());
    for (id, fin) in &folded.writes {
        match fin {
            Final::Row(row, p) => up.push(row, *p),
            Final::Deleted(p) => {
                del_ids.push(*id);
                del_lsns.push(format_lsn(p.commit_lsn));
                del_seqs.push(seq(*p));
            }
        }
    }
    let (add, change) = StatsColumns::split(&folded.stats);
    let departments: Vec<&str> = folded.stats.keys().map(String::as_str).collect();
    // Pipelined; the server runs them in this order.
    tokio::try_join!(
        async {
            if up.ids.is_empty() {
                return Ok(0);
            }
            db.execute(
                &s.upsert,
                &[
                    &up.ids,
                    &up.names,
                    &up.emails,
                    &up.departments,
                    &up.statuses,
                    &up.created,
                    &up.updated,
                    &up.lsns,
                    &up.seqs,
                ],
            )
            .await
            .map_err(sql("upserting user_view"))
        },
        async {
            if up.ids.is_empty() {
                return Ok(0);
            }
            db.execute(&s.forget_deletions, &[&up.ids])
                .await
                .map_err(sql("forgetting deletions"))
        },
        async {
            if del_ids.is_empty() {
                return Ok(0);
            }
            db.execute(&s.delete, &[&del_ids])
                .await
                .map_err(sql("deleting from user_view"))
        },
        async {
            if del_ids.is_empty() {
                return Ok(0);
            }
            db.execute(&s.record_deletions, &[&del_ids, &del_lsns, &del_seqs])
                .await
                .map_err(sql("recording deletions"))
        },
        async {
            if departments.is_empty() {
                return Ok(0);
            }
            db.execute(&s.stats_lock, &[&departments])
                .await
                .map_err(sql("locking department_stats rows"))
        },
        async {
            if add.departments.is_empty() {
                return Ok(0);
            }
            db.execute(&s.stats_add, &add.params())
                .await
                .map_err(sql("updating department_stats"))
        },
        async {
            if change.departments.is_empty() {
                return Ok(0);
            }
            let n = db
                .execute(&s.stats_change, &change.params())
                .await
                .map_err(sql("updating department_stats"))?;
            if n != change.departments.len() as u64 {
                return Err(ApplyError::StatsOutOfStep(change.departments.join(", ")));
            }
            Ok(n)
        },
        async {
            if folded.stats.is_empty() {
                return Ok(0);
            }
            db.execute(&s.drop_empty, &[])
                .await
                .map_err(sql("dropping empty departments"))
        },
    )?;
    outcome.upserted += up.ids.len();
    outcome.deleted += del_ids.len();
    Ok(())
}

/// Column arrays of department_stats deltas.
#[derive(Default)]
struct StatsColumns<'a> {
    departments: Vec<&'a str>,
    users: Vec<i64>,
    active: Vec<i64>,
    inactive: Vec<i64>,
}

impl<'a> StatsColumns<'a> {
    /// (departments whose counts only grow, the others).
    fn split(stats: &'a BTreeMap<String, events::StatsDelta>) -> (Self, Self) {
        let (mut add, mut change) = (Self::default(), Self::default());
        for (d, delta) in stats {
            let to = if delta.users >= 0 && delta.active >= 0 && delta.inactive >= 0 {
                &mut add
            } else {
                &mut change
            };
            to.departments.push(d);
            to.users.push(delta.users);
            to.active.push(delta.active);
            to.inactive.push(delta.inactive);
        }
        (add, change)
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 4] {
        [&self.departments, &self.users, &self.active, &self.inactive]
    }
}

/// Column arrays for the upsert statement.
#[derive(Default)]
struct Upserts {
    ids: Vec<i64>,
    names: Vec<String>,
    emails: Vec<String>,
    departments: Vec<String>,
    statuses: Vec<&'static str>,
    created: Vec<DateTime<Utc>>,
    updated: Vec<DateTime<Utc>>,
    lsns: Vec<String>,
    seqs: Vec<i64>,
}

impl Upserts {
    fn push(&mut self, row: &UserRow, p: Position) {
        self.ids.push(row.id);
        self.names.push(row.name.clone());
        self.emails.push(row.email.clone());
        self.departments.push(row.department.clone());
        self.statuses.push(row.status.as_str());
        self.created.push(row.created_at);
        self.updated.push(row.updated_at);
        self.lsns.push(format_lsn(p.commit_lsn));
        self.seqs.push(seq(p));
    }
}
