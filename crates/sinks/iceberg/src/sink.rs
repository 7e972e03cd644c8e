//! The `Sink` lifecycle: tables created from the source's shape, changes staged in
//! memory and committed every `commit_interval` (or `commit_rows`) as one Iceberg
//! snapshot per changed table, the catalog pointers and the checkpoint moved in one
//! Postgres transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
use iceberg::io::FileIO;
use iceberg::spec::{DataFile, TableMetadata};
use sluice_core::sink::{Sink, SinkError, SinkResult, SnapshotChunk, SnapshotMethod};
use sluice_core::{Datum, Lsn, Op, Row, TableName, TableSchema, Transaction, key_of};
use sluice_postgres::{Checkpoint, PgError, connect};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::catalog::{Catalog, SqlCatalog};
use crate::config::{IcebergSinkConfig, Mode};
use crate::encoding::{self, Column};
use crate::error::IcebergError;
use crate::maintenance::{MAINTENANCE, Maintenance, maintain_table};
use crate::rest::{Commit, RestCatalog};
use crate::storage::Warehouse;
use crate::table::{self, Files, Slot, Table};

type Result<T, E = IcebergError> = std::result::Result<T, E>;

const STATE_DB: &str = "Iceberg sink's state database";

/// One change of a changelog table.
struct LogRow {
    row: Option<Row>,
    op: &'static str,
    lsn: Lsn,
    commit_time_us: i64,
    seq: u32,
}

/// What one table has waiting for the next commit.
#[derive(Default)]
struct Pending {
    /// Upsert: the last image per key, in first-seen order (`None`: deleted).
    latest: HashMap<Vec<u8>, Option<Row>>,
    order: Vec<Vec<u8>>,
    /// Along `order`: the key's first change in this commit was an insert, so no earlier
    /// commit holds a row of it and it needs no equality delete (insert-heavy tables
    /// then get no delete files, which every reader would otherwise have to apply).
    fresh: Vec<bool>,
    /// A TRUNCATE came: the commit leaves every earlier file out.
    truncated: bool,
    /// Changelog: every change.
    log: Vec<LogRow>,
    /// The commit LSN of the first transaction with a change of this table (the start
    /// of the range its snapshot summary records).
    first_lsn: Option<Lsn>,
}

/// Changes handed to the sink and not yet committed.
#[derive(Default)]
struct Staged {
    tables: HashMap<TableName, Pending>,
    changes: usize,
    txns: i64,
    since: Option<Instant>,
    /// The first and last staged transactions' commit LSNs (the commit's range).
    first_commit_lsn: Lsn,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    /// The last staged transaction continues in the next batch: no commit until its
    /// last piece (a commit holds whole source transactions).
    open: bool,
}

pub struct IcebergSink {
    /// The state database (a SQL catalog's own).
    client: Client,
    catalog: Catalog,
    io: FileIO,
    warehouse: Warehouse,
    pipeline: String,
    cfg: IcebergSinkConfig,
    /// The background maintenance's last start, and its task.
    last_maintenance: Instant,
    maintenance_task: Option<tokio::task::JoinHandle<()>>,
    /// By the name of the table the sink is handed (the source's, or the transforms').
    tables: Mutex<HashMap<TableName, Table>>,
    /// The last committed source transaction.
    committed: Checkpoint,
    /// Streamed commits by this process.
    commits: u64,
    staged: Staged,
    /// Snapshot chunks in flight.
    chunks: std::sync::Mutex<HashMap<SnapshotChunk, ChunkFiles>>,
}

impl IcebergSink {
    pub(crate) async fn connect(cfg: &IcebergSinkConfig, pipeline: &str) -> Result<Self> {
        let client = connect(&cfg.state_connection(), STATE_DB).await?;
        let committed = Checkpoint::register(&client, pipeline).await?;
        let catalog = cfg.catalog().await?;
        let warehouse = cfg.warehouse().map_err(|e| IcebergError::permanent(e.to_string()))?;
        Ok(Self {
            client,
            catalog,
            io: warehouse.io.clone(),
            warehouse,
            pipeline: pipeline.to_string(),
            cfg: cfg.clone(),
            last_maintenance: Instant::now(),
            maintenance_task: None,
            tables: Mutex::new(HashMap::new()),
            committed,
            commits: 0,
            staged: Staged::default(),
            chunks: Default::default(),
        })
    }

    fn names(&self, table: &TableName) -> (String, String) {
        self.cfg.target(table)
    }

