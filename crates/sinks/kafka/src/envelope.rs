//! The Debezium change-event envelope (`before`, `after`, `source`, `op`, `ts_ms`) and
//! the record key, in Avro (Confluent wire format) or in JSON. Format (the envelope)
//! and encoding (Avro, JSON) are separate choices, as in Kafka Connect.

use std::sync::Arc;

use apache_avro::Schema;
use serde_json::{Value as Json, json};
use sluice_core::{ChangeEvent, Lsn, Op, Row, TableSchema};

use sluice_core::json;

use crate::avro::{self, Columns, EncodeError, header};

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

enum Body {
    Avro {
        key_id: u32,
        value_id: u32,
        key_cols: Columns,
        cols: Columns,
    },
    /// The order the key columns and all columns are written in.
    Json {
        keys: Vec<usize>,
        all: Vec<usize>,
    },
}

/// Encodes one table shape's keys and change events, straight from the rows into the
/// caller's buffers: no intermediate value tree, no schema walk per record (the tests
/// hold the output to what `apache_avro` and `serde_json` write from trees).
pub struct EventEncoder {
    pub(crate) table: Arc<TableSchema>,
    body: Body,
    /// Values are the row state (`after`), not the envelope.
    unwrap: bool,
}

fn parse(json: &Json, table: &TableSchema) -> Result<Schema, EncodeError> {
    Schema::parse(json).map_err(|e| EncodeError::Schema { table: table.name.to_string(), reason: e.to_string() })
}

impl EventEncoder {
    /// Avro under the registered ids of `key_schema(prefix)` and [`value_schema`].
    pub fn avro(table: Arc<TableSchema>, prefix: &str, key_id: u32, value_id: u32, unwrap: bool) -> Result<Self, EncodeError> {
        // Parsed to refuse a schema no reader could use; records are written directly.
        parse(&sluice_core::avro::key_schema(prefix, &table), &table)?;
        parse(&value_schema(prefix, &table, unwrap), &table)?;
        let body = Body::Avro { key_id, value_id, key_cols: Columns::new(&table, true), cols: Columns::new(&table, false) };
        Ok(Self { table, body, unwrap })
    }

