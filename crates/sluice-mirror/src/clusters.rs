//! The two clusters: clients with the user's settings, the topics to mirror, and the
//! target topics made and kept like their sources (partition count and topic configs).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use sluice_kafka::probe::Guarded;

use crate::config::{HEARTBEATS_TOPIC, MirrorConfig};
use crate::error::{MirrorError, Result};
use crate::offsets::OffsetMap;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Topic configs a mirror does not copy (as MirrorMaker 2): they describe the
/// source cluster's hardware and policy, not the data.
const NOT_COPIED: &[&str] = &[
    "follower.replication.throttled.replicas",
    "leader.replication.throttled.replicas",
    "message.timestamp.difference.max.ms",
    "message.timestamp.type",
    "unclean.leader.election.enable",
    "min.insync.replicas",
];

/// Which side of the mirror, for messages and settings.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Target,
}

impl Side {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Side::Source => "source.kafka",
            Side::Target => "sink.kafka",
        }
    }
}

pub(crate) fn client_config(cfg: &MirrorConfig, side: Side) -> ClientConfig {
    let (brokers, props) = match side {
        Side::Source => (&cfg.source().brokers, &cfg.source().properties),
        Side::Target => (&cfg.target().brokers, &cfg.target().properties),
    };
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("client.id", format!("sluice-mirror-{}", cfg.pipeline));
    for (k, v) in props {
        c.set(k, v);
    }
    c
}

fn cluster_name(cfg: &MirrorConfig, side: Side) -> (&str, &str) {
    match side {
        Side::Source => (&cfg.source().cluster, &cfg.source().brokers),
        Side::Target => (&cfg.target().cluster, &cfg.target().brokers),
    }
}

/// The cluster's metadata, or one line saying it cannot be reached.
pub(crate) fn metadata(cfg: &MirrorConfig, side: Side, client: &BaseConsumer<Guarded>) -> Result<Metadata> {
    client.fetch_metadata(None, TIMEOUT).map_err(|e| {
        let (name, brokers) = cluster_name(cfg, side);
        if let Some(refusal) = client.context().refusal() {
            return MirrorError::fatal(format!("{}.brokers: cluster {name} at {brokers}: {refusal}", side.key()));
        }
        MirrorError::kafka(
            &format!(
                "{}.brokers: cluster {name} at {brokers} did not answer within {} s; check the address, the security settings and that the brokers are up",
                side.key(),
                TIMEOUT.as_secs()
            ),
            &e,
        )
    })
}

pub(crate) fn consumer(cfg: &MirrorConfig, side: Side, group: Option<&str>) -> Result<BaseConsumer<Guarded>> {
    consumer_with(cfg, side, group, &[])
}

pub(crate) fn consumer_with(
    cfg: &MirrorConfig,
    side: Side,
    group: Option<&str>,
    extra: &[(&str, String)],
) -> Result<BaseConsumer<Guarded>> {
    let mut c = client_config(cfg, side);
    c.set("enable.auto.commit", "false").set("isolation.level", "read_committed").set("enable.partition.eof", "false");
    if let Some(g) = group {
        c.set("group.id", g);
    }
    for (k, v) in extra {
        c.set(*k, v);
    }
    c.create_with_context(Guarded::new(cfg.egress.as_ref()))
        .map_err(|e| MirrorError::kafka(&format!("{}: creating a Kafka client", side.key()), &e))
}

/// The consumer the copy reads with. librdkafka prefetches up to 100,000 records
/// per partition and, once its queue is that full, waits a whole second
/// (`fetch.queue.backoff.ms`) before fetching again: the copy, which drains a batch
/// in tens of milliseconds, found the queue empty for ~0.5 s every few batches. So
/// the queue is kept about one batch deep per partition and refilled at once.
pub(crate) fn copy_consumer(cfg: &MirrorConfig, group: &str) -> Result<BaseConsumer<Guarded>> {
    let extra = [
        ("queued.min.messages", cfg.batch.max_records.clamp(1000, 1_000_000).to_string()),
        ("queued.max.messages.kbytes", "32768".to_string()),
        ("fetch.queue.backoff.ms", "10".to_string()),
    ];
    consumer_with(cfg, Side::Source, Some(group), &extra)
}

