//! Rows as JSON objects the way Debezium's JSON converter shows them: the encoding
//! shared by every sink that writes JSON (Kafka's JSON encoding, webhooks).

use base64::Engine as _;
use serde_json::{Map, Value as Json, json};

use crate::{Datum, PgType, Row, TableSchema, Value};

/// What Debezium writes for an unchanged TOASTed value it was not sent.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// A column whose value cannot be encoded.
#[derive(Debug, thiserror::Error)]
#[error("column {column}: {reason}")]
pub struct JsonError {
    pub column: String,
    pub reason: String,
}

/// `row` as an object of `table`'s columns (only the columns at `only`, when given).
pub fn record(table: &TableSchema, row: &Row, only: Option<&[usize]>) -> Result<Json, JsonError> {
    let mut obj = Map::new();
    for (i, c) in table.columns.iter().enumerate() {
        if only.is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        let err = |reason: String| JsonError { column: c.name.clone(), reason };
        let v = match row.get(i).unwrap_or(&Datum::Null) {
            Datum::Null => Json::Null,
            Datum::Unchanged => Json::String(UNAVAILABLE.into()),
            Datum::Text(b) => {
                let text = std::str::from_utf8(b).map_err(|_| err("not UTF-8".into()))?;
                value(Value::parse(&c.pg_type, text).map_err(|e| err(e.to_string()))?, &c.pg_type)
            }
        };
        obj.insert(c.name.clone(), v);
    }
    Ok(Json::Object(obj))
}

/// The order [`record`] writes `table`'s columns in (JSON objects here are sorted maps,
/// so by name), restricted to the columns at `only` when given: what [`write_record`]
/// takes, computed once per table shape.
pub fn field_order(table: &TableSchema, only: Option<&[usize]>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..table.columns.len()).filter(|i| only.is_none_or(|o| o.contains(i))).collect();
    order.sort_by(|&a, &b| table.columns[a].name.cmp(&table.columns[b].name));
    order
}

