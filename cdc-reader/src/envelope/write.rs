//! Streamed events written straight from the pgoutput text, without building JSON values: the
//! reader's hot path. The bytes are what `serde_json` writes for the same [`Envelope`]
//! (`crate::envelope::tests` checks it), so a streamed event reads as a snapshot's.

use change_event::{Op, RecordPosition};

use super::{event_records, Builder, Record, Settings, Table, CONNECTOR, VERSION};
use crate::decode::{self, Lsn, Relation, Tuple};
use crate::envelope::EnvelopeError;
use crate::values;

/// What every streamed event of a table writes alike, made once per Relation message: the columns
/// in the order a JSON object lists its members here (by name, as `serde_json`'s maps do, so a
/// streamed event reads byte for byte as a snapshot's), each with its `"name":` escaped, and the
/// source block up to its first field that changes.
#[derive(Debug)]
pub(super) struct Layout {
    /// Column indexes by name, each with its member name.
    columns: Vec<(usize, Vec<u8>)>,
    /// The key's columns, alike.
    key: Vec<(usize, Vec<u8>)>,
    /// `"source":{"version":…,"table":"…","txId":`
    source: Vec<u8>,
}

impl Layout {
    pub(super) fn new(settings: &Settings, relation: &Relation, key: &[usize]) -> Layout {
        let member = |name: &str| {
            let mut m = Vec::with_capacity(name.len() + 3);
            values::write_str(&mut m, name);
            m.push(b':');
            m
        };
        let mut columns: Vec<(usize, Vec<u8>)> = relation
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| (i, member(&c.name)))
            .collect();
        columns.sort_by(|a, b| relation.columns[a.0].name.cmp(&relation.columns[b.0].name));
        let key = columns
            .iter()
            .filter(|(i, _)| key.contains(i))
            .cloned()
            .collect();
        let mut source = b"\"source\":{".to_vec();
        for (name, value) in [
            ("version", VERSION),
            ("connector", CONNECTOR),
            ("name", &settings.server_name),
            ("db", &settings.database),
            ("schema", &relation.namespace),
            ("table", &relation.name),
        ] {
            source.extend_from_slice(&member(name));
            values::write_str(&mut source, value);
            source.push(b',');
        }
        source.extend_from_slice(b"\"txId\":");
        Layout {
            columns,
            key,
            source,
        }
    }
}

/// A column of a row as an event writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cell<'a> {
    /// Not in the row: an unchanged TOASTed value, or a column a key image leaves out.
    Absent,
    Null,
    Text(&'a str),
}

/// Where an event stands: what its source block says beyond the table.
#[derive(Debug, Clone, Copy)]
pub(super) struct At {
    pub(super) xid: u32,
    /// The change's own WAL position, else its transaction's commit.
    pub(super) lsn: Lsn,
    /// End of the session's last commit before it (0: none yet).
    pub(super) last_commit: Lsn,
    pub(super) commit_time_ms: i64,
    pub(super) commit_lsn: Lsn,
    pub(super) index: u64,
}

impl Builder {
    /// Writes the event of a row change of relation `id` (keyed by `after`'s key, else
    /// `before`'s): its records. `unchanged_toast` holds column indexes.
    pub(super) fn event(
        &mut self,
        id: u32,
        op: Op,
        before: Option<&[Cell]>,
        after: Option<&[Cell]>,
        unchanged_toast: &[usize],
        now_ms: i64,
    ) -> Result<impl Iterator<Item = Record>, EnvelopeError> {
        let at = self.next_event(id)?;
        let table = &self.tables[&id];
        let connect = self.settings.schemas;
        let columns = &table.relation.columns;

        let mut key = Vec::with_capacity(32);
        match after.or(before) {
            Some(row) => write_row(&mut key, connect, columns, &table.layout.key, row, true),
            None => key.extend_from_slice(b"{}"),
        }

        let mut value = Vec::with_capacity(self.last_len + 64);
        for (member, row) in [(&b"{\"before\":"[..], before), (b",\"after\":", after)] {
            value.extend_from_slice(member);
            match row {
                Some(row) => {
                    write_row(
                        &mut value,
                        connect,
                        columns,
                        &table.layout.columns,
                        row,
                        false,
                    );
                }
                None => value.extend_from_slice(b"null"),
            }
        }
        value.push(b',');
        value.extend_from_slice(&table.layout.source);
        at.write_source(&mut value);
        value.extend_from_slice(b",\"op\":");
        values::write(&mut value, &op);
        value.extend_from_slice(b",\"ts_ms\":");
        values::write(&mut value, &now_ms);
        if !unchanged_toast.is_empty() {
            value.extend_from_slice(b",\"unchanged_toast\":[");
            for (n, &i) in unchanged_toast.iter().enumerate() {
                if n > 0 {
                    value.push(b',');
                }
                values::write_str(&mut value, &columns[i].name);
            }
            value.push(b']');
        }
        value.push(b'}');
        self.last_len = value.len();

        let position = RecordPosition {
            commit_lsn: at.commit_lsn,
            event_index: at.index,
            sub: 0,
        };
        let topic = table.topic.clone();
        let schemas = table.schemas.as_deref();
        Ok(event_records(
            topic,
            Some(key),
            value,
            op,
            position,
            schemas,
        ))
    }
}

