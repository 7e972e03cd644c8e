//! `sluice-bench debezium`: Sluice against Debezium's Postgres connector (3.6.1.Final,
//! its embedded engine; jars from Maven Central, a small harness compiled beside them)
//! over the same WAL of one source, each from its own slot of the same publication:
//!
//! - the yardsticks: Postgres decoding the slot server-side (`pg_logical_slot_peek_
//!   binary_changes` counted in SQL) and `pg_recvlogical` draining it;
//! - into nothing: Sluice's whole pipeline into the memory sink without keeping
//!   (batching, checkpointing, metrics) against Debezium into a consumer that counts;
//! - into Kafka as JSON (Debezium's envelope, no schema block), same broker: Sluice's
//!   Kafka sink against Debezium's records sent as Debezium Server's Kafka sink does;
//! - lag at a steady rate into Kafka, read off the topics the same way for both: each
//!   record's broker timestamp minus its `source.ts_ms` (the source commit time).
//!
//! Every pipeline runs in its own process: rows/s from process start to the last change
//! delivered, CPU seconds and peak RSS (`VmHWM`) of that process alone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use serde_json::{Value, json};
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD};
use tokio_postgres::Client;

use crate::procs::{Proc, context_switches, events_applied, free_port, java, maven_libs, sluice_bin, usage};

const DEBEZIUM: &str = "3.6.1.Final";
/// Kafka Connect's default heap (`KAFKA_HEAP_OPTS`), what a Debezium deployment gets
/// unless someone tunes it.
const DEBEZIUM_HEAP: &str = "-Xmx2g";

/// The harness: Debezium's jars and the compiled `DebeziumBench` class.
fn harness(work: &Path) -> Result<String> {
    let pom = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/debezium/pom.xml"));
    let libs = maven_libs(&format!("debezium-{DEBEZIUM}"), pom, &format!("debezium-embedded-{DEBEZIUM}.jar"))?;
    let classes = work.join("classes");
    let javac = Command::new(std::env::var("JAVAC").unwrap_or_else(|_| "javac".into()))
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg("-d")
        .arg(&classes)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/debezium/DebeziumBench.java"))
        .status()
        .context("run javac (install a JDK)")?;
    if !javac.success() {
        bail!("javac could not compile bench/debezium/DebeziumBench.java");
    }
    Ok(format!("{}:{}/*", classes.display(), libs.display()))
}

struct Setup {
    src: u16,
    state: u16,
    brokers: String,
    work: PathBuf,
    classpath: String,
    /// The producers' `compression.type`.
    compression: String,
}

impl Setup {
    fn source(&self) -> String {
        format!(
            "{{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench, tables: [public.bench]}}",
            self.src
        )
    }

    fn state(&self) -> String {
        format!("{{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench}}", self.state)
    }

    /// Sluice's pipeline `name` into `sink` (`null` or `kafka`), no snapshot.
    fn sluice_yaml(&self, name: &str, sink: &str) -> String {
        let sink = match sink {
            "null" => format!("{{memory: {{name: bench, keep: false, state: {}}}}}", self.state()),
            _ => format!(
                "{{kafka: {{brokers: '{}', encoding: json, properties: {{compression.type: {}}}, state: {}}}}}",
                self.brokers,
                self.compression,
                self.state()
            ),
        };
        format!("pipeline: {name}\nsource: {}\nsink: {sink}\nsnapshot: {{enabled: false}}\n", self.source())
    }

    fn spawn_sluice(&self, name: &str, sink: &str, metrics: u16) -> Result<Proc> {
        let cfg = self.work.join(format!("{name}.yaml"));
        std::fs::write(&cfg, self.sluice_yaml(name, sink))?;
        let log = std::fs::File::create(self.work.join(format!("{name}.log")))?;
        Ok(Proc(
            Command::new(sluice_bin()?)
                .args(["run", "--log", "warn", "--metrics-addr", &format!("127.0.0.1:{metrics}"), "-c"])
                .arg(&cfg)
                .stderr(log)
                .stdout(Stdio::null())
                .spawn()?,
        ))
    }

