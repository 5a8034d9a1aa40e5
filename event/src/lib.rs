//! The change-event contract: the one place that defines what cdc-reader writes to Kafka and what
//! the projector reads back.
//!
//! ```text
//!  key   {"id": 42}                                   (the primary key columns)
//!  value {"before": {...}|null, "after": {...}|null,
//!         "source": {"version", "connector": "postgresql", "name", "db", "schema", "table",
//!                    "txId", "lsn", "sequence", "ts_ms", "snapshot", "commit_lsn", "event_index"},
//!         "op": "c"|"u"|"d"|"r"|"t", "ts_ms": ...,
//!         "unchanged_toast": ["col", ...]}           (only when not empty)
//!  value null                                        (tombstone, after every delete)
//! ```
//!
//! The shape is Debezium's PostgreSQL connector JSON without schemas, so consumers of that format
//! read ours. Two additions, both ignorable by such consumers:
//!
//! - `source.commit_lsn` and `source.event_index` give every event a total order position
//!   ([`Position`]): the commit LSN of its transaction and its index within the transaction.
//!   Consumers compare positions to ignore re-delivered or older events.
//! - `unchanged_toast` names columns whose value did not change and was not sent by PostgreSQL (an
//!   unchanged TOASTed value without a full replica identity). Those columns are left out of
//!   `after`, never filled with a placeholder; a consumer keeps the value it has.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Row images are JSON objects with one member per column.
pub type Row = Map<String, Value>;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    /// A row read by a snapshot.
    #[serde(rename = "r")]
    Read,
    /// The table was truncated; `before` and `after` are null.
    #[serde(rename = "t")]
    Truncate,
}

/// The value of a change record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub before: Option<Row>,
    pub after: Option<Row>,
    pub source: Source,
    pub op: Op,
    /// When the reader produced the event (ms since the Unix epoch).
    pub ts_ms: i64,
    /// Columns left out of `after` because their unchanged TOASTed value was not sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged_toast: Vec<String>,
}

/// Where the change came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub version: String,
    pub connector: String,
    /// Logical name of the source server (Debezium's topic prefix).
    pub name: String,
    pub db: String,
    pub schema: String,
    pub table: String,
    #[serde(rename = "txId")]
    pub tx_id: Option<i64>,
    /// LSN of the change's own WAL record when known, else of its transaction's commit.
    pub lsn: Option<u64>,
    /// Debezium's `["<last committed lsn>", "<this lsn>"]`, as a JSON string.
    pub sequence: Option<String>,
    /// Commit time of the source transaction (snapshot: when the row was read), ms since the epoch.
    pub ts_ms: i64,
    /// `"true"`, `"last"` (the last row of a snapshot) or `"false"`.
    pub snapshot: String,
    /// Commit LSN of the source transaction. Snapshot rows get one less than the slot's consistent
    /// point: they reflect the state before it, and every streamed change commits at or after it.
    pub commit_lsn: u64,
    /// Index of this event within its transaction (or snapshot), from 0.
    pub event_index: u64,
}

impl Source {
    pub fn position(&self) -> Position {
        Position {
            commit_lsn: self.commit_lsn,
            event_index: self.event_index,
        }
    }
}

/// Parses a key or value as JSON, whether plain (the default) or in the form Kafka Connect's
/// `JsonConverter` writes with `schemas.enable=true`, `{"schema": ..., "payload": ...}`
/// (`CDC_READER_SCHEMAS=true`): then the payload. Our envelope never begins with a `schema`
/// member, so the first member tells the two apart without parsing twice.
pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    #[derive(Deserialize)]
    struct WithSchema<T> {
        payload: T,
    }
    if with_schema(bytes) {
        serde_json::from_slice::<WithSchema<T>>(bytes).map(|w| w.payload)
    } else {
        serde_json::from_slice(bytes)
    }
}

fn with_schema(bytes: &[u8]) -> bool {
    fn trimmed(b: &[u8]) -> &[u8] {
        &b[b.iter()
            .position(|c| !c.is_ascii_whitespace())
            .unwrap_or(b.len())..]
    }
    match trimmed(bytes).split_first() {
        Some((b'{', rest)) => trimmed(rest).starts_with(b"\"schema\""),
        _ => false,
    }
}

/// Total order of events of one source database: commit order, then order within the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub commit_lsn: u64,
    pub event_index: u64,
}

/// Formats an LSN the way PostgreSQL does (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's LSN text form (`16/B374D848`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source() -> Source {
        Source {
            version: "0.1.0".into(),
            connector: "postgresql".into(),
            name: "cdc".into(),
            db: "user_db".into(),
            schema: "public".into(),
            table: "users".into(),
            tx_id: Some(756),
            lsn: Some(0x21F_FE88),
            sequence: Some("[\"35651208\",\"35651208\"]".into()),
            ts_ms: 1_767_323_045_123,
            snapshot: "false".into(),
            commit_lsn: 0x21F_FFF0,
            event_index: 0,
        }
    }

    #[test]
    fn serializes_in_debezium_shape() {
        let mut after = Row::new();
        after.insert("id".into(), json!(1));
        let e = Envelope {
            before: None,
            after: Some(after),
            source: source(),
            op: Op::Create,
            ts_ms: 5,
            unchanged_toast: vec![],
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["op"], "c");
        assert_eq!(v["before"], Value::Null);
        assert_eq!(v["after"], json!({"id": 1}));
        assert_eq!(v["source"]["txId"], 756);
        assert_eq!(v["source"]["connector"], "postgresql");
        assert!(
            v.get("unchanged_toast").is_none(),
            "empty list must be omitted"
        );
        let back: Envelope = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn parses_plain_json_and_connect_json_with_schemas() {
        let plain = br#"{"id": 7}"#;
        let wrapped = br#"{"schema":{"type":"struct","fields":[]},"payload":{"id":7}}"#;
        let spaced = br#" { "schema" : null, "payload": {"id": 7}}"#;
        for bytes in [&plain[..], &wrapped[..], &spaced[..]] {
            let v: Value = parse(bytes).unwrap();
            assert_eq!(v, json!({"id": 7}), "{}", String::from_utf8_lossy(bytes));
        }
        // A plain object whose first member merely starts like it is not unwrapped.
        let v: Value = parse(br#"{"schemas": 1}"#).unwrap();
        assert_eq!(v, json!({"schemas": 1}));
    }

    #[test]
    fn positions_order_by_commit_then_index() {
        let a = Position {
            commit_lsn: 10,
            event_index: 5,
        };
        let b = Position {
            commit_lsn: 11,
            event_index: 0,
        };
        let c = Position {
            commit_lsn: 11,
            event_index: 1,
        };
        assert!(a < b && b < c);
    }

    #[test]
    fn lsn_text_round_trips() {
        for lsn in [0, 0x21F_FE88, 0x16_B374_D848, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/21FE910"), Some(0x21F_E910));
        for bad in ["", "0", "x/1", "1/", "1/2/3", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }
}
