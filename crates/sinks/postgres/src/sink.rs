//! The Postgres sink: applies committed source transactions to target tables.
//!
//! Each call to [`PostgresSink::apply`] runs in one target transaction that also moves
//! the pipeline's checkpoint (`sluice.pipelines`), so a batch is applied exactly once:
//! after a crash the source resends from its confirmed position and every transaction
//! at or below the checkpoint is skipped.
//!
//! Changes are coalesced per key within a segment (a run of changes without a
//! TRUNCATE), streamed with COPY into a temporary staging table, then merged with one
//! DELETE, one INSERT .. ON CONFLICT and, for rows whose TOASTed columns were left
//! untouched by an update, one UPDATE that keeps the target's current value for those
//! columns. An unchanged TOAST column therefore never reaches a table as a value: the
//! sink keeps the value it already holds, which is the one the source still holds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use futures::SinkExt;
use sluice_core::ddl::{ColumnChange, SchemaChange, SchemaChangeKind, is_constant_default};
use sluice_core::sink::{Sink, SinkError, SinkResult, SnapshotMethod};
use sluice_core::{ChangeEvent, Datum, Lsn, Op, Row, TableName, TableSchema, Transaction, key_of, quote_ident};
use tokio_postgres::Client;

use sluice_postgres::{
    BinaryField, BinaryRows, Checkpoint, PgConnConfig, PgError, Result, SnapshotFilter, TruncateScope, connect, int_key, put_binary_rows,
    put_field,
};

struct Target {
    source: Arc<TableSchema>,
    name: TableName,
    stage: String,
    /// Column types as the target prints them, for casts from staged text.
    types: Vec<String>,
    keys: Vec<usize>,
    /// Index of the single integer key column, when chunks can split by key range.
    int_key: Option<usize>,
    /// How each column is written when changes are copied in binary (new rows into the
    /// target, others into the staging table, then typed as the target); `None` when a
    /// column's type has no binary form here or the target's type differs from the
    /// source's (binary input is not converted), and changes are copied as text.
    binary: Option<Vec<BinaryField>>,
}

/// A pending change for one key within a segment.
enum Pending {
    Delete(Row),
    Upsert(Row),
    /// The key changed and some TOASTed columns were not resent: the new row takes
    /// those columns from the target's row under the old key (the first row).
    Move(Row, Row),
}

/// One table's pending changes in a segment: keys in first-change order, the change
/// each key ends with, and whether every change was a plain insert of a new key past
/// the snapshot's overlap (then the rows are copied straight into the target).
#[derive(Default)]
struct Staged {
    order: Vec<Vec<u8>>,
    map: HashMap<Vec<u8>, Pending>,
    mixed: bool,
}

type Segment = HashMap<TableName, Staged>;

/// Targets (`pipeline/table`) where a row copied straight in hit a key the target held
/// already (rows written into the target by someone else, a resync's copy racing the
/// stream): their changes go through the staging merge from then on, in this process.
/// Process-wide because the pipeline reconnects its sink to retry the failed batch.
static MERGE_ONLY: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

fn merge_only(pipeline: &str, target: &TableName) -> String {
    format!("{pipeline}/{target}")
}

/// Fills unchanged TOAST placeholders from an earlier image of the same row.
fn fill_unchanged(row: &mut Row, prev: &Row) {
    for (d, p) in row.iter_mut().zip(prev) {
        if *d == Datum::Unchanged {
            *d = p.clone();
        }
    }
}

pub struct PostgresSink {
    client: Client,
    pipeline: String,
    target_schema: Option<String>,
    targets: HashMap<TableName, Target>,
    checkpoint: Checkpoint,
    filter: SnapshotFilter,
    filter_upstream: bool,
    buf: BytesMut,
    /// A target transaction holds the pieces so far of a source transaction that
    /// continues: the next batch writes into it, and its last piece commits it with the
    /// checkpoint (a crash rolls it back, and the source sends the whole transaction
    /// again).
    open: bool,
}

impl PostgresSink {
    /// Connects and creates the sink's state tables (`sluice.*`) if missing.
    pub async fn connect(cfg: &PgConnConfig, pipeline: &str, target_schema: Option<String>) -> Result<Self> {
        let client = connect(cfg, "sink").await?;
        let checkpoint = Checkpoint::register(&client, pipeline).await?;
        let filter = SnapshotFilter::load(&client, pipeline).await?;
        Ok(Self {
            client,
            pipeline: pipeline.to_string(),
            target_schema,
            targets: HashMap::new(),
            checkpoint,
            filter,
            filter_upstream: false,
            buf: BytesMut::with_capacity(1 << 20),
            open: false,
        })
    }

    pub fn checkpoint(&self) -> Checkpoint {
        self.checkpoint
    }

