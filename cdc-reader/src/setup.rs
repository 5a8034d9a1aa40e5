//! The reader's objects in PostgreSQL: its publication and its logical replication slot, managed
//! over an ordinary SQL connection, plus the catalog lookups the stream needs.
//!
//! Rules: a missing publication is created for the configured tables, an existing one only gains
//! missing tables (dropping and recreating a publication under a slot breaks the slot); the slot is
//! created with `pgoutput` on first start; a slot held by another process is an error the caller
//! retries, never something to take over.

use change_event::{format_lsn, parse_lsn};
use tokio_postgres::Client;

use crate::decode::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("PostgreSQL query failed ({what})")]
    Postgres {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("table name {0:?} is not of the form schema.table")]
    TableName(String),
    #[error("replication slot {slot} is in use by another process (pid {pid}); only one reader may stream from a slot")]
    SlotActive { slot: String, pid: i32 },
    #[error("replication slot {slot} is in use by another cdc-reader (it holds the slot's session lock); only one reader may own a slot")]
    SlotLocked { slot: String },
    #[error("replication slot {slot} lost WAL it needed (wal_status = lost) and cannot stream again; drop it to start over with a new snapshot, and replay older changes from Kafka")]
    SlotLost { slot: String },
    #[error("replication slot {slot} uses output plugin {plugin}, not pgoutput")]
    WrongPlugin { slot: String, plugin: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "topic {topic} has {now} partitions, but slot {slot} has published to it with {then}: keys \
         would move to other partitions and lose their order. Give the topic its {then} partitions \
         back (a new topic of that size), or, to go on with {now}, replay into a new topic: delete \
         the row of cdc_reader_topics (slot {slot}, topic {topic}) and start a new snapshot (a new \
         slot) into the resized topic, then rebuild the views from it"
    )]
    PartitionsChanged {
        slot: String,
        topic: String,
        then: i32,
        now: i32,
    },
    #[error(
        "position topic {topic} has {now} partitions, but slot {slot} has committed positions to \
         it with {then}: a reader's positions go to its key's partition, so its last one would not \
         be found. Give the topic its {then} partitions back, or point CDC_READER_POSITION_TOPIC \
         and PROJECTOR_POSITION_TOPIC to a new topic (the reader then resumes from its slot's \
         confirmed position, which Kafka has) and delete the row of cdc_reader_topics (slot \
         {slot}, topic {topic})"
    )]
    PositionPartitionsChanged {
        slot: String,
        topic: String,
        then: i32,
        now: i32,
    },
}

impl SetupError {
    /// Worth retrying: the database was unreachable, or another reader still holds the slot.
    pub fn is_transient(&self) -> bool {
        match self {
            SetupError::Postgres { source, .. } => service::is_transient_pg(source),
            SetupError::SlotActive { .. } | SetupError::SlotLocked { .. } => true,
            SetupError::TableName(_)
            | SetupError::WrongPlugin { .. }
            | SetupError::SlotLost { .. }
            | SetupError::PartitionsChanged { .. }
            | SetupError::PositionPartitionsChanged { .. }
            | SetupError::Unsupported(_) => false,
        }
    }
}

pub(crate) fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SetupError {
    move |source| SetupError::Postgres { what, source }
}

/// Records the partition count of each topic the first time `slot` publishes to it, and fails when a
/// topic has another count now (see [`SetupError::PartitionsChanged`]; for the position topic, if
/// among them, [`SetupError::PositionPartitionsChanged`]).
pub async fn check_partition_counts(
    db: &tokio_postgres::Client,
    slot: &str,
    counts: &[(String, i32)],
    position_topic: Option<&str>,
) -> Result<(), SetupError> {
    for (topic, now) in counts {
        let then: i32 = db
            .query_one(
                "WITH new AS (INSERT INTO cdc_reader_topics (slot, topic, partitions) \
                              VALUES ($1, $2, $3) ON CONFLICT (slot, topic) DO NOTHING \
                              RETURNING partitions) \
                 SELECT partitions FROM new \
                 UNION ALL SELECT partitions FROM cdc_reader_topics WHERE slot = $1 AND topic = $2",
                &[&slot, topic, now],
            )
            .await
            .map_err(pg("recording the topics' partition counts"))?
            .get(0);
        if then != *now && position_topic == Some(topic.as_str()) {
            return Err(SetupError::PositionPartitionsChanged {
                slot: slot.to_owned(),
                topic: topic.clone(),
                then,
                now: *now,
            });
        }
        if then != *now {
            return Err(SetupError::PartitionsChanged {
                slot: slot.to_owned(),
                topic: topic.clone(),
                then,
                now: *now,
            });
        }
    }
    Ok(())
}

/// `schema.table` → (schema, table).
pub fn split_table(name: &str) -> Result<(&str, &str), SetupError> {
    match name.split_once('.') {
        Some((s, t)) if !s.is_empty() && !t.is_empty() && !t.contains('.') => Ok((s, t)),
        _ => Err(SetupError::TableName(name.to_owned())),
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quoted_table(name: &str) -> Result<String, SetupError> {
    let (schema, table) = split_table(name)?;
    Ok(format!("{}.{}", quote_ident(schema), quote_ident(table)))
}

/// Takes a session-level advisory lock named after the slot on `db`, held until that connection
/// closes: the one reader owning the slot.
pub async fn lock_slot(db: &Client, slot: &str) -> Result<(), SetupError> {
    let locked: bool = db
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('cdc_reader slot ' || $1))",
            &[&slot],
        )
        .await
        .map_err(pg("locking the slot"))?
        .get(0);
    if locked {
        Ok(())
    } else {
        Err(SetupError::SlotLocked {
            slot: slot.to_owned(),
        })
    }
}

