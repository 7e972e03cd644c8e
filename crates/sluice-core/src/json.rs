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
