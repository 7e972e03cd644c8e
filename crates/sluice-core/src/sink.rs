//! The `Sink` trait: the whole lifecycle of a destination, as the engine and the
//! control plane see it. Every sink (Postgres, Kafka, search, ...) implements it in its
//! own crate; the engine's sink registry is the only place that names them.
//!
//! - [`SinkConfigure`]: a sink's settings (one key of a pipeline's `sink:` block). They
//!   validate themselves, name the state database, and connect, returning the sink.
//! - [`Sink`]: prepare (tables / topics / index), resume position, snapshot rows, apply a
//!   batch, teardown with purge, health.
//! - [`SinkError`]: one error type for every sink, with a kind that says whether to retry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::transform::Step;
use crate::{ErrorKind, Lsn, PgConnConfig, Row, TableName, TableSchema, Transaction};

/// Any sink's error: a message that names what failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SinkError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }
    pub fn halted(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Halted, message)
    }
    /// `source`'s message becomes this error's; its kind is `kind`.
    pub fn wrap(kind: ErrorKind, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { kind, message: source.to_string(), source: Some(Box::new(source)) }
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

pub type SinkResult<T> = Result<T, SinkError>;

/// How a sink takes the initial snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMethod {
    /// The engine copies each chunk into the sink's own database, in the transaction
    /// that marks the chunk done (Postgres): exactly once.
    CopyInTarget,
    /// The engine decodes the rows and hands them to [`Sink::snapshot_rows`]; a chunk is
    /// marked done in the state database once the sink took all of it (at least once).
    Rows,
    /// The sink loads itself from the source ([`Sink::load`]), e.g. documents built by
    /// joins for a search index.
    Load,
}

/// What a sink's settings are checked against: the rest of the pipeline.
pub struct PipelineShape<'a> {
    pub transforms: &'a [Step],
    /// The pipeline has enrichers.
    pub enriched: bool,
}

impl PipelineShape<'_> {
    /// Refuses the steps that only mean something to change envelopes or records
    /// (`unwrap`, `insert_header`), for a sink that writes rows.
    pub fn rows_only(&self, sink: &str) -> Result<(), String> {
        match self.transforms.iter().position(|s| matches!(s, Step::Unwrap(_) | Step::InsertHeader(_))) {
            Some(i) => Err(format!(
                "transforms[{i}] ({}): the {sink} sink writes rows, without change envelopes or record headers; remove the step",
                self.transforms[i].kind()
            )),
            None => Ok(()),
        }
    }
}

/// What a sink is told when it connects.
#[derive(Clone)]
pub struct SinkContext {
    /// The pipeline's runner name: names its rows in state tables, its topics' prefix.
    pub pipeline: String,
    /// The source database (a sink that builds from it, like search, reads it).
    pub source: PgConnConfig,
    /// The source tables the pipeline captures, as checked.
    pub source_tables: Vec<Arc<TableSchema>>,
    /// The pipeline's transforms (a sink may carry some itself: Kafka's headers).
    pub transforms: Vec<Step>,
    /// Where the sink may connect: its Postgres connections take it
    /// ([`PgConnConfig::guarded`]), its HTTP clients too
    /// ([`crate::egress::guard_http`]). None: anywhere.
    pub egress: Option<std::sync::Arc<crate::egress::Egress>>,
}

/// Where a sink's own initial load reports its progress.
pub trait LoadProgress: Send + Sync {
    /// About how many rows the load will read.
    fn estimated(&self, rows: u64);
    /// `rows` more were loaded.
    fn loaded(&self, rows: u64);
}

/// A future a `dyn` sink returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A sink's settings: one key of a pipeline's `sink:` block, parsed strictly.
pub trait SinkConfigure: Send + Sync {
    /// The key naming this kind in configs (`postgres`, `kafka`, ...).
    fn kind(&self) -> &'static str;

