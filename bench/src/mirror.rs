//! `sluice-bench mirror`: Kafka to Kafka between two real single-node clusters, in one
//! run: a raw copy (consume A, produce to B, no transactions: the limit here), Sluice's
//! mirror and MirrorMaker 2 (dedicated mode, jars from Maven Central), each over the
//! same backlog of `records` records; then how exactly each translates 1,000 consumer
//! groups committed at random offsets, and the end-to-end lag of each at a steady rate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use rand::Rng as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde_json::{Value, json};
use sluice_kafka::broker::TempBroker;

use crate::procs::{Proc, java, maven_libs, sluice_bin, usage};

const TOPIC: &str = "bench";
const LAG_TOPIC: &str = "lagt";
const MM2_VERSION: &str = "4.3.1";

pub async fn mirror(
    records: u64,
    bytes: usize,
    partitions: i32,
    groups: usize,
    rate: u64,
    seconds: u64,
    sluice_only: bool,
) -> Result<Value> {
    tokio::task::spawn_blocking(move || run(records, bytes, partitions, groups, rate, seconds, sluice_only)).await?
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// MirrorMaker 2's jars, fetched once from Maven Central into a cache outside the clone.
fn mm2_libs() -> Result<PathBuf> {
    let pom = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/mm2/pom.xml"));
    maven_libs(&format!("mirrormaker2-{MM2_VERSION}"), pom, &format!("connect-mirror-{MM2_VERSION}.jar"))
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client(brokers).create()?;
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in futures::executor::block_on(admin.create_topics([&t], &AdminOptions::new()))? {
        r.map_err(|(t, e)| anyhow::anyhow!("create {t}: {e}"))?;
    }
    Ok(())
}

pub(crate) fn producer(brokers: &str) -> Result<BaseProducer> {
    Ok(client(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", "131072")
        .create()?)
}

/// Hands a record to the producer, serving deliveries while its queue is full.
pub(crate) fn send(p: &BaseProducer, mut rec: BaseRecord<'_, [u8], [u8]>) -> Result<()> {
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                p.poll(Duration::from_millis(10));
            }
            Err((e, _)) => bail!("produce: {e}"),
        }
    }
}

/// The backlog: `n` records of `bytes` bytes (keyed, with a header), spread by key.
fn produce_backlog(brokers: &str, n: u64, bytes: usize) -> Result<()> {
    let p = producer(brokers)?;
    let mut rng = rand::rng();
    let mut value = vec![0u8; bytes];
    for i in 0..n {
        rng.fill(&mut value[..]);
        let key = format!("k{}", i % 10_000);
        let headers = OwnedHeaders::new().insert(rdkafka::message::Header { key: "seq", value: Some(&i.to_string()) });
        let rec = BaseRecord::to(TOPIC).key(key.as_bytes()).payload(&value[..]).headers(headers);
        send(&p, rec)?;
    }
    p.flush(Duration::from_secs(120))?;
    Ok(())
}

fn consumer(brokers: &str, group: &str) -> Result<BaseConsumer> {
    Ok(client(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "52428800")
        .create()?)
}

fn ends(brokers: &str, topic: &str, partitions: i32) -> Result<Vec<i64>> {
    let c = consumer(brokers, "bench-watermarks")?;
    (0..partitions).map(|p| Ok(c.fetch_watermarks(topic, p, Duration::from_secs(10))?.1)).collect()
}

/// Rate over the part of the run from 10% to 100% of the records: steady state, without
/// each tool's start-up (a JVM and a Connect worker for MirrorMaker 2).
struct Progress {
    total: u64,
    start: Instant,
    at10: Option<(Instant, u64)>,
}

impl Progress {
    fn new(total: u64) -> Self {
        Self { total, start: Instant::now(), at10: None }
    }
    fn see(&mut self, done: u64) -> bool {
        if self.at10.is_none() && done * 10 >= self.total {
            self.at10 = Some((Instant::now(), done));
        }
        done >= self.total
    }
    fn rate(&self) -> f64 {
        let (t, d) = self.at10.unwrap_or((self.start, 0));
        (self.total - d) as f64 / t.elapsed().as_secs_f64()
    }
}