    /// Re-reads the snapshot chunks after a snapshot ran on other connections.
    pub async fn reload_snapshot_state(&mut self) -> Result<()> {
        if self.filter_upstream {
            return Ok(());
        }
        self.filter = SnapshotFilter::load(&self.client, &self.pipeline).await?;
        Ok(())
    }

    /// The pipeline drops the changes the snapshot already holds before they reach the
    /// sink (with transforms, rows no longer carry the source key the chunks are cut by).
    pub fn filter_upstream(&mut self) {
        self.filter_upstream = true;
        self.filter = SnapshotFilter::default();
    }

    pub fn target_name(&self, source: &TableName) -> TableName {
        TableName::new(self.target_schema.clone().unwrap_or_else(|| source.schema.clone()), source.name.clone())
    }

    /// Creates the target table (and any enum types it needs) when absent, checks an
    /// existing one can be upserted by the source key, and prepares its staging table.
    pub async fn prepare_table(&mut self, schema: &Arc<TableSchema>) -> Result<()> {
        let name = self.target_name(&schema.name);
        let c = &self.client;
        let err = |what: &str| {
            let what = format!("{what} for {name} in the sink");
            move |e| PgError::from_pg(&what, e)
        };
        c.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&name.schema))).await.map_err(err("creating schema"))?;
        let exists = c
            .query_opt("SELECT to_regclass($1)::text", &[&name.quoted()])
            .await
            .map_err(err("looking up table"))?
            .and_then(|r| r.get::<_, Option<String>>(0))
            .is_some();
        if !exists {
            let mut cols = Vec::new();
            for col in &schema.columns {
                let ty = self.target_type(col, &name).await?;
                cols.push(format!("{} {ty}{}", quote_ident(&col.name), if col.is_key { " NOT NULL" } else { "" }));
            }
            let keys: Vec<String> = schema.columns.iter().filter(|c| c.is_key).map(|c| quote_ident(&c.name)).collect();
            let ddl = format!("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))", name.quoted(), cols.join(", "), keys.join(", "));
            self.client.batch_execute(&ddl).await.map_err(err("creating table"))?;
            tracing::info!(table = %name, "created target table");
            self.mirror_storage(&name, &schema.columns).await;
        }
        self.sync_columns(schema, &name).await?;
        let target = self.describe_target(schema, &name).await?;
        self.targets.insert(schema.name.clone(), target);
        Ok(())
    }

    /// The type to give a column in the target: the source's type when the target
    /// knows it (enums are created from their labels), otherwise `text`, which keeps
    /// the value exactly as the source printed it.
    async fn target_type(&self, col: &sluice_core::ColumnSchema, table: &TableName) -> Result<String> {
        let known = |ty: String| async move {
            let r = self.client.query_one("SELECT to_regtype($1)::text", &[&ty]).await;
            r.map(|r| r.get::<_, Option<String>>(0).is_some()).unwrap_or(false)
        };
        if known(col.type_name.clone()).await {
            return Ok(col.type_name.clone());
        }
        if !col.enum_labels.is_empty() {
            let base = col.type_name.trim_end_matches("[]");
            let labels: Vec<String> = col.enum_labels.iter().map(|l| format!("'{}'", l.replace('\'', "''"))).collect();
            // The name comes from format_type, which already quotes it where needed.
            let ddl = format!(
                "DO $$ BEGIN CREATE TYPE {base} AS ENUM ({}); EXCEPTION WHEN duplicate_object THEN NULL; END $$",
                labels.join(", ")
            );
            self.client.batch_execute(&ddl).await.map_err(|e| PgError::from_pg(&format!("creating enum type {base} in the sink"), e))?;
            return Ok(col.type_name.clone());
        }
        tracing::warn!(table = %table, column = %col.name, source_type = %col.type_name, "type unknown to the sink: stored as text");
        Ok("text".to_string())
    }

    /// Gives columns Sluice just created the storage and compression the source set on
    /// them. Only a cost, never a meaning, so a target that cannot (no lz4 in its build)
    /// keeps its defaults with a warning.
    async fn mirror_storage(&self, name: &TableName, cols: &[sluice_core::ColumnSchema]) {
        let mut alters = Vec::new();
        for c in cols {
            if let Some(storage) = c.storage.storage {
                alters.push(format!("ALTER COLUMN {} SET STORAGE {storage}", quote_ident(&c.name)));
            }
            if let Some(compression) = c.storage.compression {
                alters.push(format!("ALTER COLUMN {} SET COMPRESSION {compression}", quote_ident(&c.name)));
            }
        }
        if alters.is_empty() {
            return;
        }
        if let Err(e) = self.client.batch_execute(&format!("ALTER TABLE {} {}", name.quoted(), alters.join(", "))).await {
            let e = PgError::from_pg(&format!("setting the source's column storage on {name}"), e);
            tracing::warn!(table = %name, error = %e, "target columns keep the default storage");
        }
    }

    /// Adds columns the source has and the target lacks (schema evolution).
    async fn sync_columns(&self, schema: &TableSchema, name: &TableName) -> Result<()> {
        let rows = self
            .client
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
                &[&name.quoted()],
            )
            .await
            .map_err(|e| PgError::from_pg(&format!("reading columns of {name} in the sink"), e))?;
        let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        for col in schema.columns.iter().filter(|c| !have.contains(&c.name)) {
            let ty = self.target_type(col, name).await?;
            let ddl = format!("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {ty}", name.quoted(), quote_ident(&col.name));
            self.client.batch_execute(&ddl).await.map_err(|e| PgError::from_pg(&format!("adding column {} to {name}", col.name), e))?;
            tracing::info!(table = %name, column = %col.name, "added column to target table");
            self.mirror_storage(name, std::slice::from_ref(col)).await;
        }
        Ok(())
    }

    async fn describe_target(&self, schema: &Arc<TableSchema>, name: &TableName) -> Result<Target> {
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&name.quoted()],
            )
            .await
            .map_err(|e| PgError::from_pg(&format!("reading columns of {name} in the sink"), e))?;
        let types: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let types: Vec<String> = schema.columns.iter().map(|c| types.get(&c.name).cloned().unwrap_or_else(|| "text".into())).collect();
        let keys: Vec<usize> = schema.key_indexes().collect();
        let key_names: Vec<String> = keys.iter().map(|&i| schema.columns[i].name.clone()).collect();
        // ON CONFLICT needs a unique index on exactly the key columns.
        let unique = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_index i WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL
                   AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a
                        WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey::int2[]))
                       = (SELECT array_agg(x ORDER BY x) FROM unnest($2::text[]) x)",
                &[&name.quoted(), &key_names],
            )
            .await
            .map_err(|e| PgError::from_pg(&format!("reading indexes of {name} in the sink"), e))?;
        if unique.is_none() {
            return Err(PgError::permanent(format!(
                "target table {name} has no primary key or unique index on ({}): add one, or drop the table and let Sluice create it",
                key_names.join(", ")
            )));
        }
        let binary: Option<Vec<BinaryField>> =
            schema.columns.iter().zip(&types).map(|(c, target_type)| BinaryField::of(c).filter(|_| *target_type == c.type_name)).collect();
        tracing::info!(table = %name, format = if binary.is_some() { "binary" } else { "text" }, "changes are copied into the target");
        // Staged as text and cast by the merge, or, when changes go in binary, typed as
        // the target (the merge's casts are then no-ops).
        let stage = format!("_sluice_stage_{}", schema.relid);
        let stage_type = |i: usize| if binary.is_some() { types[i].as_str() } else { "text" };
        let mut stage_cols: Vec<String> = (0..schema.columns.len()).map(|i| format!("c{i} {}", stage_type(i))).collect();
        stage_cols.extend(keys.iter().enumerate().map(|(j, &k)| format!("o{j} {}", stage_type(k))));
        self.client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS pg_temp.{stage}; CREATE TEMP TABLE {stage} (_op \"char\", _u bool[], {})",
                stage_cols.join(", ")
            ))
            .await
            .map_err(|e| PgError::from_pg("creating a staging table in the sink", e))?;
        let int_key = match keys.as_slice() {
            [k] if matches!(
                schema.columns[*k].pg_type,
                sluice_core::PgType::Int2 | sluice_core::PgType::Int4 | sluice_core::PgType::Int8
            ) =>
            {
                Some(*k)
            }
            _ => None,
        };
        Ok(Target { source: schema.clone(), name: name.clone(), stage, types, keys, int_key, binary })
    }

    /// Makes sure the target matches a (possibly changed) source schema.
    async fn ensure_schema(&mut self, schema: &Arc<TableSchema>) -> Result<()> {
        match self.targets.get(&schema.name) {
            Some(t) if Arc::ptr_eq(&t.source, schema) || *t.source == **schema => Ok(()),
            _ => self.prepare_table(schema).await,
        }
    }

    async fn apply_inner(&mut self, txns: &[Transaction]) -> Result<()> {
        let todo: Vec<&Transaction> = txns.iter().filter(|t| t.commit_lsn > self.checkpoint.commit_lsn).collect();
        let Some(last) = todo.last() else { return Ok(()) };
        let (commit_lsn, end_lsn) = (last.commit_lsn, last.end_lsn);
        if todo.iter().any(|t| !t.ddl.is_empty()) {
            let r = self.apply_with_ddl(&todo).await;
            if r.is_err() {
                // The target's shape is whatever the rollback left: read it again.
                let _ = self.client.batch_execute("ROLLBACK").await;
                self.targets.clear();
            }
            return r;
        }
        for t in &todo {
            for e in &t.events {
                self.ensure_schema(&e.table).await?;
            }
        }
        self.begin().await?;
        let mut segment = Segment::new();
        for t in &todo {
            for e in &t.events {
                if e.op == Op::Truncate {
                    self.flush(&mut segment).await?;
                    self.truncate(e, t.commit_lsn).await?;
                } else {
                    self.stage_event(&mut segment, e, t.commit_lsn);
                }
            }
        }
        self.flush(&mut segment).await?;
        self.commit_unless_continued(last, Checkpoint { commit_lsn, end_lsn }, todo.len()).await
    }

    /// Starts the target transaction of a batch, unless the pieces before it of a
    /// source transaction keep one open.
    async fn begin(&mut self) -> Result<()> {
        if !self.open {
            self.client.batch_execute("BEGIN").await.map_err(|e| PgError::from_pg("starting a sink transaction", e))?;
        }
        Ok(())
    }

    /// Commits the batch with the checkpoint, or keeps the target transaction open
    /// when its last source transaction continues in the next batch.
    async fn commit_unless_continued(&mut self, last: &Transaction, checkpoint: Checkpoint, txns: usize) -> Result<()> {
        if last.continues {
            self.open = true;
            return Ok(());
        }
        checkpoint.save(&self.client, &self.pipeline, txns as i64).await?;
        self.client.batch_execute("COMMIT").await.map_err(|e| PgError::from_pg("committing to the sink", e))?;
        self.open = false;
        self.checkpoint = checkpoint;
        Ok(())
    }

    /// A batch holding schema changes: each statement's effect is applied to the
    /// target at its place among the rows, all in the transaction that moves the
    /// checkpoint (Postgres DDL is transactional), so a crash applies it once.
    async fn apply_with_ddl(&mut self, todo: &[&Transaction]) -> Result<()> {
        let last = todo.last().expect("a batch");
        let checkpoint = Checkpoint { commit_lsn: last.commit_lsn, end_lsn: last.end_lsn };
        self.begin().await?;
        let mut segment = Segment::new();
        for t in todo {
            let mut ddl = t.ddl.iter().peekable();
            for (i, e) in t.events.iter().enumerate() {
                while let Some(c) = ddl.next_if(|c| c.seq as usize <= i) {
                    self.flush(&mut segment).await?;
                    self.apply_schema_change(c).await?;
                }
                if self.targets.get(&e.table.name).is_none_or(|t| !Arc::ptr_eq(&t.source, &e.table) && *t.source != *e.table) {
                    self.flush(&mut segment).await?;
                    self.ensure_schema(&e.table).await?;
                }
                if e.op == Op::Truncate {
                    self.flush(&mut segment).await?;
                    self.truncate(e, t.commit_lsn).await?;
                } else {
                    self.stage_event(&mut segment, e, t.commit_lsn);
                }
            }
            for c in ddl {
                self.flush(&mut segment).await?;
                self.apply_schema_change(c).await?;
            }
        }
        self.flush(&mut segment).await?;
        self.commit_unless_continued(last, checkpoint, todo.len()).await
    }

    /// Applies one captured statement's column changes to the target table. With
    /// transforms the target's columns are the chain's, not the source's: only added
    /// columns follow (as before DDL capture), when the next rows bring them.
    async fn apply_schema_change(&mut self, c: &SchemaChange) -> Result<()> {
        let SchemaChangeKind::Columns { after, changes, .. } = &c.kind else { return Ok(()) };
        if self.filter_upstream {
            return Ok(());
        }
        let table = self.target_name(&c.table);
        let t = table.quoted();
        let column = |n: &str| after.columns.iter().find(|c| c.name == n).cloned();
        // A restart resuming before this statement added the columns the catalog has
        // now (the table's shape at start): such a column holds no value from the log yet.
        let have: Vec<String> = self
            .client
            .query("SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped", &[&t])
            .await
            .map_err(|e| PgError::from_pg(&format!("reading columns of {table} in the sink"), e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let has = |n: &str| have.iter().any(|h| h == n);
        for ch in changes {
            let q = quote_ident(ch.column());
            let sql = match ch {
                ColumnChange::Added { name, default } => {
                    let Some(col) = column(name) else { continue };
                    let ty = self.target_type(&col, &table).await?;
                    // A constant default gives the target's existing rows what the
                    // source's got; others are resynced by the engine.
                    let def = default.as_deref().filter(|d| is_constant_default(d));
                    match def {
                        Some(d) if has(name) => {
                            format!("ALTER TABLE {t} ALTER COLUMN {q} SET DEFAULT {d}; UPDATE {t} SET {q} = {d} WHERE {q} IS NULL")
                        }
                        Some(d) => format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {q} {ty} DEFAULT {d}"),
                        None => format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {q} {ty}"),
                    }
                }
                ColumnChange::Dropped { .. } => format!("ALTER TABLE {t} DROP COLUMN IF EXISTS {q}"),
                ColumnChange::Renamed { from, to } => match (has(from), has(to)) {
                    (true, true) => format!("ALTER TABLE {t} DROP COLUMN {q}; ALTER TABLE {t} RENAME COLUMN {} TO {q}", quote_ident(from)),
                    (true, false) => format!("ALTER TABLE {t} RENAME COLUMN {} TO {q}", quote_ident(from)),
                    _ => continue,
                },
                ColumnChange::Retyped { name, .. } => {
                    let Some(col) = column(name) else { continue };
                    let ty = self.target_type(&col, &table).await?;
                    format!("ALTER TABLE {t} ALTER COLUMN {q} TYPE {ty} USING {q}::{ty}")
                }
                ColumnChange::Nullability { name, not_null } => {
                    if column(name).is_some_and(|c| c.is_key) {
                        continue; // key columns are NOT NULL in the target already
                    }
                    format!("ALTER TABLE {t} ALTER COLUMN {q} {} NOT NULL", if *not_null { "SET" } else { "DROP" })
                }
                ColumnChange::Default { default: Some(d), .. } if is_constant_default(d) => {
                    format!("ALTER TABLE {t} ALTER COLUMN {q} SET DEFAULT {d}")
                }
                ColumnChange::Default { default: Some(_), .. } => continue, // names source-side functions or sequences
                ColumnChange::Default { default: None, .. } => format!("ALTER TABLE {t} ALTER COLUMN {q} DROP DEFAULT"),
            };
            self.client.batch_execute(&sql).await.map_err(|e| {
                let e = PgError::from_pg("", e);
                if e.kind() == sluice_core::ErrorKind::Transient { e } else { PgError::halted(format!("`{sql}` failed in the sink{e}")) }
            })?;
            tracing::info!(table = %table, change = ?ch, "schema change applied to the target table");
        }
        self.targets.remove(&c.table);
        Ok(())
    }

    fn stage_event(&self, segment: &mut Segment, e: &ChangeEvent, commit_lsn: Lsn) {
        let Some(target) = self.targets.get(&e.table.name) else { return };
        let table = e.table.name.to_string();
        let covered = |row: &Row| self.filter.covers(&table, int_key(row, target.int_key), commit_lsn);
        let staged = segment.entry(e.table.name.clone()).or_default();
        // Only an insert after every snapshot chunk's position is known not to be in
        // the target (before it, a chunk copied later may hold the row already).
        let plain_insert = e.op == Op::Insert && e.before.is_none() && self.filter.settled(commit_lsn);
        staged.mixed |= !plain_insert;
        let Staged { order, map, mixed } = staged;
        let mut put = |order: &mut Vec<Vec<u8>>, map: &mut HashMap<Vec<u8>, Pending>, key: Vec<u8>, p: Pending| {
            if map.insert(key.clone(), p).is_some() {
                *mixed = true; // a key changed twice: the merge resolves it
            } else {
                order.push(key);
            }
        };
        match (e.op, &e.before, &e.after) {
            (Op::Delete, Some(old), _) => {
                if !covered(old) {
                    put(order, map, key_of(old, &target.keys), Pending::Delete(old.clone()));
                }
            }
            (Op::Insert | Op::Update | Op::Read, before, Some(new)) => {
                let new_key = key_of(new, &target.keys);
                let mut row = new.clone();
                let moved_from = before.as_ref().filter(|old| key_of(old, &target.keys) != new_key);
                // The freshest earlier image of this row in the segment, if any.
                let prev_key = moved_from.map_or_else(|| new_key.clone(), |old| key_of(old, &target.keys));
                let mut from_target = None;
                if row.contains(&Datum::Unchanged) {
                    match map.get(&prev_key) {
                        Some(Pending::Upsert(prev)) => fill_unchanged(&mut row, prev),
                        Some(Pending::Move(old, prev)) => {
                            fill_unchanged(&mut row, prev);
                            from_target = Some(old.clone());
                        }
                        _ => {}
                    }
                }
                if let Some(old) = moved_from {
                    if row.contains(&Datum::Unchanged) && from_target.is_none() {
                        from_target = Some(old.clone());
                    }
                    if !covered(old) {
                        put(order, map, key_of(old, &target.keys), Pending::Delete(old.clone()));
                    }
                }
                if covered(new) {
                    return;
                }
                let pending = match from_target {
                    Some(old) if row.contains(&Datum::Unchanged) => Pending::Move(old, row),
                    _ => Pending::Upsert(row),
                };
                put(order, map, new_key, pending);
            }
            _ => tracing::warn!(table = %e.table.name, op = ?e.op, "change without a row image skipped"),
        }
    }

    async fn truncate(&mut self, e: &ChangeEvent, commit_lsn: Lsn) -> Result<()> {
        let Some(target) = self.targets.get(&e.table.name) else { return Ok(()) };
        let table = e.table.name.to_string();
        let sql = match self.filter.truncate_scope(&table, commit_lsn) {
            TruncateScope::Everything => format!("TRUNCATE {}", target.name.quoted()),
            TruncateScope::Nothing => return Ok(()), // the snapshot was taken after this truncate
            TruncateScope::Ranges(ranges) => {
                let k = quote_ident(&target.source.columns[target.int_key.unwrap_or(0)].name);
                let ranges: Vec<String> = ranges
                    .iter()
                    .map(|(lo, hi)| {
                        let lo = lo.map_or("true".into(), |lo| format!("{k} >= {lo}"));
                        let hi = hi.map_or("true".into(), |hi| format!("{k} < {hi}"));
                        format!("({lo} AND {hi})")
                    })
                    .collect();
                format!("DELETE FROM {} WHERE {}", target.name.quoted(), ranges.join(" OR "))
            }
        };
        self.client.batch_execute(&sql).await.map_err(|e| PgError::from_pg(&format!("truncating {}", target.name), e))
    }

    /// Only new rows: COPY them straight into the target, no staging table and no merge
    /// (the target's input functions parse the text as the merge's casts would), in
    /// binary when every column has a binary form. A key the target holds already fails
    /// the batch; the table is merged from then on.
    async fn copy_inserts(&mut self, table: &TableName, order: &[Vec<u8>], map: &mut HashMap<Vec<u8>, Pending>) -> Result<()> {
        let target = &self.targets[table];
        let ncols = target.source.columns.len();
        let rows: Vec<Row> = order
            .iter()
            .filter_map(|key| match map.remove(key) {
                Some(Pending::Upsert(row)) => Some(row),
                _ => None,
            })
            .collect();
        let buf = &mut self.buf;
        buf.clear();
        let binary = target.binary.as_deref().is_some_and(|fields| put_binary_rows(buf, fields, &rows));
        if !binary {
            for row in &rows {
                put_fields(buf, row, ncols);
                buf.put_u8(b'\n');
            }
        }
        // Encoded: the rows need not stay in memory beside their copy while it is sent.
        drop(rows);
        let names: Vec<String> = target.source.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let sql = format!("COPY {} ({}) FROM STDIN{}", target.name.quoted(), names.join(", "), copy_format(binary));
        let data: Bytes = buf.split().freeze();
        let copied = async {
            let sink = self.client.copy_in(&sql).await?;
            futures::pin_mut!(sink);
            sink.send(data).await?;
            sink.finish().await
        }
        .await;
        match copied {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                MERGE_ONLY.lock().expect("merge-only set").insert(merge_only(&self.pipeline, &target.name));
                tracing::warn!(table = %target.name, "an inserted row's key is in the target already: merging this table's changes from now on");
                Err(PgError::transient(format!(
                    "copying new rows into {}: a key is there already; retrying through the merge",
                    target.name
                )))
            }
            Err(e) => Err(PgError::from_pg(&format!("copying new rows into {}", target.name), e)),
        }
    }

    async fn flush(&mut self, segment: &mut Segment) -> Result<()> {
        for (table, Staged { order, mut map, mixed }) in segment.drain() {
            let target = &self.targets[&table];
            let ncols = target.source.columns.len();
            // Checked on what is pending too: a row the copy could not write as is (a
            // delete, a move, an unchanged TOAST value) goes through the merge.
            if !mixed
                && !order.is_empty()
                && map.values().all(|p| matches!(p, Pending::Upsert(r) if !r.contains(&Datum::Unchanged)))
                && !MERGE_ONLY.lock().expect("merge-only set").contains(&merge_only(&self.pipeline, &target.name))
            {
                self.copy_inserts(&table, &order, &mut map).await?;
                continue;
            }
            let pending: Vec<Pending> = order.iter().filter_map(|key| map.remove(key)).collect();
            if pending.is_empty() {
                continue;
            }
            let (mut deletes, mut upserts, mut partial, mut moves) = (false, false, false, false);
            for p in &pending {
                let op = p.parts().0;
                moves |= op == b'M';
                if p.leaves_unchanged() {
                    partial |= op == b'U';
                } else {
                    deletes |= op == b'D';
                    upserts |= op == b'U';
                }
            }
            let buf = &mut self.buf;
            buf.clear();
            let binary = target.binary.as_deref().is_some_and(|fields| stage_binary(buf, fields, &target.keys, &pending));
            if !binary {
                stage_text(buf, ncols, &target.keys, &pending);
            }
            drop(pending);
            let data: Bytes = buf.split().freeze();
            let c = &self.client;
            let ctx = |what: &str| format!("{what} {}", target.name);
            let sink = c
                .copy_in(&format!("COPY pg_temp.{} FROM STDIN{}", target.stage, copy_format(binary)))
                .await
                .map_err(|e| PgError::from_pg(&ctx("staging changes for"), e))?;
            futures::pin_mut!(sink);
            sink.send(data).await.map_err(|e| PgError::from_pg(&ctx("staging changes for"), e))?;
            sink.finish().await.map_err(|e| PgError::from_pg(&ctx("staging changes for"), e))?;
            let mut sql = String::new();
            let cast = |i: usize| format!("s.c{i}::{}", target.types[i]);
            let cols = &target.source.columns;
            let key_match: Vec<String> = target.keys.iter().map(|&i| format!("t.{} = {}", quote_ident(&cols[i].name), cast(i))).collect();
            let key_match = key_match.join(" AND ");
            let names: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
            let keys: Vec<String> = target.keys.iter().map(|&i| quote_ident(&cols[i].name)).collect();
            let sets: Vec<String> =
                cols.iter().filter(|c| !c.is_key).map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name))).collect();
            let action = if sets.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", sets.join(", ")) };
            if moves {
                // One statement, so every move reads the old rows as they were before it.
                let values: Vec<String> = cols
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("CASE WHEN s._u[{}] THEN o.{} ELSE {} END", i + 1, quote_ident(&c.name), cast(i)))
                    .collect();
                let old_match: Vec<String> = target
                    .keys
                    .iter()
                    .enumerate()
                    .map(|(j, &i)| format!("o.{} = s.o{j}::{}", quote_ident(&cols[i].name), target.types[i]))
                    .collect();
                sql += &format!(
                    "INSERT INTO {t} ({}) SELECT {} FROM pg_temp.{} s JOIN {t} o ON {} WHERE s._op = 'M' ON CONFLICT ({}) DO {action};\n",
                    names.join(", "),
                    values.join(", "),
                    target.stage,
                    old_match.join(" AND "),
                    keys.join(", "),
                    t = target.name.quoted(),
                );
            }
            if deletes {
                sql += &format!(
                    "DELETE FROM {} t USING pg_temp.{} s WHERE s._op = 'D' AND {key_match};\n",
                    target.name.quoted(),
                    target.stage
                );
            }
            if upserts {
                let values: Vec<String> = (0..ncols).map(cast).collect();
                sql += &format!(
                    "INSERT INTO {} ({}) SELECT {} FROM pg_temp.{} s WHERE s._op = 'U' AND s._u IS NULL ON CONFLICT ({}) DO {action};\n",
                    target.name.quoted(),
                    names.join(", "),
                    values.join(", "),
                    target.stage,
                    keys.join(", ")
                );
            }
            if partial {
                let sets: Vec<String> = cols
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !c.is_key)
                    .map(|(i, c)| format!("{0} = CASE WHEN s._u[{1}] THEN t.{0} ELSE {2} END", quote_ident(&c.name), i + 1, cast(i)))
                    .collect();
                if !sets.is_empty() {
                    sql += &format!(
                        "UPDATE {} t SET {} FROM pg_temp.{} s WHERE s._op = 'U' AND s._u IS NOT NULL AND {key_match};\n",
                        target.name.quoted(),
                        sets.join(", "),
                        target.stage
                    );
                }
            }
            sql += &format!("TRUNCATE pg_temp.{}", target.stage);
            c.batch_execute(&sql).await.map_err(|e| PgError::from_pg(&ctx("applying changes to"), e))?;
        }
        Ok(())
    }
}