pub(crate) fn admin(cfg: &MirrorConfig, side: Side) -> Result<AdminClient<Guarded>> {
    client_config(cfg, side)
        .create_with_context(Guarded::new(cfg.egress.as_ref()))
        .map_err(|e| MirrorError::kafka(&format!("{}: creating a Kafka admin client", side.key()), &e))
}

/// A source topic the mirror copies, as it is now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SourceTopic {
    pub name: String,
    pub partitions: i32,
}

/// The source topics the config names, as they are in `meta`; with `must_match`, one
/// line when none matches (a typo in the pattern should not look like an idle mirror).
pub(crate) fn source_topics(cfg: &MirrorConfig, meta: &Metadata, must_match: bool) -> Result<Vec<SourceTopic>> {
    let s = cfg.source();
    let heartbeats = !s.heartbeat_interval.is_zero();
    let re = s
        .topics_regex
        .as_ref()
        .map(|r| regex::Regex::new(&format!("^(?:{r})$")))
        .transpose()
        .map_err(|e| MirrorError::fatal(e.to_string()))?;
    let mut out: Vec<SourceTopic> = meta
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !cfg.excluded(t.name()))
        .filter(|t| {
            (heartbeats && t.name() == HEARTBEATS_TOPIC)
                || match &re {
                    Some(re) => re.is_match(t.name()),
                    None => s.topics.iter().any(|n| n == t.name()),
                }
        })
        .map(|t| SourceTopic { name: t.name().to_string(), partitions: t.partitions().len() as i32 })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if must_match {
        if let Some(r) = &s.topics_regex
            && out.iter().all(|t| t.name == HEARTBEATS_TOPIC)
        {
            return Err(MirrorError::fatal(format!(
                "source.kafka.topics_regex: {r:?} matches no topic on cluster {}; fix the pattern or create the topics first",
                s.cluster
            )));
        }
        if let Some(missing) = s.topics.iter().find(|n| !out.iter().any(|t| &&t.name == n)) {
            return Err(MirrorError::fatal(format!(
                "source.kafka.topics: {missing:?} is not a topic on cluster {}; create it or remove it from the list",
                s.cluster
            )));
        }
    }
    Ok(out)
}

/// Refuses a target topic that exists with another partition count than its source,
/// unless the mirror made it and the source has gained partitions since (followed).
pub(crate) fn check_partition_counts(cfg: &MirrorConfig, topics: &[SourceTopic], target: &Metadata, map: &OffsetMap) -> Result<()> {
    for t in topics {
        let name = cfg.target_topic(&t.name);
        if let Some(existing) = target.topics().iter().find(|x| x.name() == name && x.error().is_none()) {
            let have = existing.partitions().len() as i32;
            let ours = map.partitions.keys().any(|(topic, _)| topic == &t.name);
            if have != t.partitions && !(have < t.partitions && ours) {
                return Err(MirrorError::fatal(format!(
                    "partition-count mismatch: topic {} has {} partitions on cluster {} but {name} has {have} on cluster {}; \
                     records keep their partition, so give {name} {} partitions (or delete it and let the mirror create it)",
                    t.name,
                    t.partitions,
                    cfg.source().cluster,
                    cfg.target().cluster,
                    t.partitions
                )));
            }
        }
    }
    Ok(())
}

/// Keeps the target's topics shaped like their sources.
pub(crate) struct TargetTopics {
    src_admin: AdminClient<Guarded>,
    tgt_admin: AdminClient<Guarded>,
    /// The configs last copied to each target topic.
    copied: HashMap<String, BTreeMap<String, String>>,
}

pub(crate) fn admin_opts() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT))
}

pub(crate) fn block<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

impl TargetTopics {
    pub fn new(cfg: &MirrorConfig) -> Result<Self> {
        Ok(Self { src_admin: admin(cfg, Side::Source)?, tgt_admin: admin(cfg, Side::Target)?, copied: HashMap::new() })
    }

    /// The source topic's own (dynamic) configs that a mirror copies.
    fn source_configs(&self, topic: &str) -> Result<BTreeMap<String, String>> {
        let spec = ResourceSpecifier::Topic(topic);
        let res = block(self.src_admin.describe_configs([&spec], &admin_opts()))
            .map_err(|e| MirrorError::kafka(&format!("describing topic {topic} on the source"), &e))?;
        let mut out = BTreeMap::new();
        for r in res {
            let r = r.map_err(|code| MirrorError::kafka(&format!("describing topic {topic} on the source"), &KafkaError::AdminOp(code)))?;
            for e in r.entries {
                if e.source == ConfigSource::DynamicTopic
                    && !e.is_sensitive
                    && !NOT_COPIED.contains(&e.name.as_str())
                    && let Some(v) = e.value
                {
                    out.insert(e.name, v);
                }
            }
        }
        Ok(out)
    }