/// The limit: one consumer of A and one idempotent producer to B, records copied as
/// they are (key, value, headers, timestamp, partition), no transactions.
fn raw_copy(a: &str, b: &str, n: u64, partitions: i32) -> Result<f64> {
    create_topic(b, "raw.bench", partitions)?;
    // The limit gets the prefetch tuning the mirror has (without it, librdkafka's
    // queue backoff idles the consumer up to a second at a time).
    let c: BaseConsumer = client(a)
        .set("group.id", "bench-raw")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "52428800")
        .set("queued.min.messages", "20000")
        .set("queued.max.messages.kbytes", "32768")
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let p = producer(b)?;
    let mut prog = Progress::new(n);
    let mut done = 0;
    while done < n {
        let Some(m) = c.poll(Duration::from_secs(10)) else { bail!("raw copy: no record for 10 s at {done}") };
        let m = m?;
        let mut rec = BaseRecord::to("raw.bench").partition(m.partition());
        rec.key = m.key();
        rec.payload = m.payload();
        if let Some(h) = m.headers() {
            rec = rec.headers(h.detach());
        }
        if let Some(ts) = m.timestamp().to_millis() {
            rec = rec.timestamp(ts);
        }
        send(&p, rec)?;
        done += 1;
        if done < n {
            prog.see(done);
        }
    }
    p.flush(Duration::from_secs(120))?;
    prog.see(done);
    Ok(prog.rate())
}

fn spawn_sluice(bin: &Path, dir: &Path, name: &str, a: &str, b: &str, topics: &str) -> Result<Proc> {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "pipeline: {name}\nsource:\n  kafka: {{cluster: src, brokers: \"{a}\", topics: [{topics}]}}\nsink:\n  kafka: {{cluster: b, brokers: \"{b}\"}}\n\
             offsets: {{groups: \"bench-.*\", interval: 1s}}\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok(Proc(
        Command::new(bin)
            .args(["mirror", "run", "-c"])
            .arg(&cfg)
            .env("RUST_LOG", std::env::var("SLUICE_BENCH_MIRROR_LOG").unwrap_or_else(|_| "warn".into()))
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()?,
    ))
}

