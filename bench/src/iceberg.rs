//! Postgres → Iceberg: the snapshot against writing the same rows straight to Parquet
//! with the same crate (the write limit here), streaming against pg_recvlogical, the
//! lag from source commit to a visible Iceberg snapshot at two commit intervals, and
//! DuckDB's read time of the table with equality deletes against after compaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use sluice::metrics::Metrics;
use sluice_core::{Lsn, TableName};
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD};
use tokio_postgres::Client;

use crate::{
    connect, create_bench_table, insert_rows, peak_rss_mb, recvlogical, servers, start_pipeline, steady_load, wait_snapshot, walk_size,
    write_rows,
};

/// Waits until the Iceberg sink's checkpoint (in the catalog database) reaches `end`.
async fn wait_committed(dst: &Client, pipeline: &str, end: Lsn, handle: &tokio::task::JoinHandle<Result<()>>) -> Result<()> {
    loop {
        let row = dst.query_opt("SELECT end_lsn::text FROM sluice.pipelines WHERE pipeline = $1", &[&pipeline]).await.ok().flatten();
        if let Some(r) = row
            && r.get::<_, String>(0).parse::<Lsn>()? >= end
        {
            return Ok(());
        }
        if handle.is_finished() {
            bail!("pipeline stopped");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The rows the snapshot reads (`id`, a payload making `row_bytes`), written straight
/// to one Parquet file with the parquet crate the sink uses: the write limit.
fn parquet_baseline(rows: u64, row_bytes: usize, dir: &std::path::Path) -> Result<f64> {
    let payload = "x".repeat(row_bytes.saturating_sub(8 + 24).max(1));
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("id", arrow_schema::DataType::Int64, false),
        arrow_schema::Field::new("payload", arrow_schema::DataType::Utf8, true),
    ]));
    let t = Instant::now();
    let file = std::fs::File::create(dir.join("baseline.parquet"))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)?;
    let mut id = 0u64;
    while id < rows {
        let n = 4096.min(rows - id);
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values((id..id + n).map(|i| i as i64)));
        let payloads: ArrayRef = Arc::new(StringArray::from_iter_values((0..n).map(|_| payload.as_str())));
        w.write(&RecordBatch::try_new(schema.clone(), vec![ids, payloads])?)?;
        id += n;
    }
    w.close()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Commits one more row and returns a position before its commit: the pipeline has
/// committed everything written so far once its checkpoint passes it (the current WAL
/// position itself may never be passed when nothing else commits).
async fn marker(s: &Client, id: u64) -> Result<Lsn> {
    let before: String = s.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
    insert_rows(s, id, 1, 10).await?;
    Ok(Lsn(before.parse::<Lsn>()?.0 + 1))
}

