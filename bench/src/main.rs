//! Sluice benchmarks. Each subcommand starts its own throwaway Postgres servers,
//! measures Sluice and a baseline in the same run, and prints a final JSON line.
//!
//!   cargo run --release -p sluice-bench -- throughput --row-bytes 200
//!   cargo run --release -p sluice-bench -- lag --rate 5000
//!   cargo run --release -p sluice-bench -- snapshot --mb 1024
//!   cargo run --release -p sluice-bench -- kafka --rows 500000 --rate 5000
//!   cargo run --release -p sluice-bench -- metrics-summary --scale 1
//!   cargo run --release -p sluice-bench -- enrich --rows 200000 --customers 100000
//!   cargo run --release -p sluice-bench -- tls --rows 300000
//!   cargo build --release -p sluice && cargo run --release -p sluice-bench -- mirror --records 300000
//!   cargo build --release -p sluice && cargo run --release -p sluice-bench -- debezium --row-bytes 2000 --rows 200000
//!   cargo build --release -p sluice && cargo run --release -p sluice-bench -- large-txn --rows 2000000

/// mimalloc rather than glibc's malloc: the search service's writer and tantivy's
/// indexing thread allocate on one thread and free on another, and glibc's arena locks
/// and `malloc_consolidate` took about half of the service's time (perf, initial load).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod control;
mod ddl;
mod debezium;
mod enrich;
mod iceberg;
mod large_txn;
mod mirror;
mod procs;
mod resync;
mod search;
mod slots;
mod tls;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use sluice::metrics::Metrics;
use sluice_core::source::StreamItem;
use sluice_core::{Lsn, TableName};
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD, TempCluster};
use sluice_postgres::{PgConnConfig, ReplicationStream};
use tokio_postgres::Client;