    /// Checks the settings (no I/O): one line naming the setting and the fix.
    fn validate(&self, shape: &PipelineShape<'_>) -> Result<(), String>;

    /// The Postgres database that keeps the pipeline's state (checkpoint, snapshot
    /// progress, resyncs): the sink itself for Postgres, its `state:` block otherwise.
    fn state(&self) -> PgConnConfig;

    /// Whether [`state`](Self::state) is the sink's own database (then the checkpoint
    /// commits with the rows, and messages call it "sink", not "state database").
    fn state_is_sink(&self) -> bool {
        false
    }

    /// Source tables the sink itself needs captured, besides `source.tables` (the
    /// search sink's document tables). A sink that names some may be used without a
    /// table list.
    fn required_tables(&self) -> Vec<TableName> {
        Vec::new()
    }

    /// Connects; the sink may create its own state (never data) on the way.
    fn connect<'a>(&'a self, ctx: &'a SinkContext) -> BoxFuture<'a, SinkResult<Box<dyn DynSink>>>;

    /// Checks that the sink is reachable and usable with these tables; writes
    /// nothing (`sluice check`). Default: connect, then let go.
    fn check<'a>(&'a self, ctx: &'a SinkContext) -> BoxFuture<'a, SinkResult<()>> {
        Box::pin(async move { self.connect(ctx).await.map(drop) })
    }
}

/// One chunk (a key range of a table) of the initial snapshot, as the snapshot state
/// (`sluice.snapshot_chunks`) names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotChunk {
    pub pipeline: String,
    pub table: String,
    pub chunk: i32,
}

impl SnapshotChunk {
    /// Marks the chunk done in the state database; bound as ($1 pipeline, $2 table,
    /// $3 chunk, $4 rows, $5 snapshot LSN as text).
    pub const DONE_SQL: &'static str = "UPDATE sluice.snapshot_chunks SET done = true, rows = $4, snapshot_lsn = $5::text::pg_lsn
         WHERE pipeline = $1 AND table_name = $2 AND chunk = $3";
}