    /// Debezium from `slot` into `mode` (`null` or `kafka`); with `expect`, it exits after
    /// that many changes and prints its figures on stdout.
    fn spawn_debezium(&self, slot: &str, mode: &str, topic: &str, expect: u64) -> Result<std::process::Child> {
        let log = std::fs::File::create(self.work.join(format!("debezium-{slot}.log")))?;
        Ok(java()
            .args([DEBEZIUM_HEAP, "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", &self.classpath, "DebeziumBench"])
            .args(["--mode", mode, "--expect", &expect.to_string(), "--port", &self.src.to_string()])
            .args(["--user", SUPERUSER, "--password", SUPERUSER_PASSWORD, "--database", "bench"])
            .args(["--slot", slot, "--publication", "sluice_null", "--brokers", &self.brokers, "--topic", topic])
            .args(["--compression", &self.compression])
            .stderr(log)
            .stdout(Stdio::piped())
            .spawn()?)
    }
}

/// Runs Sluice's pipeline `name` until `rows` changes are applied: its figures.
fn sluice_run(setup: &Setup, source: &Client, name: &str, sink: &str, rows: u64, mb: f64) -> Result<Value> {
    let port = free_port()?;
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
    let t = Instant::now();
    let mut p = setup.spawn_sluice(name, sink, port)?;
    loop {
        if events_applied(&agent, port) >= rows {
            break;
        }
        if let Some(st) = p.0.try_wait()? {
            bail!("sluice {name} exited ({st}) before {rows} changes; see {}", setup.work.join(format!("{name}.log")).display());
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("sluice {name}: not done within 30 min");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = t.elapsed().as_secs_f64();
    let (cpu, rss) = usage(p.id());
    let (vol, invol) = context_switches(p.id());
    // The walsender serving this pipeline started with it: its CPU is this run's.
    let q = format!("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'sluice_{name}'");
    let walsender: Option<i32> = tokio::runtime::Handle::current().block_on(source.query_one(&q, &[]))?.get(0);
    let walsender_cpu = walsender.map_or(-1.0, |pid| usage(pid as u32).0);
    drop(p);
    Ok(json!({
        "seconds": secs, "rows_per_s": rows as f64 / secs, "mb_per_s": mb / secs,
        "cpu_s": cpu, "cpu_us_per_row": cpu * 1e6 / rows as f64, "peak_rss_mb": rss,
        "context_switches": {"voluntary": vol, "involuntary": invol},
        "walsender_cpu_s": walsender_cpu, "walsender_busy": walsender_cpu / secs,
    }))
}

/// Runs Debezium from `slot` until `rows` changes are delivered: its figures.
fn debezium_run(setup: &Setup, slot: &str, mode: &str, rows: u64, mb: f64) -> Result<Value> {
    let t = Instant::now();
    let child = setup.spawn_debezium(slot, mode, "dbz.public.bench", rows)?;
    let out = child.wait_with_output()?;
    let secs = t.elapsed().as_secs_f64();
    let line = String::from_utf8_lossy(&out.stdout);
    let Some(figures) = line.lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok()) else {
        bail!(
            "Debezium ({mode}) ended without its figures ({}); see {}",
            out.status,
            setup.work.join(format!("debezium-{slot}.log")).display()
        );
    };
    let steady = figures["seconds_first_to_last"].as_f64().unwrap_or(secs);
    let cpu = figures["cpu_s"].as_f64().unwrap_or(-1.0);
    Ok(json!({
        "seconds": secs, "rows_per_s": rows as f64 / secs, "mb_per_s": mb / secs,
        "seconds_first_to_last": steady, "rows_per_s_first_to_last": rows as f64 / steady,
        "cpu_s": cpu, "cpu_us_per_row": cpu * 1e6 / rows as f64, "peak_rss_mb": figures["peak_rss_mb"],
        "heap": DEBEZIUM_HEAP,
    }))
}

/// Produces `n` records of 200 bytes to a topic of their own, acknowledged.
pub(crate) fn warm_up(brokers: &str, n: u64) -> Result<()> {
    use rdkafka::producer::{BaseRecord, Producer as _};
    let p = crate::mirror::producer(brokers)?;
    let payload = [b'w'; 200];
    for i in 0..n {
        let key = i.to_string();
        crate::mirror::send(&p, BaseRecord::to("warmup").key(key.as_bytes()).payload(&payload[..]))?;
    }
    p.flush(Duration::from_secs(120))?;
    Ok(())
}

fn kafka_consumer(brokers: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-lag")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?)
}

/// `(id, lag ms)` of every record of `topic` (all its partitions, from the start):
/// broker timestamp minus the envelope's `source.ts_ms`.
fn topic_lags(brokers: &str, topic: &str) -> Result<Vec<(i64, i64)>> {
    let c = kafka_consumer(brokers)?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    for p in 0..parts {
        let (lo, hi) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        remaining += hi - lo;
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut out = Vec::with_capacity(remaining as usize);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (out.len() as i64) < remaining {
        if Instant::now() > deadline {
            bail!("reading {topic}: {} of {remaining} records", out.len());
        }
        let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
        let m = m?;
        let ts = m.timestamp().to_millis().unwrap_or(0);
        let v: Value = m.payload().map(serde_json::from_slice).transpose()?.unwrap_or(Value::Null);
        let id = v["after"]["id"].as_i64().unwrap_or(-1);
        let at = v["source"]["ts_ms"].as_i64().unwrap_or(ts);
        out.push((id, ts - at));
    }
    Ok(out)
}

/// Percentiles of the lags of the records with ids in `ids`.
fn lag_report(lags: &[(i64, i64)], ids: std::ops::RangeInclusive<i64>, achieved: f64) -> Value {
    let mut v: Vec<f64> = lags.iter().filter(|(id, _)| ids.contains(id)).map(|(_, l)| *l as f64).collect();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| sluice::metrics_summary::quantile(&v, q);
    json!({"records": v.len(), "achieved_rows_per_s": achieved, "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

/// Rows in `topic` now (sum of its partitions' high watermarks; 0 before it exists).
fn topic_len(brokers: &str, topic: &str) -> Result<i64> {
    let c = kafka_consumer(brokers)?;
    let Ok(md) = c.fetch_metadata(Some(topic), Duration::from_secs(5)) else { return Ok(0) };
    let parts = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    let mut n = 0;
    for p in 0..parts {
        n += c.fetch_watermarks(topic, p, Duration::from_secs(5)).map_or(0, |(_, hi)| hi);
    }
    Ok(n)
}

/// Waits until `topic` holds at least `n` records.
async fn wait_topic(brokers: &str, topic: &str, n: i64, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (b, t) = (brokers.to_string(), topic.to_string());
        if tokio::task::spawn_blocking(move || topic_len(&b, &t)).await?? >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: {topic} did not reach {n} records in 5 min");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lag of one peer at a steady rate, from a slot made just before it started (so
/// it has no backlog): once it is streaming (a marker row reached `topic`), `rate` rows/s
/// are written for `seconds` with ids from `first_id`; the ids written and the rate.
async fn lag_run(
    s: &Client,
    brokers: &str,
    topic: &str,
    first_id: u64,
    rate: u64,
    seconds: u64,
) -> Result<(std::ops::RangeInclusive<i64>, f64)> {
    crate::insert_rows(s, first_id - 1, 1, 168).await?;
    wait_topic(brokers, topic, 1, "starting").await?;
    let (written, achieved) = crate::steady_load(s, first_id, rate, seconds).await?;
    wait_topic(brokers, topic, 1 + written as i64, "the steady load").await?;
    Ok((first_id as i64..=(first_id + written - 1) as i64, achieved))
}

/// What `sluice-bench debezium` was asked for.
pub struct Args {
    pub rows: u64,
    pub row_bytes: usize,
    pub per_txn: u64,
    pub rate: u64,
    pub seconds: u64,
    pub skip_lag: bool,
    pub sluice_only: bool,
    /// The producers' `compression.type`.
    pub compression: String,
}

#[allow(clippy::too_many_lines)]
pub async fn debezium(args: Args) -> Result<Value> {
    let Args { rows, row_bytes, per_txn, rate, seconds, skip_lag, sluice_only, compression } = args;
    let work = tempfile::tempdir()?;
    let classpath = if sluice_only { String::new() } else { harness(work.path())? };
    let (src, dst) = crate::servers().await?;
    let broker = tokio::task::spawn_blocking(|| sluice_kafka::broker::TempBroker::start(&[])).await??;
    let setup = Setup {
        src: src.port,
        state: dst.port,
        brokers: broker.addr().to_string(),
        work: work.path().to_path_buf(),
        classpath,
        compression,
    };

    let s = crate::connect(src.port, "bench").await?;
    s.batch_execute("CREATE TABLE bench (id int8 PRIMARY KEY, payload text); ALTER TABLE bench ALTER COLUMN payload SET STORAGE PLAIN")
        .await?;
    // Sluice's pipelines create their publications and slots (then stop); Debezium reads
    // Sluice's publication from slots of its own, made now, before the WAL is written.
    for (name, sink) in [("null", "null"), ("kafka", "kafka")] {
        let (_, stop, handle) = crate::start_pipeline(&setup.sluice_yaml(name, sink))?;
        let q = format!("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sluice_{name}' AND active)");
        while !s.query_one(&q, &[]).await?.get::<_, bool>(0) {
            if handle.is_finished() {
                handle.await??;
                bail!("pipeline {name} stopped");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(true);
        handle.await??;
    }
    for slot in ["recv_slot", "peek_slot", "dbz_null", "dbz_kafka"] {
        s.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")).await?;
    }
    let end = crate::write_rows(&s, rows, row_bytes, per_txn).await?;
    let mb = rows as f64 * row_bytes as f64 / 1e6;

    // The yardsticks: the server's own decoding, and pg_recvlogical.
    let t = Instant::now();
    let decoded: i64 = s
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('peek_slot', $1::text::pg_lsn, NULL, \
             'proto_version', '1', 'publication_names', 'sluice_null')",
            &[&end],
        )
        .await?
        .get(0);
    let decode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    crate::recvlogical(src.port, "recv_slot", "sluice_null", &end)?;
    let recv_s = t.elapsed().as_secs_f64();

    eprintln!("Sluice into the null sink...");
    let sluice_null = tokio::task::block_in_place(|| sluice_run(&setup, &s, "null", "null", rows, mb))?;
    // Debezium over the same path, unless only Sluice is measured.
    let debezium = |slot: &str, sink: &str, into: &str| -> Result<Value> {
        if sluice_only {
            return Ok(Value::Null);
        }
        eprintln!("Debezium into {into}...");
        tokio::task::block_in_place(|| debezium_run(&setup, slot, sink, rows, mb))
    };
    let dbz_null = debezium("dbz_null", "null", "a counting consumer")?;
    // The broker's JVM compiles its hot paths during its first heavy load: it gets that
    // load now, so neither peer pays for it.
    eprintln!("warming the broker up...");
    let b = setup.brokers.clone();
    tokio::task::spawn_blocking(move || warm_up(&b, 300_000)).await??;
    eprintln!("Sluice into Kafka (JSON)...");
    let sluice_kafka = tokio::task::block_in_place(|| sluice_run(&setup, &s, "kafka", "kafka", rows, mb))?;
    let dbz_kafka = debezium("dbz_kafka", "kafka", "Kafka (JSON)")?;
    let topics: &[(&str, &str)] = if sluice_only {
        &[("kafka.public.bench", "Sluice")]
    } else {
        &[("kafka.public.bench", "Sluice"), ("dbz.public.bench", "Debezium")]
    };
    for &(topic, who) in topics {
        let n = topic_len(&setup.brokers, topic)?;
        if n < rows as i64 {
            bail!("{who}'s topic {topic} holds {n} records, expected at least {rows}");
        }
    }

    let lag = if skip_lag || sluice_only {
        Value::Null
    } else {
        eprintln!("lag at {rate} rows/s, Sluice then Debezium...");
        let first = rows + 2;
        let p = setup.spawn_sluice("lag", "kafka", free_port()?)?;
        let q = "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sluice_lag' AND active)";
        while !s.query_one(q, &[]).await?.get::<_, bool>(0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (s_ids, s_rate) = lag_run(&s, &setup.brokers, "lag.public.bench", first, rate, seconds).await?;
        drop(p);
        s.batch_execute("SELECT pg_create_logical_replication_slot('dbz_lag', 'pgoutput')").await?;
        let d = Proc(setup.spawn_debezium("dbz_lag", "kafka", "dbzlag.public.bench", 0)?);
        let (d_ids, d_rate) = lag_run(&s, &setup.brokers, "dbzlag.public.bench", *s_ids.end() as u64 + 2, rate, seconds).await?;
        drop(d);
        let b = setup.brokers.clone();
        let (sl, dl) = tokio::task::spawn_blocking(move || -> Result<_> {
            Ok((topic_lags(&b, "lag.public.bench")?, topic_lags(&b, "dbzlag.public.bench")?))
        })
        .await??;
        json!({"rate": rate, "seconds": seconds, "sluice_kafka": lag_report(&sl, s_ids, s_rate), "debezium_kafka": lag_report(&dl, d_ids, d_rate),
               "note": "broker timestamp (producer create time) minus source.ts_ms (source commit time), ms"})
    };

    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let recv_rate = rows as f64 / recv_s;
    Ok(json!({
        "bench": "debezium", "debezium": DEBEZIUM, "row_bytes": row_bytes, "rows": rows, "rows_per_txn": per_txn, "mb": mb,
        "server_decode": {"seconds": decode_s, "rows_per_s": rows as f64 / decode_s, "messages": decoded},
        "pg_recvlogical": {"seconds": recv_s, "rows_per_s": recv_rate, "mb_per_s": mb / recv_s},
        "sluice_null": sluice_null, "debezium_null": dbz_null,
        "sluice_kafka_json": sluice_kafka, "debezium_kafka_json": dbz_kafka,
        "ratios": {
            "null_sluice_vs_debezium": f(&sluice_null, "rows_per_s") / f(&dbz_null, "rows_per_s"),
            "null_sluice_vs_debezium_first_to_last": f(&sluice_null, "rows_per_s") / f(&dbz_null, "rows_per_s_first_to_last"),
            "null_rss_sluice_over_debezium": f(&sluice_null, "peak_rss_mb") / f(&dbz_null, "peak_rss_mb"),
            "kafka_sluice_vs_debezium": f(&sluice_kafka, "rows_per_s") / f(&dbz_kafka, "rows_per_s"),
            "kafka_sluice_vs_debezium_first_to_last": f(&sluice_kafka, "rows_per_s") / f(&dbz_kafka, "rows_per_s_first_to_last"),
            "kafka_rss_sluice_over_debezium": f(&sluice_kafka, "peak_rss_mb") / f(&dbz_kafka, "peak_rss_mb"),
            "sluice_null_vs_recvlogical": f(&sluice_null, "rows_per_s") / recv_rate,
            "sluice_kafka_vs_sluice_null": f(&sluice_kafka, "rows_per_s") / f(&sluice_null, "rows_per_s"),
            "recvlogical_vs_server_decode": decode_s / recv_s,
        },
        "lag": lag,
    }))
}
