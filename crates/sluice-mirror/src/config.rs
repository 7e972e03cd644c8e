//! A mirror's settings: the same YAML shape as other pipelines (`pipeline`, a `source:`
//! and a `sink:` block each naming its kind), strictly checked.
//!
//! ```yaml
//! pipeline: orders_to_b
//! source:
//!   kafka: {cluster: a, brokers: "a1:9092", topics_regex: "orders.*"}
//! sink:
//!   kafka: {cluster: b, brokers: "b1:9092"}
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Lowercase letters, digits and `_`: names the transactional id and the offsets
    /// topic on the target.
    pub pipeline: String,
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub source: SourceBlock,
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub sink: SinkBlock,
    #[serde(default)]
    pub batch: MirrorBatch,
    #[serde(default)]
    pub offsets: OffsetSync,
    /// The server's egress policy over the mirror's registries (`sluice server` sets
    /// it; never read from YAML; `sluice run` has none).
    #[serde(skip)]
    pub egress: Option<std::sync::Arc<sluice_core::egress::Egress>>,
}

/// `source:` holds one key naming the kind; a mirror reads Kafka.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SourceBlock {
    Kafka(SourceCluster),
}

/// `sink:` holds one key naming the kind; a mirror writes Kafka.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SinkBlock {
    Kafka(TargetCluster),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceCluster {
    /// The cluster's short name (`a`, `us_east`): prefixes mirrored topic names and
    /// marks the records that came from it, so active/active pairs never loop.
    pub cluster: String,
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Topics to mirror by name.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Or by a regular expression matched against the whole name.
    pub topics_regex: Option<String>,
    /// Where a partition the mirror has never read starts: `earliest` (default) or `latest`.
    #[serde(default)]
    pub start_from: StartFrom,
    /// How often the mirror writes a heartbeat into the source's `heartbeats` topic,
    /// which it copies like any other: an idle link still shows it works end to end
    /// (`{cluster}.heartbeats` on the target). `0s`: none (the mirror then needs only
    /// read access to the source).
    #[serde(default = "one_second", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often new topics, new partitions and topic config changes are looked for.
    #[serde(default = "five_seconds", with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// The source cluster's schema registry: with the target's, records in Confluent's
    /// wire format get their schema copied and their schema id rewritten.
    pub registry_url: Option<String>,
    /// librdkafka properties (security settings: `security.protocol`, `sasl.*`, `ssl.*`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetCluster {
    /// The cluster's short name; records carrying it in their provenance are not
    /// mirrored back to it.
    pub cluster: String,
    pub brokers: String,
    /// `prefixed` (default, as MirrorMaker 2): `{source cluster}.{topic}`; or `identity`.
    #[serde(default)]
    pub topic_naming: TopicNaming,
    /// Replication factor of the topics the mirror creates; -1: the broker's default.
    #[serde(default = "minus_one")]
    pub replication_factor: i32,
    /// How long the offsets topic keeps the source-to-target offset map: a group
    /// offset older than this can no longer be translated.
    #[serde(default = "a_week", with = "humantime_serde")]
    pub offsets_retention: Duration,
    /// The target cluster's schema registry (see `source.kafka.registry_url`).
    pub registry_url: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TopicNaming {
    #[default]
    Prefixed,
    Identity,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorBatch {
    /// Records per transaction on the target, at most.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// How long a transaction waits to fill before it commits what it has.
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for MirrorBatch {
    fn default() -> Self {
        Self { max_records: default_max_records(), max_wait: default_max_wait() }
    }
}

/// Which source consumer groups get their committed offsets translated and written
/// to the target (only while the group has no members there).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsetSync {
    /// A regular expression over group ids; empty: no group offsets are written.
    #[serde(default = "all_groups")]
    pub groups: String,
    #[serde(default = "five_seconds", with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for OffsetSync {
    fn default() -> Self {
        Self { groups: all_groups(), interval: five_seconds() }
    }
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn a_week() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn minus_one() -> i32 {
    -1
}
fn default_max_records() -> usize {
    20000
}
fn default_max_wait() -> Duration {
    Duration::from_millis(100)
}
fn all_groups() -> String {
    ".*".into()
}

/// The regex crate's errors draw the pattern over several lines.
fn one_line(e: &regex::Error) -> String {
    e.to_string().lines().map(str::trim).filter(|l| !l.is_empty() && *l != "^").collect::<Vec<_>>().join(" ")
}

/// The source topic heartbeats go to (MirrorMaker 2's name).
pub const HEARTBEATS_TOPIC: &str = "heartbeats";

/// The header each mirrored record carries, naming the cluster it was copied from
/// (once per hop): a mirror never copies a record into a cluster it names.
pub const PROVENANCE_HEADER: &str = "sluice.mirror.source";

/// The topic on the target holding the offset map of the mirror named `pipeline`.
pub fn offsets_topic(pipeline: &str) -> String {
    format!("sluice-mirror.{pipeline}.offsets")
}

/// The transactional id the mirror named `pipeline` writes to the target with.
pub fn transactional_id(pipeline: &str) -> String {
    format!("sluice-mirror-{pipeline}")
}

impl MirrorConfig {
    /// Whether a pipeline config file is a mirror's (its source is Kafka), so `sluice
    /// run` can run either kind.
    pub fn is_mirror(text: &str) -> bool {
        serde_yaml::from_str::<serde_yaml::Value>(text)
            .ok()
            .and_then(|v| v.get("source").and_then(|s| s.get("kafka")).map(|_| ()))
            .is_some()
    }

    /// Parses and checks a config; the error is one line naming the key and the fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: MirrorConfig = serde_yaml::from_str(text).map_err(|e| e.to_string().replace('\n', " "))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn source(&self) -> &SourceCluster {
        let SourceBlock::Kafka(s) = &self.source;
        s
    }

    pub fn target(&self) -> &TargetCluster {
        let SinkBlock::Kafka(t) = &self.sink;
        t
    }

    pub fn validate(&self) -> Result<(), String> {
        let p = &self.pipeline;
        if p.is_empty() || p.len() > 40 || !p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(format!("pipeline: {p:?} must be 1-40 characters of lowercase letters, digits and _"));
        }
        let (s, t) = (self.source(), self.target());
        for (key, name) in [("source.kafka.cluster", &s.cluster), ("sink.kafka.cluster", &t.cluster)] {
            if name.is_empty() || name.len() > 40 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(format!("{key}: {name:?} must be 1-40 letters, digits, _ and - (it prefixes topic names)"));
            }
        }
        if s.cluster == t.cluster {
            return Err(format!("sink.kafka.cluster: {:?} is also the source's name; give the two clusters different names", t.cluster));
        }
        for (key, b) in [("source.kafka.brokers", &s.brokers), ("sink.kafka.brokers", &t.brokers)] {
            if b.trim().is_empty() {
                return Err(format!("{key}: give at least one host:port"));
            }
        }
        match (&s.topics.is_empty(), &s.topics_regex) {
            (true, None) => return Err("source.kafka: name the topics to mirror with topics: [..] or topics_regex".into()),
            (false, Some(_)) => return Err("source.kafka: give topics or topics_regex, not both".into()),
            _ => {}
        }
        if let Some(r) = &s.topics_regex {
            regex::Regex::new(r).map_err(|e| format!("source.kafka.topics_regex: {r:?} is not a regular expression: {}", one_line(&e)))?;
        }
        regex::Regex::new(&self.offsets.groups)
            .map_err(|e| format!("offsets.groups: {:?} is not a regular expression: {}", self.offsets.groups, one_line(&e)))?;
        for key in ["transactional.id", "enable.idempotence", "isolation.level", "enable.auto.commit", "group.id"] {
            if s.properties.contains_key(key) || t.properties.contains_key(key) {
                return Err(format!("properties: {key} is set by the mirror itself (it is what makes it exactly once); remove it"));
            }
        }
        match (&s.registry_url, &t.registry_url) {
            (Some(_), None) => return Err("sink.kafka.registry_url: give the target's registry too, or neither".into()),
            (None, Some(_)) => return Err("source.kafka.registry_url: give the source's registry too, or neither".into()),
            _ => {}
        }
        for (key, u) in [("source.kafka.registry_url", &s.registry_url), ("sink.kafka.registry_url", &t.registry_url)] {
            if let Some(u) = u
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                return Err(format!("{key}: {u:?} must start with http:// or https://"));
            }
        }
        if self.batch.max_records == 0 {
            return Err("batch.max_records: must be at least 1".into());
        }
        if t.replication_factor == 0 || t.replication_factor < -1 {
            return Err("sink.kafka.replication_factor: must be -1 (the broker's default) or at least 1".into());
        }
        Ok(())
    }

    /// The target's name for a source topic.
    pub fn target_topic(&self, topic: &str) -> String {
        match self.target().topic_naming {
            TopicNaming::Prefixed => format!("{}.{topic}", self.source().cluster),
            TopicNaming::Identity => topic.to_string(),
        }
    }

    /// The topic on the target holding, in the same transactions as the records, the
    /// source position and the source-to-target offset map of every batch.
    pub fn offsets_topic(&self) -> String {
        offsets_topic(&self.pipeline)
    }

    pub(crate) fn transactional_id(&self) -> String {
        transactional_id(&self.pipeline)
    }

    /// Whether a source topic is one the mirror must never copy: Kafka's and Sluice's
    /// internal topics, and (when names are prefixed) topics that came from the target
    /// in the first place.
    pub(crate) fn excluded(&self, topic: &str) -> bool {
        topic.starts_with("__")
            || topic.starts_with("sluice-mirror.")
            || topic == "_schemas"
            || (self.target().topic_naming == TopicNaming::Prefixed && topic.starts_with(&format!("{}.", self.target().cluster)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str =
        "pipeline: m\nsource:\n  kafka: {cluster: a, brokers: 'x:1', topics: [t]}\nsink:\n  kafka: {cluster: b, brokers: 'y:1'}\n";

    #[test]
    fn parses_and_names_topics_like_mirrormaker() {
        let c = MirrorConfig::parse(OK).unwrap();
        assert!(MirrorConfig::is_mirror(OK));
        assert_eq!(c.target_topic("orders"), "a.orders");
        assert!(c.excluded("b.orders") && c.excluded("__consumer_offsets") && !c.excluded("orders"));
        assert_eq!(c.offsets_topic(), "sluice-mirror.m.offsets");
    }

    #[test]
    fn refuses_bad_settings_with_one_line() {
        for (text, want) in [
            (OK.replace("cluster: b", "cluster: a"), "give the two clusters different names"),
            (OK.replace("topics: [t]", "topics_regex: '('"), "is not a regular expression"),
            (OK.replace("topics: [t]", "brokers2: 1"), "unknown field"),
            (OK.replace("brokers: 'y:1'", "brokers: 'y:1', properties: {transactional.id: x}"), "set by the mirror itself"),
            (OK.replace(", topics: [t]", ""), "name the topics to mirror"),
        ] {
            let e = MirrorConfig::parse(&text).unwrap_err();
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        }
    }
}
