//! The Debezium change-event envelope (`before`, `after`, `source`, `op`, `ts_ms`) and
//! the record key, in Avro (Confluent wire format) or in JSON. Format (the envelope)
//! and encoding (Avro, JSON) are separate choices, as in Kafka Connect.

use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::types::Value as Avro;
use serde_json::{Value as Json, json};
use sluice_core::{ChangeEvent, Lsn, Op, Row, TableSchema};

use crate::avro::{Columns, EncodeError, datum, header};

/// `source.version` of every event.
const VERSION: &str = concat!("sluice-", env!("CARGO_PKG_VERSION"));

/// The `source` block's schema: Debezium's Postgres source fields, plus the commit
/// LSN and the change's order in its transaction, which together identify a change
/// uniquely (several changes can share one WAL record's LSN).
fn source_schema() -> Json {
    let opt = |name: &str, t: &str| json!({"name": name, "type": ["null", t], "default": null});
    json!({
        "type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
        "fields": [
            {"name": "version", "type": "string"},
            {"name": "connector", "type": "string"},
            {"name": "name", "type": "string"},
            {"name": "ts_ms", "type": "long"},
            {"name": "snapshot", "type": ["string", "null"], "default": "false"},
            {"name": "db", "type": "string"},
            opt("sequence", "string"),
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            opt("txId", "long"),
            opt("lsn", "long"),
            opt("xmin", "long"),
            opt("commit_lsn", "long"),
            opt("event_seq", "int"),
        ]
    })
}

/// The value schema of a table's topic: Debezium's envelope around the row record.
pub fn envelope_schema(prefix: &str, table: &TableSchema) -> Json {
    let row = sluice_core::avro::value_schema(prefix, table);
    let namespace = row["namespace"].clone();
    json!({
        "type": "record", "name": "Envelope", "namespace": namespace,
        "fields": [
            {"name": "before", "type": ["null", row], "default": null},
            {"name": "after", "type": ["null", "Value"], "default": null},
            {"name": "source", "type": source_schema()},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": null},
        ]
    })
}

/// The value schema a table's records are written with: the envelope, or the row
/// record alone when unwrapped.
pub fn value_schema(prefix: &str, table: &TableSchema, unwrap: bool) -> Json {
    if unwrap { sluice_core::avro::value_schema(prefix, table) } else { envelope_schema(prefix, table) }
}

/// Per-event facts the envelope's `source` block carries besides the row.
pub struct EventMeta<'a> {
    pub prefix: &'a str,
    pub database: &'a str,
    pub now_ms: i64,
}

// One encoder per table shape, built once: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Body {
    Avro { key: Schema, key_id: u32, value: Schema, value_id: u32, key_cols: Columns, cols: Columns },
    Json,
}

/// Encodes one table shape's keys and change events.
pub struct EventEncoder {
    pub(crate) table: Arc<TableSchema>,
    body: Body,
    keys: Vec<usize>,
    /// Values are the row state (`after`), not the envelope.
    unwrap: bool,
}

fn parse(json: &Json, table: &TableSchema) -> Result<Schema, EncodeError> {
    Schema::parse(json).map_err(|e| EncodeError::Schema { table: table.name.to_string(), reason: e.to_string() })
}

impl EventEncoder {
    /// Avro under the registered ids of `key_schema(prefix)` and [`value_schema`].
    pub fn avro(table: Arc<TableSchema>, prefix: &str, key_id: u32, value_id: u32, unwrap: bool) -> Result<Self, EncodeError> {
        let key = parse(&sluice_core::avro::key_schema(prefix, &table), &table)?;
        let value = parse(&value_schema(prefix, &table, unwrap), &table)?;
        let body = Body::Avro { key, key_id, value, value_id, key_cols: Columns::new(&table, true), cols: Columns::new(&table, false) };
        Ok(Self::with(table, body, unwrap))
    }

    /// Schemaless JSON, as Kafka Connect's JsonConverter writes with `schemas.enable=false`.
    pub fn json(table: Arc<TableSchema>, unwrap: bool) -> Self {
        Self::with(table, Body::Json, unwrap)
    }

