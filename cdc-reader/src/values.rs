//! Column values in PostgreSQL's text output form → natural JSON. Pure.
//!
//! The replication session pins `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`,
//! `extra_float_digits=3` and `bytea_output=hex` (see [`SESSION_OPTIONS`]), so the text forms parsed
//! here do not depend on server defaults.
//!
//! | type | JSON |
//! |---|---|
//! | int2, int4, int8, oid | number |
//! | float4, float8 | number; `NaN`/`Infinity`/`-Infinity` as strings |
//! | numeric, money | string (exact) |
//! | bool | true / false |
//! | timestamptz | RFC 3339 string with zone (`2026-01-02T03:04:05.123456Z`) |
//! | timestamp | RFC 3339 date-time without zone; date as `YYYY-MM-DD` |
//! | json, jsonb | the embedded JSON value |
//! | bytea | base64 string |
//! | arrays of the above | arrays (nested for multi-dimensional), elements converted alike |
//! | anything else (text, uuid, enums, intervals, ...) | its text form |
//!
//! Values a mapping cannot parse (`infinity` timestamps, BC dates) fall back to their text form:
//! never an error, never a lost value.

use base64::Engine;
use serde_json::{Number, Value};

/// Startup options for the replication connection that fix the text forms parsed here.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 \
                                   -c extra_float_digits=3 -c bytea_output=hex";

mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const JSONB: u32 = 3802;
}

/// Element type of a built-in array type, when the array is one this module maps.
pub(crate) fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1028 => oid::OID,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1182 => oid::DATE,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        199 => oid::JSON,
        3807 => oid::JSONB,
        // Arrays of text-like types: elements stay strings.
        1009 | 1015 | 1014 | 1003 | 2951 | 1231 | 791 | 1183 | 1187 | 1270 => 25,
        _ => return None,
    })
}

/// Converts the text form `text` of a value of type `type_oid`.
pub fn to_json(type_oid: u32, text: &str) -> Value {
    convert(type_oid, text, false).into_value()
}

/// [`to_json`] for records with Connect schemas (see [`crate::connect`]): json and jsonb values
/// (and arrays of them) stay text, since Connect has no type for an embedded document.
pub fn to_connect_json(type_oid: u32, text: &str) -> Value {
    convert(type_oid, text, true).into_value()
}

/// Appends the JSON of [`to_json`] (`connect`: of [`to_connect_json`]) to `out`, without making a
/// [`Value`] of the common types: the streamed rows' hot path.
pub fn write_json(out: &mut Vec<u8>, type_oid: u32, text: &str, connect: bool) {
    match convert(type_oid, text, connect) {
        Json::Text(s) => write_str(out, s),
        Json::String(s) => write_str(out, &s),
        Json::Int(n) => write(out, &n),
        Json::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        Json::Value(v) => write(out, &v),
    }
}

/// Appends `s` as a JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    write(out, s);
}

/// Appends the JSON of `value`.
pub(crate) fn write<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Strings, integers and `Value`s always serialize, and a `Vec` never fails a write.
    serde_json::to_writer(out, value).expect("a JSON value always serializes");
}

/// A converted value, before it becomes a [`Value`] or bytes.
enum Json<'a> {
    /// The text form itself, as a string.
    Text(&'a str),
    /// A rewritten form, as a string.
    String(String),
    Int(i64),
    Bool(bool),
    Value(Value),
}

impl Json<'_> {
    fn into_value(self) -> Value {
        match self {
            Json::Text(s) => Value::String(s.to_owned()),
            Json::String(s) => Value::String(s),
            Json::Int(n) => Value::from(n),
            Json::Bool(b) => Value::Bool(b),
            Json::Value(v) => v,
        }
    }
}

fn convert(type_oid: u32, text: &str, connect: bool) -> Json<'_> {
    if connect {
        match type_oid {
            oid::JSON | oid::JSONB => return Json::Text(text),
            // json[] and jsonb[]: arrays of text.
            199 | 3807 => return convert(1009, text, false),
            _ => {}
        }
    }
    if let Some(element) = array_element(type_oid) {
        return parse_array(text, element).map_or(Json::Text(text), Json::Value);
    }
    scalar(type_oid, text).unwrap_or(Json::Text(text))
}

