//! Phase 3, stream: the replication reader (bounded by bytes), the heartbeat, and
//! resync, around the apply loop.

use super::*;

impl Pipeline {
    pub(super) async fn stream<S: ChangeSource>(&mut self, source: &Arc<S>, mut sink: Output, checked: &Checked) -> Result<()> {
        let tables = &checked.tables[..];
        let start = sink.sink.resume_lsn();
        let streamed: Vec<Arc<TableSchema>> = tables.iter().chain(&checked.reference).cloned().collect();
        let stream = source.open(start, &streamed).await?;
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
                        Ok(None) => break Err(anyhow::Error::from(PgError::transient("the source ended the replication stream"))),
                        Err(e) => break Err(e.into()),
                    },
                }
            };
            stream.shutdown().await;
            r
        });
        let mut heartbeat = tokio::spawn(heartbeat(source.clone(), self.cfg.source.heartbeat_interval, self.metrics.clone()));
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
            Ok(resync) => {
                // Resyncs read what the publication's row filters publish.
                let filters = self.cfg.table_filters().into_iter().filter_map(|(t, f)| Some((t, f.row_filter?))).collect();
                let mut resync = resync.with_row_filters(filters);
                // A lost slot ends the stream within one heartbeat (the source may not have
                // ended it); the retry's checks decide between halting and recovering.
                // Leaving the apply loop mid-batch is safe: the sink commits a batch whole.
                tokio::select! {
                    r = self.apply_loop(&mut sink, &mut rx, &acker, &budget, &mut resync) => r,
                    _ = &mut heartbeat => Err(PgError::transient(format!("replication slot {} was lost", self.cfg.slot_name())).into()),
                }
            }
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
}

/// Writes a heartbeat into the source's log on a timer, so the slot's confirmed
/// position advances even when every replicated table is idle, and samples the log
/// the source retains for the pipeline. Returns when the slot is lost.
pub(super) async fn heartbeat<S: ChangeSource>(source: Arc<S>, interval: Duration, metrics: Arc<Metrics>) {
    let mut last = WalStatus::Unknown;
    loop {
        match source.heartbeat().await {
            Ok(health) => {
                metrics.set_wal_health(&health);
                if health.status != last && matches!(health.status, WalStatus::Extended | WalStatus::Unreserved) {
                    tracing::warn!(wal_status = health.status.as_str(), retained_bytes = ?health.retained_bytes, safe_bytes = ?health.safe_bytes,
                        "the replication slot holds WAL beyond max_wal_size; the source invalidates it past max_slot_wal_keep_size");
                }
                last = health.status;
                if health.status == WalStatus::Lost {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        tokio::time::sleep(interval).await;
    }
}