/// Creates the publication for `tables`, or adds the tables it lacks.
pub async fn ensure_publication(
    db: &Client,
    publication: &str,
    tables: &[String],
) -> Result<(), SetupError> {
    let quoted = tables
        .iter()
        .map(|t| quoted_table(t))
        .collect::<Result<Vec<_>, _>>()?;
    let exists = db
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(pg("looking up the publication"))?
        .is_some();
    if !exists {
        db.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(publication),
            quoted.join(", ")
        ))
        .await
        .map_err(pg("creating the publication"))?;
        tracing::info!(publication, ?tables, "created publication");
        return Ok(());
    }
    let present: Vec<String> = db
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(pg("listing the publication's tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (table, quoted) in tables.iter().zip(&quoted) {
        if !present.contains(table) {
            db.batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {quoted}",
                quote_ident(publication)
            ))
            .await
            .map_err(pg("adding a table to the publication"))?;
            tracing::info!(publication, table, "added table to publication");
        }
    }
    Ok(())
}

/// The slot's confirmed position, or `None` when it does not exist. A slot held by another process
/// or made for another plugin is an error.
pub async fn slot_status(db: &Client, slot: &str) -> Result<Option<Lsn>, SetupError> {
    let row = db
        .query_opt(
            "SELECT active_pid, plugin, confirmed_flush_lsn::text, wal_status FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("looking up the replication slot"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    if let Some(pid) = row.get::<_, Option<i32>>(0) {
        return Err(SetupError::SlotActive {
            slot: slot.to_owned(),
            pid,
        });
    }
    if row.get::<_, Option<String>>(3).as_deref() == Some("lost") {
        return Err(SetupError::SlotLost {
            slot: slot.to_owned(),
        });
    }
    let plugin: Option<String> = row.get(1);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(SetupError::WrongPlugin {
            slot: slot.to_owned(),
            plugin: plugin.unwrap_or_default(),
        });
    }
    let confirmed: Option<String> = row.get(2);
    Ok(Some(confirmed.as_deref().and_then(parse_lsn).unwrap_or(0)))
}

/// Creates the slot without a snapshot; returns its consistent point.
pub async fn create_slot(db: &Client, slot: &str) -> Result<Lsn, SetupError> {
    let lsn: String = db
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(pg("creating the replication slot"))?
        .get(0);
    tracing::info!(slot, consistent_point = %lsn, "created replication slot (no snapshot)");
    Ok(parse_lsn(&lsn).unwrap_or(0))
}

/// Names of the primary key columns of relation `oid`, in key order; `None` without a primary key.
pub async fn primary_key(
    db: &impl tokio_postgres::GenericClient,
    oid: u32,
) -> Result<Option<Vec<String>>, SetupError> {
    let rows = db
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await
        .map_err(pg("reading a primary key"))?;
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok((!names.is_empty()).then_some(names))
}

/// The columns a snapshot row of table `oid` is keyed by, as streamed events of it are (see
/// `envelope::event_key`): the primary key, unless the replica identity is an index that leaves
/// part of it out, then that index's columns; without a primary key, the identity's columns
/// (`published` ones under REPLICA IDENTITY FULL).
pub async fn event_key_columns(
    db: &impl tokio_postgres::GenericClient,
    oid: u32,
    published: &[String],
) -> Result<Vec<String>, SetupError> {
    let row = db
        .query_one(
            "SELECT c.relreplident::text, \
                    (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_index i \
                       JOIN pg_attribute a ON a.attrelid = i.indrelid \
                        AND a.attnum = ANY(i.indkey::int2[]) \
                      WHERE i.indrelid = c.oid AND i.indisreplident) \
               FROM pg_class c WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .map_err(pg("reading a captured table's replica identity"))?;
    let identity: &str = row.get(0);
    let index: Option<Vec<String>> = row.get(1);
    let primary = primary_key(db, oid).await?;
    Ok(match (primary, identity, index) {
        (Some(key), "i", Some(index)) if !key.iter().all(|k| index.contains(k)) => index,
        (Some(key), _, _) => key,
        (None, "i", Some(index)) => index,
        (None, "f", _) => published.to_vec(),
        (None, _, _) => Vec::new(),
    })
}

/// The database's current WAL write position.
pub async fn current_wal_lsn(db: &Client) -> Result<Lsn, SetupError> {
    let row = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(pg("reading the current WAL position"))?;
    Ok(parse_lsn(row.get::<_, &str>(0)).unwrap_or(0))
}

/// How far the slot is behind the current WAL: (confirmed flush lag, retained WAL) in bytes.
pub async fn slot_lag(db: &Client, slot: &str) -> Result<Option<(i64, i64)>, SetupError> {
    let row = db
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, \
                    (pg_current_wal_lsn() - restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("reading slot lag"))?;
    Ok(row.map(|r| {
        (
            r.get::<_, Option<i64>>(0).unwrap_or(0),
            r.get::<_, Option<i64>>(1).unwrap_or(0),
        )
    }))
}

/// For log lines.
pub fn lsn_text(lsn: Lsn) -> String {
    format_lsn(lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(split_table("public.users").unwrap(), ("public", "users"));
        for bad in ["users", ".users", "public.", "a.b.c"] {
            assert!(split_table(bad).is_err(), "{bad}");
        }
        assert_eq!(
            quoted_table("public.we\"ird").unwrap(),
            "\"public\".\"we\"\"ird\""
        );
    }
}