fn scalar(type_oid: u32, text: &str) -> Option<Json<'_>> {
    match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text.parse::<i64>().ok().map(Json::Int),
        oid::FLOAT4 | oid::FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(|n| Json::Value(Value::Number(n))),
        // `t`/`f` from the output function (streamed rows), `true`/`false` from a `::text` cast
        // (the snapshot's query).
        oid::BOOL => match text {
            "t" | "true" => Some(Json::Bool(true)),
            "f" | "false" => Some(Json::Bool(false)),
            _ => None,
        },
        oid::TIMESTAMPTZ => timestamptz(text).map(Json::String),
        oid::TIMESTAMP => timestamp(text).map(Json::String),
        oid::JSON | oid::JSONB => serde_json::from_str(text).ok().map(Json::Value),
        oid::BYTEA => bytea(text).map(Json::String),
        _ => None,
    }
}

/// `2026-01-02 03:04:05.123456+00` → `2026-01-02T03:04:05.123456Z`; other offsets as `+HH:MM`.
fn timestamptz(text: &str) -> Option<String> {
    let split = text.rfind(['+', '-']).filter(|&i| i > 10)?;
    let (local, offset) = text.split_at(split);
    let (sign, offset) = offset.split_at(1);
    // `HH` or `HH:MM`; offsets with seconds (historic zones) have no RFC 3339 form.
    let (h, m) = offset.split_once(':').unwrap_or((offset, "00"));
    let digits2 = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits2(h) || !digits2(m) {
        return None;
    }
    let mut out = timestamp(local)?;
    if (h, m) == ("00", "00") {
        out.push('Z');
    } else {
        out.extend([sign, h, ":", m]);
    }
    Some(out)
}

/// `2026-01-02 03:04:05.123456` → `2026-01-02T03:04:05.123456`.
fn timestamp(text: &str) -> Option<String> {
    let (date, time) = text.split_once(' ')?;
    let ok_date = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    let ok_time = time.len() >= 8
        && time
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b':' || b == b'.');
    if !(ok_date && ok_time) {
        return None;
    }
    // Room for a zone after it.
    let mut out = String::with_capacity(text.len() + 7);
    out.extend([date, "T", time]);
    Some(out)
}