#[derive(Parser)]
#[command(about = "Sluice benchmarks (each prints a final JSON line)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Streaming throughput: pg_recvlogical vs Sluice's decoder into a null sink vs the Postgres sink, same WAL.
    Throughput {
        #[arg(long, default_value_t = 200)]
        row_bytes: usize,
        #[arg(long, default_value_t = 500_000)]
        rows: u64,
        #[arg(long, default_value_t = 1000)]
        rows_per_txn: u64,
    },
    /// Sluice against Debezium 3.6.1.Final (its Postgres connector in the embedded
    /// engine, jars from Maven Central; needs mvn, a JDK and the sluice binary built
    /// beside the bench), same WAL, each from its own slot: into nothing (Sluice's whole
    /// pipeline into the memory sink, Debezium into a counting consumer) and into Kafka as
    /// JSON, each in its own process (rows/s, CPU, peak RSS); the server's own decoding
    /// and pg_recvlogical as yardsticks; then lag into Kafka at a steady rate.
    Debezium {
        #[arg(long, default_value_t = 500_000)]
        rows: u64,
        #[arg(long, default_value_t = 200)]
        row_bytes: usize,
        #[arg(long, default_value_t = 1000)]
        rows_per_txn: u64,
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Skip the lag runs.
        #[arg(long)]
        no_lag: bool,
        /// Sluice and the yardsticks only (no JVM, no lag runs): for working on Sluice.
        #[arg(long)]
        sluice_only: bool,
        /// The producers' `compression.type` into Kafka (Sluice's and Debezium's alike).
        #[arg(long, default_value = "none")]
        compression: String,
    },
    /// Kafka → Kafka between two real clusters, same run: a raw copy (the limit),
    /// `sluice mirror` and MirrorMaker 2 over the same backlog; how exactly each
    /// translates `groups` consumer groups committed at random offsets; lag of each at
    /// a steady `rate`. Needs the sluice binary built beside the bench.
    Mirror {
        #[arg(long, default_value_t = 300_000)]
        records: u64,
        #[arg(long, default_value_t = 1000)]
        record_bytes: usize,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        #[arg(long, default_value_t = 1000)]
        groups: usize,
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Skip MirrorMaker 2 (quicker, for working on Sluice's side).
        #[arg(long)]
        sluice_only: bool,
    },
    /// Postgres → Iceberg (upsert, SQL catalog in Postgres, local warehouse): the
    /// initial snapshot of `rows` rows against writing them straight to Parquet; then
    /// streaming as many again until the commit that holds the last row, against
    /// pg_recvlogical over the same WAL; the lag from source commit to a visible Iceberg
    /// snapshot at commit_interval 1 s and 10 s; DuckDB's read time with equality
    /// deletes against after compaction.
    Iceberg {
        #[arg(long, default_value_t = 200)]
        row_bytes: usize,
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        #[arg(long, default_value_t = 1000)]
        rows_per_txn: u64,
        /// Rows per second of the lag runs.
        #[arg(long, default_value_t = 2000)]
        lag_rate: u64,
        /// Seconds of the 1 s lag run (the 10 s one runs at least 40 s).
        #[arg(long, default_value_t = 20)]
        lag_seconds: u64,
        /// Only the snapshot and its two baselines (a minute instead of many).
        #[arg(long)]
        snapshot_only: bool,
    },
    /// One source transaction of --rows inserts, then one of as many updates, through a
    /// `sluice run` process into the Postgres sink: its peak RSS (VmHWM) and the time
    /// from commit to the last row applied, against pg_recvlogical draining the same
    /// transaction. Needs the sluice binary built beside the bench.
    LargeTxn {
        #[arg(long, default_value_t = 2_000_000)]
        rows: u64,
        #[arg(long, default_value_t = 200)]
        row_bytes: usize,
        /// The pipeline's batch.max_transaction_memory.
        #[arg(long, default_value = "16MiB")]
        max_transaction_memory: String,
    },
    /// Commit-to-applied lag at a steady write rate into the Postgres sink.
    Lag {
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Postgres → Kafka (Avro, Debezium envelope) through an Apache Kafka broker and Sluice's
    /// registry: streaming throughput vs pg_recvlogical over the same WAL, then lag
    /// from source commit to broker ack at a steady rate.
    Kafka {
        #[arg(long, default_value_t = 500_000)]
        rows: u64,
        #[arg(long, default_value_t = 1000)]
        rows_per_txn: u64,
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Schema registry over HTTP: register, lookup and get-by-id latency, against the
    /// same row read straight from Postgres; schema ids resolved per second by a
    /// consumer-side cache, cold (through the registry) and warm.
    Registry {
        #[arg(long, default_value_t = 500)]
        schemas: u32,
    },
    /// Migration checking: time per statement and per 1,000-statement file, against
    /// Postgres's parser alone on the same text.
    Migrations {
        #[arg(long, default_value_t = 20)]
        rounds: u32,
    },
    /// The control plane: `pipelines create` to first change replicated (per provisioning
    /// step) vs the same pipeline started directly; then --pipelines small pipelines on
    /// one server at rest: memory per idle pipeline, CPU.
    Control {
        #[arg(long, default_value_t = 100)]
        pipelines: usize,
        #[arg(long, default_value_t = 20)]
        idle_seconds: u64,
    },
    /// The Metrics Summary page at --scale (1 = 82,000 metrics × 817,000 configurations):
    /// the page's queries on Postgres (the join with facet counts) vs the search index a
    /// pipeline builds, the initial load vs Postgres building the documents alone, lag
    /// from a configuration's commit to its document being searchable, `_bulk` rate.
    MetricsSummary {
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Page views asked of each system.
        #[arg(long, default_value_t = 200)]
        queries: usize,
        /// Configuration updates per second during the lag measurement.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// The search service's refresh interval (its default: 50).
        #[arg(long, default_value_t = 50)]
        refresh_ms: u64,
    },
    /// The built-in search service alone (the metrics-summary bench runs it as a child).
    #[command(hide = true)]
    SearchServe {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        data: std::path::PathBuf,
        #[arg(long, default_value_t = 50)]
        refresh_ms: u64,
    },
    /// Resync of a --rows table while --rate rows/s stream into it: its rate vs the
    /// initial snapshot of the same table, and the streamed writes' lag without and
    /// during the resync.
    Resync {
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds of writes without a resync (the lag baseline).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// What TLS costs: the same WAL through Postgres → Postgres and Postgres → Kafka
    /// (JSON) pipelines in the clear and over TLS (Postgres verify-full; Kafka SASL_SSL
    /// with SCRAM-SHA-512), and captured alone (pg_recvlogical with sslmode=require,
    /// Sluice's null sink) as the yardstick; --rounds alternating rounds of each;
    /// rows/s and the ratio.
    Tls {
        #[arg(long, default_value_t = 300_000)]
        rows: u64,
        #[arg(long, default_value_t = 200)]
        row_bytes: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// librdkafka's compression.type of the Kafka sink, in both runs.
        #[arg(long, default_value = "none")]
        compression: String,
    },
    /// A replication slot the source invalidates under a running pipeline
    /// (max_slot_wal_keep_size = 1MB, an open transaction holding it back): time to
    /// detect it, then `recover`'s rate (new slot, the table read again) vs the initial
    /// snapshot of the same --rows table.
    SlotLoss {
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
    },
    /// The source-side cost of DDL capture: a --statements ALTER TABLE migration on
    /// published tables (one transaction each) with the event trigger against without
    /// it, --rounds alternating rounds of each.
    DdlTrigger {
        #[arg(long, default_value_t = 1000)]
        statements: u32,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Lookup enrichment throughput, warm and cold cache, against no enrichment.
    Enrich {
        #[arg(long, default_value_t = 200_000)]
        rows: u64,
        #[arg(long, default_value_t = 100_000)]
        customers: u64,
    },
    /// Initial snapshot of a large table vs `COPY TO STDOUT | COPY FROM STDIN` between the same servers.
    Snapshot {
        #[arg(long, default_value_t = 1024)]
        mb: u64,
        /// Chunks copied at once.
        #[arg(long, default_value_t = 2)]
        parallelism: usize,
        /// The primary key's type: `int8` (chunks split by key range) or `uuid` (random
        /// keys, chunks split by block range).
        #[arg(long, default_value = "int8", value_parser = ["int8", "uuid"])]
        key: String,
    },
}

/// The table the throughput benchmarks stream (`id`, `payload` stored inline, so row
/// size is what is written), published as `publication`.
async fn create_bench_table(s: &Client, publication: &str) -> Result<()> {
    create_bench_table_sized(s, publication, 200).await
}

/// [`create_bench_table`] for rows of `row_bytes`: rows too wide for a page keep the
/// payload out of line, uncompressed (`EXTERNAL`), so row size is still what is written.
async fn create_bench_table_sized(s: &Client, publication: &str, row_bytes: usize) -> Result<()> {
    let storage = if row_bytes <= 8000 { "PLAIN" } else { "EXTERNAL" };
    s.batch_execute(&format!(
        "CREATE TABLE bench (id int8 PRIMARY KEY, payload text);
         ALTER TABLE bench ALTER COLUMN payload SET STORAGE {storage};
         CREATE PUBLICATION {publication} FOR TABLE bench;"
    ))
    .await?;
    Ok(())
}

async fn connect(port: u16, db: &str) -> Result<Client> {
    Ok(sluice_postgres::cluster::superuser_client(port, db).await?)
}

fn conn_cfg(port: u16, db: &str) -> PgConnConfig {
    PgConnConfig::new("127.0.0.1", port, SUPERUSER, SUPERUSER_PASSWORD.to_string().into(), db)
}

fn pipeline_yaml(name: &str, src: u16, dst: u16, snapshot: bool) -> String {
    pipeline_yaml_p(name, src, dst, snapshot, 2)
}

fn pipeline_yaml_p(name: &str, src: u16, dst: u16, snapshot: bool, parallelism: usize) -> String {
    format!(
        "pipeline: {name}\nsource: {{host: 127.0.0.1, port: {src}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, \
         database: bench, tables: [public.bench]}}\n\
         sink: {{postgres: {{host: 127.0.0.1, port: {dst}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench}}}}\n\
         snapshot: {{enabled: {snapshot}, parallelism: {parallelism}, chunk_rows: 200000}}\n"
    )
}

/// Peak resident memory of this process so far, in MB.
fn peak_rss_mb() -> f64 {
    peak_rss_mb_of("/proc/self/status")
}

/// Peak resident memory (`VmHWM`) from a `/proc/<pid>/status` file, in MB (-1 unknown).
fn peak_rss_mb_of(status: &str) -> f64 {
    let kb = status_kb(status, "VmHWM:");
    if kb < 0.0 { -1.0 } else { kb / 1024.0 }
}

/// A numeric field (`VmRSS:` in kB, `voluntary_ctxt_switches:`) of a
/// `/proc/<pid>/status` file (-1 unknown).
fn status_kb(status: &str, field: &str) -> f64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(-1.0)
}

async fn servers() -> Result<(TempCluster, TempCluster)> {
    servers_with(&[]).await
}

/// [`servers`], with `source_conf` lines added to the source's `postgresql.conf`.
async fn servers_with(source_conf: &'static [&'static str]) -> Result<(TempCluster, TempCluster)> {
    let (src, dst) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let conf: Vec<&str> = ["max_wal_size = 4GB"].iter().chain(source_conf).copied().collect();
        Ok((TempCluster::start(&conf)?, TempCluster::start(&["max_wal_size = 4GB"])?))
    })
    .await??;
    for port in [src.port, dst.port] {
        connect(port, "postgres").await?.batch_execute("CREATE DATABASE bench").await?;
    }
    Ok((src, dst))
}

