//! Lookup enrichment: fields of a reference table, fetched by key in batches
//! (`= ANY($1)`) and cached.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{ColumnSchema, Datum, PgType, TableName, TableSchema, quote_ident};
use sluice_postgres::PgConnConfig;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::LookupConfig;
use super::cache::{Breaker, Cache, Found};

pub(crate) struct Lookup {
    pub(crate) table: TableName,
    /// The reference table's key columns, matched in order against `on`.
    pub(crate) key: Vec<String>,
    pub(crate) on: Vec<String>,
    pub(crate) fields: Vec<String>,
    pub(crate) prefix: String,
    /// The reference table is in the source database: its changes come through the
    /// pipeline's own stream and invalidate the cache.
    pub(crate) replicated: bool,
    conn: PgConnConfig,
    client: Mutex<Option<Arc<Client>>>,
    /// The reference table's shape, loaded by `prepare`.
    pub(crate) schema: Option<Arc<TableSchema>>,
    sql: String,
    pub(crate) cache: Cache,
    pub(crate) breaker: Breaker,
    retries: u32,
    backoff: Duration,
}

/// The key's type name for the `ANY($1::text[]::<type>[])` cast, when the key's
/// index can serve it that way; otherwise the key is compared as text.
fn key_cast(c: &ColumnSchema) -> Option<&'static str> {
    Some(match c.pg_type {
        PgType::Int2 => "int2",
        PgType::Int4 => "int4",
        PgType::Int8 => "int8",
        PgType::Text => "text",
        PgType::Uuid => "uuid",
        PgType::Numeric => "numeric",
        PgType::Date => "date",
        _ => return None,
    })
}