    /// Starts the tables' maintenance beside streaming when its interval has passed
    /// (and the last run is over). Its commits take turns with the sink's through the
    /// catalog row lock; a failure is logged and tried again at the next interval.
    fn schedule_maintenance(&mut self) {
        let m = &self.cfg.maintenance;
        if m.interval.is_zero()
            || self.last_maintenance.elapsed() < m.interval
            || self.maintenance_task.as_ref().is_some_and(|h| !h.is_finished())
        {
            return;
        }
        self.last_maintenance = Instant::now();
        let what = Maintenance {
            compact: true,
            expire_older_than: Some(m.expire_snapshots_after),
            keep: 1,
            orphans_older_than: Some(m.orphan_files_after),
        };
        let tables: Vec<(String, String)> = self.tables.get_mut().values().map(|t| (t.namespace.clone(), t.name.clone())).collect();
        let (cfg, warehouse, mode, pipeline) = (self.cfg.clone(), self.warehouse.clone(), self.cfg.mode, self.pipeline.clone());
        self.maintenance_task = Some(tokio::spawn(async move {
            let connected = async { Ok::<_, IcebergError>((connect(&cfg.state_connection(), STATE_DB).await?, cfg.catalog().await?)) };
            let (client, catalog) = match connected.await {
                Ok(c) => c,
                Err(e) => return tracing::warn!(error = %e, "Iceberg maintenance could not connect; tried again at the next interval"),
            };
            for (ns, name) in tables {
                match maintain_table(&client, &catalog, &warehouse, &ns, &name, mode, &pipeline, &what).await {
                    Ok(r) => tracing::info!(
                        table = %r.table,
                        rows = r.rows,
                        data_files_before = r.data_files_before,
                        delete_files_before = r.delete_files_before,
                        data_files_after = r.data_files_after,
                        snapshots_expired = r.snapshots_expired,
                        files_removed = r.files_removed,
                        ms = r.ms,
                        "Iceberg table maintained"
                    ),
                    Err(e) => {
                        tracing::warn!(table = %format!("{ns}.{name}"), error = %e, "Iceberg maintenance failed; tried again at the next interval")
                    }
                }
            }
        }));
    }

    /// Opens the table, creating it (and its namespace) when missing.
    async fn open(&self, source: &TableSchema) -> Result<Table> {
        let (ns, name) = self.names(&source.name);
        if self.cfg.mode == Mode::Upsert && !source.columns.iter().any(|c| c.is_key) {
            return Err(IcebergError::permanent(format!(
                "table {} has no primary key, and the iceberg sink's upsert mode keeps one row per key: add a primary key \
                 (or REPLICA IDENTITY USING INDEX), or set sink.iceberg.mode: changelog",
                source.name
            )));
        }
        let files = |what: &str| {
            let what = format!("{what} of Iceberg table {ns}.{name}");
            move |e| IcebergError::files(&what, e)
        };
        let table_location = format!("{}/{ns}.db/{name}", self.warehouse.url);
        let new_table = || -> Result<_> {
            let schema = table::schema_for(source, self.cfg.mode).map_err(files("building the schema"))?;
            let (spec, order) = self.cfg.layout_of(source).map_err(IcebergError::permanent)?;
            Ok((schema, spec, order))
        };
        let catalog = match &self.catalog {
            Catalog::Sql(catalog) => catalog,
            Catalog::Rest(rest) => {
                let (location, metadata) = match rest.load(&ns, &name).await? {
                    Some(t) => t,
                    None => {
                        let (schema, spec, order) = new_table()?;
                        rest.ensure_namespace(&ns).await?;
                        let props = Table::properties();
                        match rest.create(&ns, &name, &table_location, &schema, spec.as_ref(), order.as_ref(), &props).await? {
                            Some(t) => {
                                tracing::info!(table = %format!("{ns}.{name}"), "created Iceberg table");
                                t
                            }
                            None => {
                                rest.load(&ns, &name).await?.ok_or_else(|| IcebergError::transient("the table was created and dropped"))?
                            }
                        }
                    }
                };
                let mut t = Table::open(&ns, &name, metadata, location, self.cfg.mode).map_err(files("opening"))?;
                t.writes_metadata = false;
                t.skip_until = t.committed_lsn();
                return Ok(t);
            }
        };
        catalog.ensure(&self.client).await?;
        let location = match catalog.load(&self.client, &ns, &name).await? {
            Some(l) => l,
            None => {
                let (schema, spec, order) = new_table()?;
                let metadata = Table::new_metadata(schema, &table_location, spec, order).map_err(files("building the metadata"))?;
                let l = format!("{table_location}/metadata/00000-{}.metadata.json", uuid::Uuid::new_v4());
                table::write_metadata(&self.io, &metadata, &l).await.map_err(files("writing the metadata"))?;
                // The namespace is recorded once the table's first metadata file is
                // written: a warehouse that fails leaves nothing behind.
                catalog.ensure_namespace(&self.client, &ns).await?;
                if catalog.create(&self.client, &ns, &name, &l).await? {
                    tracing::info!(table = %format!("{ns}.{name}"), "created Iceberg table");
                    l
                } else {
                    catalog.load(&self.client, &ns, &name).await?.unwrap_or(l)
                }
            }
        };
        let metadata = TableMetadata::read_from(&self.io, &location).await.map_err(files("reading the metadata"))?;
        Table::open(&ns, &name, metadata, location, self.cfg.mode).map_err(files("opening"))
    }

