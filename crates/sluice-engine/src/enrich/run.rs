//! One batch enriched: the distinct keys of every enricher fetched at once (cache,
//! lookups, HTTP), fields appended, failures collected; reference changes noted.

use super::*;

pub(super) struct Work {
    pub(super) plan: Arc<Plan>,
    pub(super) row: Row,
    /// Enrichers whose fields the row lacks.
    pub(super) missing: Vec<usize>,
    /// The first failure under `dead_letter`: the row is held back.
    pub(super) dead: Option<usize>,
    /// Read by a resync or the snapshot: enriched now even by `after_ingestion` ones.
    pub(super) now: bool,
}

impl Work {
    /// The row's source key, as `sluice.enrich_failures` records it.
    pub(super) fn source_key(&self) -> Vec<String> {
        self.plan.keys.iter().map(|&i| text(&self.row[i])).collect()
    }
}

/// A row's key recorded in `sluice.enrich_failures`.
pub(super) struct Failed {
    pub(super) enricher: usize,
    pub(super) table: String,
    pub(super) key: Vec<String>,
    pub(super) delivered: bool,
    pub(super) reason: String,
}

/// A table's plan, and the schema pointer it was last asked for.
pub(super) type SeenPlan = (Arc<TableSchema>, Arc<Plan>);

impl Enrichment {
    /// Enriches a sink batch in place: reference-table changes invalidate the cache
    /// and ask for re-enrichment (then leave the batch unless the table is also the
    /// pipeline's), rows gain their fields, held-back rows leave the batch, and
    /// failures are recorded before the batch goes on.
    pub(crate) async fn apply(&self, batch: &mut [Transaction]) -> Result<()> {
        self.references(batch).await?;
        let mut work = Vec::new();
        let mut at = Vec::new();
        for (ti, t) in batch.iter_mut().enumerate() {
            for (ei, e) in t.events.iter_mut().enumerate() {
                let plan = self.plan(&e.table)?;
                if plan.steps.is_empty() {
                    continue;
                }
                if let Some(b) = &mut e.before {
                    b.resize(plan.output.columns.len(), Datum::Null);
                }
                e.table = plan.output.clone();
                if let Some(row) = e.after.take() {
                    work.push(Work { plan, row, missing: Vec::new(), dead: None, now: t.xid == 0 });
                    at.push((ti, ei));
                }
            }
        }
        if work.is_empty() {
            return Ok(());
        }
        let failed = self.run(&mut work).await;
        self.record(&failed).await?;
        let mut dropped = Vec::new();
        for (w, (ti, ei)) in work.into_iter().zip(at) {
            if w.dead.is_some() {
                dropped.push((ti, ei));
            } else {
                batch[ti].events[ei].after = Some(w.row);
            }
        }
        for (ti, ei) in dropped.into_iter().rev() {
            batch[ti].events.remove(ei);
        }
        Ok(())
    }

