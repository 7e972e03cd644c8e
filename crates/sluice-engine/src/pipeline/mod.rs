//! Runs one pipeline: checks, setup, consistent snapshot, then streaming with
//! reconnects, until asked to stop.

mod apply;
mod check;
mod snapshot;
mod stream;

use apply::*;
pub use check::{CheckPart, Checked};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use std::collections::{HashMap, VecDeque};

use crate::resync::Resync;
use sluice_core::ddl::SchemaChangeKind;
use sluice_core::sink::{DynSink, LoadProgress, SinkContext, SinkError, SnapshotChunk, SnapshotMethod};
use sluice_core::source::{Acker, ChangeSource, ChangeStream, RetentionHealth, SourceError, StreamItem, WalStatus};
use sluice_core::transform::{Chain, TableTransform};
use sluice_core::{ChangeEvent, ErrorKind, Lsn, Row, TableName, TableSchema, Transaction, quote_ident};
use sluice_postgres::{CopyIntoState, PgConnConfig, PgError, PostgresSource, RowTarget, SnapshotFilter, SnapshotOptions, SnapshotTable};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_postgres::Client;

use crate::config::{OnSlotLost, PipelineConfig};
use crate::enrich::Enrichment;
use crate::metrics::Metrics;

pub struct Pipeline {
    cfg: PipelineConfig,
    source: PgConnConfig,
    /// The source as the stream phase sees it (the seam a second source would fill).
    capture: Arc<PostgresSource>,
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
    /// The command that recovers this pipeline from a lost slot, for the halt message.
    pub recover_hint: String,
}

/// How long a slot held by another connection may take to be released before the
/// pipeline gives up (a crashed predecessor's walsender lingers until it notices).
pub(super) const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(15);

/// What is buffered between the source reader and the sink, in KiB of events as
/// resident (`ChangeEvent::resident_bytes`).
pub(super) const BUFFER_BUDGET_KB: usize = 8 * 1024;

/// Rows per resync chunk (at most): each chunk is held in memory until its high
/// watermark comes back through the stream.
pub(super) const RESYNC_CHUNK_ROWS: u64 = 4096;

/// A sink batch stops growing at this much (KiB of events as resident), or at
/// `batch.max_rows`.
pub(super) const BATCH_BUDGET_KB: u32 = 4 * 1024;

/// What an item holds against the buffer budget, as the source counts it against its
/// own bound: at least 1 KiB, at most all of it (a transaction bigger than the budget
/// still passes, alone).
pub(super) fn item_cost_kb(item: &StreamItem) -> u32 {
    let bytes = match item {
        StreamItem::Txn(t) => t.events.iter().map(ChangeEvent::resident_bytes).sum::<usize>(),
        StreamItem::Position(_) | StreamItem::Mark(..) => 0,
    };
    (bytes / 1024).clamp(1, BUFFER_BUDGET_KB) as u32
}

/// The retry class of an error, from the first component error in its chain.
pub fn error_kind(e: &anyhow::Error) -> ErrorKind {
    e.chain()
        .find_map(|c| {
            (c.downcast_ref::<PgError>().map(PgError::kind))
                .or_else(|| c.downcast_ref::<SinkError>().map(SinkError::kind))
                .or_else(|| c.downcast_ref::<SourceError>().map(SourceError::kind))
        })
        .unwrap_or(ErrorKind::Permanent)
}

