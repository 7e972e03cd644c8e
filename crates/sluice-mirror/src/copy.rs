//! The mirror's loop: read a batch from the source (`read_committed`), write it to the
//! target in one transaction together with the batch's offsets records, commit, and
//! go on. A crash anywhere leaves either the whole batch (records and positions) or
//! none of it on the target; the next start fences the old producer (same
//! transactional id), reads the positions back and resumes right after the last
//! committed batch, so `read_committed` readers of the target see every record once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use rdkafka::config::FromClientConfigAndContext as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use sluice_kafka::probe::Guarded;

use crate::checkpoint::GroupSync;
use crate::clusters::{Side, SourceTopic, TargetTopics, client_config, consumer, copy_consumer, metadata, source_topics};
use crate::config::{HEARTBEATS_TOPIC, MirrorConfig, PROVENANCE_HEADER, StartFrom};
use crate::error::{MirrorError, Result};
use crate::offsets::{BatchOffsets, OffsetMap, RunBuilder};
use crate::schemas::SchemaIds;
use crate::stats::MirrorStats;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// The delivery tag of offsets records (their acks are not collected).
const OFFSETS_RECORD: usize = usize::MAX;

/// Collects each record's target offset (or error) as the target acknowledges it.
#[derive(Default)]
struct Acks {
    acked: Mutex<Vec<(usize, Result<i64, KafkaError>)>>,
    /// Offsets records acknowledged (their offsets are not needed; a failed one fails
    /// the commit).
    offsets_acked: std::sync::atomic::AtomicUsize,
    guard: Guarded,
}

impl ClientContext for Acks {
    const CHECK_CONNECT: bool = true;

    fn allow_connect(&self, addr: std::net::SocketAddr, broker: &str) -> bool {
        self.guard.allow_connect(addr, broker)
    }
}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &DeliveryResult<'_>, idx: Box<usize>) {
        if *idx == OFFSETS_RECORD {
            self.offsets_acked.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let r = match result {
            Ok(m) => Ok(m.offset()),
            Err((e, _)) => Err(e.clone()),
        };
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).push((*idx, r));
    }
}

/// Runs the mirror until `stop` is set. Errors before the first successful start are
/// returned (bad settings, unreachable clusters); later, retryable ones (a broker
/// restarting) restart the mirror from its last committed batch, with backoff.
pub fn run(cfg: &MirrorConfig, stop: &AtomicBool, stats: &MirrorStats) -> Result<()> {
    let mut started = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = Mirror::start(cfg).and_then(|mut m| {
            started = true;
            m.copy(cfg, stop, stats)
        });
        match result {
            Ok(()) => return Ok(()),
            Err(e) if !started || !e.is_retryable() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "the mirror failed; starting again from its last committed batch");
                stats.restarts.fetch_add(1, Ordering::Relaxed);
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Reads the offsets topic back (committed records only): the resume positions and
/// the offset map.
pub fn load_map(cfg: &MirrorConfig) -> Result<OffsetMap> {
    // A group id because librdkafka's assign wants one; nothing joins or commits to it.
    let c = consumer(cfg, Side::Target, Some(&cfg.transactional_id()))?;
    let topic = cfg.offsets_topic();
    let ctx = |what: &str| format!("reading the offsets topic {topic} on the target: {what}");
    let (_, high) = match c.fetch_watermarks(&topic, 0, Duration::from_secs(10)) {
        Ok(w) => w,
        Err(e)
            if matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownPartition | RDKafkaErrorCode::UnknownTopic)
            ) =>
        {
            return Ok(OffsetMap::default());
        }
        Err(e) => return Err(MirrorError::kafka(&ctx("watermarks"), &e)),
    };
    let mut map = OffsetMap::default();
    if high == 0 {
        return Ok(map);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning).map_err(|e| MirrorError::kafka(&ctx("assign"), &e))?;
    c.assign(&tpl).map_err(|e| MirrorError::kafka(&ctx("assign"), &e))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let b: BatchOffsets = serde_json::from_slice(m.payload().unwrap_or_default()).map_err(|e| {
                    MirrorError::fatal(ctx(&format!("record at offset {} is not a Sluice offsets record ({e})", m.offset())))
                })?;
                map.add(&b);
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(e)) => return Err(MirrorError::kafka(&ctx("fetch"), &e)),
            None => {
                let pos = c.position().map_err(|e| MirrorError::kafka(&ctx("position"), &e))?;
                if let Some(Offset::Offset(p)) = pos.find_partition(&topic, 0).map(|e| e.offset())
                    && p >= high
                {
                    break;
                }
            }
        }
        if Instant::now() > deadline {
            return Err(MirrorError::kafka(&ctx("no progress for 120 s"), &KafkaError::NoMessageReceived));
        }
    }
    Ok(map)
}

