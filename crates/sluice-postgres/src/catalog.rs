//! Reads table definitions and replication objects from a source's catalog.

use sluice_core::{ColumnSchema, ColumnStorage, PgType, ReplicaIdentity, TableName, TableSchema};
use tokio_postgres::Client;

use crate::error::{PgError, Result};

const COLUMNS_SQL: &str = "
SELECT a.attname::text, a.atttypid::oid::int8, format_type(a.atttypid, a.atttypmod),
       NOT a.attnotnull,
       COALESCE(a.attnum = ANY(i.indkey::int2[]), false),
       t.typtype::text, et.typtype::text,
       COALESCE((SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) FROM pg_enum e
                 WHERE e.enumtypid = CASE WHEN t.typtype = 'e' THEN t.oid ELSE et.oid END), '{}'),
       CASE WHEN a.attstorage <> t.typstorage THEN a.attstorage::text END,
       -- attcompression is Postgres 14's; read through jsonb so older servers answer NULL.
       NULLIF(to_jsonb(a)->>'attcompression', '')
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
LEFT JOIN pg_index i ON i.indrelid = a.attrelid
     AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END
WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum";

/// Loads a table's columns, key and replica identity. Fails with a one-line fix when
/// the table is missing or cannot be replicated with a key.
pub async fn load_table(client: &Client, table: &TableName, source: &str) -> Result<TableSchema> {
    let row = client
        .query_opt(
            "SELECT c.oid::int8, c.relreplident::text, c.relkind::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| PgError::from_pg("reading the source catalog", e))?
        .ok_or_else(|| {
            PgError::permanent(format!(
                "table {table} does not exist in source {source}: create it, or remove it from `source.tables` (or from `sink.search.document`)"
            ))
        })?;
    let relid: i64 = row.get(0);
    let ident: String = row.get(1);
    let kind: String = row.get(2);
    if kind != "r" && kind != "p" {
        return Err(PgError::permanent(format!(
            "{table} in source {source} is not a table (relkind {kind}): only tables can be replicated"
        )));
    }
    let replica_identity = ReplicaIdentity::from_pg(ident.as_bytes()[0]);
    let rows = client.query(COLUMNS_SQL, &[&relid]).await.map_err(|e| PgError::from_pg("reading the source catalog", e))?;
    let columns = rows
        .iter()
        .map(|r| {
            let oid = r.get::<_, i64>(1) as u32;
            let typtype: String = r.get(5);
            let elem: Option<String> = r.get(6);
            let pg_type = match (typtype.as_str(), elem.as_deref()) {
                ("e", _) => PgType::Enum,
                (_, Some("e")) => PgType::Array(Box::new(PgType::Enum)),
                _ => PgType::from_oid(oid),
            };
            ColumnSchema {
                name: r.get(0),
                type_oid: oid,
                type_name: r.get(2),
                pg_type,
                nullable: r.get(3),
                is_key: r.get(4),
                enum_labels: r.get(7),
                storage: ColumnStorage::from_pg(r.get::<_, Option<&str>>(8), r.get::<_, Option<&str>>(9)),
            }
        })
        .collect();
    let schema = TableSchema { name: table.clone(), relid: relid as u32, columns, replica_identity };
    if !schema.has_key() {
        return Err(PgError::permanent(match replica_identity {
            ReplicaIdentity::Nothing => format!(
                "table {table} has REPLICA IDENTITY NOTHING, so updates and deletes cannot be replicated: \
                 run ALTER TABLE {} REPLICA IDENTITY DEFAULT and give it a primary key",
                table.quoted()
            ),
            _ => format!(
                "table {table} has no primary key (replica identity {replica_identity:?}), so the sink cannot \
                 match rows: add a primary key, or ALTER TABLE {} REPLICA IDENTITY USING INDEX <unique index>",
                table.quoted()
            ),
        }));
    }
    if replica_identity == ReplicaIdentity::Nothing {
        return Err(PgError::permanent(format!(
            "table {table} has REPLICA IDENTITY NOTHING, so updates and deletes cannot be replicated: \
             run ALTER TABLE {} REPLICA IDENTITY DEFAULT",
            table.quoted()
        )));
    }
    Ok(schema)
}

#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<String>,
    /// `lost` once the server removed WAL the slot needed: it can never stream again.
    pub wal_status: Option<String>,
}

impl SlotInfo {
    pub fn lost(&self) -> bool {
        self.wal_status.as_deref().map(sluice_core::source::WalStatus::parse) == Some(sluice_core::source::WalStatus::Lost)
    }
}

/// Why a recovery is refused: `slot` still streams (a missing or lost slot may be
/// recovered). The CLI and the API add their own way to read tables again.
pub fn recover_refusal(slot: &str, info: Option<&SlotInfo>) -> Option<String> {
    let info = info.filter(|i| !i.lost())?;
    Some(format!(
        "replication slot {slot} is not lost (wal_status {}): nothing to recover",
        info.wal_status.as_deref().unwrap_or("unknown")
    ))
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, wal_status
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| PgError::from_pg("reading pg_replication_slots", e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        confirmed_flush: r.get(3),
        wal_status: r.get(4),
    }))
}

/// Checks that an existing slot is one this pipeline can use.
pub fn verify_slot(slot: &str, info: &SlotInfo, database: &str) -> Result<()> {
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(PgError::permanent(format!(
            "replication slot {slot} exists but uses plugin {:?}, not pgoutput: drop it with \
             SELECT pg_drop_replication_slot('{slot}') or choose another pipeline name",
            info.plugin.as_deref().unwrap_or("(physical)")
        )));
    }
    if info.database.as_deref() != Some(database) {
        return Err(PgError::permanent(format!(
            "replication slot {slot} belongs to database {:?}, not {database}: choose another pipeline name",
            info.database.as_deref().unwrap_or("")
        )));
    }
    if let Some(pid) = info.active_pid {
        return Err(PgError::permanent(format!(
            "replication slot {slot} is in use by another connection (PID {pid}): stop the other \
             pipeline using it, or give this pipeline a different name"
        )));
    }
    Ok(())
}

pub async fn wal_level(client: &Client) -> Result<String> {
    let row = client.query_one("SHOW wal_level", &[]).await.map_err(|e| PgError::from_pg("reading wal_level", e))?;
    Ok(row.get(0))
}

/// The tables a publication publishes, or `None` when it does not exist.
pub async fn publication_tables(client: &Client, publication: &str) -> Result<Option<Vec<TableName>>> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(|e| PgError::from_pg("reading pg_publication", e))?;
    if exists.is_none() {
        return Ok(None);
    }
    let rows = client
        .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2", &[&publication])
        .await
        .map_err(|e| PgError::from_pg("reading pg_publication_tables", e))?;
    Ok(Some(rows.iter().map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1))).collect()))
}