    /// Schemaless JSON, as Kafka Connect's JsonConverter writes with `schemas.enable=false`.
    pub fn json(table: Arc<TableSchema>, unwrap: bool) -> Self {
        let keys: Vec<usize> = table.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i).collect();
        let body = Body::Json { keys: json::field_order(&table, Some(&keys)), all: json::field_order(&table, None) };
        Self { table, body, unwrap }
    }

    /// Appends the record key of `row` (the table's key columns).
    pub fn key(&self, row: &Row, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match &self.body {
            Body::Avro { key_id, key_cols, .. } => {
                header(*key_id, out);
                key_cols.write(row, out)
            }
            Body::Json { keys, .. } => json_record(&self.table, row, keys, out),
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
                Body::Avro { value_id, cols, .. } => {
                    header(*value_id, out);
                    cols.write(row, out)
                }
                Body::Json { all, .. } => json_record(&self.table, row, all, out),
            };
        }
        let Source { lsn, snapshot, ts_ms, txid, commit_lsn, seq } = Source::of(e);
        let name = &self.table.name;
        let mut op = [0u8; 4];
        let op: &str = e.op.code().encode_utf8(&mut op);
        match &self.body {
            Body::Avro { value_id, cols, .. } => {
                // Envelope { before, after, source, op, ts_ms } in schema order; every
                // optional field is a ["null", T] union (branch 0 null, 1 value), but
                // `snapshot`, which is ["string", "null"].
                let opt_long = |v: Option<i64>, out: &mut Vec<u8>| match v {
                    None => out.push(0),
                    Some(v) => {
                        out.push(2);
                        avro::long(v, out);
                    }
                };
                header(*value_id, out);
                for image in [&e.before, &e.after] {
                    match image {
                        None => out.push(0),
                        Some(r) => {
                            out.push(2);
                            cols.write(r, out)?;
                        }
                    }
                }
                avro::bytes(VERSION.as_bytes(), out);
                avro::bytes(b"postgresql", out);
                avro::bytes(meta.prefix.as_bytes(), out);
                avro::long(ts_ms, out);
                out.push(0);
                avro::bytes(snapshot.as_bytes(), out);
                avro::bytes(meta.database.as_bytes(), out);
                out.push(0); // sequence
                avro::bytes(name.schema.as_bytes(), out);
                avro::bytes(name.name.as_bytes(), out);
                opt_long(txid, out);
                opt_long(Some(lsn.0 as i64), out);
                out.push(0); // xmin
                opt_long(commit_lsn, out);
                opt_long(seq.map(i64::from), out);
                avro::bytes(op.as_bytes(), out);
                opt_long(Some(meta.now_ms), out);
                Ok(())
            }
            Body::Json { all, .. } => {
                // Keys in sorted order, as serde_json writes its (sorted) maps.
                let image = |r: &Option<Row>, out: &mut Vec<u8>| match r {
                    None => {
                        out.extend_from_slice(b"null");
                        Ok(())
                    }
                    Some(r) => json_record(&self.table, r, all, out),
                };
                out.extend_from_slice(br#"{"after":"#);
                image(&e.after, out)?;
                out.extend_from_slice(br#","before":"#);
                image(&e.before, out)?;
                out.extend_from_slice(br#","op":"#);
                json::write_str(op, out);
                out.extend_from_slice(br#","source":{"commit_lsn":"#);
                json::write(&commit_lsn, out);
                out.extend_from_slice(br#","connector":"postgresql","db":"#);
                json::write_str(meta.database, out);
                out.extend_from_slice(br#","event_seq":"#);
                json::write(&seq, out);
                out.extend_from_slice(br#","lsn":"#);
                json::write(&lsn.0, out);
                out.extend_from_slice(br#","name":"#);
                json::write_str(meta.prefix, out);
                out.extend_from_slice(br#","schema":"#);
                json::write_str(&name.schema, out);
                out.extend_from_slice(br#","sequence":null,"snapshot":"#);
                json::write_str(snapshot, out);
                out.extend_from_slice(br#","table":"#);
                json::write_str(&name.name, out);
                out.extend_from_slice(br#","ts_ms":"#);
                json::write(&ts_ms, out);
                out.extend_from_slice(br#","txId":"#);
                json::write(&txid, out);
                out.extend_from_slice(br#","version":"#);
                json::write_str(VERSION, out);
                out.extend_from_slice(br#","xmin":null},"ts_ms":"#);
                json::write(&meta.now_ms, out);
                out.push(b'}');
                Ok(())
            }
        }
    }
}

/// The `source` block's facts of a change that come from its position.
struct Source {
    lsn: Lsn,
    snapshot: &'static str,
    ts_ms: i64,
    txid: Option<i64>,
    commit_lsn: Option<i64>,
    seq: Option<i32>,
}

impl Source {
    fn of(e: &ChangeEvent) -> Self {
        let p = &e.position;
        let (txid, commit_lsn, seq) = match e.op {
            Op::Read => (None, None, None),
            _ => (Some(i64::from(p.xid)), Some(p.commit_lsn.0 as i64), Some(p.seq as i32)),
        };
        Source {
            lsn: if p.lsn > Lsn::ZERO { p.lsn } else { p.commit_lsn },
            snapshot: if e.op == Op::Read { "true" } else { "false" },
            ts_ms: p.commit_time_us.div_euclid(1000),
            txid,
            commit_lsn,
            seq,
        }
    }
}

fn json_record(table: &TableSchema, row: &Row, order: &[usize], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    json::write_record(table, row, order, out).map_err(|e| EncodeError::Value { column: e.column, reason: e.reason })
}

#[cfg(test)]
mod tests {
    use apache_avro::types::Value as Avro;
    use bytes::Bytes;
    use sluice_core::json::UNAVAILABLE;
    use sluice_core::{ColumnSchema, Datum, PgType, ReplicaIdentity, SourcePosition, TableName};

    use super::*;

    /// A column; key columns are NOT NULL, the others nullable.
    fn col(name: &str, ty: PgType, type_name: &str, key: bool) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_oid: 0,
            type_name: type_name.into(),
            pg_type: ty,
            nullable: !key,
            is_key: key,
            enum_labels: vec![],
            storage: Default::default(),
        }
    }

    fn table() -> Arc<TableSchema> {
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

    /// The envelope as `apache_avro` writes it from a value tree (what Sluice wrote
    /// before it encoded straight from rows): the direct encoder is held to these bytes.
    fn avro_oracle(tbl: &Arc<TableSchema>, e: &ChangeEvent, meta: &EventMeta<'_>) -> Vec<u8> {
        let cols = Columns::new(tbl, false);
        let Source { lsn, snapshot, ts_ms, txid, commit_lsn, seq } = Source::of(e);
        let opt = |v: Option<Avro>| match v {
            None => Avro::Union(0, Box::new(Avro::Null)),
            Some(v) => Avro::Union(1, Box::new(v)),
        };
        let image = |r: &Option<Row>| r.as_ref().map(|r| cols.record(r).unwrap());
        let source = Avro::Record(vec![
            ("version".into(), Avro::String(VERSION.into())),
            ("connector".into(), Avro::String("postgresql".into())),
            ("name".into(), Avro::String(meta.prefix.into())),
            ("ts_ms".into(), Avro::Long(ts_ms)),
            ("snapshot".into(), Avro::Union(0, Box::new(Avro::String(snapshot.into())))),
            ("db".into(), Avro::String(meta.database.into())),
            ("sequence".into(), opt(None)),
            ("schema".into(), Avro::String(tbl.name.schema.clone())),
            ("table".into(), Avro::String(tbl.name.name.clone())),
            ("txId".into(), opt(txid.map(Avro::Long))),
            ("lsn".into(), opt(Some(Avro::Long(lsn.0 as i64)))),
            ("xmin".into(), opt(None)),
            ("commit_lsn".into(), opt(commit_lsn.map(Avro::Long))),
            ("event_seq".into(), opt(seq.map(Avro::Int))),
        ]);
        let record = Avro::Record(vec![
            ("before".into(), opt(image(&e.before))),
            ("after".into(), opt(image(&e.after))),
            ("source".into(), source),
            ("op".into(), Avro::String(e.op.code().to_string())),
            ("ts_ms".into(), opt(Some(Avro::Long(meta.now_ms)))),
        ]);
        let mut out = Vec::new();
        crate::avro::datum(&Schema::parse(&envelope_schema(meta.prefix, tbl)).unwrap(), record, &mut out).unwrap();
        out
    }

    /// The JSON envelope as serde_json writes it from a value tree.
    fn json_oracle(tbl: &Arc<TableSchema>, e: &ChangeEvent, meta: &EventMeta<'_>) -> String {
        let Source { lsn, snapshot, ts_ms, txid, commit_lsn, seq } = Source::of(e);
        let image = |r: &Option<Row>| r.as_ref().map(|r| sluice_core::json::record(tbl, r, None).unwrap());
        json!({
            "before": image(&e.before), "after": image(&e.after),
            "source": {
                "version": VERSION, "connector": "postgresql", "name": meta.prefix, "ts_ms": ts_ms,
                "snapshot": snapshot, "db": meta.database, "sequence": null,
                "schema": tbl.name.schema, "table": tbl.name.name,
                "txId": txid, "lsn": lsn.0, "xmin": null, "commit_lsn": commit_lsn, "event_seq": seq,
            },
            "op": e.op.code().to_string(), "ts_ms": meta.now_ms,
        })
        .to_string()
    }

    /// A table of every type the encoders treat differently.
    fn wide() -> Arc<TableSchema> {
        Arc::new(TableSchema {
            name: TableName::new("shop", "wide"),
            relid: 2,
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                col("id", PgType::Uuid, "uuid", true),
                col("n", PgType::Int4, "integer", true),
                col("s", PgType::Int2, "smallint", false),
                col("big", PgType::Int8, "bigint", false),
                col("ok", PgType::Bool, "boolean", false),
                col("f4", PgType::Float4, "real", false),
                col("f8", PgType::Float8, "double precision", false),
                col("price", PgType::Numeric, "numeric(12,3)", false),
                col("any_num", PgType::Numeric, "numeric", false),
                col("raw", PgType::Bytea, "bytea", false),
                col("body", PgType::Text, "text", false),
                col("day", PgType::Date, "date", false),
                col("t", PgType::Time, "time without time zone", false),
                col("at", PgType::TimestampTz, "timestamp with time zone", false),
                col("tags", PgType::Array(Box::new(PgType::Text)), "text[]", false),
                col("nums", PgType::Array(Box::new(PgType::Int8)), "bigint[]", false),
                col("doc", PgType::Jsonb, "jsonb", false),
                col("span", PgType::Interval, "interval", false),
            ],
        })
    }

    #[test]
    fn direct_encoding_is_the_tree_encoding_byte_for_byte() {
        let tbl = wide();
        let full = vec![
            t("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            t("-70000"),
            t("-2"),
            t("9223372036854775807"),
            t("t"),
            t("1.25"),
            t("-Infinity"),
            t("-12345.678"),
            t("3.14159265358979323846"),
            t("\\x00ff10"),
            t("quote \" é \u{7}"),
            t("2024-02-29"),
            t("23:59:59.999999"),
            t("1999-12-31 23:59:59.5+00"),
            t(r#"{a,"b c",NULL}"#),
            t("{}"),
            t(r#"{"k": [1, 2]}"#),
            t("P1DT2H"),
        ];
        let mut sparse = vec![Datum::Null; 18];
        sparse[0] = t("00000000-0000-0000-0000-000000000000");
        sparse[1] = t("0");
        sparse[10] = Datum::Unchanged;
        sparse[9] = Datum::Unchanged;
        sparse[7] = t("NaN");
        let meta = EventMeta { prefix: "shop", database: "db", now_ms: 1_700_000_000_123 };
        let avro = EventEncoder::avro(tbl.clone(), "shop", 3, 4, false).unwrap();
        let json = EventEncoder::json(tbl.clone(), false);
        for (op, before, after) in [
            (Op::Insert, None, Some(full.clone())),
            (Op::Update, Some(sparse.clone()), Some(full.clone())),
            (Op::Delete, Some(full.clone()), None),
            (Op::Read, None, Some(full.clone())),
            (Op::Truncate, None, None),
        ] {
            let e = ChangeEvent { op, table: tbl.clone(), before, after, position: event(op, None, None).position };
            if e.op == Op::Update {
                // NaN has no decimal form: a clear error, not a wrong record.
                let mut out = Vec::new();
                let err = avro.value(&e, &meta, &mut out).unwrap_err();
                assert!(err.to_string().contains("price"), "{err}");
                let e = ChangeEvent {
                    before: Some({
                        let mut r = sparse.clone();
                        r[7] = Datum::Null;
                        r
                    }),
                    ..e.clone()
                };
                let mut out = Vec::new();
                avro.value(&e, &meta, &mut out).unwrap();
                assert_eq!(&out[..5], &[0, 0, 0, 0, 4]);
                assert_eq!(out[5..], avro_oracle(&tbl, &e, &meta), "avro {op:?}");
            } else {
                let mut out = Vec::new();
                avro.value(&e, &meta, &mut out).unwrap();
                assert_eq!(out[5..], avro_oracle(&tbl, &e, &meta), "avro {op:?}");
            }
            let mut out = Vec::new();
            json.value(&e, &meta, &mut out).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), json_oracle(&tbl, &e, &meta), "json {op:?}");
        }
        // Keys, and the unwrapped row.
        let keys = Columns::new(&tbl, true);
        let mut out = Vec::new();
        avro.key(&full, &mut out).unwrap();
        let mut want = Vec::new();
        crate::avro::datum(&Schema::parse(&sluice_core::avro::key_schema("shop", &tbl)).unwrap(), keys.record(&full).unwrap(), &mut want)
            .unwrap();
        assert_eq!(out[5..], want);
        let unwrapped = EventEncoder::avro(tbl.clone(), "shop", 3, 4, true).unwrap();
        let e = ChangeEvent { op: Op::Insert, table: tbl.clone(), before: None, after: Some(full.clone()), position: Default::default() };
        let mut out = Vec::new();
        unwrapped.value(&e, &meta, &mut out).unwrap();
        let mut want = Vec::new();
        let value = Schema::parse(&sluice_core::avro::value_schema("shop", &tbl)).unwrap();
        crate::avro::datum(&value, Columns::new(&tbl, false).record(&full).unwrap(), &mut want).unwrap();
        assert_eq!(out[5..], want);
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