struct Mirror {
    source: BaseConsumer<Guarded>,
    /// A plain client of the target, for group listings.
    target: BaseConsumer<Guarded>,
    producer: BaseProducer<Acks>,
    /// Shapes target topics: here at start, then on the side thread.
    targets: Option<TargetTopics>,
    map: OffsetMap,
    topics: Vec<SourceTopic>,
    /// Target topic name of each source topic.
    names: HashMap<String, String>,
    schemas: Option<SchemaIds>,
    /// Reused buffers for keys and values whose schema ids are rewritten.
    bufs: (Vec<u8>, Vec<u8>),
    /// Writes heartbeats into the source's heartbeats topic.
    heartbeat: Option<BaseProducer<Guarded>>,
}

/// What writing one record needs: borrowed field by field beside the source consumer,
/// which the record being copied borrows.
struct Out<'a> {
    producer: &'a BaseProducer<Acks>,
    names: &'a HashMap<String, String>,
    schemas: Option<&'a mut SchemaIds>,
    bufs: &'a mut (Vec<u8>, Vec<u8>),
}

impl Out<'_> {
    fn send(self, cfg: &MirrorConfig, m: &BorrowedMessage<'_>, idx: usize) -> Result<()> {
        let target = self.names.get(m.topic()).map_or_else(|| cfg.target_topic(m.topic()), Clone::clone);
        let mut headers = m.headers().map_or_else(|| OwnedHeaders::new_with_capacity(1), |h| h.detach());
        headers = headers.insert(Header { key: PROVENANCE_HEADER, value: Some(cfg.source().cluster.as_bytes()) });
        let (mut key, mut payload) = (m.key(), m.payload());
        if let Some(ids) = self.schemas {
            let (kb, vb) = self.bufs;
            if let Some(k) = key {
                key = ids.rewrite(cfg, k, kb)?.or(key);
            }
            if let Some(v) = payload {
                payload = ids.rewrite(cfg, v, vb)?.or(payload);
            }
        }
        let mut rec: BaseRecord<'_, [u8], [u8], Box<usize>> =
            BaseRecord::with_opaque_to(&target, Box::new(idx)).partition(m.partition()).headers(headers);
        rec.key = key;
        rec.payload = payload;
        if let Some(ts) = m.timestamp().to_millis() {
            rec = rec.timestamp(ts);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(MirrorError::kafka(&format!("writing to {target} on the target"), &e)),
            }
        }
    }
}

/// One record of the open transaction: where it came from (target offset from its ack).
struct Sent {
    topic: usize,
    partition: i32,
    offset: i64,
    /// The record's timestamp (ms), for the replication latency; key and value bytes.
    ts: Option<i64>,
    bytes: usize,
}