fn start_pipeline(yaml: &str) -> Result<sluice::demo::Running> {
    sluice::demo::spawn_pipeline(yaml, false)
}

/// Drains `slot` up to `end` with Postgres's own `pg_recvlogical` (pgoutput v1).
fn recvlogical(port: u16, slot: &str, publication: &str, end: &str) -> Result<()> {
    recvlogical_sslmode(port, slot, publication, end, "disable")
}

/// `pg_recvlogical` draining `slot` up to `end` with libpq's `sslmode`.
fn recvlogical_sslmode(port: u16, slot: &str, publication: &str, end: &str, sslmode: &str) -> Result<()> {
    let bin = Command::new("pg_config").arg("--bindir").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let recvlogical = bin.map(|b| format!("{b}/pg_recvlogical")).filter(|p| std::path::Path::new(p).exists());
    let recvlogical = recvlogical.unwrap_or_else(|| {
        let mut v: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin/pg_recvlogical"))
            .filter(|p| p.exists())
            .collect();
        v.sort();
        v.pop().map(|p| p.display().to_string()).unwrap_or_else(|| "pg_recvlogical".into())
    });
    let st = Command::new(&recvlogical)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER, "-d", "bench", "--slot", slot, "--start"])
        .args(["-o", "proto_version=1", "-o", &format!("publication_names={publication}"), "--endpos", end, "-f", "/dev/null", "--no-loop"])
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGSSLMODE", sslmode)
        .status()
        .context("running pg_recvlogical")?;
    if !st.success() {
        bail!("pg_recvlogical failed: {st}");
    }
    Ok(())
}

