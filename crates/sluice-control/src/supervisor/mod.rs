//! Runs the pipelines this server holds a lease on. Every pass (2 s, or when woken):
//! renew the leases and publish each pipeline's status; stop what is no longer
//! wanted here; claim wanted pipelines nobody holds (or whose holder's lease ran out)
//! and start them from their checkpoints. A server that cannot renew stops its
//! pipelines before its leases can expire, so a pipeline never runs in two places
//! (and its replication slot admits one reader only, a second fence). Mirrors run
//! under the same kind of lease (`mirrors`).

mod leases;
mod mirrors;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_postgres::Client;

use self::leases::{Held, Leased};
use super::Control;
use sluice_engine::alerts::{AlertConfig, Alerts, Subject, deliver};
use sluice_engine::dogstatsd::DogStatsd;
use sluice_engine::metrics::Metrics;
use sluice_engine::pipeline::Pipeline;

struct Local {
    /// Names for tags and alerts: pipeline, tenant (id and name), sink kind.
    pipeline: String,
    tenant_id: i64,
    tenant: String,
    sink: String,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
}

impl Leased for Local {
    const TABLE: &'static str = "pipelines";
    const KIND: &'static str = "pipeline";

    fn status(&self, server: &str) -> Value {
        status(&self.metrics, server)
    }

    fn wanted(&self, desired: &str, same_generation: bool) -> bool {
        desired == "running" && same_generation
    }

    fn ask_stop(&self) {
        let _ = self.stop.send(true);
    }
}

fn status(m: &Metrics, server: &str) -> Value {
    let s = &m.snapshot;
    let (done, total) = (s.chunks_done.load(Ordering::Relaxed), s.chunks_total.load(Ordering::Relaxed));
    let halted = m.halted.load(Ordering::Relaxed) == 1;
    json!({
        "state": if halted { "halted" } else if total > done { "snapshotting" } else { "running" },
        "server": server,
        "events": m.events.load(Ordering::Relaxed),
        "lag_last_ms": m.lag_last_ms.load(Ordering::Relaxed),
        "lag_p99_ms": m.lag_quantile_ms(0.99),
        "confirmed_lsn": sluice_core::Lsn(m.confirmed_lsn.load(Ordering::Relaxed)).to_string(),
        "halted_reason": m.halt_reason(),
        "wal_retained_bytes": m.wal_retained_bytes.load(Ordering::Relaxed),
        "wal_safe_bytes": m.wal_safe_bytes.load(Ordering::Relaxed),
        "wal_status": m.wal_status().as_str(),
        "snapshot": { "rows": s.rows_copied.load(Ordering::Relaxed), "chunks_done": done, "chunks_total": total },
        "resync": { "rows": m.resync_rows.load(Ordering::Relaxed), "chunks": m.resync_chunks.load(Ordering::Relaxed) },
        "enrich": {
            "keys_fetched": m.enrich_fetched.load(Ordering::Relaxed), "keys_cached": m.enrich_cached.load(Ordering::Relaxed),
            "errors": m.enrich_errors.load(Ordering::Relaxed), "failed_rows": m.enrich_failed_rows.load(Ordering::Relaxed),
            "dead_letters": m.enrich_dead_letters.load(Ordering::Relaxed),
        },
        "errors": m.errors.load(Ordering::Relaxed),
        "reconnects": m.reconnects.load(Ordering::Relaxed),
    })
}

