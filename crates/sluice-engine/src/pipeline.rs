//! Runs one pipeline: checks, setup, consistent snapshot, then streaming with
//! reconnects, until asked to stop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use std::collections::HashMap;

use crate::resync::Resync;
use sluice_core::sink::{DynSink, LoadProgress, SinkContext, SinkError, SnapshotMethod};
use sluice_core::transform::{Chain, TableTransform};
use sluice_core::{ErrorKind, Lsn, Row, TableName, TableSchema, Transaction, quote_ident};
use sluice_postgres::{
    Acker, CopyIntoState, HEARTBEAT_PREFIX, PgConnConfig, PgError, ReplicationStream, RowTarget, SnapshotFilter, SnapshotOptions,
    SnapshotTable, StreamItem,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_postgres::Client;

use crate::config::PipelineConfig;
use crate::enrich::Enrichment;
use crate::metrics::Metrics;

pub struct Pipeline {
    cfg: PipelineConfig,
    source: PgConnConfig,
    /// The Postgres database holding the pipeline's state: the sink itself when the
    /// sink is Postgres, the configured state database otherwise.
    state: PgConnConfig,
    chain: Arc<Chain>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    /// Draw a progress bar for the snapshot (interactive terminals).
    pub progress_bar: bool,
    /// Refuse a source without `wal_level=logical` (the control plane's provisioning
    /// checks it itself, and may be the one fixing it).
    pub require_logical_wal: bool,
    /// End the run once the snapshot is complete (a provisioning step).
    pub stop_after_snapshot: bool,
    /// Only checking a changed config of a pipeline that may be running: its own slot
    /// being in use is expected, not an error.
    pub slot_may_be_in_use: bool,
}

/// The part of a pipeline's config a failed check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckPart {
    /// The source database, its settings, the slot.
    Source,
    Tables,
    Enrich,
    Transforms,
    /// The sink, its state database, the broker.
    Sink,
}

/// What the checks found; nothing has been written when this is returned.
pub struct Checked {
    pub tables: Vec<Arc<TableSchema>>,
    /// Each table's transforms (its output shape), when the pipeline has any.
    pub transforms: Vec<Option<Arc<TableTransform>>>,
    pub slot_exists: bool,
    pub publication_missing: Vec<TableName>,
    pub publication_exists: bool,
    /// The enrichers, checked against the tables and their reference databases.
    pub(crate) enrichment: Option<Arc<Enrichment>>,
    /// Reference tables streamed only to keep lookups fresh (never delivered).
    pub reference: Vec<Arc<TableSchema>>,
}

impl Checked {
    /// Each table's shape after enrichment (before the transforms).
    fn enriched(&self) -> Result<Vec<Arc<TableSchema>>> {
        self.tables
            .iter()
            .map(|t| {
                Ok(match &self.enrichment {
                    Some(e) => e.plan(t)?.output().clone(),
                    None => t.clone(),
                })
            })
            .collect()
    }

    /// Each table's shape in the sink.
    fn outputs(&self) -> Result<Vec<Arc<TableSchema>>> {
        Ok(self.enriched()?.into_iter().zip(&self.transforms).map(|(t, x)| x.as_ref().map_or(t, |x| x.output.clone())).collect())
    }
}

/// How long a slot held by another connection may take to be released before the
/// pipeline gives up (a crashed predecessor's walsender lingers until it notices).
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(15);

/// Row data buffered between the source reader and the sink, in KiB.
const BUFFER_BUDGET_KB: usize = 8 * 1024;

/// Rows per resync chunk (at most): each chunk is held in memory until its high
/// watermark comes back through the stream.
const RESYNC_CHUNK_ROWS: u64 = 4096;

/// A sink batch stops growing at this much row data (KiB), or at `batch.max_rows`.
const BATCH_BUDGET_KB: u32 = 4 * 1024;