    /// Creates missing target topics with their source's partition count and configs,
    /// adds partitions the source gained, and follows config changes. A target topic
    /// that exists with another partition count and was not made by this mirror is
    /// refused: records must keep their partition.
    pub fn sync(&mut self, cfg: &MirrorConfig, topics: &[SourceTopic], target: &Metadata, map: &OffsetMap) -> Result<()> {
        // Every topic is checked before any is changed: a refusal leaves the target as it was.
        check_partition_counts(cfg, topics, target, map)?;
        for t in topics {
            let name = cfg.target_topic(&t.name);
            let configs = self.source_configs(&t.name)?;
            match target.topics().iter().find(|x| x.name() == name && x.error().is_none()) {
                None => {
                    let mut new = NewTopic::new(&name, t.partitions, TopicReplication::Fixed(cfg.target().replication_factor));
                    for (k, v) in &configs {
                        new = new.set(k, v);
                    }
                    self.create(&new)?;
                    tracing::info!(topic = %name, partitions = t.partitions, "created the target topic");
                }
                Some(existing) => {
                    let have = existing.partitions().len() as i32;
                    let ours = map.partitions.keys().any(|(topic, _)| topic == &t.name);
                    if have < t.partitions && ours {
                        let np = NewPartitions::new(&name, t.partitions as usize);
                        let res = block(self.tgt_admin.create_partitions([&np], &admin_opts()))
                            .map_err(|e| MirrorError::kafka(&format!("adding partitions to {name} on the target"), &e))?;
                        for r in res {
                            r.map_err(|(_, c)| MirrorError::kafka(&format!("adding partitions to {name}"), &KafkaError::AdminOp(c)))?;
                        }
                        tracing::info!(topic = %name, partitions = t.partitions, "followed the source's new partitions");
                    }
                    if self.copied.get(&name) != Some(&configs) && !configs.is_empty() {
                        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&name));
                        for (k, v) in &configs {
                            alter = alter.set(k, v);
                        }
                        let res = block(self.tgt_admin.alter_configs([&alter], &admin_opts()))
                            .map_err(|e| MirrorError::kafka(&format!("copying the configs of {} to {name}", t.name), &e))?;
                        for r in res {
                            r.map_err(|(_, c)| MirrorError::kafka(&format!("copying the configs of {}", t.name), &KafkaError::AdminOp(c)))?;
                        }
                    }
                }
            }
            self.copied.insert(name, configs);
        }
        Ok(())
    }

    /// The source's heartbeats topic (one partition), which the mirror writes to.
    pub fn ensure_heartbeats_topic(&self) -> Result<()> {
        let new = NewTopic::new(HEARTBEATS_TOPIC, 1, TopicReplication::Fixed(-1));
        Self::create_on(&self.src_admin, &new, "source")
    }

    fn create(&self, new: &NewTopic<'_>) -> Result<()> {
        Self::create_on(&self.tgt_admin, new, "target")
    }

    fn create_on(admin: &AdminClient<Guarded>, new: &NewTopic<'_>, side: &str) -> Result<()> {
        let res = block(admin.create_topics([new], &admin_opts()))
            .map_err(|e| MirrorError::kafka(&format!("creating topic {} on the {side}", new.name), &e))?;
        for r in res {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(MirrorError::kafka(&format!("creating topic {t} on the {side}"), &KafkaError::AdminOp(code))),
            }
        }
        Ok(())
    }

    /// The offsets topic: one partition (one order for every batch), deleted by age
    /// rather than compacted, since every batch's record is part of the offset map.
    pub fn ensure_offsets_topic(&self, cfg: &MirrorConfig) -> Result<()> {
        let name = cfg.offsets_topic();
        let retention = cfg.target().offsets_retention.as_millis().to_string();
        let new = NewTopic::new(&name, 1, TopicReplication::Fixed(cfg.target().replication_factor))
            .set("cleanup.policy", "delete")
            .set("retention.ms", &retention);
        self.create(&new)
    }
}
