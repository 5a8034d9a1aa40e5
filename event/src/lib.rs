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

/// The total order of the records the reader publishes: the event's position (commit LSN, index in
/// the transaction), then 0 for the event and 1 for the tombstone after it. Within a partition
/// records are published in this order, so the last record of a partition tells how far that
/// partition got; the reader sends it as the `cdc.position` header (`commit_lsn:event_index:sub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordPosition {
    pub commit_lsn: u64,
    pub event_index: u64,
    pub sub: u8,
}

impl RecordPosition {
    /// The header name.
    pub const HEADER: &'static str = "cdc.position";

    pub fn of(source: &Source, sub: u8) -> Self {
        RecordPosition {
            commit_lsn: source.commit_lsn,
            event_index: source.event_index,
            sub,
        }
    }

    pub fn header_value(&self) -> String {
        format!("{}:{}:{}", self.commit_lsn, self.event_index, self.sub)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        let position = RecordPosition {
            commit_lsn: parts.next()?.parse().ok()?,
            event_index: parts.next()?.parse().ok()?,
            sub: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(position)
    }

    /// The position a [`RecordPosition::HEADER`] header's value holds, if it is one.
    pub fn from_header(value: &[u8]) -> Option<Self> {
        RecordPosition::parse(std::str::from_utf8(value).ok()?)
    }
}

/// What the reader commits with each Kafka transaction into its position topic (key: its
/// transactional id; value: this, as JSON):
///
/// ```text
/// {"transactional_id": "...", "end_lsn": "0/16B3700",     where the stream resumes: every source
///                                                          transaction ending at or before it is
///                                                          in Kafka, whole
///  "position": "commit_lsn:index:sub" | null,              a split source transaction's last
///                                                          record in Kafka
///  "partitions": {"<topic>": {"<partition>": "c:i:s"}}}    the last record of every partition so
///                                                          far
/// ```
///
/// A consumer that has read each partition up to the record named for it has every source
/// transaction that ended at or before `end_lsn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderPosition {
    pub end_lsn: u64,
    pub split: Option<RecordPosition>,
    /// The last record of each (topic, partition).
    pub partitions: std::collections::BTreeMap<(String, i32), RecordPosition>,
}

impl ReaderPosition {
    pub fn to_json(&self, transactional_id: &str) -> Vec<u8> {
        let mut partitions: std::collections::BTreeMap<&str, Map<String, Value>> =
            std::collections::BTreeMap::new();
        for ((topic, partition), last) in &self.partitions {
            partitions
                .entry(topic)
                .or_default()
                .insert(partition.to_string(), Value::String(last.header_value()));
        }
        serde_json::json!({
            "transactional_id": transactional_id,
            "end_lsn": format_lsn(self.end_lsn),
            "position": self.split.map(|p| p.header_value()),
            "partitions": partitions,
        })
        .to_string()
        .into_bytes()
    }

    /// `None` when `value` is not such a record. `partitions` is empty in records of readers that
    /// did not write it.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(value).ok()?;
        let end_lsn = parse_lsn(v["end_lsn"].as_str()?)?;
        let split = match &v["position"] {
            Value::Null => None,
            p => Some(RecordPosition::parse(p.as_str()?)?),
        };
        let mut partitions = std::collections::BTreeMap::new();
        match &v["partitions"] {
            Value::Null => {}
            Value::Object(topics) => {
                for (topic, of_topic) in topics {
                    for (partition, last) in of_topic.as_object()? {
                        partitions.insert(
                            (topic.clone(), partition.parse().ok()?),
                            RecordPosition::parse(last.as_str()?)?,
                        );
                    }
                }
            }
            _ => return None,
        }
        Some(ReaderPosition {
            end_lsn,
            split,
            partitions,
        })
    }
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

    #[test]
    fn record_positions_order_and_round_trip() {
        let a = RecordPosition {
            commit_lsn: 10,
            event_index: 3,
            sub: 0,
        };
        let tombstone = RecordPosition { sub: 1, ..a };
        let next = RecordPosition {
            commit_lsn: 10,
            event_index: 4,
            sub: 0,
        };
        assert!(a < tombstone && tombstone < next);
        assert_eq!(
            RecordPosition::parse(&tombstone.header_value()),
            Some(tombstone)
        );
        for bad in ["", "1:2", "1:2:3:4", "x:1:0", "1:2:300"] {
            assert_eq!(RecordPosition::parse(bad), None, "{bad}");
        }
    }

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