impl Mirror {
    fn start(cfg: &MirrorConfig) -> Result<Mirror> {
        // librdkafka's incremental assignment wants a group id; the mirror never joins
        // or commits to this group (its positions live on the target).
        let source = copy_consumer(cfg, &cfg.transactional_id())?;
        let smeta = metadata(cfg, Side::Source, &source)?;
        let target = consumer(cfg, Side::Target, None)?;
        metadata(cfg, Side::Target, &target)?;

        let mut pc = client_config(cfg, Side::Target);
        pc.set("transactional.id", cfg.transactional_id())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "none")
            .set("transaction.timeout.ms", TXN_TIMEOUT.as_millis().to_string())
            .set("queue.buffering.max.kbytes", "131072");
        let producer = BaseProducer::from_config_and_context(&pc, Acks { guard: Guarded::new(cfg.egress.as_ref()), ..Acks::default() })
            .map_err(|e| MirrorError::kafka("sink.kafka: creating the transactional producer", &e))?;
        let mut topics = source_topics(cfg, &smeta, true)?;
        let targets = TargetTopics::new(cfg)?;
        let heartbeat = if cfg.source().heartbeat_interval.is_zero() {
            None
        } else {
            targets.ensure_heartbeats_topic()?;
            topics = source_topics(cfg, &metadata(cfg, Side::Source, &source)?, true)?;
            let mut hc = client_config(cfg, Side::Source);
            hc.set("enable.idempotence", "true").set("acks", "all");
            Some(
                hc.create_with_context::<_, BaseProducer<Guarded>>(Guarded::new(cfg.egress.as_ref()))
                    .map_err(|e| MirrorError::kafka("source.kafka: creating the heartbeat producer", &e))?,
            )
        };
        // Fences an earlier instance (a crashed one) and aborts its open transaction,
        // so the offsets topic read next holds only committed batches.
        producer.init_transactions(TXN_TIMEOUT).map_err(|e| MirrorError::kafka("sink.kafka: starting transactions on the target", &e))?;
        let map = load_map(cfg)?;
        let mut m = Mirror {
            source,
            target,
            producer,
            targets: Some(targets),
            map,
            topics: vec![],
            names: HashMap::new(),
            schemas: SchemaIds::new(cfg),
            bufs: Default::default(),
            heartbeat,
        };
        // Target topics are checked (partition counts) before anything is created.
        m.follow(cfg, topics)?;
        if let Some(t) = &m.targets {
            t.ensure_offsets_topic(cfg)?;
        }
        tracing::info!(topics = m.topics.len(), partitions = m.map.partitions.len(), "mirror started");
        Ok(m)
    }

    /// Shapes the target topics like `topics` and reads any partition not read yet.
    fn follow(&mut self, cfg: &MirrorConfig, topics: Vec<SourceTopic>) -> Result<()> {
        let tmeta = metadata(cfg, Side::Target, &self.target)?;
        if let Some(t) = self.targets.as_mut() {
            t.sync(cfg, &topics, &tmeta, &self.map)?;
        }
        self.assign(cfg, topics)
    }

    /// Reads the partitions of `topics` not read yet (their target topics are shaped).
    fn assign(&mut self, cfg: &MirrorConfig, topics: Vec<SourceTopic>) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for t in &topics {
            let had = self.topics.iter().find(|x| x.name == t.name).map_or(0, |x| x.partitions);
            for p in had..t.partitions {
                let at = match (self.map.get(&t.name, p), cfg.source().start_from) {
                    (Some(m), _) => Offset::Offset(m.next),
                    (None, StartFrom::Earliest) => Offset::Beginning,
                    (None, StartFrom::Latest) => Offset::End,
                };
                tpl.add_partition_offset(&t.name, p, at).map_err(|e| MirrorError::kafka("assigning partitions", &e))?;
            }
            self.names.insert(t.name.clone(), cfg.target_topic(&t.name));
        }
        if tpl.count() > 0 {
            self.source.incremental_assign(&tpl).map_err(|e| MirrorError::kafka("reading the source's partitions", &e))?;
        }
        self.topics = topics;
        Ok(())
    }

    fn copy(&mut self, cfg: &MirrorConfig, stop: &AtomicBool, stats: &MirrorStats) -> Result<()> {
        // Everything but the copy runs on a thread of its own, with clients of its own:
        // topic discovery, target topic shaping, lag and group offsets are round trips
        // (metadata, configs, watermarks, one per group) that, on the copy's clients,
        // queue behind 50 MB fetch responses and stalled the copy for seconds. It
        // follows the committed batches, and hands new topic lists to the copy, whose
        // target topics it has already made.
        let (committed_tx, committed_rx) = std::sync::mpsc::channel::<Vec<BatchOffsets>>();
        let (topics_tx, topics_rx) = std::sync::mpsc::channel::<Result<Vec<SourceTopic>>>();
        let targets = self.targets.take().map_or_else(|| TargetTopics::new(cfg), Ok)?;
        let side = SideWork::new(cfg, self.map.clone(), self.topics.clone(), targets)?;
        let stopped = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| side.run(cfg, committed_rx, topics_tx, stats, stop, &stopped));
            let r = self.copy_loop(cfg, stop, stats, committed_tx, topics_rx);
            stopped.store(true, Ordering::Relaxed);
            r
        })
    }

    fn copy_loop(
        &mut self,
        cfg: &MirrorConfig,
        stop: &AtomicBool,
        stats: &MirrorStats,
        committed_tx: Sender<Vec<BatchOffsets>>,
        topics_rx: Receiver<Result<Vec<SourceTopic>>>,
    ) -> Result<()> {
        let mut next_beat = Instant::now();
        let mut sent: Vec<Sent> = Vec::with_capacity(cfg.batch.max_records);
        // Source positions this batch reached (last offset + 1), per partition.
        let mut reached: BTreeMap<(usize, i32), i64> = BTreeMap::new();
        let mut topic_ids: HashMap<String, usize> = HashMap::new();
        let mut topic_names: Vec<String> = Vec::new();
        let target_cluster = cfg.target().cluster.as_bytes();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            while let Ok(topics) = topics_rx.try_recv() {
                self.assign(cfg, topics?)?;
            }
            if let Some(hb) = &self.heartbeat
                && now >= next_beat
            {
                let value = serde_json::json!({"source": cfg.source().cluster, "target": cfg.target().cluster, "pipeline": cfg.pipeline, "ts": now_ms()});
                let value = value.to_string();
                // Best effort: a heartbeat that fails to send is simply missing downstream.
                if hb.send(BaseRecord::<str, str>::to(HEARTBEATS_TOPIC).key(&cfg.pipeline).payload(&value)).is_ok() {
                    stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                hb.poll(Duration::ZERO);
                next_beat = now + cfg.source().heartbeat_interval;
            }

            let began = Instant::now();
            let mut open = false;
            while sent.len() < cfg.batch.max_records {
                let left = cfg.batch.max_wait.saturating_sub(began.elapsed());
                if left.is_zero() {
                    break;
                }
                let m = match self.source.poll(left) {
                    None => break,
                    Some(Err(e)) => return Err(MirrorError::kafka("reading the source", &e)),
                    Some(Ok(m)) => m,
                };
                if !open {
                    self.producer.begin_transaction().map_err(|e| MirrorError::kafka("beginning a transaction on the target", &e))?;
                    open = true;
                }
                let tid = intern(&mut topic_ids, &mut topic_names, m.topic());
                reached.insert((tid, m.partition()), m.offset() + 1);
                if m.topic() == HEARTBEATS_TOPIC && m.key() != Some(cfg.pipeline.as_bytes()) {
                    continue; // another pipeline's heartbeat: that pipeline copies it
                }
                if came_from(&m, target_cluster) {
                    stats.looped.fetch_add(1, Ordering::Relaxed);
                    continue; // it was copied from the target: copying it back would loop
                }
                let (ts, bytes) = (m.timestamp().to_millis(), m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len));
                let out = Out { producer: &self.producer, names: &self.names, schemas: self.schemas.as_mut(), bufs: &mut self.bufs };
                out.send(cfg, &m, sent.len())?;
                sent.push(Sent { topic: tid, partition: m.partition(), offset: m.offset(), ts, bytes });
            }
            // The consumer's position also moves past what is not a record to copy
            // (transaction markers, aborted records). A group committing there must
            // translate too, so the batch records those positions, and an otherwise
            // idle round commits them on their own.
            let positions = self.source.position().map_err(|e| MirrorError::kafka("reading the source positions", &e))?;
            for e in positions.elements() {
                let Offset::Offset(pos) = e.offset() else { continue };
                let tid = intern(&mut topic_ids, &mut topic_names, e.topic());
                let known = reached.get(&(tid, e.partition())).copied().or_else(|| self.map.get(e.topic(), e.partition()).map(|m| m.next));
                if known.is_none_or(|k| pos > k) {
                    reached.insert((tid, e.partition()), pos);
                }
            }
            if !open && !reached.is_empty() {
                self.producer.begin_transaction().map_err(|e| MirrorError::kafka("beginning a transaction on the target", &e))?;
                open = true;
            }
            if open {
                tracing::debug!(records = sent.len(), poll_ms = began.elapsed().as_millis() as u64, "batch read");
                let batches = self.commit(cfg, &sent, &reached, &topic_names)?;
                let _ = committed_tx.send(batches);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.records.fetch_add(sent.len() as u64, Ordering::Relaxed);
                stats.bytes.fetch_add(sent.iter().map(|s| s.bytes as u64).sum(), Ordering::Relaxed);
                let committed = now_ms();
                // The latency of each partition's newest record in the batch.
                let mut seen = std::collections::HashSet::new();
                for s in sent.iter().rev() {
                    if let Some(ts) = s.ts
                        && seen.insert((s.topic, s.partition))
                    {
                        stats.partition(&topic_names[s.topic], s.partition, |p| p.latency_ms = Some(committed - ts));
                    }
                }
            }
            sent.clear();
            reached.clear();
        }
        Ok(())
    }

    /// Serves delivery reports until `done`. (librdkafka-rs's `flush` polls in 100 ms
    /// steps and cost each batch two of them: the mirror waits for exactly the acks it
    /// needs instead, so `commit_transaction`'s own flush finds nothing outstanding.)
    fn wait_acks(&self, done: impl Fn(&Acks) -> bool) -> Result<()> {
        let deadline = Instant::now() + TXN_TIMEOUT;
        while !done(self.producer.context()) {
            if Instant::now() > deadline {
                return Err(MirrorError::kafka("waiting for the target's acknowledgements", &KafkaError::NoMessageReceived));
            }
            self.producer.poll(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Waits for every record's ack, writes the batch's offsets records and commits.
    /// Any failure aborts: the caller restarts from the last committed batch.
    fn commit(
        &mut self,
        cfg: &MirrorConfig,
        sent: &[Sent],
        reached: &BTreeMap<(usize, i32), i64>,
        names: &[String],
    ) -> Result<Vec<BatchOffsets>> {
        let t0 = Instant::now();
        self.wait_acks(|a| a.acked.lock().unwrap_or_else(|p| p.into_inner()).len() >= sent.len())?;
        let flushed = t0.elapsed();
        let mut acked = std::mem::take(&mut *self.producer.context().acked.lock().unwrap_or_else(|p| p.into_inner()));
        if acked.len() != sent.len() {
            return Err(MirrorError::kafka("the target acknowledged fewer records than sent", &KafkaError::NoMessageReceived));
        }
        acked.sort_unstable_by_key(|(i, _)| *i);
        let mut runs: BTreeMap<(usize, i32), RunBuilder> = BTreeMap::new();
        for (s, (_, r)) in sent.iter().zip(&acked) {
            let t = r.as_ref().map_err(|e| MirrorError::kafka(&format!("writing a record of {} to the target", names[s.topic]), e))?;
            runs.entry((s.topic, s.partition)).or_default().push(s.offset, *t);
        }
        let otopic = cfg.offsets_topic();
        self.producer.context().offsets_acked.store(0, Ordering::Relaxed);
        let mut batches = Vec::with_capacity(reached.len());
        for (&(tid, p), &next) in reached {
            let runs = runs.remove(&(tid, p)).map_or_else(Vec::new, |r| r.runs);
            // After the last copied record, or where the partition stood.
            let tnext = runs.last().map_or_else(|| self.map.get(&names[tid], p).map_or(0, |m| m.tnext), |[_, t, n]| t + n);
            let b = BatchOffsets { topic: names[tid].clone(), partition: p, next, tnext, runs };
            let json = serde_json::to_vec(&b).map_err(|e| MirrorError::fatal(format!("encoding an offsets record: {e}")))?;
            let key = b.key();
            let rec: BaseRecord<'_, str, [u8], Box<usize>> =
                BaseRecord::with_opaque_to(&otopic, Box::new(OFFSETS_RECORD)).partition(0).key(key.as_str()).payload(json.as_slice());
            self.producer.send(rec).map_err(|(e, _)| MirrorError::kafka("writing the offsets record", &e))?;
            batches.push(b);
        }
        let want = batches.len();
        self.wait_acks(|a| a.offsets_acked.load(Ordering::Relaxed) >= want)?;
        self.producer.commit_transaction(TXN_TIMEOUT).map_err(|e| {
            let _ = self.producer.abort_transaction(TXN_TIMEOUT);
            MirrorError::kafka("committing a batch on the target", &e)
        })?;
        tracing::debug!(
            records = sent.len(),
            flush_ms = flushed.as_millis() as u64,
            commit_ms = (t0.elapsed() - flushed).as_millis() as u64,
            "batch committed"
        );
        for b in &batches {
            self.map.add(b);
        }
        Ok(batches)
    }
}

/// The side thread's state: its own clients of both clusters, the target topics it
/// shapes, and its copy of the offset map (from the committed batches).
struct SideWork {
    source: BaseConsumer<Guarded>,
    target: BaseConsumer<Guarded>,
    targets: TargetTopics,
    map: OffsetMap,
    topics: Vec<SourceTopic>,
    groups: Option<GroupSync>,
}

impl SideWork {
    fn new(cfg: &MirrorConfig, map: OffsetMap, topics: Vec<SourceTopic>, targets: TargetTopics) -> Result<Self> {
        let groups = GroupSync::new(cfg).map_err(|e| tracing::warn!(error = %e, "group offsets will not be translated")).ok();
        Ok(Self { source: consumer(cfg, Side::Source, None)?, target: consumer(cfg, Side::Target, None)?, targets, map, topics, groups })
    }

    /// Until the copy stops: every `refresh_interval` new topics and partitions (target
    /// topics made first, then handed to the copy), config changes and lag; every
    /// `offsets.interval` group offsets. Failures to look are logged and retried; a
    /// refusal (a partition-count conflict) is handed to the copy, which stops.
    fn run(
        mut self,
        cfg: &MirrorConfig,
        committed: Receiver<Vec<BatchOffsets>>,
        topics_tx: Sender<Result<Vec<SourceTopic>>>,
        stats: &MirrorStats,
        stop: &AtomicBool,
        stopped: &AtomicBool,
    ) {
        let (mut next_refresh, mut next_groups) = (Instant::now(), Instant::now());
        while !stop.load(Ordering::Relaxed) && !stopped.load(Ordering::Relaxed) {
            let wake = next_refresh.min(next_groups);
            match committed.recv_timeout(wake.saturating_duration_since(Instant::now()).min(Duration::from_millis(200))) {
                Ok(batches) => {
                    for b in &batches {
                        self.map.add(b);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_refresh {
                let t = Instant::now();
                match self.refresh(cfg) {
                    Ok(Some(topics)) => {
                        let _ = topics_tx.send(Ok(topics));
                    }
                    Ok(None) => {}
                    Err(e) if e.is_retryable() => tracing::warn!(error = %e, "looking for new topics failed; trying again later"),
                    Err(e) => {
                        let _ = topics_tx.send(Err(e));
                        return;
                    }
                }
                self.measure_lag(stats);
                tracing::debug!(ms = t.elapsed().as_millis() as u64, "refreshed topics and lag");
                next_refresh = Instant::now() + cfg.source().refresh_interval;
            }
            if Instant::now() >= next_groups {
                if let Some(g) = self.groups.as_mut()
                    && let Err(e) = g.run(cfg, &self.map, &self.source, &self.target)
                {
                    tracing::warn!(error = %e, "translating group offsets failed; trying again later");
                }
                next_groups = Instant::now() + cfg.offsets.interval;
            }
        }
    }

    /// Shapes the target topics like the source's now (new topics, new partitions,
    /// config changes); the topic list when it changed.
    fn refresh(&mut self, cfg: &MirrorConfig) -> Result<Option<Vec<SourceTopic>>> {
        let topics = source_topics(cfg, &metadata(cfg, Side::Source, &self.source)?, false)?;
        let tmeta = metadata(cfg, Side::Target, &self.target)?;
        self.targets.sync(cfg, &topics, &tmeta, &self.map)?;
        if topics == self.topics {
            return Ok(None);
        }
        self.topics = topics.clone();
        Ok(Some(topics))
    }

    /// Records not yet copied, per partition: the source's end minus the committed
    /// position.
    fn measure_lag(&self, stats: &MirrorStats) {
        for t in &self.topics {
            for p in 0..t.partitions {
                if let Ok((_, high)) = self.source.fetch_watermarks(&t.name, p, Duration::from_secs(2)) {
                    let next = self.map.get(&t.name, p).map_or(0, |m| m.next);
                    stats.partition(&t.name, p, |s| s.lag_records = Some((high - next).max(0)));
                }
            }
        }
    }
}

/// A small number for a topic name, so per-record bookkeeping copies no strings.
fn intern(ids: &mut HashMap<String, usize>, names: &mut Vec<String>, topic: &str) -> usize {
    if let Some(i) = ids.get(topic) {
        return *i;
    }
    names.push(topic.to_string());
    ids.insert(topic.to_string(), names.len() - 1);
    names.len() - 1
}

/// Whether the record names `cluster` among the clusters it was copied from.
fn came_from(m: &BorrowedMessage<'_>, cluster: &[u8]) -> bool {
    m.headers().is_some_and(|h| h.iter().any(|x| x.key == PROVENANCE_HEADER && x.value == Some(cluster)))
}
