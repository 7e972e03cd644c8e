//! Mirrors under the same leases as pipelines: each pass renews the leases of the
//! mirrors run here and publishes their status, stops the ones paused, changed, lost
//! or deleted, and claims wanted mirrors nobody holds. A mirror marked `deleting` is
//! claimed the same way to be torn down (its offsets topic, with `purge` its target
//! topics), and its row goes only when that succeeded.
//!
//! Two servers never copy at once for long: a lease lost is a mirror stopped (the
//! loop in `super`), and should one linger, the next owner's `init_transactions`
//! with the same transactional id fences it and aborts its open batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use serde_json::{Value, json};
use sluice_mirror::MirrorStats;
use tokio_postgres::Client;

use super::leases::{self, Held, Leased};
use crate::Control;

pub(super) struct Running {
    stats: Arc<MirrorStats>,
    stop: Arc<AtomicBool>,
    /// A teardown rather than a copy.
    teardown: bool,
}

impl Leased for Running {
    const TABLE: &'static str = "mirrors";
    const KIND: &'static str = "mirror";

    fn status(&self, server: &str) -> Value {
        let mut s = self.stats.summary();
        s["state"] = json!(if self.teardown { "deleting" } else { "running" });
        s["server"] = json!(server);
        s
    }

    fn wanted(&self, desired: &str, same_generation: bool) -> bool {
        if self.teardown { desired == "deleting" } else { desired == "running" && same_generation }
    }

    /// The copy stops after its batch in flight commits or aborts.
    fn ask_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn deletes_row(&self) -> bool {
        self.teardown
    }
}

pub(super) async fn pass(ctl: &Arc<Control>, c: &Client, local: &mut HashMap<i64, Held<Running>>, stopping: bool) -> Result<()> {
    let me = &ctl.server_id;
    let wanted = leases::renew(c, me, ctl.lease.as_secs_f64(), local).await?;
    for id in leases::ended(local, wanted, stopping) {
        let r = local.remove(&id).expect("present");
        leases::record_end(c, me, id, r).await?;
    }
    if stopping {
        return Ok(());
    }
    let mine: Vec<i64> = local.keys().copied().collect();
    let claimed = c
        .query(
            "UPDATE mirrors SET owner = $1, lease_until = now() + make_interval(secs => $2)
             WHERE id IN (SELECT id FROM mirrors
                          WHERE desired IN ('running', 'deleting') AND retry_at <= now()
                            AND (owner IS NULL OR lease_until < now() OR (owner = $1 AND NOT id = ANY($3)))
                          ORDER BY id LIMIT 50 FOR UPDATE SKIP LOCKED)
             RETURNING id, generation, desired, purge",
            &[me, &ctl.lease.as_secs_f64(), &mine],
        )
        .await?;
    for row in claimed {
        let (id, generation, desired, purge): (i64, i32, String, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let loaded = match crate::api::load_mirror(ctl, id).await {
            Ok(Some((spec, cfg))) => match ctl.recheck_egress(&[("", &Value::Object(spec.settings))]).await {
                Ok(()) => crate::egress::check_mirror_brokers(&ctl.egress_policy(), &cfg)
                    .await
                    .map(|()| Some(cfg))
                    .map_err(|m| anyhow::anyhow!("egress refused when connecting: {m}")),
                Err(refused) => Err(anyhow::Error::msg(refused)),
            },
            other => other.map(|m| m.map(|(_, cfg)| cfg)),
        };
        let mut cfg = match loaded {
            Ok(Some(cfg)) => cfg,
            Ok(None) => continue,
            Err(e) => {
                leases::not_started::<Running>(c, id, &format!("{e:#}")).await?;
                continue;
            }
        };
        cfg.egress = Some(ctl.egress_policy());
        let stats = Arc::new(MirrorStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let teardown = desired == "deleting";
        let (s, f, wake) = (stats.clone(), stop.clone(), ctl.clone());
        // librdkafka's calls block: each mirror has a thread of its own.
        let task = tokio::task::spawn_blocking(move || {
            let result = if teardown {
                sluice_mirror::teardown(&cfg, purge).map(|topics| tracing::info!(mirror = id, ?topics, "deleted the mirror's topics"))
            } else {
                sluice_mirror::run(&cfg, &f, &s)
            };
            wake.wake_supervisor.notify_one();
            result.map_err(anyhow::Error::from)
        });
        tracing::info!(mirror = id, teardown, "mirror claimed by this server");
        local.insert(id, Held::new(Running { stats, stop, teardown }, generation, task));
    }
    Ok(())
}
