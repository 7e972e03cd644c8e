//! An event as the JSON object a webhook receives, its idempotency id, and the
//! request signature.

use hmac::{Hmac, Mac as _};
use serde_json::{Value as Json, json};
use sluice_core::{ChangeEvent, Op, Row};

use serde::Deserialize;

/// The header carrying the body's HMAC-SHA256 (`sha256=<hex>`), as GitHub signs
/// webhooks: receivers verify it with the shared secret before trusting the body.
pub const SIGNATURE_HEADER: &str = "X-Sluice-Signature-256";

/// How each event is written.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Debezium's envelope: `before`, `after`, `source`, `op`, `ts_ms`.
    #[default]
    Debezium,
    /// The row the change leaves (`row`; the old key for a delete) and `op`.
    Row,
}

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a JSON encoding failed on (a column that cannot be read).
pub(crate) type EncodeError = sluice_core::json::JsonError;

/// The event's id: the same however often it is delivered. A streamed change is its
/// commit LSN and its order in the transaction; a snapshot read is its table and key
/// (a chunk sent again after a crash repeats the same ids).
pub(crate) fn event_id(e: &ChangeEvent, key: &Json) -> String {
    match e.op {
        Op::Read => format!("snapshot:{}:{key}", e.table.name),
        _ => format!("{}:{}", e.position.commit_lsn, e.position.seq),
    }
}

/// The event's key columns (from the new row, or the old one for a delete).
pub(crate) fn key_of(e: &ChangeEvent) -> Result<Json, EncodeError> {
    let keys: Vec<usize> = e.table.key_indexes().collect();
    match e.after.as_ref().or(e.before.as_ref()) {
        Some(row) if !keys.is_empty() => sluice_core::json::record(&e.table, row, Some(&keys)),
        _ => Ok(Json::Null),
    }
}

/// One event as JSON in `format`.
pub(crate) fn event(e: &ChangeEvent, format: Format, database: &str, now_ms: i64) -> Result<Json, EncodeError> {
    let key = key_of(e)?;
    let id = event_id(e, &key);
    let image = |r: &Option<Row>| r.as_ref().map(|r| sluice_core::json::record(&e.table, r, None)).transpose();
    let table = e.table.name.to_string();
    Ok(match format {
        Format::Debezium => {
            let p = &e.position;
            let streamed = e.op != Op::Read;
            json!({
                "id": id,
                "table": table,
                "key": key,
                "op": e.op.code().to_string(),
                "before": image(&e.before)?,
                "after": image(&e.after)?,
                "source": {
                    "connector": "postgresql", "db": database,
                    "schema": e.table.name.schema, "table": e.table.name.name,
                    "snapshot": if streamed { "false" } else { "true" },
                    "ts_ms": p.commit_time_us / 1000,
                    "txId": if streamed { Some(p.xid) } else { None },
                    "lsn": p.lsn.0,
                    "commit_lsn": if streamed { Some(p.commit_lsn.0) } else { None },
                    "event_seq": if streamed { Some(p.seq) } else { None },
                },
                "ts_ms": now_ms,
            })
        }
        Format::Row => {
            let row = if e.op == Op::Delete { image(&e.before)? } else { image(&e.after)? };
            json!({ "id": id, "table": table, "key": key, "op": e.op.code().to_string(), "row": row })
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use sluice_core::{ColumnSchema, Datum, Lsn, PgType, ReplicaIdentity, SourcePosition, TableName, TableSchema};

    use super::*;

    fn table() -> Arc<TableSchema> {
        let col = |name: &str, ty: PgType, key: bool| ColumnSchema {
            name: name.into(),
            type_oid: 0,
            type_name: String::new(),
            pg_type: ty,
            nullable: !key,
            is_key: key,
            enum_labels: vec![],
            storage: Default::default(),
        };
        Arc::new(TableSchema {
            name: TableName::new("public", "orders"),
            relid: 1,
            columns: vec![col("id", PgType::Int8, true), col("note", PgType::Text, false)],
            replica_identity: ReplicaIdentity::Default,
        })
    }

    fn t(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn ids_are_stable_and_formats_differ() {
        let pos = SourcePosition { lsn: Lsn(0x10), commit_lsn: Lsn(0x20), xid: 7, commit_time_us: 5_000, seq: 3 };
        let upd = ChangeEvent { op: Op::Update, table: table(), before: None, after: Some(vec![t("1"), t("hi")]), position: pos };
        let v = event(&upd, Format::Debezium, "app", 9).unwrap();
        assert_eq!(v["id"], "0/20:3");
        assert_eq!(v["key"], json!({"id": 1}));
        assert_eq!(v["after"], json!({"id": 1, "note": "hi"}));
        assert_eq!(v["source"]["commit_lsn"], 0x20);
        let del = ChangeEvent { op: Op::Delete, table: table(), before: Some(vec![t("1"), Datum::Null]), after: None, position: pos };
        let r = event(&del, Format::Row, "app", 9).unwrap();
        assert_eq!((r["op"].as_str(), &r["row"]), (Some("d"), &json!({"id": 1, "note": null})));
        let read = ChangeEvent { op: Op::Read, table: table(), before: None, after: Some(vec![t("1"), t("hi")]), position: pos };
        assert_eq!(event(&read, Format::Row, "app", 9).unwrap()["id"], r#"snapshot:public.orders:{"id":1}"#);
    }

    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