impl At {
    /// Debezium's `source.sequence`: `[last commit, this change]` as decimal strings, null before
    /// the session's first commit.
    pub(super) fn sequence(&self) -> String {
        let mut out = Vec::with_capacity(48);
        self.write_sequence(&mut out, b"\"");
        String::from_utf8(out).expect("digits, quotes and brackets")
    }

    /// Writes the sequence with each quote written as `quote`.
    fn write_sequence(&self, out: &mut Vec<u8>, quote: &[u8]) {
        out.push(b'[');
        match self.last_commit {
            0 => out.extend_from_slice(b"null"),
            lsn => {
                out.extend_from_slice(quote);
                values::write(out, &lsn);
                out.extend_from_slice(quote);
            }
        }
        out.push(b',');
        out.extend_from_slice(quote);
        values::write(out, &self.lsn);
        out.extend_from_slice(quote);
        out.push(b']');
    }

    /// The source block's fields from `txId`'s value on, and its closing brace: what
    /// `serde_json` writes for them.
    fn write_source(&self, out: &mut Vec<u8>) {
        values::write(out, &self.xid);
        out.extend_from_slice(b",\"lsn\":");
        values::write(out, &self.lsn);
        // A JSON string holding the sequence: its quotes escaped.
        out.extend_from_slice(b",\"sequence\":\"");
        self.write_sequence(out, b"\\\"");
        out.extend_from_slice(b"\",\"ts_ms\":");
        values::write(out, &self.commit_time_ms);
        out.extend_from_slice(b",\"snapshot\":\"false\",\"commit_lsn\":");
        values::write(out, &self.commit_lsn);
        out.extend_from_slice(b",\"event_index\":");
        values::write(out, &self.index);
        out.push(b'}');
    }
}

/// A key column's value: one missing from the row is null.
pub(super) fn key_cell(cell: Cell) -> Cell {
    match cell {
        Cell::Absent => Cell::Null,
        c => c,
    }
}

/// Writes the JSON object of `row` over `members` (see [`Layout`]); `key`: a column missing from
/// the row is written null, else left out.
fn write_row(
    out: &mut Vec<u8>,
    connect: bool,
    columns: &[decode::Column],
    members: &[(usize, Vec<u8>)],
    row: &[Cell],
    key: bool,
) {
    out.push(b'{');
    let mut first = true;
    for (i, member) in members {
        let cell = if key { key_cell(row[*i]) } else { row[*i] };
        let text = match cell {
            Cell::Absent => continue,
            Cell::Null => None,
            Cell::Text(text) => Some(text),
        };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(member);
        match text {
            Some(text) => values::write_json(out, columns[*i].type_oid, text, connect),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
}

/// The cells of `tuple`, by column, restricted to `only` columns when given (the others absent),
/// and the indexes of columns whose value was an unchanged TOAST marker.
pub(super) fn cells<'t>(
    table: &Table,
    tuple: &'t Tuple<'t>,
    only: Option<&[usize]>,
) -> Result<(Vec<Cell<'t>>, Vec<usize>), EnvelopeError> {
    let columns = &table.relation.columns;
    let relation = || format!("{}.{}", table.relation.namespace, table.relation.name);
    if tuple.0.len() != columns.len() {
        return Err(EnvelopeError::ColumnCount {
            relation: relation(),
            got: tuple.0.len(),
            want: columns.len(),
        });
    }
    let mut out = Vec::with_capacity(columns.len());
    let mut unchanged = Vec::new();
    for (i, (column, value)) in columns.iter().zip(&tuple.0).enumerate() {
        if only.is_some_and(|keep| !keep.contains(&i)) {
            out.push(Cell::Absent);
            continue;
        }
        out.push(match value {
            decode::Value::Null => Cell::Null,
            decode::Value::UnchangedToast => {
                unchanged.push(i);
                Cell::Absent
            }
            decode::Value::Text(bytes) => {
                Cell::Text(
                    std::str::from_utf8(bytes).map_err(|_| EnvelopeError::NotUtf8 {
                        relation: relation(),
                        column: column.name.clone(),
                    })?,
                )
            }
            decode::Value::Binary(_) => {
                return Err(EnvelopeError::Binary {
                    relation: relation(),
                })
            }
        });
    }
    Ok((out, unchanged))
}
