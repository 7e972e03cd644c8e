//! A lost replication slot: how long the pipeline takes to notice the source
//! invalidated its slot, and how fast the recovery (a new slot and every table read
//! again between watermarks) brings the sink back, against the initial snapshot of the
//! same table in the same run.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sluice_core::TableName;

use crate::{connect, fill_bench_table, peak_rss_mb, pipeline_yaml, servers_with, start_pipeline, wait_bench_equal, wait_snapshot};

pub async fn slot_loss(rows: u64) -> Result<serde_json::Value> {
    let (src, dst) = servers_with(&["max_slot_wal_keep_size = 1MB"]).await?;
    let s = connect(src.port, "bench").await?;
    fill_bench_table(&s, rows).await?;

    // Baseline: the initial snapshot of the same table.
    let yaml = pipeline_yaml("slots", src.port, dst.port, true)
        .replace("tables: [public.bench]}", "tables: [public.bench], heartbeat_interval: 1s}");
    let t = Instant::now();
    let (metrics, stop, mut handle) = start_pipeline(&yaml)?;
    wait_snapshot(&metrics, &mut handle).await?;
    let snapshot_s = t.elapsed().as_secs_f64();

    // A transaction left open holds the slot's restart point back while the pipeline
    // streams; WAL and checkpoints then invalidate the slot under the running pipeline.
    let holder = connect(src.port, "bench").await?;
    holder.batch_execute("BEGIN; INSERT INTO bench VALUES (-1, 'held')").await?;
    let mut lost_at = None;
    for i in 0..500u64 {
        s.batch_execute(&format!("UPDATE bench SET payload = 'u{i}' WHERE id % 1000 = {}", i % 1000)).await?;
        s.batch_execute("SELECT pg_switch_wal(); CHECKPOINT;").await?;
        let status: Option<String> =
            s.query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'sluice_slots'", &[]).await?.get(0);
        if status.as_deref() == Some("lost") {
            lost_at = Some(Instant::now());
            break;
        }
    }
    let Some(lost_at) = lost_at else { bail!("the slot was never invalidated") };
    while metrics.halted.load(Ordering::Relaxed) == 0 {
        if lost_at.elapsed() > Duration::from_secs(120) || handle.is_finished() {
            bail!("the lost slot was not detected");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let detect_ms = lost_at.elapsed().as_secs_f64() * 1000.0;
    holder.batch_execute("ROLLBACK").await?;
    // Changes the lost slot can never deliver.
    s.batch_execute("UPDATE bench SET payload = 'after' WHERE id % 10 = 3; DELETE FROM bench WHERE id % 100 = 7;").await?;

    let d = connect(dst.port, "bench").await?;
    let requested = Instant::now();
    sluice::recover::request(&d, "slots", 1, &[TableName::new("public", "bench")]).await?;
    while metrics.halted.load(Ordering::Relaxed) == 1 {
        if requested.elapsed() > Duration::from_secs(120) || handle.is_finished() {
            bail!("the recovery did not start");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let replaced = Instant::now();
    let pickup_s = replaced.duration_since(requested).as_secs_f64();
    loop {
        let done: Option<bool> = d.query_one("SELECT bool_and(done) FROM sluice.resyncs WHERE pipeline = 'slots'", &[]).await?.get(0);
        if done == Some(true) {
            break;
        }
        if replaced.elapsed() > Duration::from_secs(1800) || handle.is_finished() {
            bail!("the recovery did not finish");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recover_s = replaced.elapsed().as_secs_f64();
    let r = d.query_one("SELECT rows, deleted FROM sluice.resyncs WHERE pipeline = 'slots'", &[]).await?;
    let (read, deleted): (i64, i64) = (r.get(0), r.get(1));
    wait_bench_equal(&s, &d, &handle, "the recovery").await?;
    let _ = stop.send(true);
    handle.await??;
    Ok(serde_json::json!({
        "bench": "slot-loss", "rows": rows, "heartbeat_interval_s": 1,
        "detection_ms": detect_ms,
        "snapshot_baseline": {"seconds": snapshot_s, "rows_per_s": rows as f64 / snapshot_s},
        "recovery": {"pickup_s": pickup_s, "seconds": recover_s, "rows_read": read, "rows_deleted": deleted, "rows_per_s": read as f64 / recover_s},
        "ratio_recovery_to_snapshot_rate": (read as f64 / recover_s) / (rows as f64 / snapshot_s),
        "note": "detection: from the CHECKPOINT that invalidated the active slot returning to the pipeline halted; pickup: from the recover request to the slot replaced (the halted pipeline's retry backoff, up to 10 s); recovery: from then to the last chunk read",
        "peak_rss_mb": peak_rss_mb(),
    }))
}
