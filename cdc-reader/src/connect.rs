//! Keys and values with their schemas, as Kafka Connect's `JsonConverter` writes them with
//! `schemas.enable=true` (`CDC_READER_SCHEMAS=true`): `{"schema": <Connect schema>, "payload":
//! <the plain JSON>}`. Connect sinks that need schemas (Debezium's JDBC sink) then read our topics
//! unchanged. Pure.
//!
//! The schemas follow those of Debezium's PostgreSQL connector under `decimal.handling.mode=string`,
//! `binary.handling.mode=base64` and `time.precision.mode=isostring`: integers by width, float4 as
//! `float`, float8 as `double`, booleans, and strings for everything else, named with Debezium's
//! semantic types where it has one (`io.debezium.time.ZonedTimestamp`, `io.debezium.data.Json`, ...).
//! Key columns are required, every other column optional (pgoutput does not say which columns are
//! NOT NULL). Connect has no type for an embedded JSON document, so json and jsonb values are
//! written as their text, as Debezium writes them, in this form only.

use serde_json::{json, Value};

/// The two prefixes of one table's records, schema included: `{"schema":...,"payload":`.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSchemas {
    key: String,
    value: String,
}

impl TableSchemas {
    /// Schemas of table `schema.table` (`server` is `source.name`, the prefix of the schema names,
    /// as Debezium's topic prefix is) with `columns` (name, type OID) keyed by `key` columns.
    pub fn new(
        server: &str,
        schema: &str,
        table: &str,
        columns: &[(String, u32)],
        key: &[String],
    ) -> TableSchemas {
        let name = format!("{server}.{schema}.{table}");
        let field = |(column, type_oid): &(String, u32), optional: bool| {
            let mut f = column_schema(*type_oid);
            f["optional"] = json!(optional);
            f["field"] = json!(column);
            f
        };
        let key_fields: Vec<Value> = key
            .iter()
            .filter_map(|k| columns.iter().find(|(c, _)| c == k))
            .map(|c| field(c, false))
            .collect();
        let row_fields: Vec<Value> = columns
            .iter()
            .map(|c| field(c, !key.contains(&c.0)))
            .collect();
        let row = |side: &str| {
            json!({"type": "struct", "fields": row_fields, "optional": true,
                   "name": format!("{name}.Value"), "field": side})
        };
        let plain =
            |t: &str, f: &str, optional: bool| json!({"type": t, "optional": optional, "field": f});
        let source = json!({
            "type": "struct", "optional": false, "name": "io.debezium.connector.postgresql.Source",
            "field": "source",
            "fields": [
                plain("string", "version", false), plain("string", "connector", false),
                plain("string", "name", false), plain("int64", "ts_ms", false),
                plain("string", "snapshot", true), plain("string", "db", false),
                plain("string", "sequence", true), plain("string", "schema", false),
                plain("string", "table", false), plain("int64", "txId", true),
                plain("int64", "lsn", true), plain("int64", "commit_lsn", false),
                plain("int64", "event_index", false),
            ],
        });
        let envelope = json!({
            "type": "struct", "optional": false, "name": format!("{name}.Envelope"),
            "fields": [
                row("before"), row("after"), source,
                plain("string", "op", false), plain("int64", "ts_ms", true),
                {"type": "array", "items": {"type": "string", "optional": false},
                 "optional": true, "field": "unchanged_toast"},
            ],
        });
        let key_schema = json!({"type": "struct", "fields": key_fields, "optional": false,
                                "name": format!("{name}.Key")});
        TableSchemas {
            key: prefix(&key_schema),
            value: prefix(&envelope),
        }
    }

    /// `payload` (a plain JSON key) with its schema.
    pub fn key(&self, payload: &[u8]) -> Vec<u8> {
        wrap(&self.key, payload)
    }

    /// `payload` (a plain JSON envelope) with its schema.
    pub fn value(&self, payload: &[u8]) -> Vec<u8> {
        wrap(&self.value, payload)
    }
}

fn prefix(schema: &Value) -> String {
    format!("{{\"schema\":{schema},\"payload\":")
}

fn wrap(prefix: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + payload.len() + 1);
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(payload);
    out.push(b'}');
    out
}

/// The Connect schema of a column of type `type_oid` (without `optional` and `field`).
fn column_schema(type_oid: u32) -> Value {
    let named = |name: &str| json!({"type": "string", "name": name, "version": 1});
    match type_oid {
        16 => json!({"type": "boolean"}),
        21 => json!({"type": "int16"}),
        23 => json!({"type": "int32"}),
        20 | 26 => json!({"type": "int64"}),
        700 => json!({"type": "float"}),
        701 => json!({"type": "double"}),
        1184 => named("io.debezium.time.ZonedTimestamp"),
        1114 => named("io.debezium.time.IsoTimestamp"),
        1082 => named("io.debezium.time.IsoDate"),
        1083 => named("io.debezium.time.IsoTime"),
        1266 => named("io.debezium.time.ZonedTime"),
        114 | 3802 => named("io.debezium.data.Json"),
        2950 => named("io.debezium.data.Uuid"),
        _ => match crate::values::array_element(type_oid) {
            Some(element) => {
                let mut items = column_schema(element);
                items["optional"] = json!(true);
                json!({"type": "array", "items": items})
            }
            None => json!({"type": "string"}),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> TableSchemas {
        let columns: Vec<(String, u32)> = [
            ("id", 20),
            ("name", 25),
            ("created_at", 1184),
            ("score", 701),
            ("tags", 1009),
            ("doc", 3802),
        ]
        .iter()
        .map(|(c, t)| ((*c).to_owned(), *t))
        .collect();
        TableSchemas::new("cdc", "public", "users", &columns, &["id".to_owned()])
    }

    #[test]
    fn keys_and_values_carry_connect_schemas() {
        let s = users();
        let key: Value = serde_json::from_slice(&s.key(br#"{"id":7}"#)).unwrap();
        assert_eq!(key["payload"], json!({"id": 7}));
        assert_eq!(key["schema"]["name"], "cdc.public.users.Key");
        assert_eq!(
            key["schema"]["fields"],
            json!([{"type": "int64", "optional": false, "field": "id"}])
        );

        let value: Value = serde_json::from_slice(&s.value(br#"{"op":"c"}"#)).unwrap();
        assert_eq!(value["payload"], json!({"op": "c"}));
        let schema = &value["schema"];
        assert_eq!(schema["name"], "cdc.public.users.Envelope");
        let fields = schema["fields"].as_array().unwrap();
        let after = fields.iter().find(|f| f["field"] == "after").unwrap();
        assert_eq!(after["name"], "cdc.public.users.Value");
        let column = |name: &str| {
            after["fields"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["field"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(column("id")["optional"], false);
        assert_eq!(column("name")["optional"], true);
        assert_eq!(
            column("created_at")["name"],
            "io.debezium.time.ZonedTimestamp"
        );
        assert_eq!(column("score")["type"], "double");
        assert_eq!(
            column("tags")["items"],
            json!({"type": "string", "optional": true})
        );
        assert_eq!(column("doc")["name"], "io.debezium.data.Json");
        let source = fields.iter().find(|f| f["field"] == "source").unwrap();
        assert_eq!(source["name"], "io.debezium.connector.postgresql.Source");
    }

    #[test]
    fn the_contract_reads_both_forms_back() {
        let s = users();
        let wrapped = s.value(br#"{"op":"c","ts_ms":1}"#);
        let v: Value = change_event::parse(&wrapped).unwrap();
        assert_eq!(v, json!({"op": "c", "ts_ms": 1}));
    }
}