    /// Stages committed source transactions (those past the checkpoint).
    fn stage(&mut self, batch: &[Transaction]) -> Result<()> {
        let tables = self.tables.get_mut();
        for t in batch {
            if t.commit_lsn <= self.committed.commit_lsn {
                continue; // committed before a restart: the source sent it again
            }
            for e in &t.events {
                let Some(table) = tables.get_mut(&e.table.name) else { continue };
                if t.commit_lsn <= table.skip_until {
                    continue; // this table holds it already (a REST commit whose checkpoint was lost)
                }
                table.map(&e.table, t.commit_lsn, self.cfg.mode, self.cfg.accept_narrowing).map_err(|r| IcebergError::halted(r.0))?;
                let before = e.before.as_ref().map(|r| table.fields_of(r));
                let pending = self.staged.tables.entry(e.table.name.clone()).or_default();
                pending.first_lsn.get_or_insert(t.commit_lsn);
                if self.cfg.mode == Mode::Changelog {
                    let (row, op) = match e.op {
                        Op::Insert => (e.after.as_ref(), "c"),
                        Op::Update => (e.after.as_ref(), "u"),
                        Op::Delete => (None, "d"),
                        Op::Read => (e.after.as_ref(), "r"),
                        Op::Truncate => (None, "t"),
                    };
                    let row = match (row, e.op) {
                        (Some(r), _) => Some(fill_unchanged(table.fields_of(r), before.as_ref(), None, table)?),
                        (None, Op::Delete) => before,
                        (None, _) => None,
                    };
                    pending.log.push(LogRow { row, op, lsn: t.commit_lsn, commit_time_us: t.commit_time_us, seq: e.position.seq });
                } else {
                    match e.op {
                        Op::Truncate => {
                            pending.latest.clear();
                            pending.order.clear();
                            pending.fresh.clear();
                            pending.truncated = true;
                        }
                        Op::Delete => {
                            if let Some(old) = &before {
                                put(pending, key_of(old, &table.keys), None, false);
                            }
                        }
                        Op::Insert | Op::Update | Op::Read => {
                            let Some(new) = &e.after else { continue };
                            let new = table.fields_of(new);
                            let key = key_of(&new, &table.keys);
                            if let Some(old) = &before {
                                let old_key = key_of(old, &table.keys);
                                if old_key != key {
                                    put(pending, old_key, None, false); // the key changed: the old row goes
                                }
                            }
                            let prev = pending.latest.get(&key).and_then(Option::as_ref);
                            let new = fill_unchanged(new, before.as_ref(), prev, table)?;
                            put(pending, key, Some(new), e.op == Op::Insert && before.is_none());
                        }
                    }
                }
                self.staged.changes += 1;
            }
            self.staged.since.get_or_insert_with(Instant::now);
            self.staged.open = t.continues;
            if t.continues {
                continue;
            }
            if self.staged.txns == 0 {
                self.staged.first_commit_lsn = t.commit_lsn;
            }
            self.staged.txns += 1;
            self.staged.commit_lsn = t.commit_lsn;
            self.staged.end_lsn = t.end_lsn;
        }
        Ok(())
    }

    fn due(&self) -> bool {
        !self.staged.open && self.staged.since.is_some_and(|s| s.elapsed() >= self.cfg.commit_interval)
            || self.staged.changes >= self.cfg.commit_rows
    }