impl Lookup {
    pub(crate) fn new(name: &str, cfg: &LookupConfig, source: &PgConnConfig) -> Result<Self, String> {
        let table = TableName::parse(&cfg.table).ok_or_else(|| format!("table {:?} is not a table name: write schema.table", cfg.table))?;
        if cfg.fields.is_empty() {
            return Err("fields: list at least one column of the reference table".into());
        }
        let (key, on) = (cfg.key.names(), cfg.on.names());
        if key.is_empty() || key.len() != on.len() {
            return Err(format!("key and on: name as many columns in on ({}) as in key ({}), in the same order", on.len(), key.len()));
        }
        Ok(Self {
            table,
            key,
            on,
            fields: cfg.fields.clone(),
            prefix: cfg.prefix.clone().unwrap_or_else(|| format!("{name}_")),
            replicated: cfg.connection.is_none(),
            conn: cfg.connection.clone().map_or_else(|| source.clone(), |c| c.guarded(source.egress.as_ref())),
            client: Mutex::new(None),
            schema: None,
            sql: String::new(),
            cache: Cache::new(cfg.cache_ttl, cfg.cache_max_entries),
            breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_open_for),
            retries: cfg.retries,
            backoff: cfg.backoff,
        })
    }

    /// Loads the reference table and checks the key and fields against it.
    pub(crate) async fn prepare(&mut self) -> Result<(), String> {
        let c = self.client().await?;
        let schema =
            sluice_postgres::load_table(&c, &self.table, &self.conn.describe()).await.map_err(|e| format!("reference table: {e}"))?;
        let names = || schema.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ");
        let col = |n: &str| {
            schema
                .columns
                .iter()
                .find(|c| c.name == n)
                .ok_or_else(|| format!("column {n:?} is not in the reference table {} (its columns: {})", self.table, names()))
        };
        let mut cols = Vec::new();
        let mut conds = Vec::new();
        let mut keys = Vec::new();
        for (n, k) in self.key.iter().enumerate() {
            let c = col(k)?;
            let q = quote_ident(&c.name);
            cols.push(format!("t.{q}::text"));
            keys.push(format!("${}::text[]", n + 1));
            conds.push(match key_cast(c) {
                Some(ty) => format!("t.{q} = k.k{n}::{ty}"),
                None => format!("t.{q}::text = k.k{n}"),
            });
        }
        for f in &self.fields {
            col(f)?;
            cols.push(format!("t.{}::text", quote_ident(f)));
        }
        let from = match (&self.key[..], key_cast(col(&self.key[0])?)) {
            // One key column: `= ANY`, which an index on it serves directly.
            ([k], Some(ty)) => format!("{} t WHERE t.{} = ANY($1::text[]::{ty}[])", self.table.quoted(), quote_ident(k)),
            ([k], None) => format!("{} t WHERE t.{}::text = ANY($1)", self.table.quoted(), quote_ident(k)),
            _ => {
                let names: Vec<String> = (0..self.key.len()).map(|n| format!("k{n}")).collect();
                format!("unnest({}) AS k({}) JOIN {} t ON {}", keys.join(", "), names.join(", "), self.table.quoted(), conds.join(" AND "))
            }
        };
        // One statement, so the snapshot it reports is the one its rows were read in.
        self.sql = format!(
            "WITH s AS (SELECT pg_current_snapshot()::text AS snap)
             SELECT s.snap, r.* FROM s LEFT JOIN (SELECT {} FROM {from}) r ON true",
            cols.join(", ")
        );
        self.schema = Some(Arc::new(schema));
        Ok(())
    }

    /// The reference columns, renamed with the prefix, as the added columns.
    pub(crate) fn columns(&self) -> Vec<ColumnSchema> {
        let schema = self.schema.as_ref().expect("prepared");
        self.fields
            .iter()
            .map(|f| {
                let mut c = schema.columns.iter().find(|c| &c.name == f).expect("checked by prepare").clone();
                c.name = format!("{}{f}", self.prefix);
                (c.nullable, c.is_key) = (true, false);
                c
            })
            .collect()
    }

    async fn client(&self) -> Result<Arc<Client>, String> {
        let mut g = self.client.lock().await;
        if let Some(c) = g.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(sluice_postgres::connect(&self.conn, "lookup database").await.map_err(|e| e.to_string())?);
        *g = Some(c.clone());
        Ok(c)
    }

    /// Fields for `keys`, from the cache or the reference table. `must_see`: source
    /// transactions (reference-table changes already streamed) the read's snapshot
    /// must include, so a key invalidated by a change is never cached from before it.
    pub(crate) async fn fetch(&self, keys: &[String], must_see: &[u32]) -> Result<(HashMap<String, Found>, usize), String> {
        let (mut out, miss) = self.cache.get_many(keys);
        if miss.is_empty() {
            return Ok((out, 0));
        }
        let what = format!("lookup in {}", self.table);
        let found = self.breaker.call(&what, self.retries, self.backoff, || self.query(&miss, must_see)).await?;
        self.cache.put_many(&found);
        let n = found.len();
        out.extend(found);
        Ok((out, n))
    }

    async fn query(&self, keys: &[String], must_see: &[u32]) -> Result<HashMap<String, Found>, String> {
        let c = self.client().await?;
        // A composite key goes as one array per column (see `encode_key`).
        let n = self.key.len();
        let columns: Vec<Vec<String>> = if n == 1 {
            vec![keys.to_vec()]
        } else {
            let mut columns = vec![Vec::with_capacity(keys.len()); n];
            for k in keys {
                let parts: Vec<String> = serde_json::from_str(k).map_err(|e| format!("internal: composite key {k:?}: {e}"))?;
                for (col, p) in columns.iter_mut().zip(parts) {
                    col.push(p);
                }
            }
            columns
        };
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns.iter().map(|c| c as _).collect();
        for _ in 0..1000 {
            let rows = c.query(&self.sql, &params).await.map_err(|e| {
                let e = sluice_postgres::PgError::from_pg(&format!("looking up {}", self.table), e);
                e.to_string()
            })?;
            let snap: String = rows.first().map(|r| r.get(0)).unwrap_or_default();
            let seen = sluice_postgres::SnapshotXids::parse(&snap);
            if self.replicated && !must_see.iter().all(|&x| seen.sees(x)) {
                // A reference change the stream delivered is not visible yet (its
                // commit record precedes its visibility): read again in a moment.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let mut found: HashMap<String, Found> = keys.iter().map(|k| (k.clone(), None)).collect();
            for r in &rows {
                let Some(parts) = (0..n).map(|i| r.get::<_, Option<String>>(i + 1)).collect::<Option<Vec<String>>>() else { continue };
                let k = super::encode_key(&parts.iter().map(|p| p.as_bytes()).collect::<Vec<_>>());
                let vals = (0..self.fields.len())
                    .map(|i| r.get::<_, Option<String>>(i + n + 1).map_or(Datum::Null, |v| Datum::Text(v.into())))
                    .collect();
                found.insert(k, Some(vals));
            }
            return Ok(found);
        }
        Err(format!("lookup in {}: a streamed reference change stayed invisible for 1 s", self.table))
    }
}