    fn with(table: Arc<TableSchema>, body: Body, unwrap: bool) -> Self {
        let keys = table.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i).collect();
        Self { table, body, keys, unwrap }
    }

    /// Appends the record key of `row` (the table's key columns).
    pub fn key(&self, row: &Row, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match &self.body {
            Body::Avro { key, key_id, key_cols, .. } => {
                header(*key_id, out);
                datum(key, key_cols.record(row)?, out)
            }
            Body::Json => {
                let obj = json_record(&self.table, row, Some(&self.keys))?;
                serde_json::to_writer(out, &obj).map_err(|e| EncodeError::Value { column: "(key)".into(), reason: e.to_string() })
            }
        }
    }

    /// Appends the envelope of a change. `snapshot_lsn` is set for rows the initial
    /// snapshot read (op `r`), whose position is the snapshot's.
    pub fn value(&self, e: &ChangeEvent, meta: &EventMeta<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if self.unwrap {
            let Some(row) = &e.after else {
                return Err(EncodeError::Value { column: "(record)".into(), reason: "no row state to write".into() });
            };
            return match &self.body {
                Body::Avro { value, value_id, cols, .. } => {
                    header(*value_id, out);
                    datum(value, cols.record(row)?, out)
                }
                Body::Json => serde_json::to_writer(out, &json_record(&self.table, row, None)?)
                    .map_err(|e| EncodeError::Value { column: "(record)".into(), reason: e.to_string() }),
            };
        }
        let p = &e.position;
        let lsn = if p.lsn > Lsn::ZERO { p.lsn } else { p.commit_lsn };
        let snapshot = if e.op == Op::Read { "true" } else { "false" };
        let ts_ms = p.commit_time_us.div_euclid(1000);
        let (txid, commit_lsn, seq) = match e.op {
            Op::Read => (None, None, None),
            _ => (Some(i64::from(p.xid)), Some(p.commit_lsn.0 as i64), Some(p.seq as i32)),
        };
        match &self.body {
            Body::Avro { value, value_id, cols, .. } => {
                let opt = |v: Option<Avro>| match v {
                    None => Avro::Union(0, Box::new(Avro::Null)),
                    Some(v) => Avro::Union(1, Box::new(v)),
                };
                let image = |r: &Option<Row>| r.as_ref().map(|r| cols.record(r)).transpose();
                let source = Avro::Record(vec![
                    ("version".into(), Avro::String(VERSION.into())),
                    ("connector".into(), Avro::String("postgresql".into())),
                    ("name".into(), Avro::String(meta.prefix.into())),
                    ("ts_ms".into(), Avro::Long(ts_ms)),
                    ("snapshot".into(), Avro::Union(0, Box::new(Avro::String(snapshot.into())))),
                    ("db".into(), Avro::String(meta.database.into())),
                    ("sequence".into(), opt(None)),
                    ("schema".into(), Avro::String(self.table.name.schema.clone())),
                    ("table".into(), Avro::String(self.table.name.name.clone())),
                    ("txId".into(), opt(txid.map(Avro::Long))),
                    ("lsn".into(), opt(Some(Avro::Long(lsn.0 as i64)))),
                    ("xmin".into(), opt(None)),
                    ("commit_lsn".into(), opt(commit_lsn.map(Avro::Long))),
                    ("event_seq".into(), opt(seq.map(Avro::Int))),
                ]);
                let record = Avro::Record(vec![
                    ("before".into(), opt(image(&e.before)?)),
                    ("after".into(), opt(image(&e.after)?)),
                    ("source".into(), source),
                    ("op".into(), Avro::String(e.op.code().to_string())),
                    ("ts_ms".into(), opt(Some(Avro::Long(meta.now_ms)))),
                ]);
                header(*value_id, out);
                datum(value, record, out)
            }
            Body::Json => {
                let image = |r: &Option<Row>| r.as_ref().map(|r| json_record(&self.table, r, None)).transpose();
                let v = json!({
                    "before": image(&e.before)?,
                    "after": image(&e.after)?,
                    "source": {
                        "version": VERSION, "connector": "postgresql", "name": meta.prefix, "ts_ms": ts_ms,
                        "snapshot": snapshot, "db": meta.database, "sequence": null,
                        "schema": self.table.name.schema, "table": self.table.name.name,
                        "txId": txid, "lsn": lsn.0, "xmin": null, "commit_lsn": commit_lsn, "event_seq": seq,
                    },
                    "op": e.op.code().to_string(),
                    "ts_ms": meta.now_ms,
                });
                serde_json::to_writer(out, &v).map_err(|e| EncodeError::Value { column: "(record)".into(), reason: e.to_string() })
            }
        }
    }
}