    /// Commits everything staged: one Iceberg snapshot per changed table, then the
    /// catalog pointers and the checkpoint in one transaction.
    async fn commit(&mut self) -> Result<()> {
        if self.staged.since.is_none() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        let started = Instant::now();
        let mut batches = Vec::new();
        {
            let tables = self.tables.get_mut();
            for (name, pending) in &staged.tables {
                let table = &tables[name];
                let (data, deletes, n_deletes) = match self.cfg.mode {
                    Mode::Upsert => upsert_batches(table, pending)?,
                    Mode::Changelog => (changelog_batch(table, &pending.log)?, None, 0),
                };
                // The files are written before the transaction: the catalog row lock
                // is held for the metadata only.
                let commit = uuid::Uuid::new_v4().to_string();
                let what = format!("writing a commit of Iceberg table {}.{}", table.namespace, table.name);
                let written = async { table.files(&self.io)?.write(&commit, data.into_iter().collect(), deletes).await }
                    .await
                    .map_err(|e| IcebergError::files(&what, e))?;
                let first = pending.first_lsn.unwrap_or(staged.first_commit_lsn);
                batches.push((name.clone(), commit, written, (n_deletes, first), pending.truncated));
            }
        }
        let props = |(n_deletes, first): (usize, Lsn)| {
            HashMap::from([
                ("sluice.pipeline".to_string(), self.pipeline.clone()),
                ("sluice.first-commit-lsn".to_string(), first.to_string()),
                ("sluice.commit-lsn".to_string(), staged.commit_lsn.to_string()),
                ("sluice.deletes".to_string(), n_deletes.to_string()),
            ])
        };
        let checkpoint = Checkpoint { commit_lsn: staged.commit_lsn, end_lsn: staged.end_lsn };
        let c = &self.client;
        let catalog = match &self.catalog {
            Catalog::Sql(catalog) => catalog,
            Catalog::Rest(rest) => {
                // Table by table, each snapshot carrying the commit LSN; then the
                // checkpoint. A crash between them is undone by `skip_until`.
                let tables = self.tables.get_mut();
                for (name, commit, written, n_deletes, truncated) in batches {
                    let t = tables.get_mut(&name).expect("staged tables are open");
                    commit_rest(rest, &self.io, t, &commit, written, truncated, props(n_deletes)).await?;
                }
                // Test hook: die after the catalog took the commit and before the
                // checkpoint moved (the window only the summaries' LSNs cover).
                if std::env::var("SLUICE_TEST_ICEBERG_ABORT_BEFORE_CHECKPOINT").ok().and_then(|v| v.parse::<u64>().ok())
                    == Some(self.commits + 1)
                {
                    std::process::abort();
                }
                checkpoint.save(c, &self.pipeline, staged.txns).await?;
                return self.committed(checkpoint, &staged, started);
            }
        };
        c.batch_execute("BEGIN").await.map_err(|e| PgError::from_pg("starting the Iceberg commit", e))?;
        let r = async {
            let tables = self.tables.get_mut();
            let mut done = Vec::new();
            for (name, commit, written, n_deletes, truncated) in batches {
                let t = tables.get_mut(&name).expect("staged tables are open");
                done.push((name, stage_locked(c, catalog, &self.io, t, &commit, written, truncated, props(n_deletes)).await?));
            }
            checkpoint.save(c, &self.pipeline, staged.txns).await?;
            c.batch_execute("COMMIT").await.map_err(|e| PgError::from_pg("committing the Iceberg commit", e))?;
            Ok::<_, IcebergError>(done)
        }
        .await;
        let done = match r {
            Ok(done) => done,
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                // The files written stay unreferenced (orphan removal takes them); the
                // source sends the changes again.
                return Err(e);
            }
        };
        let tables = self.tables.get_mut();
        for (name, (metadata, location)) in done {
            let t = tables.get_mut(&name).expect("staged tables are open");
            t.metadata = metadata;
            t.metadata_location = location;
        }
        self.committed(checkpoint, &staged, started)
    }

    /// Records a commit that reached the catalog and the checkpoint.
    fn committed(&mut self, checkpoint: Checkpoint, staged: &Staged, started: Instant) -> Result<()> {
        self.committed = checkpoint;
        self.commits += 1;
        // Test hook: die right after a commit, before the source hears of it, so the
        // restart is sent again what this commit holds (the window kill -9 rarely hits).
        if std::env::var("SLUICE_TEST_ICEBERG_ABORT_AFTER_COMMITS").ok().and_then(|v| v.parse::<u64>().ok()) == Some(self.commits) {
            std::process::abort();
        }
        tracing::debug!(
            changes = staged.changes,
            tables = staged.tables.len(),
            ms = started.elapsed().as_millis() as u64,
            "Iceberg commit"
        );
        Ok(())
    }
}

