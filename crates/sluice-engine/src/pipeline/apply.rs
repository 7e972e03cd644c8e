//! Phase 4, apply: batches of whole transactions through the snapshot filter,
//! enrichment and transforms into the sink; the LSN confirmed after the sink took them.

use super::*;

/// A running sink, and what the pipeline does to changes before it.
pub(super) struct Output {
    /// Shared with the snapshot's row deliveries while a snapshot runs; owned alone
    /// (for `apply`) afterwards.
    pub(super) sink: Arc<dyn DynSink>,
    /// Whether the sink holds changes from an earlier run.
    pub(super) sink_progress: bool,
    /// Drops the changes the snapshot already holds, on source rows (before the
    /// transforms). The Postgres sink does this itself when there are no transforms.
    pub(super) upstream: Option<(SnapshotFilter, Client)>,
    pub(super) enrichment: Option<Arc<Enrichment>>,
    pub(super) transformer: Transformer,
}

impl Output {
    /// Whether the sink holds changes from an earlier run (then a missing slot means
    /// changes were lost).
    pub(super) fn has_progress(&self) -> bool {
        self.sink_progress || self.upstream.as_ref().is_some_and(|(f, _)| !f.is_empty())
    }

    /// The sink alone, for the calls that change it (no snapshot shares it then).
    pub(super) fn sink_mut(&mut self) -> Result<&mut dyn DynSink> {
        match Arc::get_mut(&mut self.sink) {
            Some(s) => Ok(s),
            None => bail!(PgError::transient("the sink is still shared with a stopped snapshot")),
        }
    }

    pub(super) async fn reload_snapshot_state(&mut self, pipeline: &str) -> Result<()> {
        self.sink_mut()?.after_snapshot().await?;
        if let Some((filter, state)) = &mut self.upstream {
            *filter = SnapshotFilter::load(state, pipeline).await?;
        }
        Ok(())
    }