impl Pending {
    /// The staged operation (`D`elete, `U`psert, `M`ove), the row, and for a move the
    /// row under the old key.
    fn parts(&self) -> (u8, &Row, Option<&Row>) {
        match self {
            Pending::Delete(r) => (b'D', r, None),
            Pending::Upsert(r) => (b'U', r, None),
            Pending::Move(old, r) => (b'M', r, Some(old)),
        }
    }

    /// An upsert or move that left some TOAST values unchanged: its `_u` flags say which
    /// columns keep the target's value.
    fn leaves_unchanged(&self) -> bool {
        !matches!(self, Pending::Delete(_)) && self.parts().1.contains(&Datum::Unchanged)
    }
}

/// What a COPY statement adds for the format its data was written in.
fn copy_format(binary: bool) -> &'static str {
    if binary { " (FORMAT binary)" } else { "" }
}

/// Stages changes as COPY text rows: `_op`, `_u` (which columns an update left
/// unchanged, NULL when none), the row's columns, then the old key's.
fn stage_text(buf: &mut BytesMut, ncols: usize, keys: &[usize], pending: &[Pending]) {
    for p in pending {
        let (op, row, old) = p.parts();
        buf.put_u8(op);
        buf.put_u8(b'\t');
        if p.leaves_unchanged() {
            buf.put_u8(b'{');
            for (i, d) in row.iter().enumerate() {
                if i > 0 {
                    buf.put_u8(b',');
                }
                buf.put_u8(if *d == Datum::Unchanged { b't' } else { b'f' });
            }
            buf.put_u8(b'}');
        } else {
            buf.put_slice(b"\\N");
        }
        buf.put_u8(b'\t');
        put_fields(buf, row, ncols);
        for &k in keys {
            buf.put_u8(b'\t');
            put_field(buf, old.map_or(&Datum::Null, |o| &o[k]));
        }
        buf.put_u8(b'\n');
    }
}