fn json_record(table: &TableSchema, row: &Row, only: Option<&[usize]>) -> Result<Json, EncodeError> {
    sluice_core::json::record(table, row, only).map_err(|e| EncodeError::Value { column: e.column, reason: e.reason })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use sluice_core::json::UNAVAILABLE;
    use sluice_core::{ColumnSchema, Datum, PgType, ReplicaIdentity, SourcePosition, TableName};

    use super::*;

    fn table() -> Arc<TableSchema> {
        let col = |name: &str, ty: PgType, type_name: &str, key: bool| ColumnSchema {
            name: name.into(),
            type_oid: 0,
            type_name: type_name.into(),
            pg_type: ty,
            nullable: !key,
            is_key: key,
            enum_labels: vec![],
        };
        Arc::new(TableSchema {
            name: TableName::new("public", "items"),
            relid: 1,
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                col("id", PgType::Int8, "bigint", true),
                col("body", PgType::Text, "text", false),
                col("data", PgType::Bytea, "bytea", false),
            ],
        })
    }

    fn t(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn event(op: Op, before: Option<Row>, after: Option<Row>) -> ChangeEvent {
        let position = SourcePosition { lsn: Lsn(100), commit_lsn: Lsn(120), xid: 7, commit_time_us: 5_000_123, seq: 2 };
        ChangeEvent { op, table: table(), before, after, position }
    }

    #[test]
    fn json_envelope_like_debezium() {
        let enc = EventEncoder::json(table(), false);
        let meta = EventMeta { prefix: "shop", database: "db", now_ms: 9 };
        let mut out = Vec::new();
        let e = event(Op::Update, None, Some(vec![t("1"), Datum::Unchanged, t("\\x0102")]));
        enc.value(&e, &meta, &mut out).unwrap();
        let v: Json = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["op"], "u");
        assert_eq!(v["after"], json!({"id": 1, "body": UNAVAILABLE, "data": "AQI="}));
        assert_eq!(v["before"], Json::Null);
        assert_eq!(v["source"]["ts_ms"], 5000);
        assert_eq!(v["source"]["commit_lsn"], 120);
        assert_eq!(v["source"]["event_seq"], 2);
        out.clear();
        enc.key(&vec![t("1"), Datum::Null, Datum::Null], &mut out).unwrap();
        assert_eq!(out, br#"{"id":1}"#);
    }

    #[test]
    fn avro_envelope_round_trips() {
        let tbl = table();
        let enc = EventEncoder::avro(tbl.clone(), "shop", 1, 2, false).unwrap();
        let meta = EventMeta { prefix: "shop", database: "db", now_ms: 9 };
        let mut out = Vec::new();
        let e = event(Op::Delete, Some(vec![t("1"), Datum::Null, Datum::Null]), None);
        enc.value(&e, &meta, &mut out).unwrap();
        assert_eq!(&out[..5], &[0, 0, 0, 0, 2]);
        let schema = Schema::parse(&envelope_schema("shop", &tbl)).unwrap();
        let v = apache_avro::from_avro_datum(&schema, &mut &out[5..], None).unwrap();
        let Avro::Record(fields) = v else { panic!("not a record") };
        assert_eq!(fields[3], ("op".into(), Avro::String("d".into())));
        assert!(matches!(&fields[1].1, Avro::Union(0, _)), "after is null for a delete");
    }
}