/// One transaction inserting ids `after + 1 ..= after + n` with `payload`-byte payloads.
/// Creates `bench` in the source with `rows` rows of ~200 bytes, analyzed.
async fn fill_bench_table(s: &Client, rows: u64) -> Result<()> {
    s.batch_execute("CREATE TABLE bench (id int8 PRIMARY KEY, payload text)").await?;
    eprintln!("creating a table of {rows} rows...");
    for start in (0..rows).step_by(100_000) {
        insert_rows(s, start, 100_000.min(rows - start), 168).await?;
    }
    s.batch_execute("VACUUM ANALYZE bench").await?;
    Ok(())
}

async fn insert_rows(s: &Client, after: u64, n: u64, payload: usize) -> Result<()> {
    s.batch_execute(&format!(
        "INSERT INTO bench SELECT g, rpad(md5(g::text), {payload}, 'x') FROM generate_series({}, {}) g",
        after + 1,
        after + n
    ))
    .await?;
    Ok(())
}

/// Writes `rows` rows of about `row_bytes` into `bench`, `per_txn` rows a transaction;
/// returns the WAL position after the last commit.
async fn write_rows(s: &Client, rows: u64, row_bytes: usize, per_txn: u64) -> Result<String> {
    let payload = row_bytes.saturating_sub(8 + 24).max(1); // id + tuple header
    eprintln!("writing {rows} rows of ~{row_bytes} bytes...");
    let mut id = 0u64;
    while id < rows {
        let n = per_txn.min(rows - id);
        insert_rows(s, id, n, payload).await?;
        id += n;
    }
    let end = s.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    // The backlog's pages go to disk now, not during whichever run comes first.
    s.batch_execute("CHECKPOINT").await?;
    Ok(end)
}

/// Writes transactions every 10 ms at `rate` rows/s for `seconds`, with ids after
/// `first_id`; returns the rows written and the rate achieved.
async fn steady_load(s: &Client, first_id: u64, rate: u64, seconds: u64) -> Result<(u64, f64)> {
    let per_tick = (rate / 100).max(1);
    let start = Instant::now();
    let (mut id, mut tick) = (first_id, 0u64);
    while start.elapsed() < Duration::from_secs(seconds) {
        insert_rows(s, id, per_tick, 168).await?;
        id += per_tick;
        tick += 1;
        tokio::time::sleep_until((start + Duration::from_millis(10 * tick)).into()).await;
    }
    Ok((id - first_id, (id - first_id) as f64 / start.elapsed().as_secs_f64()))
}