/// A destination's lifecycle. Methods are called by one task at a time.
pub trait Sink: Send + Sync + 'static {
    /// How the initial snapshot reaches this sink.
    fn snapshot_method(&self) -> SnapshotMethod;

    /// Creates what the sink needs for these output shapes (tables, topics and their
    /// schemas, the index and its mapping). Idempotent.
    fn prepare(&mut self, tables: &[Arc<TableSchema>]) -> impl Future<Output = SinkResult<()>> + Send;

    /// Whether the sink already holds changes of this pipeline (then a missing slot
    /// means changes were lost).
    fn has_progress(&self) -> impl Future<Output = SinkResult<bool>> + Send;

    /// Where streaming resumes when the sink keeps its checkpoint with its data;
    /// `Lsn::ZERO`: the slot's confirmed position is the checkpoint.
    fn resume_lsn(&self) -> Lsn {
        Lsn::ZERO
    }

    /// The sink's name for a source (or transformed) table.
    fn target_name(&self, table: &TableName) -> TableName {
        table.clone()
    }

    /// The sink drops stream changes its own snapshot chunks already hold (inside its
    /// write), so the engine need not. Only possible when rows keep the source's key
    /// (`keyed_as_source`: no transforms). Returns whether it does.
    fn filters_snapshot(&mut self, _keyed_as_source: bool) -> bool {
        false
    }

    /// Whether the sink's tables hold the source's rows under the source's keys in the
    /// state database, so a resync can also delete rows the source no longer has.
    fn mirrors_source_rows(&self) -> bool {
        false
    }

    /// Whether the sink keeps one row per key (a replica, an index, an upsert table)
    /// rather than a log of events: then an update that a `filter` transform drops
    /// must remove the row the sink may hold from before, as Postgres's own publication
    /// row filters turn such an update into a delete.
    fn keeps_rows_by_key(&self) -> bool {
        false
    }

    /// Reloads what the sink knows of the snapshot (after it ran).
    fn after_snapshot(&mut self) -> impl Future<Output = SinkResult<()>> + Send {
        async { Ok(()) }
    }

    /// Snapshot rows of `chunk` ([`SnapshotMethod::Rows`]), in batches; returns once
    /// durable, unless the sink commits the chunk's rows in
    /// [`Sink::snapshot_chunk_done`].
    fn snapshot_rows(
        &self,
        table: &Arc<TableSchema>,
        chunk: &SnapshotChunk,
        rows: Vec<Row>,
        snapshot_lsn: Lsn,
    ) -> impl Future<Output = SinkResult<()>> + Send {
        let _ = (chunk, rows, snapshot_lsn);
        let table = table.name.clone();
        async move { Err(SinkError::permanent(format!("this sink takes no snapshot rows (table {table})"))) }
    }

    /// Every row of `chunk` was handed over. A sink whose state database is its own
    /// (`state_is_sink`) may commit the chunk's rows together with the chunk's done mark
    /// ([`SnapshotChunk`]'s `done_sql`) and return true: a crash then re-delivers only
    /// chunks of which nothing is committed, so rows that are not idempotent (appends)
    /// land exactly once. False: the engine records the chunk (rows at least once).
    fn snapshot_chunk_done(
        &self,
        table: &Arc<TableSchema>,
        chunk: &SnapshotChunk,
        rows: u64,
        snapshot_lsn: Lsn,
    ) -> impl Future<Output = SinkResult<bool>> + Send {
        let _ = (table, chunk, rows, snapshot_lsn);
        async { Ok(false) }
    }

    /// The sink's own initial load ([`SnapshotMethod::Load`]), versioned `version`.
    fn load<'a>(&'a self, version: u64, progress: &'a dyn LoadProgress) -> impl Future<Output = SinkResult<()>> + Send + 'a {
        let _ = (version, progress);
        async { Err(SinkError::permanent("this sink has no initial load of its own")) }
    }

    /// Applies whole source transactions; returns only once they are durable in the
    /// sink (with the position they came from, for sinks that keep their checkpoint).
    fn apply(&mut self, batch: &[Transaction]) -> impl Future<Output = SinkResult<()>> + Send;

    /// Up to where the source may forget, once everything up to `applied` was handed
    /// to [`apply`](Self::apply). A sink that gathers batches into fewer, larger commits
    /// of its own (Iceberg) answers its last commit's position while later batches wait
    /// for theirs; every other sink holds what `apply` returned.
    fn durable_lsn(&self, applied: Lsn) -> Lsn {
        applied
    }

    /// Called on a timer while streaming (every 500 ms), so a sink that commits on its
    /// own cadence commits what is due even when no batch comes.
    fn tick(&mut self) -> impl Future<Output = SinkResult<()>> + Send {
        async { Ok(()) }
    }

    /// Removes what the pipeline created: `tables` are the sink's names of its tables
    /// (topics and their subjects, target tables, the index). Without `purge`, nothing
    /// is removed.
    fn teardown<'a>(&'a self, tables: &'a [TableName], purge: bool) -> impl Future<Output = SinkResult<()>> + Send + 'a;

    /// Whether the sink answers now.
    fn health(&self) -> impl Future<Output = SinkResult<()>> + Send {
        async { Ok(()) }
    }
}

/// [`Sink`] behind a pointer (the registry's and the runner's view): one boxed future
/// per call, which per batch costs nothing next to the batch.
pub trait DynSink: Send + Sync {
    fn snapshot_method(&self) -> SnapshotMethod;
    fn prepare<'a>(&'a mut self, tables: &'a [Arc<TableSchema>]) -> BoxFuture<'a, SinkResult<()>>;
    fn has_progress(&self) -> BoxFuture<'_, SinkResult<bool>>;
    fn resume_lsn(&self) -> Lsn;
    fn target_name(&self, table: &TableName) -> TableName;
    fn filters_snapshot(&mut self, keyed_as_source: bool) -> bool;
    fn mirrors_source_rows(&self) -> bool;
    fn keeps_rows_by_key(&self) -> bool;
    fn after_snapshot(&mut self) -> BoxFuture<'_, SinkResult<()>>;
    fn snapshot_rows<'a>(
        &'a self,
        table: &'a Arc<TableSchema>,
        chunk: &'a SnapshotChunk,
        rows: Vec<Row>,
        snapshot_lsn: Lsn,
    ) -> BoxFuture<'a, SinkResult<()>>;
    fn snapshot_chunk_done<'a>(
        &'a self,
        table: &'a Arc<TableSchema>,
        chunk: &'a SnapshotChunk,
        rows: u64,
        snapshot_lsn: Lsn,
    ) -> BoxFuture<'a, SinkResult<bool>>;
    fn load<'a>(&'a self, version: u64, progress: &'a dyn LoadProgress) -> BoxFuture<'a, SinkResult<()>>;
    fn apply<'a>(&'a mut self, batch: &'a [Transaction]) -> BoxFuture<'a, SinkResult<()>>;
    fn durable_lsn(&self, applied: Lsn) -> Lsn;
    fn tick(&mut self) -> BoxFuture<'_, SinkResult<()>>;
    fn teardown<'a>(&'a self, tables: &'a [TableName], purge: bool) -> BoxFuture<'a, SinkResult<()>>;
    fn health(&self) -> BoxFuture<'_, SinkResult<()>>;
}