/// DuckDB's Iceberg extension scanning the table (tests/python/iceberg_read.py), for at
/// most `limit`.
fn duckdb_scan(metadata_location: &str, limit: Duration) -> Result<serde_json::Value> {
    let python = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "/var/cache/sluice/venv/bin/python".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../crates/sluice/tests/python/iceberg_read.py");
    let mut child = std::process::Command::new(python)
        .args([script, "--time-duckdb", metadata_location])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let t = Instant::now();
    while child.try_wait()?.is_none() {
        if t.elapsed() > limit {
            child.kill()?;
            child.wait()?;
            return Ok(serde_json::json!({"timed_out_after_s": limit.as_secs()}));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("iceberg_read.py --time-duckdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn yaml(src: u16, dst: u16, warehouse: &std::path::Path, interval: &str) -> String {
    format!(
        "pipeline: ice\nsource: {{host: 127.0.0.1, port: {src}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, \
         database: bench, tables: [public.bench]}}\n\
         sink: {{iceberg: {{warehouse: {wh}, commit_interval: {interval}, maintenance: {{interval: 0s}}, catalog: {{sql: {{host: 127.0.0.1, \
         port: {dst}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench}}}}}}}}\n\
         snapshot: {{parallelism: 2, chunk_rows: 100000}}\n",
        wh = warehouse.display(),
    )
}

/// The read limit of the snapshot: the table's rows COPYed out of Postgres as text over
/// two connections (the snapshot's parallelism, one half of the keys each), bytes
/// counted and dropped. Seconds.
async fn copy_out_baseline(port: u16, rows: u64) -> Result<f64> {
    use futures::StreamExt as _;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (lo, hi) in [(0, rows / 2), (rows / 2, i64::MAX as u64)] {
        tasks.push(tokio::spawn(async move {
            let c = connect(port, "bench").await?;
            let out = c.copy_out(&format!("COPY (SELECT * FROM bench WHERE id >= {lo} AND id < {hi}) TO STDOUT")).await?;
            futures::pin_mut!(out);
            let mut bytes = 0usize;
            while let Some(b) = out.next().await {
                bytes += b?.len();
            }
            Ok::<_, anyhow::Error>(bytes)
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Source commit → visible in an Iceberg snapshot at a steady `rate`, for `seconds`.
async fn visible_lag(s: &Client, dst: &Client, yaml: &str, first_id: u64, rate: u64, seconds: u64) -> Result<(u64, serde_json::Value)> {
    let (metrics, stop, handle): (Arc<Metrics>, _, _) = start_pipeline(yaml)?;
    let (written, achieved) = steady_load(s, first_id, rate, seconds).await?;
    let end = marker(s, first_id + written).await?;
    wait_committed(dst, "ice", end, &handle).await?;
    let _ = stop.send(true);
    handle.await??;
    Ok((
        written + 1,
        serde_json::json!({
            "achieved_rows_per_s": achieved,
            "p50_ms_le": metrics.lag_quantile_ms(0.5), "p99_ms_le": metrics.lag_quantile_ms(0.99),
            "max_ms_le": metrics.lag_quantile_ms(1.0),
        }),
    ))
}

pub async fn iceberg(
    row_bytes: usize,
    rows: u64,
    per_txn: u64,
    lag_rate: u64,
    lag_seconds: u64,
    snapshot_only: bool,
) -> Result<serde_json::Value> {
    let (src, dst) = servers().await?;
    let s = connect(src.port, "bench").await?;
    create_bench_table(&s, "sluice_ice").await?;
    let warehouse = tempfile::tempdir()?;
    let yaml1 = yaml(src.port, dst.port, warehouse.path(), "1s");

    // The snapshot: `rows` rows already in the table; the same rows straight to Parquet.
    write_rows(&s, rows, row_bytes, per_txn).await?;
    let baseline_dir = tempfile::tempdir()?;
    let parquet_s = parquet_baseline(rows, row_bytes, baseline_dir.path())?;
    let copy_s = copy_out_baseline(src.port, rows).await?;
    let t = Instant::now();
    let (metrics, stop, mut handle) = start_pipeline(&yaml1)?;
    wait_snapshot(&metrics, &mut handle).await?;
    let snap_s = t.elapsed().as_secs_f64();
    let _ = stop.send(true);
    handle.await??;
    let mb = (rows as f64 * row_bytes as f64) / 1e6;
    let rate = |s: f64| (rows as f64 / s, mb / s);
    let (sn, pq, cp) = (rate(snap_s), rate(parquet_s), rate(copy_s));
    let snapshot = serde_json::json!({
        "parquet_baseline": {"seconds": parquet_s, "rows_per_s": pq.0, "mb_per_s": pq.1},
        "snapshot": {"seconds": snap_s, "rows_per_s": sn.0, "mb_per_s": sn.1},
        "snapshot_vs_parquet": pq.0.recip() * sn.0,
        "copy_out_baseline": {"seconds": copy_s, "rows_per_s": cp.0, "mb_per_s": cp.1,
                              "note": "COPY ... TO STDOUT over 2 connections, bytes dropped: the read limit of the snapshot"},
        "snapshot_vs_copy_out": cp.0.recip() * sn.0,
    });
    if snapshot_only {
        let mut out = serde_json::json!({"bench": "iceberg", "row_bytes": row_bytes, "rows": rows, "peak_rss_mb": peak_rss_mb()});
        out.as_object_mut().expect("object").extend(snapshot.as_object().expect("object").clone());
        return Ok(out);
    }

    // Streaming: as many rows again, with a second slot drained by pg_recvlogical.
    s.batch_execute("SELECT pg_create_logical_replication_slot('recv_slot', 'pgoutput')").await?;
    let payload = row_bytes.saturating_sub(8 + 24).max(1);
    let mut id = rows;
    // The last transaction commits after this position: its end LSN is past it.
    let mut before_last = Lsn::ZERO;
    while id < 2 * rows {
        let n = per_txn.min(2 * rows - id);
        before_last = s.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get::<_, String>(0).parse()?;
        insert_rows(&s, id, n, payload).await?;
        id += n;
    }
    let end: String = s.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let t = Instant::now();
    recvlogical(src.port, "recv_slot", "sluice_ice", &end)?;
    let base_s = t.elapsed().as_secs_f64();
    s.batch_execute("SELECT pg_drop_replication_slot('recv_slot')").await?;
    let dstc = connect(dst.port, "bench").await?;
    let t = Instant::now();
    let (_metrics, stop, handle) = start_pipeline(&yaml1)?;
    wait_committed(&dstc, "ice", Lsn(before_last.0 + 1), &handle).await?;
    let stream_s = t.elapsed().as_secs_f64();
    let _ = stop.send(true);
    handle.await??;

    // Commit → visible, at commit_interval 1 s and 10 s.
    let (w1, lag_1s) = visible_lag(&s, &dstc, &yaml1, id + 1, lag_rate, lag_seconds).await?;
    id += w1 + 1;
    let yaml10 = yaml(src.port, dst.port, warehouse.path(), "10s");
    let (w10, lag_10s) = visible_lag(&s, &dstc, &yaml10, id + 1, lag_rate, lag_seconds.max(40)).await?;
    id += w10 + 1;

    // Updates of a fifth of the rows, in several commits: equality deletes to apply.
    let (_m, stop, handle) = start_pipeline(&yaml1)?;
    let mut lo = 0;
    while lo < id {
        s.execute(
            "UPDATE bench SET payload = md5(id::text) WHERE id >= $1 AND id < $2 AND id % 5 = 0",
            &[&(lo as i64), &((lo + 50_000) as i64)],
        )
        .await?;
        lo += 50_000;
    }
    let end = marker(&s, id + 1).await?;
    wait_committed(&dstc, "ice", end, &handle).await?;
    let _ = stop.send(true);
    handle.await??;
    let location = |c: Client| async move {
        c.query_one("SELECT metadata_location FROM iceberg_tables WHERE table_name = 'bench'", &[]).await.map(|r| r.get::<_, String>(0))
    };
    let with_deletes = duckdb_scan(&location(connect(dst.port, "bench").await?).await?, Duration::from_secs(300))?;
    let cfg = sluice::config::PipelineConfig::parse(&yaml1).map_err(anyhow::Error::msg)?;
    let sluice::sinks::SinkConfig::Iceberg(sink) = &cfg.sink else { bail!("not an iceberg sink") };
    let what = sluice_sink_iceberg::Maintenance { compact: true, expire_older_than: None, keep: 1, orphans_older_than: None };
    let t = Instant::now();
    let report = sluice_sink_iceberg::maintain(sink, "ice", &[TableName::new("public", "bench")], &what).await?;
    let compact_s = t.elapsed().as_secs_f64();
    let compacted = duckdb_scan(&location(connect(dst.port, "bench").await?).await?, Duration::from_secs(300))?;
    let expect: i64 = s.query_one("SELECT count(*) FROM bench", &[]).await?.get(0);
    for (what, scan) in [("with deletes", &with_deletes), ("compacted", &compacted)] {
        if scan.get("timed_out_after_s").is_none() && scan["rows"].as_i64() != Some(expect) {
            bail!("DuckDB read {} rows of the table {what}, the source has {expect}", scan["rows"]);
        }
    }

    let files = walk_size(warehouse.path());
    let (b, st) = (rate(base_s), rate(stream_s));
    let mut out = serde_json::json!({
        "bench": "iceberg", "row_bytes": row_bytes, "rows": rows, "rows_per_txn": per_txn,
        "pg_recvlogical": {"seconds": base_s, "rows_per_s": b.0, "mb_per_s": b.1},
        "streaming_to_committed": {"seconds": stream_s, "rows_per_s": st.0, "mb_per_s": st.1, "commit_interval_s": 1},
        "streaming_vs_recvlogical": b.0.recip() * st.0,
        "visible_lag": {"rate_rows_per_s": lag_rate, "commit_interval_1s": lag_1s, "commit_interval_10s": lag_10s,
                        "note": "histogram bucket upper bounds, source commit to the Iceberg commit that makes it visible"},
        "duckdb_read": {"rows": expect, "with_equality_deletes_s": with_deletes["seconds"], "data_files": report[0].data_files_before,
                        "delete_files": report[0].delete_files_before, "compacted_s": compacted["seconds"],
                        "compacted_vs_with_deletes": with_deletes["seconds"].as_f64().unwrap_or(0.0) / compacted["seconds"].as_f64().unwrap_or(1.0),
                        "compaction_s": compact_s},
        "warehouse_mb": files as f64 / 1e6,
        "peak_rss_mb": peak_rss_mb(),
    });
    out.as_object_mut().expect("object").extend(snapshot.as_object().expect("object").clone());
    Ok(out)
}
