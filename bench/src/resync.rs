//! Resync while streaming: how fast a table is read again between watermarks, against
//! the initial snapshot of the same table in the same run, and what it does to the
//! lag of the changes streaming meanwhile.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sluice::metrics::lag_quantile_of;
use sluice_core::TableName;

use crate::{
    connect, fill_bench_table, peak_rss_mb, pipeline_yaml, servers, start_pipeline, steady_load, wait_bench_equal, wait_events,
    wait_snapshot,
};

pub async fn resync(rows: u64, rate: u64, seconds: u64) -> Result<serde_json::Value> {
    let (src, dst) = servers().await?;
    let s = connect(src.port, "bench").await?;
    fill_bench_table(&s, rows).await?;

    // Baseline: the initial snapshot of the same table (chunked COPY, 2 in parallel).
    let t = Instant::now();
    let (metrics, stop, mut handle) = start_pipeline(&pipeline_yaml("resync", src.port, dst.port, true))?;
    wait_snapshot(&metrics, &mut handle).await?;
    let snapshot_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Lag at a steady write rate, without and then with a resync of the same table.
    let before = metrics.lag_counts();
    let (n, achieved_a) = steady_load(&s, rows, rate, seconds).await?;
    let mut next_id = rows + n;
    wait_events(&metrics, n, &handle).await?;
    let quiet = metrics.lag_counts();

    let d = connect(dst.port, "bench").await?;
    let t = Instant::now();
    sluice::resync::request(&d, "resync", 1, &[TableName::new("public", "bench")]).await?;
    let (mut loaded, mut load_s) = (0u64, 0.0);
    loop {
        let (n, _) = steady_load(&s, next_id, rate, 1).await?;
        next_id += n;
        loaded += n;
        load_s += 1.0;
        let done: bool = d.query_one("SELECT bool_and(done) FROM sluice.resyncs WHERE pipeline = 'resync'", &[]).await?.get(0);
        if done {
            break;
        }
        if handle.is_finished() || t.elapsed() > Duration::from_secs(1800) {
            bail!("the resync did not finish");
        }
    }
    // From the request to the last chunk recorded (the load loop checks once a second).
    let r = d
        .query_one(
            "SELECT rows, chunks, extract(epoch FROM finished_at - requested_at)::float8 FROM sluice.resyncs WHERE pipeline = 'resync'",
            &[],
        )
        .await?;
    let (read, chunks, resync_s): (i64, i32, f64) = (r.get(0), r.get(1), r.get(2));
    // The target must equal the source once the last writes are applied.
    wait_bench_equal(&s, &d, &handle, "the resync").await?;
    let during = metrics.lag_counts();
    let _ = stop.send(true);
    handle.await??;

    let phase = |from: &[u64], to: &[u64], q: f64| {
        let d: Vec<u64> = to.iter().zip(from).map(|(t, f)| t - f).collect();
        lag_quantile_of(&d, q)
    };
    Ok(serde_json::json!({
        "bench": "resync", "rows": rows, "write_rate_rows_per_s": rate,
        "snapshot_baseline": {"seconds": snapshot_s, "rows_per_s": rows as f64 / snapshot_s},
        "resync": {"seconds": resync_s, "rows_read": read, "chunks": chunks, "rows_per_s": read as f64 / resync_s,
                   "writes_during": loaded, "achieved_write_rate": loaded as f64 / load_s},
        "ratio_resync_to_snapshot_rate": (read as f64 / resync_s) / (rows as f64 / snapshot_s),
        "lag_without_resync": {"p50_ms_le": phase(&before, &quiet, 0.5), "p99_ms_le": phase(&before, &quiet, 0.99), "achieved_write_rate": achieved_a},
        "lag_during_resync": {"p50_ms_le": phase(&quiet, &during, 0.5), "p99_ms_le": phase(&quiet, &during, 0.99)},
        "note": "lag quantiles are histogram bucket upper bounds (source commit to sink commit) of the streamed writes (resync chunks are not counted)",
        "peak_rss_mb": peak_rss_mb(),
    }))
}
