//! Avro schemas derived from table schemas, the way Debezium names and shapes them:
//! a record `Value` (or `Key`) in namespace `<prefix>.<schema>.<table>`, columns
//! outside the key as `["null", T]` with default null, and logical types for decimals, dates,
//! times, timestamps and uuids. JSON and anything without an Avro equivalent is a string.

use serde_json::{Value as Json, json};

use crate::{ColumnSchema, PgType, TableSchema};

/// Avro names allow `[A-Za-z_][A-Za-z0-9_]*`; anything else becomes `_`.
pub fn avro_name(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// `numeric(10,2)` → `Some((10, 2))`; `None` for an unconstrained numeric.
pub fn precision_scale(type_name: &str) -> Option<(u32, u32)> {
    let inner = type_name.strip_prefix("numeric(")?.strip_suffix(')')?;
    let (p, s) = inner.split_once(',').unwrap_or((inner, "0"));
    Some((p.trim().parse().ok()?, s.trim().parse().ok()?))
}

fn avro_type(t: &PgType, type_name: &str) -> Json {
    match t {
        PgType::Bool => json!("boolean"),
        PgType::Int2 | PgType::Int4 => json!("int"),
        PgType::Int8 => json!("long"),
        PgType::Float4 => json!("float"),
        PgType::Float8 => json!("double"),
        PgType::Numeric => match precision_scale(type_name) {
            Some((precision, scale)) => json!({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale}),
            // Unconstrained numerics have no fixed scale: exact decimal text.
            None => json!("string"),
        },
        PgType::Bytea => json!("bytes"),
        PgType::Uuid => json!({"type": "string", "logicalType": "uuid"}),
        PgType::Date => json!({"type": "int", "logicalType": "date"}),
        PgType::Time => json!({"type": "long", "logicalType": "time-micros"}),
        PgType::Timestamp | PgType::TimestampTz => json!({"type": "long", "logicalType": "timestamp-micros"}),
        // Postgres arrays may hold NULL elements.
        PgType::Array(elem) => json!({"type": "array", "items": ["null", avro_type(elem, type_name.trim_end_matches("[]"))]}),
        PgType::Text
        | PgType::Json
        | PgType::Jsonb
        | PgType::Enum
        | PgType::TimeTz
        | PgType::Interval
        | PgType::Inet
        | PgType::Cidr
        | PgType::Other => json!("string"),
    }
}

/// Every column outside the key is optional, NOT NULL ones too: a delete's before
/// image under the default replica identity carries only the key, and a column's
/// NOT NULL can be dropped later without breaking readers.
/// Whether the column's Avro type is a string or bytes (a uuid's logical string is not).
pub fn is_textual(t: &PgType, type_name: &str) -> bool {
    matches!(avro_type(t, type_name).as_str(), Some("string" | "bytes"))
}

fn field(c: &ColumnSchema) -> Json {
    let t = avro_type(&c.pg_type, &c.type_name);
    if !c.is_key {
        json!({"name": avro_name(&c.name), "type": ["null", t], "default": null})
    } else {
        json!({"name": avro_name(&c.name), "type": t})
    }
}

fn record(name: &str, prefix: &str, table: &TableSchema, cols: impl Iterator<Item = Json>) -> Json {
    let namespace = format!("{}.{}.{}", avro_name(prefix), avro_name(&table.name.schema), avro_name(&table.name.name));
    json!({"type": "record", "name": name, "namespace": namespace, "fields": cols.collect::<Vec<_>>()})
}

/// The value schema: every column.
pub fn value_schema(prefix: &str, table: &TableSchema) -> Json {
    record("Value", prefix, table, table.columns.iter().map(field))
}

/// The key schema: the key columns.
pub fn key_schema(prefix: &str, table: &TableSchema) -> Json {
    record("Key", prefix, table, table.columns.iter().filter(|c| c.is_key).map(field))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ReplicaIdentity, TableName};

    fn col(name: &str, ty: PgType, type_name: &str, nullable: bool, key: bool) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_oid: 0,
            type_name: type_name.into(),
            pg_type: ty,
            nullable,
            is_key: key,
            enum_labels: vec![],
            storage: Default::default(),
        }
    }

    #[test]
    fn shapes_like_debezium() {
        let t = TableSchema {
            name: TableName::new("public", "order-items"),
            relid: 1,
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                col("id", PgType::Int8, "bigint", false, true),
                col("price", PgType::Numeric, "numeric(10,2)", true, false),
                col("at", PgType::TimestampTz, "timestamp with time zone", false, false),
                col("tags", PgType::Array(Box::new(PgType::Text)), "text[]", true, false),
            ],
        };
        let v = value_schema("shop", &t);
        assert_eq!(v["namespace"], "shop.public.order_items");
        assert_eq!(v["fields"][0], json!({"name": "id", "type": "long"}));
        assert_eq!(v["fields"][1]["type"][1]["logicalType"], "decimal");
        assert_eq!(v["fields"][1]["default"], Json::Null);
        assert_eq!(v["fields"][2]["type"][1]["logicalType"], "timestamp-micros", "NOT NULL columns are optional too");
        assert_eq!(v["fields"][3]["type"][1]["items"], json!(["null", "string"]));
        assert_eq!(key_schema("shop", &t)["fields"].as_array().unwrap().len(), 1);
    }
}
