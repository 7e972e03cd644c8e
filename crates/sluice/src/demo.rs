//! `sluice demo`: two throwaway Postgres servers and a live pipeline between them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rand::Rng as _;
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD, TempCluster};
use tokio::sync::watch;
use tokio_postgres::Client;

use sluice_engine::config::PipelineConfig;
use sluice_engine::metrics::Metrics;
use sluice_engine::pipeline::Pipeline;

async fn connect(port: u16, db: &str) -> Result<Client> {
    sluice_postgres::cluster::superuser_client(port, db).await.context("connecting to a demo server")
}

/// A pipeline running in this process: its metrics, its stop switch, its task.
pub type Running = (Arc<Metrics>, watch::Sender<bool>, tokio::task::JoinHandle<Result<()>>);

/// Starts the pipeline of `yaml` in this process (demos and benchmarks).
pub fn spawn_pipeline(yaml: &str, progress_bar: bool) -> Result<Running> {
    let cfg = PipelineConfig::parse(yaml).map_err(anyhow::Error::msg)?;
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut pipeline = Pipeline::new(cfg, metrics.clone(), stop_rx);
    pipeline.progress_bar = progress_bar;
    Ok((metrics, stop_tx, tokio::spawn(async move { pipeline.run().await })))
}

async fn digest(c: &Client) -> Result<(i64, String)> {
    let row = c.query_one("SELECT count(*), coalesce(md5(string_agg(o::text, ',' ORDER BY id)), '') FROM orders o", &[]).await?;
    Ok((row.get(0), row.get(1)))
}

pub async fn run(duration: Duration, rate: u32, rows: u32, shutdown: watch::Receiver<bool>) -> Result<()> {
    println!("starting two throwaway Postgres servers (source and replica)...");
    let (src, dst) =
        tokio::task::spawn_blocking(|| -> std::io::Result<_> { Ok((TempCluster::start(&[])?, TempCluster::start(&[])?)) }).await??;
    for port in [src.port, dst.port] {
        connect(port, "postgres").await?.batch_execute("CREATE DATABASE shop").await?;
    }
    let s = connect(src.port, "shop").await?;
    println!("loading {rows} sample orders into the source (port {})...", src.port);
    s.batch_execute(&format!(
        "CREATE TABLE orders (id int8 PRIMARY KEY, customer text NOT NULL, amount numeric(12,2), status text,
                              created_at timestamptz NOT NULL DEFAULT now(), note text);
         INSERT INTO orders SELECT g, 'customer ' || (g % 1000), (g % 10000) / 100.0, 'new', now(), NULL
         FROM generate_series(1, {rows}) g;"
    ))
    .await?;

    let yaml = format!(
        "pipeline: demo\nsource: {{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, \
         database: shop, tables: [public.orders], heartbeat_interval: 1s}}\n\
         sink: {{postgres: {{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: shop}}}}\n\
         snapshot: {{chunk_rows: 25000}}\n",
        src.port, dst.port
    );
    let (metrics, stop_tx, runner) = spawn_pipeline(&yaml, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;

    println!("snapshotting into the replica (port {})...", dst.port);
    let t0 = Instant::now();
    loop {
        let p = &metrics.snapshot;
        let (done, total) = (p.chunks_done.load(Ordering::Relaxed), p.chunks_total.load(Ordering::Relaxed));
        if total > 0 && done == total {
            break;
        }
        anyhow::ensure!(!runner.is_finished(), "the pipeline stopped during the snapshot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snap_rows = metrics.snapshot.rows_copied.load(Ordering::Relaxed);
    println!("snapshot done: {snap_rows} rows in {:.1}s", t0.elapsed().as_secs_f64());

    println!("writing ~{rate} changes/s to the source for {duration:?}; replicating live:");
    let writer = s;
    let mut next_id = i64::from(rows) + 1;
    let mut written = 0u64;
    let start = Instant::now();
    let mut last_print = Instant::now();
    let mut stop = shutdown.clone();
    while start.elapsed() < duration && !*stop.borrow() {
        let tick = Instant::now();
        let per_tick = (rate / 10).max(1);
        let mut sql = String::from("BEGIN;");
        {
            let mut rng = rand::rng();
            for _ in 0..per_tick {
                match rng.random_range(0..10) {
                    0..=4 => {
                        sql += &format!(
                            "INSERT INTO orders (id, customer, amount, status) VALUES ({next_id}, 'c{}', {}, 'new');",
                            next_id % 97,
                            rng.random_range(1..100_000) as f64 / 100.0
                        );
                        next_id += 1;
                    }
                    5..=8 => {
                        sql +=
                            &format!("UPDATE orders SET status = 'paid', amount = amount + 1 WHERE id = {};", rng.random_range(1..next_id))
                    }
                    _ => sql += &format!("DELETE FROM orders WHERE id = {};", rng.random_range(1..next_id)),
                }
            }
        }
        sql += "COMMIT;";
        writer.batch_execute(&sql).await?;
        written += u64::from(per_tick);
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "  t={:>3}s  written {written:>7}  applied {:>7}  lag last {:>4} ms  p50 <= {} ms  p99 <= {} ms  WAL retained {} kB",
                start.elapsed().as_secs(),
                metrics.events.load(Ordering::Relaxed),
                metrics.lag_last_ms.load(Ordering::Relaxed),
                metrics.lag_quantile_ms(0.5).unwrap_or(0),
                metrics.lag_quantile_ms(0.99).unwrap_or(0),
                metrics.wal_retained_bytes.load(Ordering::Relaxed).max(0) / 1024,
            );
        }
        anyhow::ensure!(!runner.is_finished(), "the pipeline stopped while streaming");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed())) => {}
            _ = stop.changed() => {}
        }
    }
    println!("stopped writing; waiting for the replica to catch up...");
    let replica = connect(dst.port, "shop").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (a, b) = loop {
        let (a, b) = (digest(&writer).await?, digest(&replica).await?);
        if a == b || Instant::now() > deadline {
            break (a, b);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = stop_tx.send(true);
    runner.await??;
    if a == b {
        println!("source and replica match: {} orders, md5 {}", a.0, a.1);
        Ok(())
    } else {
        anyhow::bail!("replica differs from source: {} vs {} rows", b.0, a.0)
    }
}