/// Waits until every planned snapshot chunk is done; an error if the pipeline stopped.
async fn wait_snapshot(metrics: &Metrics, handle: &mut tokio::task::JoinHandle<Result<()>>) -> Result<()> {
    loop {
        let p = &metrics.snapshot;
        let total = p.chunks_total.load(Ordering::Relaxed);
        if total > 0 && p.chunks_done.load(Ordering::Relaxed) == total {
            return Ok(());
        }
        if handle.is_finished() {
            handle.await??;
            bail!("pipeline stopped");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the `bench` table is the same in the target as in the source (after
/// `what`), for up to two minutes.
async fn wait_bench_equal(s: &Client, d: &Client, handle: &tokio::task::JoinHandle<Result<()>>, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if bench_equal(s, d).await? {
            return Ok(());
        }
        if Instant::now() > deadline || handle.is_finished() {
            bail!("after {what} the target differs from the source");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the `bench` table holds the same rows in the target as in the source.
async fn bench_equal(s: &Client, d: &Client) -> Result<bool> {
    let digest = "SELECT count(*), md5(string_agg(id || payload, ',' ORDER BY id)) FROM bench";
    let (a, b) = (s.query_one(digest, &[]).await?, d.query_one(digest, &[]).await?);
    Ok((a.get::<_, i64>(0), a.get::<_, String>(1)) == (b.get::<_, i64>(0), b.get::<_, String>(1)))
}

async fn wait_events(metrics: &Metrics, n: u64, handle: &tokio::task::JoinHandle<Result<()>>) -> Result<()> {
    while metrics.events.load(Ordering::Relaxed) < n {
        if handle.is_finished() {
            bail!("pipeline stopped");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn percentiles(mut us: Vec<f64>) -> serde_json::Value {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| sluice::metrics_summary::quantile(&us, q);
    serde_json::json!({"p50_us": at(0.5), "p99_us": at(0.99), "mean_us": us.iter().sum::<f64>() / us.len() as f64})
}

async fn registry(n: u32) -> Result<serde_json::Value> {
    let pg = tokio::task::spawn_blocking(|| TempCluster::start(&[])).await??;
    connect(pg.port, "postgres").await?.batch_execute("CREATE DATABASE bench").await?;
    let store = sluice_registry::Store::open(conn_cfg(pg.port, "bench")).await.map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, sluice_registry::router(Arc::new(store))).await });

    // The client side runs on its own thread with a keep-alive agent, like a producer's.
    let url = base.clone();
    let (register, lookup, by_id, ids) = tokio::task::spawn_blocking(move || -> Result<_> {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(true).build().into();
        let schema = |i: u32| serde_json::json!({"schema": format!(r#"{{"type":"record","name":"R{i}","fields":[{{"name":"f{i}","type":"long"}}]}}"#)});
        let (mut register, mut lookup, mut by_id, mut ids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let t = Instant::now();
            let v: serde_json::Value = agent.post(&format!("{url}/subjects/bench{i}-value/versions")).send_json(schema(i))?.body_mut().read_json()?;
            register.push(t.elapsed().as_secs_f64() * 1e6);
            ids.push(v["id"].as_i64().context("no id")?);
        }
        for i in 0..n {
            let t = Instant::now();
            agent.post(&format!("{url}/subjects/bench{i}-value")).send_json(schema(i))?.body_mut().read_to_string()?;
            lookup.push(t.elapsed().as_secs_f64() * 1e6);
        }
        for id in &ids {
            let t = Instant::now();
            agent.get(&format!("{url}/schemas/ids/{id}")).call()?.body_mut().read_to_string()?;
            by_id.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok((register, lookup, by_id, ids))
    })
    .await??;

    // Baseline: the same schema rows read straight from Postgres (prepared statement).
    let c = connect(pg.port, "bench").await?;
    let stmt = c.prepare("SELECT schema FROM sluice_registry.schemas WHERE ctx = '' AND id = $1").await?;
    let mut direct = Vec::new();
    for id in &ids {
        let t = Instant::now();
        c.query_one(&stmt, &[&(*id as i32)]).await?;
        direct.push(t.elapsed().as_secs_f64() * 1e6);
    }

    // A consumer's cache: the first record of a schema id resolves through the
    // registry, every later one from memory.
    let url = base.clone();
    let ids2 = ids.clone();
    let (cold_per_s, warm_per_s) = tokio::task::spawn_blocking(move || -> Result<(f64, f64)> {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let mut cache: std::collections::HashMap<i64, serde_json::Value> = std::collections::HashMap::new();
        let t = Instant::now();
        for id in &ids2 {
            let v: serde_json::Value = agent.get(&format!("{url}/schemas/ids/{id}")).call()?.body_mut().read_json()?;
            cache.insert(*id, v);
        }
        let cold = ids2.len() as f64 / t.elapsed().as_secs_f64();
        let rounds = 2_000_000usize;
        let t = Instant::now();
        let mut hits = 0usize;
        for i in 0..rounds {
            hits += usize::from(std::hint::black_box(cache.get(&ids2[i % ids2.len()])).is_some());
        }
        let warm = hits as f64 / t.elapsed().as_secs_f64();
        Ok((cold, warm))
    })
    .await??;
    let direct_p = percentiles(direct);
    let by_id_p = percentiles(by_id);
    Ok(serde_json::json!({
        "bench": "registry", "schemas": n,
        "register": percentiles(register), "lookup": percentiles(lookup),
        "get_by_id": by_id_p.clone(), "postgres_direct_by_id": direct_p.clone(),
        "get_by_id_vs_direct_p50": by_id_p["p50_us"].as_f64().unwrap_or(0.0) / direct_p["p50_us"].as_f64().unwrap_or(1.0),
        "consumer_cache": {"cold_resolves_per_s": cold_per_s, "warm_resolves_per_s": warm_per_s},
        "peak_rss_mb": peak_rss_mb(),
    }))
}

async fn kafka(rows: u64, per_txn: u64, rate: u64, seconds: u64) -> Result<serde_json::Value> {
    let (src, dst) = servers().await?;
    // The broker: Apache Kafka (single-node KRaft), from .ci/install-deps.
    let broker = tokio::task::spawn_blocking(|| sluice_kafka::broker::TempBroker::start(&[])).await??;
    let brokers = broker.addr().to_string();
    // The broker's JVM compiles its hot paths under its first heavy load: that load is
    // given to it before anything is measured.
    let b = brokers.clone();
    tokio::task::spawn_blocking(move || debezium::warm_up(&b, 300_000)).await??;
    // Sluice's registry, in process, stored in the second server.
    let store = sluice_registry::Store::open(conn_cfg(dst.port, "bench")).await.map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let registry = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, sluice_registry::router(Arc::new(store))).await });

    let s = connect(src.port, "bench").await?;
    create_bench_table(&s, "sluice_kafka").await?;
    s.batch_execute("SELECT pg_create_logical_replication_slot('recv_slot', 'pgoutput')").await?;
    let yaml = format!(
        "pipeline: kafka\nsource: {{host: 127.0.0.1, port: {sp}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench, tables: [public.bench]}}\n\
         sink: {{kafka: {{brokers: '{brokers}', registry_url: '{registry}', tombstones: false, state: {{host: 127.0.0.1, port: {dp}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench}}}}}}\n\
         snapshot: {{enabled: false}}\n",
        sp = src.port,
        dp = dst.port,
    );
    // A first run creates the slot, topic and subjects; then the WAL to replay is written.
    let (metrics, stop, handle) = start_pipeline(&yaml)?;
    while !s
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sluice_kafka' AND active)", &[])
        .await?
        .get::<_, bool>(0)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.batch_execute("INSERT INTO bench VALUES (0, 'warm-up')").await?;
    wait_events(&metrics, 1, &handle).await?;
    let _ = stop.send(true);
    handle.await??;
    let end = write_rows(&s, rows, 200, per_txn).await?;
    let mb = rows as f64 * 200.0 / 1e6;

    let t = Instant::now();
    recvlogical(src.port, "recv_slot", "sluice_kafka", &end)?;
    let base_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let (metrics, stop, handle) = start_pipeline(&yaml)?;
    wait_events(&metrics, rows, &handle).await?;
    let kafka_s = t.elapsed().as_secs_f64();
    let rss_after_throughput = peak_rss_mb();

    // Lag at a steady rate, from a fresh histogram.
    let lag_metrics = {
        let _ = stop.send(true);
        handle.await??;
        let (m, stop, handle) = start_pipeline(&yaml)?;
        let (written, achieved) = steady_load(&s, rows + 1, rate, seconds).await?;
        wait_events(&m, written, &handle).await?;
        let _ = stop.send(true);
        handle.await??;
        (m, achieved)
    };
    let (lm, achieved) = lag_metrics;
    Ok(serde_json::json!({
        "bench": "kafka", "encoding": "avro", "row_bytes": 200, "rows": rows, "rows_per_txn": per_txn,
        "pg_recvlogical": {"seconds": base_s, "rows_per_s": rows as f64 / base_s, "mb_per_s": mb / base_s},
        "sluice_kafka": {"seconds": kafka_s, "rows_per_s": rows as f64 / kafka_s, "mb_per_s": mb / kafka_s},
        "kafka_vs_recvlogical": base_s / kafka_s,
        "lag": {"target_rows_per_s": rate, "achieved_rows_per_s": achieved, "seconds": seconds,
                "p50_ms_le": lm.lag_quantile_ms(0.5), "p99_ms_le": lm.lag_quantile_ms(0.99), "max_ms_le": lm.lag_quantile_ms(1.0),
                "note": "histogram bucket upper bounds, source commit to broker ack"},
        "peak_rss_mb_after_throughput": rss_after_throughput,
        "peak_rss_mb": peak_rss_mb(),
        "note": "single process: the pipeline runs in the bench process, so RSS is Sluice's plus the bench's",
    }))
}

async fn throughput(row_bytes: usize, rows: u64, per_txn: u64) -> Result<serde_json::Value> {
    let (src, dst) = servers().await?;
    let s = connect(src.port, "bench").await?;
    create_bench_table_sized(&s, "sluice_pg", row_bytes).await?;
    for slot in ["recv_slot", "null_slot", "sluice_pg"] {
        s.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")).await?;
    }
    let end = write_rows(&s, rows, row_bytes, per_txn).await?;
    let end_lsn: Lsn = end.parse()?;
    let mb = (rows as f64 * row_bytes as f64) / 1e6;

    // Baseline: Postgres's own decoding, drained by pg_recvlogical.
    let t = Instant::now();
    recvlogical(src.port, "recv_slot", "sluice_pg", &end)?;
    let base_s = t.elapsed().as_secs_f64();

    // Sluice's source into a null sink: decode and assemble events, then drop them.
    let catalog = sluice_postgres::connect(&conn_cfg(src.port, "bench"), "source").await?;
    let schema = Arc::new(sluice_postgres::load_table(&catalog, &TableName::new("public", "bench"), "bench").await?);
    let t = Instant::now();
    let mut stream =
        ReplicationStream::start(&conn_cfg(src.port, "bench"), "null_slot", "sluice_pg", Lsn::ZERO, &[schema], catalog).await?;
    let acker = stream.acker();
    let mut events = 0u64;
    loop {
        match stream.next().await? {
            Some(StreamItem::Txn(txn)) => {
                events += txn.events.len() as u64;
                acker.ack(txn.end_lsn);
                if txn.end_lsn >= end_lsn || events >= rows {
                    break;
                }
            }
            Some(StreamItem::Position(_) | StreamItem::Mark(..)) => {}
            None => bail!("stream ended early"),
        }
    }
    let null_s = t.elapsed().as_secs_f64();
    stream.shutdown().await;
    let null_rss = peak_rss_mb();
    if events != rows {
        bail!("null sink saw {events} events, expected {rows}");
    }

    // The real pipeline into the Postgres sink.
    let t = Instant::now();
    let (metrics, stop, handle) = start_pipeline(&pipeline_yaml("pg", src.port, dst.port, false))?;
    while metrics.events.load(Ordering::Relaxed) < rows {
        if handle.is_finished() {
            handle.await??;
            bail!("pipeline stopped");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pg_s = t.elapsed().as_secs_f64();
    let _ = stop.send(true);
    handle.await??;
    let count: i64 = connect(dst.port, "bench").await?.query_one("SELECT count(*) FROM bench", &[]).await?.get(0);
    if count as u64 != rows {
        bail!("sink holds {count} rows, expected {rows}");
    }
    let rate = |s: f64| (rows as f64 / s, mb / s);
    let (b, n, p) = (rate(base_s), rate(null_s), rate(pg_s));
    Ok(serde_json::json!({
        "bench": "throughput", "row_bytes": row_bytes, "rows": rows, "rows_per_txn": per_txn,
        "pg_recvlogical": {"seconds": base_s, "rows_per_s": b.0, "mb_per_s": b.1},
        "sluice_null_sink": {"seconds": null_s, "rows_per_s": n.0, "mb_per_s": n.1},
        "sluice_postgres_sink": {"seconds": pg_s, "rows_per_s": p.0, "mb_per_s": p.1},
        "null_vs_recvlogical": b.0.recip() * n.0,
        "peak_rss_mb_after_null_sink": null_rss,
        "postgres_sink_vs_recvlogical": b.0.recip() * p.0,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

fn walk_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_size(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

async fn lag(rate: u64, seconds: u64) -> Result<serde_json::Value> {
    let (src, dst) = servers().await?;
    let s = connect(src.port, "bench").await?;
    s.batch_execute("CREATE TABLE bench (id int8 PRIMARY KEY, payload text)").await?;
    let (metrics, stop, handle) = start_pipeline(&pipeline_yaml("lag", src.port, dst.port, true))?;
    while metrics.snapshot.chunks_total.load(Ordering::Relaxed) == 0
        || metrics.snapshot.chunks_done.load(Ordering::Relaxed) < metrics.snapshot.chunks_total.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Transactions every 10 ms, sized for the rate.
    let (id, achieved) = steady_load(&s, 0, rate, seconds).await?;
    wait_events(&metrics, id, &handle).await?;
    let _ = stop.send(true);
    handle.await??;
    Ok(serde_json::json!({
        "bench": "lag", "target_rows_per_s": rate, "achieved_rows_per_s": achieved, "seconds": seconds,
        "lag_p50_ms_le": metrics.lag_quantile_ms(0.5), "lag_p99_ms_le": metrics.lag_quantile_ms(0.99),
        "lag_max_ms_le": metrics.lag_quantile_ms(1.0),
        "note": "lag quantiles are histogram bucket upper bounds (source commit to sink commit)",
        "peak_rss_mb": peak_rss_mb(),
    }))
}

async fn snapshot(mb: u64, parallelism: usize, key: &str) -> Result<serde_json::Value> {
    let (src, dst) = servers().await?;
    let s = connect(src.port, "bench").await?;
    let rows = mb * 1_000_000 / 200;
    eprintln!("creating a {mb} MB table ({rows} rows, {key} key)...");
    let id = if key == "uuid" { "gen_random_uuid()" } else { "g" };
    s.batch_execute(&format!(
        "CREATE TABLE bench (id {key} PRIMARY KEY, payload text);
         INSERT INTO bench SELECT {id}, rpad(md5(g::text), 160, 'x') FROM generate_series(1, {rows}) g;"
    ))
    .await?;
    s.batch_execute("VACUUM ANALYZE bench").await?;
    let size: i64 = s.query_one("SELECT pg_table_size('bench')", &[]).await?.get(0);
    let size_mb = size as f64 / 1e6;

    // Baseline: COPY out of the source piped into COPY into the target, by psql.
    let d = connect(dst.port, "bench").await?;
    d.batch_execute(&format!("CREATE TABLE baseline (id {key} PRIMARY KEY, payload text)")).await?;
    let t = Instant::now();
    let st = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "psql -h 127.0.0.1 -p {} -U {SUPERUSER} -d bench -c 'COPY bench TO STDOUT' | psql -h 127.0.0.1 -p {} -U {SUPERUSER} -d bench -c 'COPY baseline FROM STDIN'",
            src.port, dst.port
        ))
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("baseline copy failed");
    }
    let base_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let (metrics, stop, mut handle) = start_pipeline(&pipeline_yaml_p("snap", src.port, dst.port, true, parallelism))?;
    wait_snapshot(&metrics, &mut handle).await?;
    let sluice_s = t.elapsed().as_secs_f64();
    let _ = stop.send(true);
    handle.await??;
    let copied = metrics.snapshot.rows_copied.load(Ordering::Relaxed);
    if copied != rows {
        bail!("snapshot copied {copied} rows, expected {rows}");
    }
    Ok(serde_json::json!({
        "bench": "snapshot", "key": key, "table_mb": size_mb, "rows": rows, "parallelism": parallelism,
        "copy_pipe_baseline": {"seconds": base_s, "mb_per_s": size_mb / base_s},
        "sluice_snapshot": {"seconds": sluice_s, "mb_per_s": size_mb / sluice_s},
        "ratio": base_s / sluice_s,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

const TYPICAL: &[&str] = &[
    "ALTER TABLE orders ADD COLUMN note text",
    "ALTER TABLE orders ALTER COLUMN email SET NOT NULL",
    "CREATE INDEX CONCURRENTLY orders_note ON orders (note)",
    "ALTER TABLE orders ADD CONSTRAINT qty_pos CHECK (qty > 0) NOT VALID",
    "ALTER TABLE orders RENAME COLUMN note TO memo",
    "CREATE TABLE audit (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), payload jsonb)",
    "UPDATE orders SET status = 'done' WHERE id IN (SELECT order_id FROM items WHERE n > 3)",
    "DROP TABLE IF EXISTS legacy_orders",
];

fn migrations(rounds: u32) -> Result<serde_json::Value> {
    let file: String = (0..1000).map(|i| format!("{};\n", TYPICAL[i % TYPICAL.len()])).collect();
    // Baseline: the parser alone, one call per statement as the checker makes them.
    let t = Instant::now();
    for _ in 0..rounds {
        for s in pg_query::split_with_scanner(&file)? {
            std::hint::black_box(pg_query::parse(s, 0)?);
        }
    }
    let parse_file_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(sluice_ddl::check("bench.sql", &file, &mut sluice_ddl::Model::default())?);
    }
    let check_file_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
    let t = Instant::now();
    let n = rounds * 200;
    for i in 0..n {
        std::hint::black_box(sluice_ddl::check("s.sql", TYPICAL[i as usize % TYPICAL.len()], &mut sluice_ddl::Model::default())?);
    }
    let per_stmt_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    Ok(serde_json::json!({
        "bench": "migrations", "statements_per_file": 1000, "rounds": rounds,
        "parser_only_file_ms": parse_file_ms, "check_file_ms": check_file_ms,
        "check_vs_parser_only": check_file_ms / parse_file_ms,
        "check_single_statement_us": per_stmt_us,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    // Pipeline warnings (retries, halts) on stderr; RUST_LOG=info for more.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let out = match Cli::parse().bench {
        Bench::Throughput { row_bytes, rows, rows_per_txn } => throughput(row_bytes, rows, rows_per_txn).await?,
        Bench::Lag { rate, seconds } => lag(rate, seconds).await?,
        Bench::LargeTxn { rows, row_bytes, max_transaction_memory } => {
            large_txn::large_txn(rows, row_bytes, &max_transaction_memory).await?
        }
        Bench::Iceberg { row_bytes, rows, rows_per_txn, lag_rate, lag_seconds, snapshot_only } => {
            iceberg::iceberg(row_bytes, rows, rows_per_txn, lag_rate, lag_seconds, snapshot_only).await?
        }
        Bench::Snapshot { mb, parallelism, key } => snapshot(mb, parallelism, &key).await?,
        Bench::Resync { rows, rate, seconds } => resync::resync(rows, rate, seconds).await?,
        Bench::SlotLoss { rows } => slots::slot_loss(rows).await?,
        Bench::Tls { rows, row_bytes, rounds, compression } => tls::tls(rows, row_bytes, rounds, &compression).await?,
        Bench::Migrations { rounds } => migrations(rounds)?,
        Bench::Mirror { records, record_bytes, partitions, groups, rate, seconds, sluice_only } => {
            mirror::mirror(records, record_bytes, partitions, groups, rate, seconds, sluice_only).await?
        }
        Bench::Debezium { rows, row_bytes, rows_per_txn, rate, seconds, no_lag, sluice_only, compression } => {
            let args = debezium::Args { rows, row_bytes, per_txn: rows_per_txn, rate, seconds, skip_lag: no_lag, sluice_only, compression };
            debezium::debezium(args).await?
        }
        Bench::DdlTrigger { statements, rounds } => ddl::ddl_trigger(statements, rounds).await?,
        Bench::Enrich { rows, customers } => enrich::enrich(rows, customers).await?,
        Bench::Control { pipelines, idle_seconds } => control::control(pipelines, idle_seconds).await?,
        Bench::Registry { schemas } => registry(schemas).await?,
        Bench::Kafka { rows, rows_per_txn, rate, seconds } => kafka(rows, rows_per_txn, rate, seconds).await?,
        Bench::MetricsSummary { scale, queries, rate, seconds, refresh_ms } => {
            search::metrics_summary(scale, queries, rate, seconds, refresh_ms).await?
        }
        Bench::SearchServe { addr, data, refresh_ms } => return search::serve(addr, data, refresh_ms).await,
    };
    println!("{out}");
    Ok(())
}