/// Appends `row` as the object [`record`] builds, byte for byte, without building it:
/// the columns at `order` (from [`field_order`]); text columns are escaped straight
/// from the row.
pub fn write_record(table: &TableSchema, row: &Row, order: &[usize], out: &mut Vec<u8>) -> Result<(), JsonError> {
    out.push(b'{');
    for (n, &i) in order.iter().enumerate() {
        let c = &table.columns[i];
        if n > 0 {
            out.push(b',');
        }
        write_str(&c.name, out);
        out.push(b':');
        let err = |reason: String| JsonError { column: c.name.clone(), reason };
        match row.get(i).unwrap_or(&Datum::Null) {
            Datum::Null => out.extend_from_slice(b"null"),
            Datum::Unchanged => write_str(UNAVAILABLE, out),
            Datum::Text(b) => {
                let text = std::str::from_utf8(b).map_err(|_| err("not UTF-8".into()))?;
                match &c.pg_type {
                    PgType::Text => write_str(text, out),
                    ty => match Value::parse(ty, text).map_err(|e| err(e.to_string()))? {
                        // Numbers are written as they are (no Json value in between).
                        Value::Int2(v) => write(&v, out),
                        Value::Int4(v) => write(&v, out),
                        Value::Int8(v) => write(&v, out),
                        v => write(&value(v, ty), out),
                    },
                }
            }
        }
    }
    out.push(b'}');
    Ok(())
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it (`\"`, `\\`, the
/// short forms of `\b \f \n \r \t`, `\u00xx` for other control characters), byte
/// for byte. Every text column of every JSON record passes here, so it looks at eight
/// bytes at a time and copies the runs between escapes whole.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    // Words of eight bytes, then the tail byte by byte; every byte of a word the quick
    // test reports, and of the tail, is checked on its own.
    for (n, chunk) in bytes.chunks(8).enumerate() {
        if let Ok(w) = <[u8; 8]>::try_from(chunk)
            && !may_need_escape(u64::from_le_bytes(w))
        {
            continue;
        }
        for (j, &b) in chunk.iter().enumerate() {
            if needs_escape(b) {
                let at = n * 8 + j;
                out.extend_from_slice(&bytes[start..at]);
                escape(b, out);
                start = at + 1;
            }
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether any byte of the word may need escaping. The zero-byte tests can report a
/// byte that does not (a borrow carries into the byte above a match), never miss
/// one: the caller checks each byte of a reported word.
fn may_need_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    // Bytes under 0x20 (a byte of 0x80 or more has its high bit set in `w` and is
    // masked out by `!w`).
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    control | zero_in(w ^ (ONES * u64::from(b'"'))) | zero_in(w ^ (ONES * u64::from(b'\\'))) != 0
}

fn escape(b: u8, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short = match b {
        b'"' => b'"',
        b'\\' => b'\\',
        0x08 => b'b',
        0x0c => b'f',
        b'\n' => b'n',
        b'\r' => b'r',
        b'\t' => b't',
        _ => {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
            return;
        }
    };
    out.extend_from_slice(&[b'\\', short]);
}

/// Appends `v` as JSON.
pub fn write<T: serde::Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) {
    // Serializing strings, numbers and `Json` values into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// Values as Debezium's JSON converter shows them: numbers as numbers, dates as days
/// and times/timestamps as microseconds since the epoch, bytes as base64, decimals
/// and everything without a JSON equivalent as its exact text.
pub fn value(v: Value, ty: &PgType) -> Json {
    let float = |f: f64| serde_json::Number::from_f64(f).map_or_else(|| Json::String(f.to_string()), Json::Number);
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(b),
        Value::Int2(i) => json!(i),
        Value::Int4(i) => json!(i),
        Value::Int8(i) => json!(i),
        Value::Float4(f) => float(f64::from(f)),
        Value::Float8(f) => float(f),
        Value::Bytea(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Date(d) => json!(d),
        Value::Time(t) | Value::Timestamp(t) | Value::TimestampTz(t) => json!(t),
        Value::Array(items) => {
            let elem = match ty {
                PgType::Array(e) => e.as_ref(),
                other => other,
            };
            Json::Array(items.into_iter().map(|i| value(i, elem)).collect())
        }
        other => Json::String(other.to_pg_text().unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{ColumnSchema, ReplicaIdentity, TableName};

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut cases: Vec<String> = vec![String::new(), "plain ascii, longer than a word".into(), "é ü 日本 🦀 \u{7f}".into()];
        // Every ASCII character at every offset of a word and in the tail.
        for c in 0u8..0x80 {
            for at in 0..17 {
                let mut t = "abcdefghijklmnopq".to_string();
                t.replace_range(at..=at, &char::from(c).to_string());
                cases.push(t);
            }
        }
        // Runs of escapes, escapes beside multi-byte characters, and borrows: a match
        // in one byte of a word beside bytes that only just do not match.
        cases.push("\"\\\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{1f}\"\"".into());
        cases.push("é\"é\\é\u{1}é!#[]^_`".into());
        cases.push("\u{0}!\u{0}!\u{0}!\u{0}!".into());
        cases.push("\u{1f} \u{1f}!\u{1f}#\u{1f}]".into());
        for s in &cases {
            let mut out = vec![b'x'];
            write_str(s, &mut out);
            assert_eq!(&out[1..], serde_json::to_string(s).unwrap().as_bytes(), "{s:?}");
        }
    }

    #[test]
    fn write_record_is_record_byte_for_byte() {
        let types = [
            ("z_text", PgType::Text, "text"),
            ("id", PgType::Int8, "bigint"),
            ("a_small", PgType::Int2, "smallint"),
            ("n", PgType::Int4, "integer"),
            ("price", PgType::Numeric, "numeric(10,2)"),
            ("ok", PgType::Bool, "boolean"),
            ("f", PgType::Float8, "double precision"),
            ("b", PgType::Bytea, "bytea"),
            ("at", PgType::TimestampTz, "timestamp with time zone"),
            ("tags", PgType::Array(Box::new(PgType::Int4)), "integer[]"),
            ("doc", PgType::Jsonb, "jsonb"),
            ("Upper", PgType::Text, "text"),
        ];
        let table = TableSchema {
            name: TableName::new("public", "t"),
            relid: 1,
            replica_identity: ReplicaIdentity::Default,
            columns: types
                .iter()
                .map(|(name, ty, tn)| ColumnSchema {
                    name: (*name).into(),
                    type_oid: 0,
                    type_name: (*tn).into(),
                    pg_type: ty.clone(),
                    nullable: true,
                    is_key: *name == "id",
                    enum_labels: vec![],
                    storage: Default::default(),
                })
                .collect(),
        };
        let t = |s: &str| Datum::Text(Bytes::copy_from_slice(s.as_bytes()));
        let rows = [
            vec![
                t("quote \" and \\ and \u{1} and é"),
                t("-9223372036854775808"),
                t("-3"),
                t("42"),
                t("12.50"),
                t("t"),
                t("1.5e300"),
                t("\\x00ff"),
                t("2024-02-29 12:00:00.5+00"),
                t("{1,NULL,3}"),
                t(r#"{"k": [1, "v"]}"#),
                t(""),
            ],
            vec![
                Datum::Null,
                t("1"),
                Datum::Unchanged,
                Datum::Null,
                t("NaN"),
                t("f"),
                t("-Infinity"),
                Datum::Unchanged,
                Datum::Null,
                t("{}"),
                Datum::Null,
                t("x"),
            ],
        ];
        for row in &rows {
            for only in [None, Some(&[1usize, 3][..])] {
                let mut out = Vec::new();
                write_record(&table, row, &field_order(&table, only), &mut out).unwrap();
                assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&record(&table, row, only).unwrap()).unwrap());
            }
        }
        let bad = vec![t("x"), t("not a number")];
        let mut out = Vec::new();
        let e = write_record(&table, &bad, &field_order(&table, Some(&[1])), &mut out).unwrap_err();
        assert_eq!(e.column, "id");
    }
}
