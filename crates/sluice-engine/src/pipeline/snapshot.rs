//! Phase 2, snapshot: the consistent initial copy, by the sink's snapshot method,
//! with progress (a bar on terminals, a log line every 5 s otherwise).

use super::*;

/// Snapshot rows handed to a sink that takes them decoded ([`SnapshotMethod::Rows`]).
#[derive(Clone)]
pub(super) struct SinkRows(Arc<dyn DynSink>);

fn pg(e: SinkError) -> PgError {
    PgError::wrap(e.kind(), e.to_string(), Box::new(e))
}

impl RowTarget for SinkRows {
    async fn deliver(&self, table: &Arc<TableSchema>, chunk: &SnapshotChunk, rows: Vec<Row>, snapshot_lsn: Lsn) -> Result<(), PgError> {
        self.0.snapshot_rows(table, chunk, rows, snapshot_lsn).await.map_err(pg)
    }
    async fn chunk_done(&self, table: &Arc<TableSchema>, chunk: &SnapshotChunk, rows: u64, snapshot_lsn: Lsn) -> Result<bool, PgError> {
        self.0.snapshot_chunk_done(table, chunk, rows, snapshot_lsn).await.map_err(pg)
    }
}

/// The snapshot's progress, as a sink's own load reports it.
pub(super) struct LoadCounter<'a>(&'a sluice_postgres::SnapshotProgress);

impl LoadProgress for LoadCounter<'_> {
    fn estimated(&self, rows: u64) {
        self.0.rows_estimated.store(rows, Ordering::Relaxed);
    }
    fn loaded(&self, rows: u64) {
        self.0.rows_copied.fetch_add(rows, Ordering::Relaxed);
    }
}

impl Pipeline {
    pub(super) async fn snapshot(&self, sink: &Output, checked: &Checked) -> Result<()> {
        let opts = SnapshotOptions {
            pipeline: self.cfg.pipeline.clone(),
            slot: self.cfg.slot_name(),
            publication: self.cfg.publication_name(),
            parallelism: self.cfg.snapshot.parallelism,
            chunk_rows: self.cfg.snapshot.chunk_rows,
        };
        let target = |n: &TableName| sink.sink.target_name(n);
        let mut snap = Vec::with_capacity(checked.tables.len());
        let filters = self.cfg.table_filters();
        for (t, x) in checked.tables.iter().zip(&checked.transforms) {
            snap.push(SnapshotTable {
                schema: t.clone(),
                target: target(x.as_ref().map_or(&t.name, |x| &x.output.name)),
                transform: x.clone(),
                enrich: match &checked.enrichment {
                    Some(e) => e.for_snapshot(t)?,
                    None => None,
                },
                row_filter: filters.get(&t.name).and_then(|f| f.row_filter.clone()),
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
    pub(super) async fn initial_load(&self, sink: &dyn DynSink, progress: &Arc<sluice_postgres::SnapshotProgress>) -> Result<(), PgError> {
        let src = sluice_postgres::connect(&self.source, "source").await?;
        let slot = self.cfg.slot_name();
        let version = sluice_postgres::replication::slot_confirmed_lsn(&src, &slot).await?;
        progress.chunks_total.store(1, Ordering::Relaxed);
        sink.load(version.0.max(1), &LoadCounter(progress)).await.map_err(|e| PgError::wrap(e.kind(), e.to_string(), Box::new(e)))?;
        progress.chunks_done.store(1, Ordering::Relaxed);
        Ok(())
    }
}