pub async fn supervisor(ctl: Arc<Control>, mut shutdown: watch::Receiver<bool>) {
    let mut local: HashMap<i64, Held<Local>> = HashMap::new();
    let mut local_mirrors: HashMap<i64, Held<mirrors::Running>> = HashMap::new();
    let mut client: Option<Client> = None;
    let mut last_renewed = Instant::now();
    loop {
        let stopping = *shutdown.borrow();
        if client.as_ref().is_none_or(Client::is_closed) {
            client = ctl.db.connect().await.map_err(|e| tracing::warn!(error = %e, "supervisor: control database")).ok();
        }
        let pass = match &client {
            Some(c) => match pass(&ctl, c, &mut local, stopping).await {
                Ok(()) => mirrors::pass(&ctl, c, &mut local_mirrors, stopping).await,
                Err(e) => Err(e),
            },
            None => Err(anyhow::anyhow!("no control database connection")),
        };
        match pass {
            Ok(()) => last_renewed = Instant::now(),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "supervisor pass failed");
                client = None;
                // Fence: leases cannot be renewed, so stop before another server may
                // take the pipelines over.
                if last_renewed.elapsed() + Duration::from_secs(3) > ctl.lease && !(local.is_empty() && local_mirrors.is_empty()) {
                    tracing::error!(
                        pipelines = local.len(),
                        mirrors = local_mirrors.len(),
                        "cannot renew leases; stopping this server's pipelines and mirrors"
                    );
                    stop_all(&mut local, &mut local_mirrors).await;
                }
            }
        }
        if stopping {
            stop_all(&mut local, &mut local_mirrors).await;
            if let Some(c) = &client {
                leases::release_all::<Local>(c, &ctl.server_id).await;
                leases::release_all::<mirrors::Running>(c, &ctl.server_id).await;
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = ctl.wake_supervisor.notified() => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn stop_all(local: &mut HashMap<i64, Held<Local>>, mirrors: &mut HashMap<i64, Held<mirrors::Running>>) {
    for (_, l) in local.drain() {
        l.stop().await;
    }
    for (_, m) in mirrors.drain() {
        m.stop().await;
    }
}

async fn pass(ctl: &Arc<Control>, c: &Client, local: &mut HashMap<i64, Held<Local>>, stopping: bool) -> Result<()> {
    let me = &ctl.server_id;
    // 1. Renew, publish status, learn what is wanted of the pipelines held here.
    let wanted = leases::renew(c, me, ctl.lease.as_secs_f64(), local).await?;
    // Before ended tasks are taken out: their last errors count too.
    signals(ctl, c, local).await?;
    // 2. Stop what is gone, no longer wanted, lost, or finished by itself. A pipeline
    //    told to stop is only awaited once its task has ended (it wakes the supervisor).
    for id in leases::ended(local, wanted, stopping) {
        let l = local.remove(&id).expect("present");
        ctl.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        leases::record_end(c, me, id, l).await?;
    }
    if stopping {
        return Ok(());
    }
    // 3. Claim. A server restarted under the same id takes its own leases back at once.
    let mine: Vec<i64> = local.keys().copied().collect();
    let claimed = c
        .query(
            "UPDATE pipelines SET owner = $1, lease_until = now() + make_interval(secs => $2)
             WHERE id IN (SELECT id FROM pipelines
                          WHERE desired = 'running' AND retry_at <= now()
                            AND (owner IS NULL OR lease_until < now() OR (owner = $1 AND NOT id = ANY($3)))
                          ORDER BY id LIMIT 50 FOR UPDATE SKIP LOCKED)
             RETURNING id, generation",
            &[me, &ctl.lease.as_secs_f64(), &mine],
        )
        .await?;
    for r in claimed {
        let (id, generation): (i64, i32) = (r.get(0), r.get(1));
        let loaded = ctl.load_pipeline(id).await?;
        let name = loaded.as_ref().map(|p| p.name.clone()).unwrap_or_default();
        let (tenant_id, sink) = loaded.as_ref().map(|p| (p.tenant_id, p.sink.kind.clone())).unwrap_or_default();
        let tenant: String =
            c.query_opt("SELECT name FROM tenants WHERE id = $1", &[&tenant_id]).await?.map(|r| r.get(0)).unwrap_or_default();
        let Some(p) = loaded else { continue };
        let checked = match ctl.recheck_pipeline_egress(&p).await {
            Ok(()) => p.run_config().map_err(|e| e.message),
            Err(refused) => Err(refused),
        };
        let cfg = match checked {
            Ok(cfg) => cfg,
            Err(error) => {
                leases::not_started::<Local>(c, id, &error).await?;
                continue;
            }
        };
        let metrics = Arc::new(Metrics::default());
        let (stop, rx) = watch::channel(false);
        let mut pipeline = Pipeline::new(cfg, metrics.clone(), rx);
        pipeline.recover_hint = format!("sluice pipelines recover {name}");
        let wake = ctl.clone();
        let task = tokio::spawn(async move {
            let result = pipeline.run().await;
            wake.wake_supervisor.notify_one(); // record its end without waiting for the next pass
            result
        });
        tracing::info!(pipeline = id, "pipeline started on this server");
        ctl.running.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            crate::Running { tenant_id, tenant: tenant.clone(), pipeline: name.clone(), sink: sink.clone(), metrics: metrics.clone() },
        );
        local.insert(id, Held::new(Local { pipeline: name, tenant_id, tenant, sink, metrics, stop }, generation, task));
    }
    Ok(())
}

/// DogStatsD metrics and alert state of this server's pipelines.
#[derive(Default)]
pub(crate) struct Signals {
    pub(crate) statsd: Option<DogStatsd>,
    alerts: Alerts,
    /// The tenants' webhooks' client, resolving names through the egress policy it
    /// was built with (built at first use, again if the policy is replaced).
    client: Option<(Arc<sluice_core::egress::Egress>, reqwest::Client)>,
}

/// Sends metrics when due, and evaluates each tenant's alert rules on its pipelines
/// here, delivering what fires or resolves to the tenant's webhook.
async fn signals(ctl: &Control, c: &Client, local: &HashMap<i64, Held<Local>>) -> Result<()> {
    if local.is_empty() {
        return Ok(()); // no pipelines here: nothing to send or evaluate, no query
    }
    let tenants: Vec<i64> = local.values().map(|l| l.kind.tenant_id).collect();
    let rows = c.query("SELECT tenant_id, sealed FROM alert_settings WHERE tenant_id = ANY($1)", &[&tenants]).await?;
    let mut settings: HashMap<i64, AlertConfig> = HashMap::new();
    for r in rows {
        let opened =
            ctl.sealer.open(crate::crypto::Owner::new("alert_settings", r.get(0), ""), r.get::<_, &[u8]>(1)).map_err(anyhow::Error::msg)?;
        match serde_json::from_slice::<AlertConfig>(&opened) {
            Ok(cfg) => {
                settings.insert(r.get(0), cfg);
            }
            Err(e) => tracing::warn!(tenant = r.get::<_, i64>(0), error = %e, "unreadable alert settings"),
        }
    }
    let mut s = ctl.signals.lock().unwrap_or_else(|e| e.into_inner());
    let s = &mut *s;
    if let Some(d) = s.statsd.as_mut()
        && d.due()
    {
        for l in local.values().map(|h| &h.kind) {
            d.emit(&[("pipeline", &l.pipeline), ("tenant", &l.tenant), ("sink", &l.sink)], &l.metrics);
        }
    }
    let policy = ctl.egress_policy();
    for l in local.values().map(|h| &h.kind) {
        let Some(cfg) = settings.get(&l.tenant_id) else { continue };
        let subject = Subject { pipeline: l.pipeline.clone(), tenant: Some(l.tenant.clone()) };
        for n in s.alerts.evaluate(&subject, &l.metrics, cfg) {
            // A tenant's webhook is reached only where the egress policy lets it: an
            // address literal is checked here, a name by the client at each connection.
            if let Err(m) = policy.check_url_literal(secrecy::ExposeSecret::expose_secret(&cfg.webhook_url)) {
                tracing::warn!(tenant = %l.tenant, error = %m, "alert not delivered: egress refused");
                continue;
            }
            if s.client.as_ref().is_none_or(|(p, _)| !Arc::ptr_eq(p, &policy)) {
                match sluice_core::egress::guard_http(reqwest::Client::builder(), "", Some(&policy))
                    .and_then(|b| b.build().map_err(|e| e.to_string()))
                {
                    Ok(c) => s.client = Some((policy.clone(), c)),
                    Err(e) => {
                        tracing::error!(error = %e, "alert not delivered: no HTTP client");
                        continue;
                    }
                }
            }
            if let Some((_, client)) = &s.client {
                deliver(client, &cfg.webhook_url, n);
            }
        }
    }
    Ok(())
}