/// What an item holds against the buffer budget: at least 1 KiB, at most all of it
/// (a transaction bigger than the budget still passes, alone).
fn item_cost_kb(item: &StreamItem) -> u32 {
    let bytes = match item {
        StreamItem::Txn(t) => t.events.iter().map(|e| e.payload_bytes() + 64).sum::<usize>(),
        StreamItem::Position(_) | StreamItem::Mark(..) => 0,
    };
    (bytes / 1024).clamp(1, BUFFER_BUDGET_KB) as u32
}

/// The retry class of an error, from the first component error in its chain.
pub fn error_kind(e: &anyhow::Error) -> ErrorKind {
    e.chain()
        .find_map(|c| c.downcast_ref::<PgError>().map(PgError::kind).or_else(|| c.downcast_ref::<SinkError>().map(SinkError::kind)))
        .unwrap_or(ErrorKind::Permanent)
}

/// A running sink, and what the pipeline does to changes before it.
struct Output {
    /// Shared with the snapshot's row deliveries while a snapshot runs; owned alone
    /// (for `apply`) afterwards.
    sink: Arc<dyn DynSink>,
    /// Whether the sink holds changes from an earlier run.
    sink_progress: bool,
    /// Drops the changes the snapshot already holds, on source rows (before the
    /// transforms). The Postgres sink does this itself when there are no transforms.
    upstream: Option<(SnapshotFilter, Client)>,
    enrichment: Option<Arc<Enrichment>>,
    transformer: Transformer,
}

impl Output {
    /// Whether the sink holds changes from an earlier run (then a missing slot means
    /// changes were lost).
    fn has_progress(&self) -> bool {
        self.sink_progress || self.upstream.as_ref().is_some_and(|(f, _)| !f.is_empty())
    }

    /// The sink alone, for the calls that change it (no snapshot shares it then).
    fn sink_mut(&mut self) -> Result<&mut dyn DynSink> {
        match Arc::get_mut(&mut self.sink) {
            Some(s) => Ok(s),
            None => bail!(PgError::transient("the sink is still shared with a stopped snapshot")),
        }
    }

    async fn reload_snapshot_state(&mut self, pipeline: &str) -> Result<()> {
        self.sink_mut()?.after_snapshot().await?;
        if let Some((filter, state)) = &mut self.upstream {
            *filter = SnapshotFilter::load(state, pipeline).await?;
        }
        Ok(())
    }

    async fn apply(&mut self, batch: &mut [Transaction]) -> Result<()> {
        if let Some((filter, _)) = &self.upstream
            && !filter.is_empty()
        {
            for t in batch.iter_mut() {
                t.events.retain(|e| !filter.covers_event(e));
            }
        }
        if let Some(e) = &self.enrichment {
            e.apply(batch).await?;
        }
        self.transformer.apply(batch)?;
        self.sink_mut()?.apply(batch).await?;
        Ok(())
    }
}

/// The pipeline's transform chain, compiled per source table shape as shapes arrive.
struct Transformer {
    chain: Arc<Chain>,
    tables: HashMap<TableName, (Arc<TableSchema>, Arc<TableTransform>)>,
}

impl Transformer {
    fn get(&mut self, source: &Arc<TableSchema>) -> Result<Arc<TableTransform>> {
        if let Some((s, t)) = self.tables.get(&source.name)
            && (Arc::ptr_eq(s, source) || s.columns == source.columns)
        {
            return Ok(t.clone());
        }
        let t = Arc::new(self.chain.compile(source)?);
        self.tables.insert(source.name.clone(), (source.clone(), t.clone()));
        Ok(t)
    }

    fn apply(&mut self, batch: &mut [Transaction]) -> Result<()> {
        if self.chain.is_empty() {
            return Ok(());
        }
        for t in batch.iter_mut() {
            let mut out = Vec::with_capacity(t.events.len());
            for e in t.events.drain(..) {
                if let Some(e) = self.get(&e.table)?.apply_owned(e)? {
                    out.push(e);
                }
            }
            t.events = out;
        }
        Ok(())
    }
}

/// Snapshot rows handed to a sink that takes them decoded ([`SnapshotMethod::Rows`]).
#[derive(Clone)]
struct SinkRows(Arc<dyn DynSink>);