/// [`stage_text`] in binary, into a staging table typed as the target; `false`, with
/// `buf` as it was, when a value is not in its type's printed form.
fn stage_binary(buf: &mut BytesMut, fields: &[BinaryField], keys: &[usize], pending: &[Pending]) -> bool {
    let Ok(n) = i16::try_from(2 + fields.len() + keys.len()) else { return false };
    let mut w = BinaryRows::begin(buf);
    for p in pending {
        let (op, row, old) = p.parts();
        w.row(n);
        w.char(op);
        if p.leaves_unchanged() {
            w.bools(row.iter().map(|d| *d == Datum::Unchanged));
        } else {
            w.null();
        }
        // An unchanged value is staged as NULL; `_u` says to keep the target's.
        let values = (0..fields.len()).map(|i| (fields[i], row.get(i).filter(|d| **d != Datum::Unchanged)));
        let old_keys = keys.iter().map(|&k| (fields[k], old.map(|o| &o[k])));
        for (f, d) in values.chain(old_keys) {
            if !w.value(f, d.unwrap_or(&Datum::Null)) {
                w.abandon();
                return false;
            }
        }
    }
    w.finish();
    true
}

/// A row's first `ncols` values as COPY text fields, tab-separated, NULL for the
/// columns a short row lacks.
fn put_fields(buf: &mut BytesMut, row: &Row, ncols: usize) {
    for i in 0..ncols {
        if i > 0 {
            buf.put_u8(b'\t');
        }
        put_field(buf, row.get(i).unwrap_or(&Datum::Null));
    }
}