fn spawn_mm2(libs: &Path, dir: &Path, a: &str, b: &str) -> Result<Proc> {
    let props = dir.join("mm2.properties");
    std::fs::write(
        &props,
        format!(
            "clusters = a, b\na.bootstrap.servers = {a}\nb.bootstrap.servers = {b}\na->b.enabled = true\na->b.topics = {TOPIC}, {LAG_TOPIC}\n\
             b->a.enabled = false\na->b.groups = bench-.*\nreplication.factor = 1\ncheckpoints.topic.replication.factor = 1\n\
             heartbeats.topic.replication.factor = 1\noffset-syncs.topic.replication.factor = 1\noffset.storage.replication.factor = 1\n\
             status.storage.replication.factor = 1\nconfig.storage.replication.factor = 1\nsync.group.offsets.enabled = true\n\
             sync.group.offsets.interval.seconds = 1\nemit.checkpoints.interval.seconds = 1\nrefresh.topics.interval.seconds = 5\n\
             refresh.groups.interval.seconds = 5\ntasks.max = 2\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("mm2.log"))?;
    Ok(Proc(
        java()
            .args(["-Xmx1g", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp"])
            .arg(format!("{}/*", libs.display()))
            .arg("org.apache.kafka.connect.mirror.MirrorMaker")
            .arg(&props)
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()?,
    ))
}

/// Waits until `done()` reaches `n`; the steady rate.
fn watch(n: u64, limit: Duration, mut done: impl FnMut() -> Result<u64>) -> Result<f64> {
    let mut prog = Progress::new(n);
    let deadline = Instant::now() + limit;
    loop {
        if prog.see(done()?) {
            return Ok(prog.rate());
        }
        if Instant::now() > deadline {
            bail!("not done within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Offsets of the records (not markers) of each partition of a target topic.
fn record_offsets(brokers: &str, topic: &str, partitions: i32, n: u64) -> Result<Vec<Vec<i64>>> {
    let c = consumer(brokers, "bench-truth")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut out = vec![Vec::new(); partitions as usize];
    let mut got = 0;
    while got < n {
        let Some(m) = c.poll(Duration::from_secs(10)) else { bail!("{topic}: {got} of {n} records") };
        let m = m?;
        out[m.partition() as usize].push(m.offset());
        got += 1;
    }
    Ok(out)
}

/// Each group's committed offset of `topic` on B, compared with where it should be:
/// the target offset of the record it would have read next on A.
fn score(b: &str, topic: &str, groups: &[(String, i32, i64)], truth: &[Vec<i64>]) -> Result<Value> {
    let (mut exact, mut reread, mut skipped, mut untranslated, mut worst) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for (g, p, c) in groups {
        let cons = consumer(b, g)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, *p);
        let got = cons.committed_offsets(tpl, Duration::from_secs(10))?;
        let Some(Offset::Offset(t)) = got.elements().first().map(|e| e.offset()) else {
            untranslated += 1;
            continue;
        };
        let offs = &truth[*p as usize];
        // Source offsets are dense here (no transactions on A): the record index is c.
        let want = offs.get(*c as usize).copied().unwrap_or_else(|| offs.last().map_or(0, |o| o + 1));
        let idx = |x: i64| offs.partition_point(|o| *o < x) as u64;
        let (iw, it) = (idx(want), idx(t));
        if it == iw {
            exact += 1;
        } else if it < iw {
            reread += iw - it;
            worst = worst.max(iw - it);
        } else {
            skipped += it - iw;
            worst = worst.max(it - iw);
        }
    }
    Ok(
        json!({"exact": exact, "records_reread": reread, "records_skipped": skipped, "untranslated": untranslated, "worst_group_records_off": worst}),
    )
}

/// Groups on A committed at random offsets of the backlog.
fn commit_groups(a: &str, n: usize, ends: &[i64]) -> Result<Vec<(String, i32, i64)>> {
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let p = rng.random_range(0..ends.len()) as i32;
        let c = rng.random_range(0..=ends[p as usize]);
        let g = format!("bench-{i}");
        let cons = consumer(a, &g)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(TOPIC, p, Offset::Offset(c))?;
        cons.commit(&tpl, CommitMode::Sync)?;
        out.push((g, p, c));
    }
    Ok(out)
}

fn all_committed(b: &str, topic: &str, groups: &[(String, i32, i64)]) -> Result<usize> {
    let mut n = 0;
    for (g, p, _) in groups {
        let cons = consumer(b, g)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, *p);
        if matches!(cons.committed_offsets(tpl, Duration::from_secs(10))?.elements().first().map(|e| e.offset()), Some(Offset::Offset(_))) {
            n += 1;
        }
    }
    Ok(n)
}

/// Records at `rate`/s into A's lag topic (timestamp: when produced) while a consumer
/// of `target` on B measures when each arrives; p50 and p99 in ms.
fn lag(a: &str, b: &str, target: &str, partitions: i32, rate: u64, seconds: u64) -> Result<Value> {
    let c = consumer(b, "bench-lag")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait for the mirror to have created the topic, then read from its end.
    while ends(b, target, partitions).is_err() {
        if Instant::now() > deadline {
            bail!("{target} never appeared on b");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(target, p, Offset::End)?;
    }
    c.assign(&tpl)?;
    let _ = c.poll(Duration::from_millis(500));
    let a2 = a.to_string();
    let writer = std::thread::spawn(move || -> Result<()> {
        let p = producer(&a2)?;
        let start = Instant::now();
        let value = vec![7u8; 1000];
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(seconds) {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while i < due {
                let key = format!("k{i}");
                send(&p, BaseRecord::to(LAG_TOPIC).key(key.as_bytes()).payload(&value[..]).timestamp(now_ms()))?;
                i += 1;
            }
            p.poll(Duration::from_millis(1));
        }
        p.flush(Duration::from_secs(30))?;
        Ok(())
    });
    let mut lags = Vec::new();
    let end = Instant::now() + Duration::from_secs(seconds + 5);
    // The first 2 s are warm-up (the mirror's first transactions, the topic's first
    // fetches): the figure is the steady state.
    let steady = now_ms() + 2000;
    while Instant::now() < end {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100))
            && let Some(ts) = m.timestamp().to_millis()
            && ts >= steady
        {
            lags.push(now_ms() - ts);
        }
    }
    writer.join().map_err(|_| anyhow::anyhow!("lag writer panicked"))??;
    lags.sort_unstable();
    let q = |f: f64| lags.get(((lags.len() as f64 - 1.0) * f) as usize).copied().unwrap_or(-1);
    Ok(json!({"records": lags.len(), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": lags.last()}))
}

fn run(n: u64, bytes: usize, partitions: i32, groups: usize, rate: u64, seconds: u64, sluice_only: bool) -> Result<Value> {
    let libs = mm2_libs()?;
    let bin = sluice_bin()?;
    let dir = tempfile::Builder::new().prefix("sluice-bench-mirror-").tempdir()?;
    eprintln!("logs in {} (kept with SLUICE_BENCH_MIRROR_LOG set)", dir.path().display());
    let ta = std::thread::spawn(|| TempBroker::start(&[]));
    let tb = TempBroker::start(&[])?;
    let ta = ta.join().map_err(|_| anyhow::anyhow!("broker a"))??;
    let (a, b) = (ta.addr().to_string(), tb.addr().to_string());
    create_topic(&a, TOPIC, partitions)?;
    create_topic(&a, LAG_TOPIC, partitions)?;
    let t = Instant::now();
    produce_backlog(&a, n, bytes)?;
    eprintln!("backlog: {n} records of {bytes} B in {:.1} s", t.elapsed().as_secs_f64());
    let ends_a = ends(&a, TOPIC, partitions)?;
    let committed = commit_groups(&a, groups, &ends_a)?;
    let mb = |r: f64| r * bytes as f64 / 1e6;

    let raw = raw_copy(&a, &b, n, partitions)?;
    eprintln!("raw copy: {raw:.0} records/s");

    let sluice = spawn_sluice(&bin, dir.path(), "bench", &a, &b, TOPIC)?;
    let pid = sluice.0.id();
    // Sluice's committed positions, followed in its offsets topic by one long-lived
    // read_committed consumer (a new client per probe would tax the 2 cores the run
    // shares).
    let probe = consumer(&b, "bench-probe")?;
    let otopic = sluice_mirror::MirrorConfig::parse(&std::fs::read_to_string(dir.path().join("bench.yaml"))?)
        .map_err(anyhow::Error::msg)?
        .offsets_topic();
    let mut assigned = false;
    let mut next: BTreeMap<(String, i32), u64> = BTreeMap::new();
    let s_rate = watch(n, Duration::from_secs(600), || {
        if !assigned {
            if probe.fetch_watermarks(&otopic, 0, Duration::from_secs(1)).is_err() {
                return Ok(0); // not created yet
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&otopic, 0, Offset::Beginning)?;
            probe.assign(&tpl)?;
            assigned = true;
        }
        while let Some(m) = probe.poll(Duration::from_millis(10)) {
            let b: sluice_mirror::offsets::BatchOffsets = serde_json::from_slice(m?.payload().unwrap_or_default())?;
            next.insert((b.topic, b.partition), b.next as u64);
        }
        Ok(next.iter().filter(|((t, _), _)| t == TOPIC).map(|(_, n)| n).sum())
    })?;
    let (s_cpu, s_rss) = usage(pid);
    eprintln!("sluice mirror: {s_rate:.0} records/s");
    let wait_groups = |topic: &str| -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = (0, Instant::now());
        loop {
            let n = all_committed(&b, topic, &committed)?;
            if n == committed.len() || Instant::now() > deadline || (n > 0 && n == last.0 && last.1.elapsed() > Duration::from_secs(20)) {
                return Ok(n);
            }
            if n != last.0 {
                last = (n, Instant::now());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    };
    wait_groups("src.bench")?;
    let s_truth = record_offsets(&b, "src.bench", partitions, n)?;
    let s_score = score(&b, "src.bench", &committed, &s_truth)?;
    drop(sluice);
    let s_lag = {
        let _p = spawn_sluice(&bin, dir.path(), "lag", &a, &b, LAG_TOPIC)?;
        lag(&a, &b, "src.lagt", partitions, rate, seconds)?
    };
    eprintln!("sluice: translation {s_score}, lag {s_lag}");
    if sluice_only {
        if std::env::var_os("SLUICE_BENCH_MIRROR_LOG").is_some() {
            let _ = dir.keep();
        }
        return Ok(json!({"bench": "mirror", "records": n, "raw_copy": raw.round(), "sluice": s_rate.round(), "vs_raw": s_rate / raw,
                         "sluice_cpu_s": s_cpu, "translation": s_score, "lag": s_lag}));
    }

    let mm2 = spawn_mm2(&libs, dir.path(), &a, &b)?;
    let mpid = mm2.0.id();
    let ends_b = consumer(&b, "bench-mm2-watch")?;
    let m_rate = watch(n, Duration::from_secs(900), || {
        let mut sum = 0;
        for p in 0..partitions {
            sum += ends_b.fetch_watermarks("a.bench", p, Duration::from_secs(10)).map_or(0, |w| w.1) as u64;
        }
        Ok(sum)
    })?;
    let (m_cpu, m_rss) = usage(mpid);
    eprintln!("mirrormaker 2: {m_rate:.0} records/s");
    wait_groups("a.bench")?;
    let m_truth = record_offsets(&b, "a.bench", partitions, n)?;
    let m_score = score(&b, "a.bench", &committed, &m_truth)?;
    let m_lag = lag(&a, &b, "a.lagt", partitions, rate, seconds)?;
    drop(mm2);
    if std::env::var_os("SLUICE_BENCH_MIRROR_LOG").is_some() {
        let _ = dir.keep();
    }

    let round = |x: f64| (x * 100.0).round() / 100.0;
    let by_partition: BTreeMap<i32, i64> = ends_a.iter().enumerate().map(|(p, e)| (p as i32, *e)).collect();
    Ok(json!({
        "bench": "mirror",
        "records": n, "record_bytes": bytes, "partitions": partitions, "records_by_partition": by_partition,
        "raw_copy": {"records_per_s": raw.round(), "mb_per_s": round(mb(raw))},
        "sluice": {"records_per_s": s_rate.round(), "mb_per_s": round(mb(s_rate)), "vs_raw": round(s_rate / raw),
                   "cpu_s": round(s_cpu), "peak_rss_mb": round(s_rss)},
        "mirrormaker2": {"version": MM2_VERSION, "records_per_s": m_rate.round(), "mb_per_s": round(mb(m_rate)), "vs_raw": round(m_rate / raw),
                         "cpu_s": round(m_cpu), "peak_rss_mb": round(m_rss)},
        "sluice_vs_mirrormaker2": round(s_rate / m_rate),
        "translation": {"groups": committed.len(), "sluice": s_score, "mirrormaker2": m_score},
        "lag": {"rate": rate, "seconds": seconds, "sluice": s_lag, "mirrormaker2": m_lag},
    }))
}