/// Snapshot rows of a chunk waiting for its commit: batches not yet written, and
/// files written.
#[derive(Default)]
struct ChunkFiles {
    batches: Vec<arrow_array::RecordBatch>,
    rows: usize,
    files: Vec<DataFile>,
}

/// Snapshot rows are written out once a chunk holds this many (bounded memory per
/// chunk in flight, files of a useful size).
const SNAPSHOT_FILE_ROWS: usize = 131_072;

/// The open table snapshot rows of `source` go to.
fn prepared<'a>(tables: &'a mut HashMap<TableName, Table>, source: &TableSchema) -> SinkResult<&'a mut Table> {
    tables
        .get_mut(&source.name)
        .ok_or_else(|| SinkError::permanent(format!("snapshot rows for {}, which the sink was not prepared for", source.name)))
}

async fn write_chunk_files(files: &Files, batches: Vec<arrow_array::RecordBatch>) -> SinkResult<Vec<DataFile>> {
    let commit = uuid::Uuid::new_v4().to_string();
    let (data, _) = files.write(&commit, batches, None).await.map_err(|e| sink_error(IcebergError::files("writing snapshot rows", e)))?;
    Ok(data)
}

/// Commits files already written for `t` on the table's current state, read under the
/// catalog row lock (maintenance may have committed since this process last did), and
/// moves the pointer, in the caller's transaction.
#[allow(clippy::too_many_arguments)]
async fn stage_locked(
    c: &Client,
    catalog: &SqlCatalog,
    io: &FileIO,
    t: &mut Table,
    commit: &str,
    (data, deletes): (Vec<DataFile>, Vec<DataFile>),
    truncated: bool,
    props: HashMap<String, String>,
) -> Result<(TableMetadata, String)> {
    let what = format!("Iceberg table {}.{}", t.namespace, t.name);
    let current = catalog.lock(c, &t.namespace, &t.name).await?;
    if current != t.metadata_location {
        t.rebase(io, current, MAINTENANCE).await.map_err(|e| IcebergError::files(&format!("reading the current state of {what}"), e))?;
    }
    let (metadata, location) = t
        .stage_files(io, commit, data, deletes, truncated, props)
        .await
        .map_err(|e| IcebergError::files(&format!("writing a commit of {what}"), e))?;
    catalog.swap(c, &t.namespace, &t.name, &t.metadata_location, &location).await?;
    Ok((metadata, location))
}

/// Commits files already written for `t` through a REST catalog: on the table's state
/// as this process knows it, and again on the catalog's current state when maintenance
/// committed meanwhile (anything else is refused by [`Table::rebase_to`]).
async fn commit_rest(
    rest: &RestCatalog,
    io: &FileIO,
    t: &mut Table,
    commit: &str,
    (data, deletes): (Vec<DataFile>, Vec<DataFile>),
    truncated: bool,
    props: HashMap<String, String>,
) -> Result<()> {
    let what = format!("Iceberg table {}.{}", t.namespace, t.name);
    for _ in 0..5 {
        let (next, _) = t
            .stage_files(io, commit, data.clone(), deletes.clone(), truncated, props.clone())
            .await
            .map_err(|e| IcebergError::files(&format!("writing a commit of {what}"), e))?;
        match rest.commit(&t.namespace, &t.name, &t.metadata, &next).await? {
            Commit::Done(location, metadata) => {
                t.metadata = *metadata;
                t.metadata_location = location;
                return Ok(());
            }
            Commit::Conflict => {
                let (location, theirs) = rest
                    .load(&t.namespace, &t.name)
                    .await?
                    .ok_or_else(|| IcebergError::permanent(format!("{what} is gone from the REST catalog; restart the pipeline")))?;
                t.rebase_to(theirs, location, MAINTENANCE)
                    .map_err(|e| IcebergError::files(&format!("reading the current state of {what}"), e))?;
            }
        }
    }
    Err(IcebergError::transient(format!("{what}: the REST catalog refused five commits in a row (the table kept moving); retrying")))
}

fn put(p: &mut Pending, key: Vec<u8>, row: Option<Row>, insert: bool) {
    if p.latest.insert(key.clone(), row).is_none() {
        p.order.push(key);
        p.fresh.push(insert);
    }
}