/// `\x0102ff` → base64 of the bytes.
fn bytea(text: &str) -> Option<String> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Parses an array literal (`{1,2}`, `{{a,"b c"},{NULL,d}}`), converting elements as `element`.
fn parse_array(text: &str, element: u32) -> Option<Value> {
    // A lower bound decoration (`[0:1]={1,2}`) is dropped: JSON arrays start at 0 anyway.
    let text = match text.strip_prefix('[') {
        Some(_) => &text[text.find('=')? + 1..],
        None => text,
    };
    let mut p = ArrayParser {
        s: text.as_bytes(),
        i: 0,
        element,
    };
    let v = p.array()?;
    (p.i == p.s.len()).then_some(v)
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    element: u32,
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn array(&mut self) -> Option<Value> {
        if self.peek()? != b'{' {
            return None;
        }
        self.i += 1;
        let mut items = Vec::new();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(Value::Array(items));
        }
        loop {
            let item = match self.peek()? {
                b'{' => self.array()?,
                b'"' => {
                    let s = self.quoted()?;
                    to_json(self.element, &s)
                }
                _ => {
                    let raw = self.bare()?;
                    if raw.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        to_json(self.element, &raw)
                    }
                }
            };
            items.push(item);
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(Value::Array(items));
                }
                _ => return None,
            }
        }
    }

    fn quoted(&mut self) -> Option<String> {
        self.i += 1; // opening quote
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return String::from_utf8(out).ok();
                }
                b'\\' => {
                    out.push(*self.s.get(self.i + 1)?);
                    self.i += 2;
                }
                b => {
                    out.push(b);
                    self.i += 1;
                }
            }
        }
    }

    fn bare(&mut self) -> Option<String> {
        let start = self.i;
        while let Some(b) = self.peek() {
            if b == b',' || b == b'}' {
                break;
            }
            self.i += 1;
        }
        let raw = std::str::from_utf8(&self.s[start..self.i]).ok()?.trim();
        (!raw.is_empty()).then(|| raw.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_stays_text_under_connect_schemas() {
        assert_eq!(to_connect_json(3802, r#"{"a": 1}"#), json!(r#"{"a": 1}"#));
        assert_eq!(to_connect_json(114, "[1]"), json!("[1]"));
        assert_eq!(
            to_connect_json(3807, r#"{"{\"a\": 1}",null}"#),
            json!([r#"{"a": 1}"#, null])
        );
        assert_eq!(to_connect_json(23, "5"), json!(5));
    }

    #[test]
    fn written_json_is_the_values_json() {
        let cases = [
            (20, "9007199254740993"),
            (21, "-5"),
            (23, "x"),
            (701, "1.5"),
            (701, "NaN"),
            (700, "-Infinity"),
            (1700, "12.50"),
            (16, "t"),
            (16, "false"),
            (16, "maybe"),
            (1184, "2026-01-02 03:04:05.123456+00"),
            (1184, "2026-01-02 03:04:05-08"),
            (1184, "infinity"),
            (1114, "2026-01-02 03:04:05"),
            (3802, "{\"k\": [1, 2]}"),
            (114, "not json"),
            (17, "\\x0102ff"),
            (25, "tab\there \"q\" \\ é\u{1}"),
            (1009, "{a,\"b c\",NULL}"),
            (1007, "{1,2"),
            (3807, r#"{"{\"a\": 1}",null}"#),
        ];
        for connect in [false, true] {
            for (oid, text) in cases {
                let mut out = Vec::new();
                write_json(&mut out, oid, text, connect);
                let value = if connect {
                    to_connect_json(oid, text)
                } else {
                    to_json(oid, text)
                };
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    value.to_string(),
                    "{oid} {text:?} connect={connect}"
                );
            }
        }
    }

    #[test]
    fn numbers_and_bools() {
        assert_eq!(
            to_json(20, "9007199254740993"),
            json!(9_007_199_254_740_993_i64)
        );
        assert_eq!(to_json(21, "-5"), json!(-5));
        assert_eq!(to_json(701, "1.5"), json!(1.5));
        assert_eq!(to_json(701, "NaN"), json!("NaN"));
        assert_eq!(to_json(700, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            to_json(1700, "12.50"),
            json!("12.50"),
            "numeric stays exact"
        );
        assert_eq!(to_json(16, "t"), json!(true));
        assert_eq!(to_json(16, "f"), json!(false));
        // As a `::text` cast writes them (the snapshot reads columns that way).
        assert_eq!(to_json(16, "true"), json!(true));
        assert_eq!(to_json(16, "false"), json!(false));
    }

    #[test]
    fn times_become_rfc3339() {
        assert_eq!(
            to_json(1184, "2026-01-02 03:04:05.123456+00"),
            json!("2026-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            to_json(1184, "2026-01-02 03:04:05+05:30"),
            json!("2026-01-02T03:04:05+05:30")
        );
        assert_eq!(
            to_json(1184, "2026-01-02 03:04:05-08"),
            json!("2026-01-02T03:04:05-08:00")
        );
        assert_eq!(to_json(1184, "infinity"), json!("infinity"));
        assert_eq!(
            to_json(1184, "1890-01-01 00:00:00+00:53:28"),
            json!("1890-01-01 00:00:00+00:53:28"),
            "an offset with seconds has no RFC 3339 form"
        );
        assert_eq!(
            to_json(1114, "2026-01-02 03:04:05"),
            json!("2026-01-02T03:04:05")
        );
        assert_eq!(to_json(1082, "2026-01-02"), json!("2026-01-02"));
        assert_eq!(
            to_json(1114, "0044-03-15 00:00:00 BC"),
            json!("0044-03-15 00:00:00 BC")
        );
    }

    #[test]
    fn json_bytea_and_text() {
        assert_eq!(to_json(3802, "{\"k\": [1, 2]}"), json!({"k": [1, 2]}));
        assert_eq!(to_json(114, "not json"), json!("not json"));
        assert_eq!(to_json(17, "\\x0102ff"), json!("AQL/"));
        assert_eq!(to_json(17, "\\x"), json!(""));
        assert_eq!(
            to_json(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(to_json(25, "héllo"), json!("héllo"));
        assert_eq!(to_json(1186, "P1DT2H"), json!("P1DT2H"));
    }

    #[test]
    fn arrays() {
        assert_eq!(to_json(1009, "{a,\"b c\",NULL}"), json!(["a", "b c", null]));
        assert_eq!(to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(1007, "{}"), json!([]));
        assert_eq!(
            to_json(1009, "{\"x\\\"y\",\"NULL\"}"),
            json!(["x\"y", "NULL"])
        );
        assert_eq!(to_json(1000, "{t,f}"), json!([true, false]));
        assert_eq!(to_json(1007, "[0:1]={7,8}"), json!([7, 8]));
        assert_eq!(
            to_json(1185, "{\"2026-01-02 03:04:05+00\"}"),
            json!(["2026-01-02T03:04:05Z"])
        );
        assert_eq!(to_json(1007, "{1,2"), json!("{1,2"), "malformed: text form");
    }
}