    pub(super) async fn apply(&mut self, batch: &mut [Transaction]) -> Result<()> {
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
pub(super) struct Transformer {
    pub(super) chain: Arc<Chain>,
    pub(super) tables: HashMap<TableName, (Arc<TableSchema>, Arc<TableTransform>)>,
    /// The sink keeps one row per key: updates the filters drop become deletes.
    pub(super) keyed: bool,
}

impl Transformer {
    pub(super) fn get(&mut self, source: &Arc<TableSchema>) -> Result<Arc<TableTransform>> {
        if let Some((s, t)) = self.tables.get(&source.name)
            && (Arc::ptr_eq(s, source) || s.columns == source.columns)
        {
            return Ok(t.clone());
        }
        let t = Arc::new(self.chain.compile(source)?);
        self.tables.insert(source.name.clone(), (source.clone(), t.clone()));
        Ok(t)
    }

    pub(super) fn apply(&mut self, batch: &mut [Transaction]) -> Result<()> {
        if self.chain.is_empty() {
            return Ok(());
        }
        for t in batch.iter_mut() {
            let mut out = Vec::with_capacity(t.events.len());
            for e in t.events.drain(..) {
                let t = self.get(&e.table)?;
                if let Some(e) = if self.keyed { t.apply_keyed(e)? } else { t.apply_owned(e)? } {
                    out.push(e);
                }
            }
            t.events = out;
        }
        Ok(())
    }
}

impl Pipeline {
    pub(super) async fn apply_loop(
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
        // Everything up to here was handed to the sink (or was only a position).
        let mut applied = Lsn::ZERO;
        // Transactions handed to the sink and not yet durable in it (a sink may commit
        // on its own cadence): their lag is measured when they become visible.
        let mut unseen: VecDeque<(Lsn, i64)> = VecDeque::new();
        // A transaction with schema changes is a batch of its own: the one before it
        // waits here while the batch before it is applied.
        let mut carry: Option<StreamItem> = None;
        loop {
            let first = if let Some(c) = carry.take() {
                Some(c)
            } else {
                tokio::select! {
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
                        sink.sink_mut()?.tick().await?;
                        self.confirm(&*sink.sink, applied, acker, &mut unseen);
                        continue;
                    }
                }
            };
            let Some(first) = first else { return Ok(()) };
            let (mut rows, mut cost, mut position) = (0usize, 0u32, Lsn::ZERO);
            let deadline = Instant::now() + self.cfg.batch.max_wait;
            let mut next = Some(first);
            while let Some(item) = next.take() {
                // Schema changes, and a piece of a transaction that continues (whose
                // sink write stays open until its last piece), are batches of their own.
                let alone = matches!(&item, StreamItem::Txn(t) if !t.ddl.is_empty() || t.continues);
                if alone && !batch.is_empty() {
                    carry = Some(item);
                    break;
                }
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
                if alone {
                    break;
                }
                if rows < max_rows && cost < BATCH_BUDGET_KB {
                    next = rx.try_recv().ok();
                    // With `batch.max_wait`, a quiet moment does not cut the batch: it
                    // waits for more until the deadline (still bounded by size).
                    let left = deadline.saturating_duration_since(Instant::now());
                    if next.is_none() && !left.is_zero() {
                        next = tokio::time::timeout(left, rx.recv()).await.ok().flatten();
                    }
                }
            }
            if !batch.is_empty() {
                let ddl = batch.iter().any(|t| !t.ddl.is_empty());
                if ddl {
                    self.before_schema_changes(sink, &batch).await?;
                }
                if let Err(e) = sink.apply(&mut batch).await {
                    return Err(if ddl { schema_change_refused(&batch, e) } else { e });
                }
                if ddl {
                    self.after_schema_changes(sink, &batch, resync).await?;
                    kill_failpoint("kill-after:ddl");
                }
                if self.metrics.halted.load(Ordering::Relaxed) != 0 {
                    self.metrics.set_halted(None);
                }
                self.record(&batch, &mut unseen);
                // A piece that continues has no end yet: nothing past it is confirmed.
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
            applied = applied.max(position);
            self.confirm(&*sink.sink, applied, acker, &mut unseen);
        }
    }

    /// What a batch's schema changes need before the sink applies it: a change no
    /// sink can follow halts here; a table that joined the publication gets its place
    /// in the sink.
    async fn before_schema_changes(&self, sink: &mut Output, batch: &[Transaction]) -> Result<()> {
        for c in batch.iter().flat_map(|t| &t.ddl) {
            match &c.kind {
                SchemaChangeKind::Unsupported { reason } => {
                    bail!(PgError::halted(format!("schema change `{}`: {reason}", sluice_core::one_line(&c.statement))))
                }
                SchemaChangeKind::TableAdded { schema } => sink.sink_mut()?.prepare(std::slice::from_ref(schema)).await?,
                SchemaChangeKind::TableRemoved => {
                    tracing::warn!(table = %c.table, "table left the publication: its changes no longer reach the sink, which keeps its rows")
                }
                SchemaChangeKind::Columns { .. } => {}
            }
        }
        Ok(())
    }

    /// Once the sink took the batch: the tables whose rows the log cannot bring (new in
    /// the publication, or rewritten by a volatile default) are read through a resync.
    async fn after_schema_changes(&self, sink: &Output, batch: &[Transaction], resync: &mut Resync) -> Result<()> {
        for t in batch {
            for c in &t.ddl {
                let (schema, added_at) = match &c.kind {
                    SchemaChangeKind::TableAdded { schema } => (schema, Some(t.commit_lsn)),
                    SchemaChangeKind::Columns { after, resync: true, .. } => (after, None),
                    _ => continue,
                };
                let target = (sink.sink.mirrors_source_rows() && self.chain.is_empty()).then(|| sink.sink.target_name(&schema.name));
                tracing::info!(table = %schema.name, "schema change: the table is read again through a resync");
                resync.request_table(t.commit_lsn.0 as i64, schema, target, added_at).await?;
            }
        }
        Ok(())
    }

    /// Tells the source what the sink holds durably of what it was handed, and measures
    /// the lag of the transactions that became durable (visible) since.
    fn confirm(&self, sink: &dyn DynSink, applied: Lsn, acker: &Acker, unseen: &mut VecDeque<(Lsn, i64)>) {
        let durable = sink.durable_lsn(applied);
        if durable > Lsn::ZERO {
            acker.ack(durable);
            self.metrics.confirmed_lsn.store(durable.0, Ordering::Relaxed);
        }
        if unseen.front().is_some_and(|(end, _)| *end <= durable) {
            let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
            while let Some((_, commit_us)) = unseen.front().filter(|(end, _)| *end <= durable).copied() {
                self.metrics.observe_lag_ms((now_us - commit_us) / 1000);
                unseen.pop_front();
            }
        }
    }

    pub(super) fn record(&self, batch: &[Transaction], unseen: &mut VecDeque<(Lsn, i64)>) {
        let m = &self.metrics;
        let (mut events, mut bytes) = (0u64, 0u64);
        // Per-table counts by runs of one table: one lookup per run, not per event.
        let mut run: Option<(&TableName, u64)> = None;
        let mut per_table = m.table_events.lock().unwrap_or_else(|e| e.into_inner());
        for t in batch {
            for e in &t.events {
                match &mut run {
                    Some((name, n)) if **name == e.table.name => *n += 1,
                    _ => {
                        if let Some((name, n)) = run.take() {
                            count_table(&mut per_table, name, n);
                        }
                        run = Some((&e.table.name, 1));
                    }
                }
            }
            events += t.events.len() as u64;
            bytes += t.events.iter().map(|e| e.payload_bytes() as u64).sum::<u64>();
            // A resync's chunk (xid 0) is no source commit: it has no lag; a piece
            // that continues is measured with its last piece.
            if !t.events.is_empty() && t.xid != 0 && !t.continues {
                unseen.push_back((t.end_lsn, t.commit_time_us));
            }
        }
        if let Some((name, n)) = run {
            count_table(&mut per_table, name, n);
        }
        drop(per_table);
        m.events.fetch_add(events, Ordering::Relaxed);
        m.bytes.fetch_add(bytes, Ordering::Relaxed);
        m.transactions.fetch_add(batch.iter().filter(|t| !t.continues).count() as u64, Ordering::Relaxed);
        m.batches.fetch_add(1, Ordering::Relaxed);
    }
}

fn count_table(per_table: &mut HashMap<TableName, u64>, name: &TableName, n: u64) {
    match per_table.get_mut(name) {
        Some(c) => *c += n,
        None => {
            per_table.insert(name.clone(), n);
        }
    }
}

/// A sink refused a batch with schema changes: the halt names the statement.
fn schema_change_refused(batch: &[Transaction], e: anyhow::Error) -> anyhow::Error {
    let Some(c) = batch.iter().flat_map(|t| &t.ddl).next() else { return e };
    if error_kind(&e) == ErrorKind::Transient {
        return e;
    }
    // A sink's own refusal may already say how to fix it (the registry's does).
    let fix = if e.to_string().contains("resumes by itself") {
        String::new()
    } else {
        "; change the sink so it can (or undo the change in the source) and the pipeline resumes by itself".into()
    };
    PgError::halted(format!("the sink cannot take the schema change `{}` on {}: {e}{fix}", sluice_core::one_line(&c.statement), c.table))
        .into()
}

/// Test hook: `SLUICE_FAILPOINT=kill-after:ddl` kills this process with SIGKILL right
/// after the sink took a schema change, before its position is confirmed. Nothing else
/// reads it.
fn kill_failpoint(name: &str) {
    if std::env::var("SLUICE_FAILPOINT").is_ok_and(|f| f == name) {
        tracing::warn!(failpoint = name, "failpoint: killing this process");
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::thread::sleep(Duration::from_secs(60));
    }
}