/// An update that left TOASTed columns untouched does not resend them: they come from
/// the old image (REPLICA IDENTITY FULL) or from this commit's earlier image of the row.
/// Rows are in the table's field order.
fn fill_unchanged(mut row: Row, before: Option<&Row>, prev: Option<&Row>, table: &Table) -> Result<Row> {
    for (i, d) in row.iter_mut().enumerate() {
        if *d == Datum::Unchanged {
            match before.or(prev).and_then(|r| r.get(i)).filter(|v| **v != Datum::Unchanged) {
                Some(v) => *d = v.clone(),
                None => {
                    let source = table.source_name();
                    return Err(IcebergError::permanent(format!(
                        "an update of {source} left the large (TOASTed) column {} unchanged, and the iceberg sink cannot read \
                         the value it already holds: run ALTER TABLE {} REPLICA IDENTITY FULL on the source so updates carry it",
                        table.arrow.field(i).name(),
                        source.quoted()
                    )));
                }
            }
        }
    }
    Ok(row)
}

/// The table's columns from `rows` (in field order; a changelog's own columns come out
/// null); with `only_keys`, every column but the key is null (equality deletes).
fn columns_of<'a>(table: &Table, rows: &[&'a Row], only_keys: bool) -> Result<Vec<ArrayRef>> {
    let mut out = Vec::with_capacity(table.kinds.len());
    for (i, kind) in table.kinds.iter().enumerate() {
        let values: Column<'a> = if only_keys && !table.keys.contains(&i) {
            vec![None; rows.len()]
        } else {
            rows.iter().map(|r| r.get(i).and_then(encoding::datum)).collect()
        };
        out.push(encoding::array(*kind, table.arrow.field(i).name(), &values).map_err(|b| {
            IcebergError::permanent(format!(
                "column {} of Iceberg table {}.{}: a value does not fit its type {:?}",
                b.column, table.namespace, table.name, b.kind
            ))
        })?);
    }
    Ok(out)
}

type Batch = Option<arrow_array::RecordBatch>;

/// The data rows (last image per key) and the equality deletes (every key touched).
fn upsert_batches(table: &Table, p: &Pending) -> Result<(Batch, Batch, usize)> {
    let rows: Vec<&Row> = p.order.iter().filter_map(|k| p.latest.get(k)?.as_ref()).collect();
    let data = if rows.is_empty() {
        None
    } else {
        Some(encoding::batch(&table.arrow, columns_of(table, &rows, false)?).map_err(IcebergError::permanent)?)
    };
    // A key's earlier rows go, whether it was updated or deleted. After a truncate
    // no earlier file remains: nothing to delete.
    let deleted = p.order.iter().filter(|k| p.latest.get(*k).is_some_and(Option::is_none)).count();
    let keyed: Vec<Row> = if p.truncated {
        Vec::new()
    } else {
        // Key-only rows: the key's values come from the latest image, or from the delete.
        p.order.iter().zip(&p.fresh).filter(|(_, fresh)| !**fresh).map(|(k, _)| key_row(table, k)).collect()
    };
    let deletes = if keyed.is_empty() {
        None
    } else {
        let refs: Vec<&Row> = keyed.iter().collect();
        Some(encoding::batch(&table.arrow, columns_of(table, &refs, true)?).map_err(IcebergError::permanent)?)
    };
    Ok((data, deletes, deleted))
}

/// A row holding only the key values of `key` (as [`key_of`] encoded them).
fn key_row(table: &Table, key: &[u8]) -> Row {
    let mut row = vec![Datum::Null; table.kinds.len()];
    let mut rest = key;
    for &i in &table.keys {
        let (len, tail) = rest.split_at(4);
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes"));
        if len == u32::MAX {
            rest = tail;
            continue;
        }
        let (v, tail) = tail.split_at(len as usize);
        row[i] = Datum::Text(bytes_of(v));
        rest = tail;
    }
    row
}

fn bytes_of(v: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(v)
}

fn changelog_batch(table: &Table, log: &[LogRow]) -> Result<Batch> {
    if log.is_empty() {
        return Ok(None);
    }
    let empty: Row = Vec::new();
    let rows: Vec<&Row> = log.iter().map(|l| l.row.as_ref().unwrap_or(&empty)).collect();
    let mut cols = columns_of(table, &rows, false)?;
    for (i, slot) in table.slots.iter().enumerate() {
        let Slot::Changelog(which) = slot else { continue };
        cols[i] = match which {
            0 => Arc::new(StringArray::from_iter_values(log.iter().map(|l| l.op))),
            1 => Arc::new(Int64Array::from_iter_values(log.iter().map(|l| l.lsn.0 as i64))),
            2 => Arc::new(TimestampMicrosecondArray::from_iter_values(log.iter().map(|l| l.commit_time_us)).with_timezone("+00:00")),
            _ => Arc::new(Int64Array::from_iter_values(log.iter().map(|l| i64::from(l.seq)))),
        };
    }
    Ok(Some(encoding::batch(&table.arrow, cols).map_err(IcebergError::permanent)?))
}