impl RowTarget for SinkRows {
    async fn deliver(&self, table: &Arc<TableSchema>, rows: Vec<Row>, snapshot_lsn: Lsn) -> Result<(), PgError> {
        self.0.snapshot_rows(table, rows, snapshot_lsn).await.map_err(|e| PgError::wrap(e.kind(), e.to_string(), Box::new(e)))
    }
}

/// The snapshot's progress, as a sink's own load reports it.
struct LoadCounter<'a>(&'a sluice_postgres::SnapshotProgress);

impl LoadProgress for LoadCounter<'_> {
    fn estimated(&self, rows: u64) {
        self.0.rows_estimated.store(rows, Ordering::Relaxed);
    }
    fn loaded(&self, rows: u64) {
        self.0.rows_copied.fetch_add(rows, Ordering::Relaxed);
    }
}

impl Pipeline {
    pub fn new(cfg: PipelineConfig, metrics: Arc<Metrics>, shutdown: watch::Receiver<bool>) -> Self {
        let source = cfg.source.connection();
        let state = cfg.state_connection();
        let chain = Arc::new(Chain::new(cfg.transforms.clone()).expect("transforms are validated when the config is parsed"));
        Self {
            cfg,
            source,
            state,
            chain,
            metrics,
            shutdown,
            progress_bar: false,
            require_logical_wal: true,
            stop_after_snapshot: false,
            slot_may_be_in_use: false,
        }
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Runs until shutdown. Transient failures (a server restart, a dropped
    /// connection) are retried with backoff; anything else ends the run.
    pub async fn run(&mut self) -> Result<()> {
        let mut backoff = Duration::from_millis(250);
        loop {
            let started = Instant::now();
            match self.run_once().await {
                Ok(()) => return Ok(()),
                Err(e) if error_kind(&e) != ErrorKind::Permanent && !self.stopping() => {
                    self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    let halted = error_kind(&e) == ErrorKind::Halted;
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(250);
                    }
                    if halted {
                        // Nothing past the last delivered batch was confirmed: the
                        // pipeline retries from there until a person resolves it.
                        self.metrics.halted.store(1, Ordering::Relaxed);
                        backoff = backoff.max(Duration::from_secs(2));
                        tracing::error!(error = %e, retry_in = ?backoff, "pipeline halted");
                    } else {
                        self.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, retry_in = ?backoff, "transient failure; reconnecting");
                    }
                    let mut sd = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = sd.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// Every check that can fail on bad input, before anything is written anywhere.
    pub async fn check(&self) -> Result<Checked> {
        self.check_parts().await.map_err(|(_, e)| e)
    }

    /// [`check`](Self::check), also saying which part of the config a failure is
    /// about (the API names it as the refused field).
    pub async fn check_parts(&self) -> Result<Checked, (CheckPart, anyhow::Error)> {
        use CheckPart::*;
        fn at<E: Into<anyhow::Error>>(part: CheckPart) -> impl FnOnce(E) -> (CheckPart, anyhow::Error) {
            move |e| (part, e.into())
        }
        let src = sluice_postgres::connect(&self.source, "source").await.map_err(at(Source))?;
        let level = sluice_postgres::wal_level(&src).await.map_err(at(Source))?;
        if level != "logical" && self.require_logical_wal {
            return Err(at(Source)(PgError::permanent(format!(
                "source {} has wal_level={level}, but logical replication needs wal_level=logical: run \
                 ALTER SYSTEM SET wal_level = logical; then restart Postgres",
                self.source.describe()
            ))));
        }
        let publication = self.cfg.publication_name();
        let published = sluice_postgres::publication_tables(&src, &publication).await.map_err(at(Source))?;
        let names = if self.cfg.tables().is_empty() {
            match &published {
                Some(t) if !t.is_empty() => t.clone(),
                Some(_) => {
                    return Err(at(Tables)(PgError::permanent(format!(
                        "publication {publication} publishes no tables: add tables to it, or list them in source.tables"
                    ))));
                }
                None => {
                    return Err(at(Tables)(PgError::permanent(format!(
                        "publication {publication} does not exist in source {}: create it, or list the tables in source.tables",
                        self.source.describe()
                    ))));
                }
            }
        } else {
            self.cfg.tables()
        };
        let mut tables = Vec::new();
        for name in &names {
            tables.push(Arc::new(sluice_postgres::load_table(&src, name, &self.source.describe()).await.map_err(at(Tables))?));
        }
        let enrichment = Enrichment::new(&self.cfg.pipeline, &self.cfg.enrich, &self.source, &self.state, &names, self.metrics.clone())
            .await
            .map_err(at(Enrich))?;
        let mut reference = Vec::new();
        for name in enrichment.as_ref().map_or(&[][..], |e| e.reference_tables()) {
            if !names.contains(name) {
                reference.push(Arc::new(sluice_postgres::load_table(&src, name, &self.source.describe()).await.map_err(at(Enrich))?));
            }
        }
        let publication_missing = names
            .iter()
            .chain(reference.iter().map(|t| &t.name))
            .filter(|n| published.as_ref().is_none_or(|p| !p.contains(n)))
            .cloned()
            .collect();
        if published.is_some() {
            let relids: Vec<i64> = tables.iter().map(|t| i64::from(t.relid)).collect();
            let row = src
                .query_one(
                    "SELECT p.pubviaroot, EXISTS (SELECT 1 FROM pg_class c WHERE c.oid::int8 = ANY($2) AND c.relkind = 'p')
                     FROM pg_publication p WHERE p.pubname = $1",
                    &[&publication, &relids],
                )
                .await
                .map_err(|e| at(Source)(PgError::from_pg("reading pg_publication", e)))?;
            let (via_root, partitioned): (bool, bool) = (row.get(0), row.get(1));
            if partitioned && !via_root {
                return Err(at(Tables)(PgError::permanent(format!(
                    "publication {publication} publishes partitioned tables under their partitions' names: run                      ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    quote_ident(&publication)
                ))));
            }
        }
        let slot = self.cfg.slot_name();
        // After a crash or a dropped connection, the server keeps the old walsender (and
        // the slot) until it notices its client is gone: give it a moment before calling
        // the slot taken.
        let deadline = Instant::now() + SLOT_RELEASE_WAIT;
        let mut waited = false;
        let slot_info = loop {
            let info = sluice_postgres::slot_info(&src, &slot).await.map_err(at(Source))?;
            match info.as_ref().and_then(|i| i.active_pid) {
                Some(_) if self.slot_may_be_in_use => break info,
                Some(pid) if Instant::now() < deadline && !self.stopping() => {
                    if !waited {
                        tracing::info!(slot = %slot, pid, wait = ?SLOT_RELEASE_WAIT, "replication slot is held by another connection; waiting for it to be released");
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ => break info,
            }
        };
        if let Some(info) = &slot_info {
            let mut info = info.clone();
            if self.slot_may_be_in_use {
                info.active_pid = None;
            }
            sluice_postgres::verify_slot(&slot, &info, &self.source.database).map_err(at(Source))?;
        }
        // The sink (and state database) must be reachable before anything is created.
        let what = if self.cfg.sink.get().state_is_sink() { "sink" } else { "state database" };
        drop(sluice_postgres::connect(&self.state, what).await.map_err(at(Sink))?);
        self.cfg.sink.get().check(&self.sink_context(&tables)).await.map_err(at(Sink))?;
        let mut transforms = Vec::with_capacity(tables.len());
        for t in &tables {
            let shaped = match &enrichment {
                Some(e) => e.plan(t).map_err(at(Enrich))?.output().clone(),
                None => t.clone(),
            };
            let compiled = if self.chain.is_empty() { None } else { Some(Arc::new(self.chain.compile(&shaped).map_err(at(Transforms))?)) };
            transforms.push(compiled);
        }
        Ok(Checked {
            tables,
            transforms,
            slot_exists: slot_info.is_some(),
            publication_missing,
            publication_exists: published.is_some(),
            enrichment,
            reference,
        })
    }

    pub async fn run_once(&mut self) -> Result<()> {
        let checked = self.check().await?;
        let mut sink = self.connect_sink(&checked).await?;
        let had_progress = sink.has_progress();
        let src = sluice_postgres::connect(&self.source, "source").await?;
        self.setup_publication(&src, &checked).await?;
        let slot = self.cfg.slot_name();
        if !checked.slot_exists {
            if sink.has_progress() {
                bail!(PgError::permanent(format!(
                    "replication slot {slot} is gone but the sink already holds this pipeline's changes: changes since \
                     then were lost. To start over, run DELETE FROM sluice.pipelines WHERE pipeline = '{}'; \
                     DELETE FROM sluice.snapshot_chunks WHERE pipeline = '{}'; in the {} and empty the sink",
                    self.cfg.pipeline,
                    self.cfg.pipeline,
                    if self.cfg.sink.get().state_is_sink() { "sink" } else { "state database" },
                )));
            }
            src.query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
                .await
                .map_err(|e| PgError::from_pg(&format!("creating replication slot {slot}"), e))?;
            tracing::info!(slot = %slot, "created replication slot");
        }
        if self.cfg.snapshot.enabled {
            self.snapshot(&sink, &checked).await?;
            sink.reload_snapshot_state(&self.cfg.pipeline).await?;
        }
        if self.stopping() || self.stop_after_snapshot {
            return Ok(());
        }
        if let Some(e) = &checked.enrichment {
            e.check_versions(had_progress).await?;
        }
        self.stream(sink, &checked).await
    }

    /// Checks everything, then creates the sink's objects (tables, topics and their
    /// schemas, the index and its mapping) without moving any data.
    pub async fn prepare(&self) -> Result<()> {
        let checked = self.check().await?;
        drop(self.connect_sink(&checked).await?);
        Ok(())
    }

    /// What the sink is told when it connects.
    fn sink_context(&self, tables: &[Arc<TableSchema>]) -> SinkContext {
        SinkContext {
            pipeline: self.cfg.pipeline.clone(),
            source: self.source.clone(),
            source_tables: tables.to_vec(),
            transforms: self.cfg.transforms.clone(),
        }
    }

    /// Removes what the pipeline created in its sink when `purge` (target tables,
    /// topics and their schema subjects, the index); the state rows are the caller's.
    pub async fn teardown_sink(&self, purge: bool) -> Result<()> {
        let checked = self.check().await?;
        let sink = self.cfg.sink.get().connect(&self.sink_context(&checked.tables)).await?;
        let names: Vec<TableName> = checked
            .tables
            .iter()
            .zip(&checked.transforms)
            .map(|(t, x)| sink.target_name(x.as_ref().map_or(&t.name, |x| &x.output.name)))
            .collect();
        sink.teardown(&names, purge).await?;
        Ok(())
    }

    async fn connect_sink(&self, checked: &Checked) -> Result<Output> {
        let outputs = checked.outputs()?;
        let transformed = !self.chain.is_empty();
        let mut sink = self.cfg.sink.get().connect(&self.sink_context(&checked.tables)).await?;
        sink.prepare(&outputs).await?;
        let sink_progress = sink.has_progress().await?;
        // Snapshot chunks are cut by the source key: a sink can drop the changes they
        // already hold itself only while rows keep that key. A sink that loads itself
        // has no chunks to filter by.
        let filters_itself = sink.filters_snapshot(!transformed);
        let upstream = if !filters_itself && sink.snapshot_method() != SnapshotMethod::Load {
            let state = sluice_postgres::connect(&self.state, "state database").await?;
            state
                .batch_execute(sluice_postgres::STATE_DDL)
                .await
                .map_err(|e| PgError::from_pg("creating sluice state tables in the state database", e))?;
            Some((SnapshotFilter::load(&state, &self.cfg.pipeline).await?, state))
        } else {
            None
        };
        // The shapes compiled by the checks serve until a table changes shape.
        let tables =
            checked.enriched()?.into_iter().zip(&checked.transforms).filter_map(|(t, x)| Some((t.name.clone(), (t, x.clone()?)))).collect();
        let transformer = Transformer { chain: self.chain.clone(), tables };
        Ok(Output { sink: Arc::from(sink), sink_progress, upstream, enrichment: checked.enrichment.clone(), transformer })
    }

    async fn setup_publication(&self, src: &Client, checked: &Checked) -> Result<()> {
        if checked.publication_missing.is_empty() {
            return Ok(());
        }
        let publication = self.cfg.publication_name();
        let list: Vec<String> = checked.publication_missing.iter().map(TableName::quoted).collect();
        let sql = if checked.publication_exists {
            format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(&publication), list.join(", "))
        } else {
            // Changes to a partitioned table are then published under its own name, not
            // under the partitions' names, which the pipeline does not know.
            format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
                quote_ident(&publication),
                list.join(", ")
            )
        };
        src.batch_execute(&sql).await.map_err(|e| PgError::from_pg(&format!("setting up publication {publication}"), e))?;
        tracing::info!(publication = %publication, tables = list.len(), "publication ready");
        Ok(())
    }

    async fn snapshot(&self, sink: &Output, checked: &Checked) -> Result<()> {
        let opts = SnapshotOptions {
            pipeline: self.cfg.pipeline.clone(),
            slot: self.cfg.slot_name(),
            publication: self.cfg.publication_name(),
            parallelism: self.cfg.snapshot.parallelism,
            chunk_rows: self.cfg.snapshot.chunk_rows,
        };
        let target = |n: &TableName| sink.sink.target_name(n);
        let mut snap = Vec::with_capacity(checked.tables.len());
        for (t, x) in checked.tables.iter().zip(&checked.transforms) {
            snap.push(SnapshotTable {
                schema: t.clone(),
                target: target(x.as_ref().map_or(&t.name, |x| &x.output.name)),
                transform: x.clone(),
                enrich: match &checked.enrichment {
                    Some(e) => e.for_snapshot(t)?,
                    None => None,
                },
            });
        }
        let progress = self.metrics.snapshot.clone();
        let started = Instant::now();
        let bar = self.progress_bar.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("snapshot [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta}) {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        let ticker = {
            let (p, bar) = (progress.clone(), bar.clone());
            tokio::spawn(async move {
                let mut last_log = Instant::now();
                loop {
                    let (rows, est) = (p.rows_copied.load(Ordering::Relaxed), p.rows_estimated.load(Ordering::Relaxed));
                    let (done, total) = (p.chunks_done.load(Ordering::Relaxed), p.chunks_total.load(Ordering::Relaxed));
                    match &bar {
                        Some(bar) => {
                            bar.set_length(est.max(rows));
                            bar.set_position(rows);
                            bar.set_message(format!("chunks {done}/{total}"));
                        }
                        // Without a terminal, a progress line every 5 s instead of a bar.
                        None if last_log.elapsed() >= Duration::from_secs(5) && total > 0 => {
                            last_log = Instant::now();
                            tracing::info!(rows, rows_estimated = est, chunks_done = done, chunks_total = total, "snapshot progress");
                        }
                        None => {}
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        // Stopping mid-snapshot is safe: a chunk's rows and its done mark commit together.
        let mut shutdown = self.shutdown.clone();
        let r = tokio::select! {
            r = async {
                match sink.sink.snapshot_method() {
                    SnapshotMethod::CopyInTarget => sluice_postgres::run_snapshot(&self.source, &self.state, None::<CopyIntoState>, &opts, &snap, progress.clone()).await,
                    SnapshotMethod::Rows => sluice_postgres::run_snapshot(&self.source, &self.state, Some(SinkRows(sink.sink.clone())), &opts, &snap, progress.clone()).await,
                    SnapshotMethod::Load => self.initial_load(&*sink.sink, &progress).await,
                }
            } => r,
            _ = shutdown.changed() => Ok(()),
        };
        ticker.abort();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        r?;
        if self.stopping() {
            return Ok(());
        }
        let rows = progress.rows_copied.load(Ordering::Relaxed);
        if rows > 0 {
            let mb = progress.bytes_copied.load(Ordering::Relaxed) as f64 / 1e6;
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(rows, mb = format!("{mb:.1}"), seconds = format!("{secs:.1}"), "snapshot complete");
        }
        Ok(())
    }

    /// A sink's own initial load (search: every document built from the source),
    /// versioned with the slot's position (every streamed change has a higher one).
    async fn initial_load(&self, sink: &dyn DynSink, progress: &Arc<sluice_postgres::SnapshotProgress>) -> Result<(), PgError> {
        let src = sluice_postgres::connect(&self.source, "source").await?;
        let slot = self.cfg.slot_name();
        let row = src
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .map_err(|e| PgError::from_pg("reading the slot position", e))?;
        let version: Lsn = row.get::<_, String>(0).parse().map_err(|_| PgError::permanent("slot position is not an LSN"))?;
        progress.chunks_total.store(1, Ordering::Relaxed);
        sink.load(version.0.max(1), &LoadCounter(progress)).await.map_err(|e| PgError::wrap(e.kind(), e.to_string(), Box::new(e)))?;
        progress.chunks_done.store(1, Ordering::Relaxed);
        Ok(())
    }

    async fn stream(&mut self, mut sink: Output, checked: &Checked) -> Result<()> {
        let tables = &checked.tables[..];
        let catalog = sluice_postgres::connect(&self.source, "source").await?;
        let start = sink.sink.resume_lsn();
        let streamed: Vec<Arc<TableSchema>> = tables.iter().chain(&checked.reference).cloned().collect();
        let stream =
            ReplicationStream::start(&self.source, &self.cfg.slot_name(), &self.cfg.publication_name(), start, &streamed, catalog).await?;
        tracing::info!(slot = %self.cfg.slot_name(), from = %start, "streaming");
        let acker = stream.acker();
        let (tx, mut rx) = mpsc::channel::<StreamItem>(1024);
        // Bounds memory by bytes, not items: a reader far ahead of the sink waits.
        let budget = Arc::new(Semaphore::new(BUFFER_BUDGET_KB));
        let reader_budget = budget.clone();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let reader = tokio::spawn(async move {
            let mut stream = stream;
            let r = loop {
                tokio::select! {
                    _ = stop_rx.changed() => break Ok(()),
                    item = stream.next() => match item {
                        Ok(Some(item)) => {
                            let cost = item_cost_kb(&item);
                            match reader_budget.acquire_many(cost).await {
                                Ok(permit) => permit.forget(),
                                Err(_) => break Ok(()),
                            }
                            if tx.send(item).await.is_err() { break Ok(()) }
                        }
                        Ok(None) => break Err(PgError::transient("the source ended the replication stream")),
                        Err(e) => break Err(e),
                    },
                }
            };
            stream.shutdown().await;
            r
        });
        let heartbeat = tokio::spawn(heartbeat(self.source.clone(), self.cfg.clone(), self.metrics.clone()));
        // Rows the source no longer has can be found in a Postgres sink whose rows are
        // the source's own (no transforms).
        let targets = if sink.sink.mirrors_source_rows() && self.chain.is_empty() {
            tables.iter().map(|t| (t.name.clone(), sink.sink.target_name(&t.name))).collect()
        } else {
            HashMap::new()
        };
        let chunk_rows = self.cfg.snapshot.chunk_rows.min(RESYNC_CHUNK_ROWS);
        let result = match Resync::new(
            &self.cfg.pipeline,
            self.source.clone(),
            &self.state,
            tables,
            targets,
            chunk_rows,
            self.metrics.clone(),
        )
        .await
        {
            Ok(mut resync) => self.apply_loop(&mut sink, &mut rx, &acker, &budget, &mut resync).await,
            Err(e) => Err(e),
        };
        budget.close();
        heartbeat.abort();
        let _ = stop_tx.send(true);
        drop(rx);
        let reader_result = reader.await.context("replication reader task")?;
        result?;
        if !self.stopping() {
            reader_result?;
            bail!(PgError::transient("the replication reader stopped"));
        }
        Ok(())
    }

    async fn apply_loop(
        &mut self,
        sink: &mut Output,
        rx: &mut mpsc::Receiver<StreamItem>,
        acker: &Acker,
        budget: &Semaphore,
        resync: &mut Resync,
    ) -> Result<()> {
        let max_rows = self.cfg.batch.max_rows;
        let mut batch: Vec<Transaction> = Vec::new();
        let mut shutdown = self.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                item = rx.recv() => item,
                _ = tick.tick() => {
                    if let Some(e) = &sink.enrichment {
                        e.replay().await?;
                        if e.take_requested() {
                            resync.wake();
                        }
                    }
                    resync.tick().await?;
                    continue;
                }
            };
            let Some(first) = first else { return Ok(()) };
            let (mut rows, mut cost, mut position) = (0usize, 0u32, Lsn::ZERO);
            let mut next = Some(first);
            while let Some(item) = next.take() {
                cost += item_cost_kb(&item);
                match item {
                    StreamItem::Txn(t) => {
                        resync.observe(&t);
                        rows += t.events.len();
                        batch.push(t);
                    }
                    StreamItem::Position(l) => position = position.max(l),
                    StreamItem::Mark(lsn, text) => {
                        if let Some(t) = resync.on_mark(lsn, &text).await? {
                            rows += t.events.len();
                            batch.push(t);
                        }
                    }
                }
                if rows < max_rows && cost < BATCH_BUDGET_KB {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                sink.apply(&mut batch).await?;
                self.metrics.halted.store(0, Ordering::Relaxed);
                self.record(&batch);
                position = position.max(batch.last().map_or(Lsn::ZERO, |t| t.end_lsn));
                batch.clear();
            }
            if let Some(e) = &sink.enrichment {
                e.replay().await?;
                if e.take_requested() {
                    resync.wake();
                }
            }
            resync.after_apply().await?;
            // Everything taken is applied (or was only a position): its budget is free.
            budget.add_permits(cost as usize);
            if position > Lsn::ZERO {
                acker.ack(position);
                self.metrics.confirmed_lsn.store(position.0, Ordering::Relaxed);
            }
        }
    }

    fn record(&self, batch: &[Transaction]) {
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let m = &self.metrics;
        let (mut events, mut bytes) = (0u64, 0u64);
        for t in batch {
            events += t.events.len() as u64;
            bytes += t.events.iter().map(|e| e.payload_bytes() as u64).sum::<u64>();
            // A resync's chunk (xid 0) is no source commit: it has no lag.
            if !t.events.is_empty() && t.xid != 0 {
                m.observe_lag_ms((now_us - t.commit_time_us) / 1000);
            }
        }
        m.events.fetch_add(events, Ordering::Relaxed);
        m.bytes.fetch_add(bytes, Ordering::Relaxed);
        m.transactions.fetch_add(batch.len() as u64, Ordering::Relaxed);
        m.batches.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes a heartbeat into the source's WAL on a timer, so the slot's confirmed
/// position advances even when every replicated table is idle, and samples how much
/// WAL the slot retains.
async fn heartbeat(source: PgConnConfig, cfg: PipelineConfig, metrics: Arc<Metrics>) {
    let slot = cfg.slot_name();
    let mut client: Option<Client> = None;
    loop {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = sluice_postgres::connect(&source, "source").await.ok();
        }
        if let Some(c) = &client {
            let beat = c.execute("SELECT pg_logical_emit_message(false, $1, $2)", &[&HEARTBEAT_PREFIX, &cfg.pipeline]).await;
            if let Err(e) = beat {
                tracing::warn!(error = %e, "heartbeat failed");
            }
            let retained = c
                .query_opt("SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                .await;
            if let Ok(Some(row)) = retained {
                metrics.wal_retained_bytes.store(row.get::<_, Option<i64>>(0).unwrap_or(-1), Ordering::Relaxed);
            }
        }
        tokio::time::sleep(cfg.source.heartbeat_interval).await;
    }
}