impl Pipeline {
    pub fn new(cfg: PipelineConfig, metrics: Arc<Metrics>, shutdown: watch::Receiver<bool>) -> Self {
        let source = cfg.source_connection();
        let state = cfg.state_connection();
        let chain = Arc::new(Chain::new(cfg.transforms.clone()).expect("transforms are validated when the config is parsed"));
        let capture = Arc::new(
            PostgresSource::new(source.clone(), &cfg.pipeline, &cfg.slot_name(), &cfg.publication_name())
                .with_filters(cfg.table_filters())
                .with_max_transaction_memory(cfg.batch.max_transaction_memory),
        );
        Self {
            cfg,
            source,
            capture,
            state,
            chain,
            metrics,
            shutdown,
            progress_bar: false,
            require_logical_wal: true,
            stop_after_snapshot: false,
            slot_may_be_in_use: false,
            recover_hint: "sluice recover -c <the pipeline's config>".into(),
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
                        self.metrics.set_halted(Some(format!("{e:#}")));
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

    pub async fn run_once(&mut self) -> Result<()> {
        let mut checked = self.check().await?;
        let mut sink = self.connect_sink(&checked).await?;
        let had_progress = sink.has_progress();
        // A slot that is gone after the sink took changes lost the ones since then.
        if checked.slot_lost || (!checked.slot_exists && had_progress) {
            self.recover_slot(&sink, &checked).await?;
            checked.slot_exists = true;
        }
        self.capture.prepare(&checked.publication_missing, checked.slot_exists).await?;
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
        self.stream(&self.capture.clone(), sink, &checked).await
    }

    /// Replaces a lost slot when asked to (a recovery request, or `on_slot_lost:
    /// resync`), recording the resync of every table first; halts otherwise. See
    /// [`crate::recover`].
    async fn recover_slot(&self, sink: &Output, checked: &Checked) -> Result<()> {
        // No heartbeat runs while halted here: the status says lost meanwhile.
        self.metrics.set_wal_health(&RetentionHealth { status: WalStatus::Lost, ..Default::default() });
        let state = sluice_postgres::connect(&self.state, "state database").await?;
        let pipeline = &self.cfg.pipeline;
        let id = match crate::recover::pending(&state, pipeline).await? {
            Some(id) => id,
            None if self.cfg.source.on_slot_lost == OnSlotLost::Resync => {
                let id = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
                let tables: Vec<TableName> = checked.tables.iter().map(|t| t.name.clone()).collect();
                crate::recover::request(&state, pipeline, id, &tables).await?
            }
            None => {
                let limit = self.capture.wal_keep_limit().await.unwrap_or_else(|_| "?".into());
                let msg = crate::recover::lost_message(&self.cfg.slot_name(), sink.sink.resume_lsn(), &limit, &self.recover_hint);
                bail!(PgError::halted(msg));
            }
        };
        let from = self.capture.replace_lost_slot().await?;
        crate::recover::finish(&state, pipeline).await?;
        self.metrics.set_halted(None);
        tracing::warn!(slot = %self.cfg.slot_name(), %from, resync = id, tables = checked.tables.len(),
            "replaced the lost replication slot; reading every table again");
        Ok(())
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
            egress: self.cfg.egress.clone(),
        }
    }

    /// Removes what the pipeline created in its sink when `purge` (target tables,
    /// topics and their schema subjects, the index); the state rows are the caller's.
    pub async fn teardown_sink(&self, purge: bool) -> Result<()> {
        let checked = self.check().await?;
        let sink = self.open_sink(&checked).await?;
        let names: Vec<TableName> = checked
            .tables
            .iter()
            .zip(&checked.transforms)
            .map(|(t, x)| sink.target_name(x.as_ref().map_or(&t.name, |x| &x.output.name)))
            .collect();
        sink.teardown(&names, purge).await?;
        Ok(())
    }

    /// Brings the state schema up to date (sinks keep their progress there), then
    /// connects the sink.
    async fn open_sink(&self, checked: &Checked) -> Result<Box<dyn DynSink>> {
        let what = if self.cfg.sink.get().state_is_sink() { "sink" } else { "state database" };
        crate::state::migrate(&sluice_postgres::connect(&self.state, what).await?).await?;
        Ok(self.cfg.sink.get().connect(&self.sink_context(&checked.tables)).await?)
    }

    async fn connect_sink(&self, checked: &Checked) -> Result<Output> {
        let outputs = checked.outputs()?;
        let transformed = !self.chain.is_empty();
        let mut sink = self.open_sink(checked).await?;
        sink.prepare(&outputs).await?;
        let sink_progress = sink.has_progress().await?;
        // Snapshot chunks are cut by the source key: a sink can drop the changes they
        // already hold itself only while rows keep that key. A sink that loads itself
        // has no chunks to filter by.
        let filters_itself = sink.filters_snapshot(!transformed);
        let upstream = if !filters_itself && sink.snapshot_method() != SnapshotMethod::Load {
            let state = sluice_postgres::connect(&self.state, "state database").await?;
            Some((SnapshotFilter::load(&state, &self.cfg.pipeline).await?, state))
        } else {
            None
        };
        // The shapes compiled by the checks serve until a table changes shape.
        let tables =
            checked.enriched()?.into_iter().zip(&checked.transforms).filter_map(|(t, x)| Some((t.name.clone(), (t, x.clone()?)))).collect();
        let transformer = Transformer { chain: self.chain.clone(), tables, keyed: sink.keeps_rows_by_key() };
        Ok(Output { sink: Arc::from(sink), sink_progress, upstream, enrichment: checked.enrichment.clone(), transformer })
    }
}