fn sink_error(e: IcebergError) -> SinkError {
    SinkError::wrap(e.kind(), e)
}

/// Rows and the checkpoint commit together (catalog pointers and `sluice.pipelines` in
/// one Postgres transaction): exactly once. The snapshot's rows are committed per
/// delivery, before the engine marks their chunk done.
impl Sink for IcebergSink {
    /// An upsert table holds one row per key; a changelog is a log.
    fn keeps_rows_by_key(&self) -> bool {
        self.cfg.mode == Mode::Upsert
    }

    fn snapshot_method(&self) -> SnapshotMethod {
        SnapshotMethod::Rows
    }

    async fn prepare(&mut self, tables: &[Arc<TableSchema>]) -> SinkResult<()> {
        for t in tables {
            let table = self.open(t).await.map_err(sink_error)?;
            self.tables.get_mut().insert(t.name.clone(), table);
        }
        Ok(())
    }

    async fn has_progress(&self) -> SinkResult<bool> {
        Ok(self.committed.end_lsn > Lsn::ZERO)
    }

    fn resume_lsn(&self) -> Lsn {
        self.committed.end_lsn
    }

    fn target_name(&self, table: &TableName) -> TableName {
        let (ns, name) = self.names(table);
        TableName::new(ns, name)
    }

    /// Rows of a chunk become Parquet files as they come, in parallel with the other
    /// chunks; [`Sink::snapshot_chunk_done`] commits them.
    async fn snapshot_rows(&self, source: &Arc<TableSchema>, chunk: &SnapshotChunk, rows: Vec<Row>, snapshot_lsn: Lsn) -> SinkResult<()> {
        let (batch, files) = {
            let mut tables = self.tables.lock().await;
            let table = prepared(&mut tables, source)?;
            table.map(source, snapshot_lsn, self.cfg.mode, self.cfg.accept_narrowing).map_err(|r| SinkError::halted(r.0))?;
            let rows: Vec<Row> = rows.iter().map(|r| table.fields_of(r)).collect();
            let batch = match self.cfg.mode {
                // A chunk commits whole or not at all, and streaming starts after the
                // snapshot: the rows need no deletes.
                Mode::Upsert => {
                    let refs: Vec<&Row> = rows.iter().collect();
                    encoding::batch(&table.arrow, columns_of(table, &refs, false).map_err(sink_error)?).map_err(SinkError::permanent)?
                }
                Mode::Changelog => {
                    let log: Vec<LogRow> = rows
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| LogRow { row: Some(r), op: "r", lsn: snapshot_lsn, commit_time_us: 0, seq: i as u32 })
                        .collect();
                    changelog_batch(table, &log).map_err(sink_error)?.expect("rows were delivered")
                }
            };
            (batch, table.files(&self.io).map_err(|e| sink_error(IcebergError::files("writing snapshot rows", e)))?)
        };
        let full = {
            let mut chunks = self.chunks.lock().expect("not poisoned");
            let c = chunks.entry(chunk.clone()).or_default();
            c.rows += batch.num_rows();
            c.batches.push(batch);
            (c.rows >= SNAPSHOT_FILE_ROWS).then(|| (std::mem::take(&mut c.batches), std::mem::take(&mut c.rows)))
        };
        if let Some((batches, _)) = full {
            let written = write_chunk_files(&files, batches).await?;
            self.chunks.lock().expect("not poisoned").entry(chunk.clone()).or_default().files.extend(written);
        }
        Ok(())
    }

    /// Commits the chunk's files and its done mark in one transaction: a chunk is in
    /// the table whole, exactly once, or not at all (and delivered again).
    async fn snapshot_chunk_done(
        &self,
        source: &Arc<TableSchema>,
        chunk: &SnapshotChunk,
        rows: u64,
        snapshot_lsn: Lsn,
    ) -> SinkResult<bool> {
        let Some(staged) = self.chunks.lock().expect("not poisoned").remove(chunk) else { return Ok(false) };
        let mut tables = self.tables.lock().await;
        let table = prepared(&mut tables, source)?;
        let mut data_files = staged.files;
        if !staged.batches.is_empty() {
            let files = table.files(&self.io).map_err(|e| sink_error(IcebergError::files("writing snapshot rows", e)))?;
            data_files.extend(write_chunk_files(&files, staged.batches).await?);
        }
        let props = HashMap::from([
            ("sluice.pipeline".to_string(), self.pipeline.clone()),
            ("sluice.snapshot-lsn".to_string(), snapshot_lsn.to_string()),
            ("sluice.snapshot-chunk".to_string(), format!("{}/{}", chunk.table, chunk.chunk)),
        ]);
        let c = &self.client;
        let pg = |what: &'static str| move |e| sink_error(PgError::from_pg(what, e).into());
        let lsn_text = snapshot_lsn.to_string();
        let rows = rows as i64;
        let done = async |lsn: &str| c.execute(SnapshotChunk::DONE_SQL, &[&chunk.pipeline, &chunk.table, &chunk.chunk, &rows, &lsn]).await;
        let catalog = match &self.catalog {
            Catalog::Sql(catalog) => catalog,
            Catalog::Rest(rest) => {
                // The chunk's snapshot names it: one committed before a crash lost its
                // done mark is marked done as of the LSN it was read at (the stream
                // skips what that read holds), and this read's files are dropped.
                let at = match table.holds_chunk(&props["sluice.snapshot-chunk"]) {
                    Some(at) => at.to_string(),
                    None => {
                        let commit = uuid::Uuid::new_v4().to_string();
                        commit_rest(rest, &self.io, table, &commit, (data_files, Vec::new()), false, props).await.map_err(sink_error)?;
                        // Test hook: die after the catalog took a chunk and before its
                        // done mark (the restart delivers the chunk again).
                        if std::env::var("SLUICE_TEST_ICEBERG_ABORT_BEFORE_CHUNK_DONE").is_ok_and(|v| v == chunk.chunk.to_string()) {
                            std::process::abort();
                        }
                        lsn_text
                    }
                };
                done(&at).await.map_err(pg("recording a snapshot chunk as done"))?;
                return Ok(true);
            }
        };
        c.batch_execute("BEGIN").await.map_err(pg("starting an Iceberg commit of snapshot rows"))?;
        let r = async {
            let commit = uuid::Uuid::new_v4().to_string();
            let m = stage_locked(c, catalog, &self.io, table, &commit, (data_files, Vec::new()), false, props).await?;
            done(&lsn_text).await.map_err(|e| PgError::from_pg("recording a snapshot chunk as done", e))?;
            Ok::<_, IcebergError>(m)
        }
        .await;
        let (metadata, location) = match r {
            Ok(m) => m,
            Err(e) => {
                let _ = c.batch_execute("ROLLBACK").await;
                return Err(sink_error(e));
            }
        };
        c.batch_execute("COMMIT").await.map_err(pg("committing snapshot rows to Iceberg"))?;
        table.metadata = metadata;
        table.metadata_location = location;
        Ok(true)
    }

    async fn apply(&mut self, batch: &[Transaction]) -> SinkResult<()> {
        // Ticks wait while changes keep coming: maintenance is scheduled here too.
        self.schedule_maintenance();
        self.stage(batch).map_err(sink_error)?;
        if self.due() {
            self.commit().await.map_err(sink_error)?;
        }
        Ok(())
    }

    fn durable_lsn(&self, applied: Lsn) -> Lsn {
        if self.staged.since.is_some() { self.committed.end_lsn } else { applied }
    }

    async fn tick(&mut self) -> SinkResult<()> {
        self.schedule_maintenance();
        if self.due() {
            self.commit().await.map_err(sink_error)?;
        }
        Ok(())
    }

    async fn teardown(&self, tables: &[TableName], purge: bool) -> SinkResult<()> {
        if !purge {
            return Ok(());
        }
        for t in tables {
            match &self.catalog {
                Catalog::Sql(catalog) => catalog.drop(&self.client, &t.schema, &t.name).await.map_err(|e| sink_error(e.into()))?,
                Catalog::Rest(rest) => rest.drop(&t.schema, &t.name).await.map_err(sink_error)?,
            }
            let dir = format!("{}/{}.db/{}", self.warehouse.url, t.schema, t.name);
            self.warehouse.remove_dir(&dir).await.map_err(|e| sink_error(IcebergError::storage(&format!("removing {dir}"), e)))?;
        }
        Ok(())
    }

    async fn health(&self) -> SinkResult<()> {
        self.client.simple_query("SELECT 1").await.map(drop).map_err(|e| sink_error(PgError::from_pg("catalog health check", e).into()))
    }
}