    /// Reference-table changes in `batch`: cache invalidation and re-enrichment
    /// requests (durable before the batch is applied, so before its position is
    /// confirmed), then the changes leave the batch unless the pipeline replicates
    /// the table itself.
    pub(super) async fn references(&self, batch: &mut [Transaction]) -> Result<()> {
        let refs = &self.refs;
        if refs.is_empty() {
            return Ok(());
        }
        let mut changed: BTreeMap<usize, HashSet<String>> = BTreeMap::new();
        let mut last = Lsn::ZERO;
        for t in batch.iter_mut() {
            let mut touched = false;
            for e in &t.events {
                if !refs.contains(&e.table.name) {
                    continue;
                }
                touched = true;
                for (k, en) in self.enrichers.iter().enumerate() {
                    let Kind::Lookup(l) = &en.kind else { continue };
                    if !l.replicated || l.table != e.table.name {
                        continue;
                    }
                    let set = changed.entry(k).or_default();
                    if e.op == Op::Truncate {
                        set.insert(String::new()); // everything
                    }
                    let Some(idx) = l.key.iter().map(|k| e.table.columns.iter().position(|c| c.name == *k)).collect::<Option<Vec<_>>>()
                    else {
                        continue;
                    };
                    for row in [&e.before, &e.after].into_iter().flatten() {
                        if let KeyRead::Key(k) = read_key(row, &idx) {
                            set.insert(k);
                        }
                    }
                }
            }
            if touched {
                last = t.commit_lsn;
                let mut x = self.ref_xids.lock().expect("xids lock");
                if x.len() == RECENT_REF_XIDS {
                    x.pop_front();
                }
                x.push_back(t.xid);
                t.events.retain(|e| !refs.contains(&e.table.name) || self.sink_tables.contains(&e.table.name));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        let mut requests = Vec::new();
        for (k, keys) in &changed {
            let en = &self.enrichers[*k];
            let Kind::Lookup(l) = &en.kind else { continue };
            let keys: Vec<String> = keys.iter().cloned().collect();
            l.cache.invalidate(&keys);
            let all = keys.iter().any(String::is_empty) || keys.len() > MAX_FILTER_KEYS;
            for t in self.sink_tables.iter().filter(|t| en.applies(t)) {
                // The rows pointing at a changed key; all rows when `on` is not a
                // source column (it comes from an earlier enricher).
                let on_source = self
                    .plans
                    .lock()
                    .expect("plans lock")
                    .get(t)
                    .is_some_and(|(_, p)| l.on.iter().all(|o| p.source.columns.iter().any(|c| c.name == *o)));
                let filter = (!all && on_source).then(|| {
                    let rows = keys
                        .iter()
                        .map(|k| if l.on.len() == 1 { vec![k.clone()] } else { serde_json::from_str(k).unwrap_or_default() })
                        .collect();
                    KeySet { columns: l.on.clone(), rows }.to_json()
                });
                requests.push((t.to_string(), filter, format!("enrich:{} reference change", en.cfg.name)));
            }
        }
        // One id per batch (its last reference commit): a replayed batch asks again
        // under the same id, which changes nothing.
        let id = last.0 as i64;
        let mut g = self.state().await?;
        let c = g.as_mut().expect("connected");
        for (table, filter, reason) in requests {
            c.execute(
                "INSERT INTO sluice.resyncs (pipeline, id, table_name, keys, reason) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &[&self.pipeline, &id, &table, &filter, &reason],
            )
            .await
            .context("recording a re-enrichment request")?;
        }
        self.requested.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Runs every enricher over `work`, in order; returns the rows to record.
    pub(super) async fn run(&self, work: &mut [Work]) -> Vec<Failed> {
        let mut failed = Vec::new();
        let must_see: Vec<u32> = self.ref_xids.lock().expect("xids lock").iter().copied().collect();
        for (k, en) in self.enrichers.iter().enumerate() {
            let step = |w: &Work| {
                w.plan
                    .steps
                    .iter()
                    .position(|s| matches!(s, PlanStep::Fetch { enricher, .. } | PlanStep::Expr { enricher, .. } if *enricher == k))
            };
            let mut mine: Vec<(usize, usize)> = Vec::new(); // (work index, step index)
            for (i, w) in work.iter().enumerate() {
                if let Some(s) = step(w) {
                    mine.push((i, s));
                }
            }
            if mine.is_empty() {
                continue;
            }
            let fail = |w: &mut Work, width: usize, reason: &str, failed: &mut Vec<Failed>| {
                w.row.extend(std::iter::repeat_n(Datum::Null, width));
                let dead = en.cfg.on_failure == OnFailure::DeadLetter;
                if dead {
                    w.dead.get_or_insert(k);
                } else {
                    w.missing.push(k);
                }
                failed.push(Failed {
                    enricher: k,
                    table: w.plan.source.name.to_string(),
                    key: w.source_key(),
                    delivered: !dead,
                    reason: reason.to_string(),
                });
            };
            match &en.kind {
                Kind::Expression(_) => {
                    for (i, s) in mine {
                        let w = &mut work[i];
                        let plan = w.plan.clone();
                        let PlanStep::Expr { transform, width, .. } = &plan.steps[s] else { unreachable!() };
                        match transform.apply_read(w.row.clone(), SourcePosition::default()) {
                            Ok(Some(r)) => w.row = r,
                            Ok(None) => w.row.extend(std::iter::repeat_n(Datum::Null, *width)),
                            Err(e) => fail(w, *width, &e.to_string(), &mut failed),
                        }
                    }
                }
                Kind::Lookup(_) | Kind::Http(_) => {
                    let deferred = en.cfg.apply == ApplyWhen::AfterIngestion;
                    let mut keys: Vec<String> = Vec::new();
                    let mut seen = HashSet::new();
                    for &(i, s) in &mine {
                        let w = &work[i];
                        let PlanStep::Fetch { inputs, .. } = &w.plan.steps[s] else { unreachable!() };
                        if (!deferred || w.now)
                            && let KeyRead::Key(v) = read_key(&w.row, inputs)
                            && seen.insert(v.clone())
                        {
                            keys.push(v);
                        }
                    }
                    let answer = if keys.is_empty() {
                        Ok((HashMap::new(), 0))
                    } else {
                        match &en.kind {
                            Kind::Lookup(l) => l.fetch(&keys, &must_see).await,
                            Kind::Http(h) => h.fetch(&keys).await,
                            Kind::Expression(_) => unreachable!(),
                        }
                    };
                    let m = &self.metrics;
                    match &answer {
                        Ok((_, fetched)) => {
                            m.enrich_fetched.fetch_add(*fetched as u64, Ordering::Relaxed);
                            m.enrich_cached.fetch_add((keys.len() - fetched) as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            m.enrich_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(enricher = %en.cfg.name, error = %e, rows = mine.len(), policy = ?en.cfg.on_failure, "enrichment failed");
                        }
                    }
                    for (i, s) in mine {
                        let w = &mut work[i];
                        let plan = w.plan.clone();
                        let PlanStep::Fetch { inputs, width, .. } = &plan.steps[s] else { unreachable!() };
                        let width = *width;
                        if deferred && !w.now {
                            w.row.extend(std::iter::repeat_n(Datum::Null, width));
                            w.missing.push(k);
                            failed.push(Failed {
                                enricher: k,
                                table: w.plan.source.name.to_string(),
                                key: w.source_key(),
                                delivered: true,
                                reason: "deferred: enriched after ingestion".into(),
                            });
                            continue;
                        }
                        match (&answer, read_key(&w.row, inputs)) {
                            (_, KeyRead::Unchanged) => w.row.extend(std::iter::repeat_n(Datum::Unchanged, width)),
                            (_, KeyRead::Null) => w.row.extend(std::iter::repeat_n(Datum::Null, width)),
                            (Ok((found, _)), KeyRead::Key(k)) => match found.get(&k) {
                                Some(Some(vals)) => w.row.extend(vals.iter().cloned()),
                                _ => w.row.extend(std::iter::repeat_n(Datum::Null, width)),
                            },
                            (Err(reason), KeyRead::Key(_)) => fail(w, width, reason, &mut failed),
                        }
                    }
                }
            }
        }
        for w in work.iter_mut() {
            if w.plan.missing {
                let names: Vec<&str> = w.missing.iter().map(|&k| self.enrichers[k].cfg.name.as_str()).collect();
                w.row.push(if names.is_empty() { Datum::Null } else { Datum::Text(names.join(",").into()) });
            }
        }
        failed
    }
}