/// Rows, snapshot chunks and the checkpoint commit together in the target: exactly once.
impl Sink for PostgresSink {
    fn keeps_rows_by_key(&self) -> bool {
        true
    }

    fn snapshot_method(&self) -> SnapshotMethod {
        SnapshotMethod::CopyInTarget
    }

    async fn prepare(&mut self, tables: &[Arc<TableSchema>]) -> SinkResult<()> {
        for t in tables {
            self.prepare_table(t).await.map_err(sink_error)?;
        }
        Ok(())
    }

    async fn has_progress(&self) -> SinkResult<bool> {
        Ok(self.checkpoint.end_lsn > Lsn::ZERO)
    }

    fn resume_lsn(&self) -> Lsn {
        self.checkpoint.end_lsn
    }

    fn target_name(&self, table: &TableName) -> TableName {
        PostgresSink::target_name(self, table)
    }

    fn filters_snapshot(&mut self, keyed_as_source: bool) -> bool {
        if !keyed_as_source {
            self.filter_upstream();
        }
        keyed_as_source
    }

    fn mirrors_source_rows(&self) -> bool {
        true
    }

    async fn after_snapshot(&mut self) -> SinkResult<()> {
        self.reload_snapshot_state().await.map_err(sink_error)
    }

    async fn apply(&mut self, txns: &[Transaction]) -> SinkResult<()> {
        let was_open = self.open;
        let r = self.apply_inner(txns).await;
        if r.is_err() {
            // Leave the connection usable for a retry; the failed batch is rolled back.
            let _ = self.client.batch_execute("ROLLBACK").await;
            if was_open || self.open {
                // Tables and staging tables made inside the open transaction are gone
                // with it; the source sends the whole transaction again.
                self.open = false;
                self.targets.clear();
            }
        }
        r.map_err(sink_error)
    }

    async fn teardown(&self, tables: &[TableName], purge: bool) -> SinkResult<()> {
        if purge {
            for t in tables {
                self.client
                    .batch_execute(&format!("DROP TABLE IF EXISTS {}", t.quoted()))
                    .await
                    .map_err(|e| sink_error(PgError::from_pg(&format!("dropping {t}"), e)))?;
            }
        }
        Ok(())
    }

    async fn health(&self) -> SinkResult<()> {
        self.client.simple_query("SELECT 1").await.map(drop).map_err(|e| sink_error(PgError::from_pg("sink health check", e)))
    }
}

fn sink_error(e: PgError) -> SinkError {
    SinkError::wrap(e.kind(), e)
}