impl<S: Sink> DynSink for S {
    fn snapshot_method(&self) -> SnapshotMethod {
        Sink::snapshot_method(self)
    }
    fn prepare<'a>(&'a mut self, tables: &'a [Arc<TableSchema>]) -> BoxFuture<'a, SinkResult<()>> {
        Box::pin(Sink::prepare(self, tables))
    }
    fn has_progress(&self) -> BoxFuture<'_, SinkResult<bool>> {
        Box::pin(Sink::has_progress(self))
    }
    fn resume_lsn(&self) -> Lsn {
        Sink::resume_lsn(self)
    }
    fn target_name(&self, table: &TableName) -> TableName {
        Sink::target_name(self, table)
    }
    fn filters_snapshot(&mut self, keyed_as_source: bool) -> bool {
        Sink::filters_snapshot(self, keyed_as_source)
    }
    fn mirrors_source_rows(&self) -> bool {
        Sink::mirrors_source_rows(self)
    }
    fn keeps_rows_by_key(&self) -> bool {
        Sink::keeps_rows_by_key(self)
    }
    fn after_snapshot(&mut self) -> BoxFuture<'_, SinkResult<()>> {
        Box::pin(Sink::after_snapshot(self))
    }
    fn snapshot_rows<'a>(
        &'a self,
        table: &'a Arc<TableSchema>,
        chunk: &'a SnapshotChunk,
        rows: Vec<Row>,
        snapshot_lsn: Lsn,
    ) -> BoxFuture<'a, SinkResult<()>> {
        Box::pin(Sink::snapshot_rows(self, table, chunk, rows, snapshot_lsn))
    }
    fn snapshot_chunk_done<'a>(
        &'a self,
        table: &'a Arc<TableSchema>,
        chunk: &'a SnapshotChunk,
        rows: u64,
        snapshot_lsn: Lsn,
    ) -> BoxFuture<'a, SinkResult<bool>> {
        Box::pin(Sink::snapshot_chunk_done(self, table, chunk, rows, snapshot_lsn))
    }
    fn load<'a>(&'a self, version: u64, progress: &'a dyn LoadProgress) -> BoxFuture<'a, SinkResult<()>> {
        Box::pin(Sink::load(self, version, progress))
    }
    fn apply<'a>(&'a mut self, batch: &'a [Transaction]) -> BoxFuture<'a, SinkResult<()>> {
        Box::pin(Sink::apply(self, batch))
    }
    fn durable_lsn(&self, applied: Lsn) -> Lsn {
        Sink::durable_lsn(self, applied)
    }
    fn tick(&mut self) -> BoxFuture<'_, SinkResult<()>> {
        Box::pin(Sink::tick(self))
    }
    fn teardown<'a>(&'a self, tables: &'a [TableName], purge: bool) -> BoxFuture<'a, SinkResult<()>> {
        Box::pin(Sink::teardown(self, tables, purge))
    }
    fn health(&self) -> BoxFuture<'_, SinkResult<()>> {
        Box::pin(Sink::health(self))
    }
}
