//! What enrichment keeps in the state database: failures to replay
//! (`sluice.enrich_failures`), definitions seen (`sluice.enrich_versions`), and the
//! report the API shows.

use super::*;

impl Enrichment {
    pub(super) async fn state(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut g = self.state_client.lock().await;
        if g.as_ref().is_none_or(Client::is_closed) {
            *g = Some(sluice_postgres::connect(&self.state, "state database").await?);
        }
        Ok(g)
    }

    /// Records failed and deferred rows (one statement; the same key twice in a
    /// batch is recorded once).
    pub(super) async fn record(&self, failed: &[Failed]) -> Result<()> {
        if failed.is_empty() {
            return Ok(());
        }
        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        let mut dead = 0u64;
        for f in failed {
            if !seen.insert((f.enricher, f.table.as_str(), f.key.clone())) {
                continue;
            }
            dead += u64::from(!f.delivered);
            let en = &self.enrichers[f.enricher];
            rows.push(serde_json::json!({
                "e": en.cfg.name, "t": f.table, "k": f.key, "d": f.delivered, "p": en.kind.replays(), "r": f.reason,
            }));
        }
        self.metrics.enrich_failed_rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
        self.metrics.enrich_dead_letters.fetch_add(dead, Ordering::Relaxed);
        let g = self.state().await?;
        g.as_ref()
            .expect("connected")
            .execute(
                "INSERT INTO sluice.enrich_failures (pipeline, enricher, table_name, key, delivered, replay, reason)
                 SELECT $1, x.e, x.t, ARRAY(SELECT jsonb_array_elements_text(x.k)), x.d, x.p, x.r
                 FROM jsonb_to_recordset($2::text::jsonb) AS x(e text, t text, k jsonb, d bool, p bool, r text)
                 ON CONFLICT (pipeline, enricher, table_name, key) DO UPDATE SET
                    delivered = excluded.delivered, reason = excluded.reason,
                    attempts = sluice.enrich_failures.attempts + 1, last_failed_at = now()",
                &[&self.pipeline, &serde_json::Value::Array(rows).to_string()],
            )
            .await
            .context("recording enrichment failures")?;
        self.pending.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Turns recorded failures into re-enrichment requests once their enricher
    /// answers again (breaker closed or half-open), at most every second per
    /// enricher, backing off while it keeps failing.
    pub(crate) async fn replay(&self) -> Result<()> {
        if !self.pending.load(Ordering::Relaxed) {
            return Ok(());
        }
        {
            let mut looked = self.looked.lock().expect("looked lock");
            if looked.elapsed() < Duration::from_millis(500) {
                return Ok(());
            }
            *looked = tokio::time::Instant::now();
        }
        let mut g = self.state().await?;
        let c = g.as_mut().expect("connected");
        let groups = c
            .query(
                "SELECT enricher, table_name FROM sluice.enrich_failures WHERE pipeline = $1 AND replay GROUP BY 1, 2",
                &[&self.pipeline],
            )
            .await
            .context("reading enrichment failures")?;
        if groups.is_empty() {
            self.pending.store(false, Ordering::Relaxed);
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        for r in groups {
            let (name, table): (String, String) = (r.get(0), r.get(1));
            let Some(en) = self.enrichers.iter().find(|e| e.cfg.name == name) else { continue };
            let Some(plan) =
                self.plans.lock().expect("plans lock").values().find(|(_, p)| p.source.name.to_string() == table).map(|(_, p)| p.clone())
            else {
                continue;
            };
            {
                let mut next = en.next_replay.lock().expect("replay lock");
                if now < next.0 || en.breaker().is_some_and(|b| !b.allows()) {
                    continue;
                }
                let failing = en.breaker().is_some_and(cache::Breaker::failing);
                next.1 = if failing { (next.1 * 2).min(Duration::from_secs(30)) } else { Duration::from_secs(1) };
                next.0 = now + next.1;
            }
            let columns: Vec<String> = plan.keys.iter().map(|&i| plan.source.columns[i].name.clone()).collect();
            let tx = c.transaction().await.context("replaying enrichment failures")?;
            let rows = tx
                .query(
                    "DELETE FROM sluice.enrich_failures WHERE ctid IN (
                        SELECT ctid FROM sluice.enrich_failures WHERE pipeline = $1 AND enricher = $2 AND table_name = $3 AND replay
                        ORDER BY key LIMIT $4 FOR UPDATE)
                     RETURNING key",
                    &[&self.pipeline, &name, &table, &REPLAY_KEYS],
                )
                .await
                .context("taking enrichment failures for a replay")?;
            let keys = KeySet { columns, rows: rows.iter().map(|r| r.get::<_, Vec<String>>(0)).collect() };
            if keys.rows.is_empty() {
                continue;
            }
            let id = crate::resync::now_us();
            tx.execute(
                "INSERT INTO sluice.resyncs (pipeline, id, table_name, keys, reason) VALUES ($1, $2, $3, $4, $5)",
                &[&self.pipeline, &id, &table, &keys.to_json(), &format!("enrich:{name} replay")],
            )
            .await
            .context("requesting a replay of enrichment failures")?;
            tx.commit().await.context("replaying enrichment failures")?;
            self.requested.store(true, Ordering::Relaxed);
            tracing::info!(enricher = %name, table = %table, rows = keys.rows.len(), "re-enriching failed or deferred rows");
        }
        Ok(())
    }

    /// Whether resync requests were written since the last call.
    pub(crate) fn take_requested(&self) -> bool {
        self.requested.swap(false, Ordering::Relaxed)
    }

    /// Asks for a re-enrichment of every row of the tables an enricher applies to
    /// when its definition changed, or when it is new to a pipeline whose sink already
    /// holds rows. Records the definitions seen.
    pub(crate) async fn check_versions(&self, had_progress: bool) -> Result<()> {
        let mut g = self.state().await?;
        let c = g.as_mut().expect("connected");
        let tx = c.transaction().await.context("checking enricher versions")?;
        for en in &self.enrichers {
            let stored: Option<String> = tx
                .query_opt(
                    "SELECT fingerprint FROM sluice.enrich_versions WHERE pipeline = $1 AND enricher = $2",
                    &[&self.pipeline, &en.cfg.name],
                )
                .await
                .context("reading enricher versions")?
                .map(|r| r.get(0));
            let changed = match &stored {
                Some(f) => *f != en.fingerprint,
                None => had_progress,
            };
            if changed {
                let id = crate::resync::now_us();
                let mut tables: Vec<&TableName> = self.sink_tables.iter().filter(|t| en.applies(t)).collect();
                tables.sort();
                for t in tables {
                    tx.execute(
                        "INSERT INTO sluice.resyncs (pipeline, id, table_name, reason) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        &[&self.pipeline, &id, &t.to_string(), &format!("enrich:{} changed", en.cfg.name)],
                    )
                    .await
                    .context("requesting a re-enrichment")?;
                }
                tracing::info!(enricher = %en.cfg.name, "enricher is new or changed: re-enriching the rows already delivered");
            }
            tx.execute(
                "INSERT INTO sluice.enrich_versions (pipeline, enricher, fingerprint) VALUES ($1, $2, $3)
                 ON CONFLICT (pipeline, enricher) DO UPDATE SET fingerprint = excluded.fingerprint",
                &[&self.pipeline, &en.cfg.name, &en.fingerprint],
            )
            .await
            .context("recording enricher versions")?;
        }
        tx.commit().await.context("recording enricher versions")?;
        Ok(())
    }
}

/// A pipeline's enrichment as its state database records it: failed or deferred rows
/// waiting for a replay (grouped by enricher and table), and the latest
/// re-enrichments with their progress.
pub async fn report(state: &Client, pipeline: &str) -> Result<serde_json::Value> {
    let exists: bool =
        state.query_one("SELECT to_regclass('sluice.enrich_failures') IS NOT NULL", &[]).await.context("reading enrichment state")?.get(0);
    if !exists {
        return Ok(serde_json::json!({ "failures": [], "re_enrichments": [] }));
    }
    let failures = state
        .query(
            "SELECT enricher, table_name, count(*)::int8, (count(*) FILTER (WHERE NOT delivered))::int8, max(attempts),
                    max(last_failed_at)::text, (array_agg(reason ORDER BY last_failed_at DESC))[1]
             FROM sluice.enrich_failures WHERE pipeline = $1 GROUP BY 1, 2 ORDER BY 1, 2",
            &[&pipeline],
        )
        .await
        .context("reading enrichment failures")?;
    let runs = state
        .query(
            "SELECT id, table_name, reason, rows, chunks, done, requested_at::text, finished_at::text FROM sluice.resyncs
             WHERE pipeline = $1 AND reason LIKE 'enrich:%' ORDER BY id DESC, table_name LIMIT 20",
            &[&pipeline],
        )
        .await
        .context("reading re-enrichments")?;
    Ok(serde_json::json!({
        "failures": failures.iter().map(|r| serde_json::json!({
            "enricher": r.get::<_, String>(0), "table": r.get::<_, String>(1), "rows": r.get::<_, i64>(2),
            "held_back": r.get::<_, i64>(3), "max_attempts": r.get::<_, i32>(4), "last_failed_at": r.get::<_, String>(5),
            "last_reason": r.get::<_, String>(6),
        })).collect::<Vec<_>>(),
        "re_enrichments": runs.iter().map(|r| serde_json::json!({
            "id": r.get::<_, i64>(0), "table": r.get::<_, String>(1), "reason": r.get::<_, Option<String>>(2),
            "rows": r.get::<_, i64>(3), "chunks": r.get::<_, i32>(4), "done": r.get::<_, bool>(5),
            "requested_at": r.get::<_, String>(6), "finished_at": r.get::<_, Option<String>>(7),
        })).collect::<Vec<_>>(),
    }))
}
