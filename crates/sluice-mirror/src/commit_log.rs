//! The source's committed group offsets, read from its `__consumer_offsets` topic with
//! one client (as Burrow does). Asking each group for its offsets needs a client per
//! group (librdkafka fixes one group id per client, and rust-rdkafka does not wrap the
//! admin calls that take any group): with 1,000 groups that was 1,000 clients, each
//! with its threads and connections, on the cores the copy runs on, and 1,000 round
//! trips a pass. The log gives every group's commits as they happen, for the cost of
//! one consumer.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sluice_kafka::probe::Guarded;

use crate::clusters::{Side, consumer_with};
use crate::config::MirrorConfig;
use crate::error::{MirrorError, Result};

const TOPIC: &str = "__consumer_offsets";
const TIMEOUT: Duration = Duration::from_secs(10);
/// Records read per call at most, so a large log is caught up over several passes
/// rather than holding the side thread (topic refreshes, lag) for long.
const MAX_PER_CALL: usize = 200_000;

/// A record key of `__consumer_offsets` this reader cares about. Key versions 0 and 1
/// are an offset commit (group, topic, partition); version 2 is a group's metadata,
/// whose tombstone means the group was deleted. Later versions (the new consumer
/// protocol's records) say nothing about committed offsets.
#[derive(Debug, PartialEq)]
enum Key<'a> {
    Offset { group: &'a str, topic: &'a str, partition: i32 },
    Group(&'a str),
}

/// A non-flexible Kafka string: an i16 length, then UTF-8 bytes.
fn string<'a>(b: &mut &'a [u8]) -> Option<&'a str> {
    let len = usize::try_from(i16::from_be_bytes(b.get(..2)?.try_into().ok()?)).ok()?;
    let s = std::str::from_utf8(b.get(2..2 + len)?).ok()?;
    *b = &b[2 + len..];
    Some(s)
}

fn key(mut b: &[u8]) -> Option<Key<'_>> {
    let version = i16::from_be_bytes(b.get(..2)?.try_into().ok()?);
    b = &b[2..];
    match version {
        0 | 1 => {
            let group = string(&mut b)?;
            let topic = string(&mut b)?;
            let partition = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
            Some(Key::Offset { group, topic, partition })
        }
        2 => Some(Key::Group(string(&mut b)?)),
        _ => None,
    }
}

/// The committed offset of an offset-commit value: every version (0 to 4, flexible or
/// not) starts with an i16 version and the i64 offset.
fn offset(v: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(v.get(2..10)?.try_into().ok()?))
}

/// Every matching group's latest committed offsets on the source, kept up to date.
pub(crate) struct CommitLog {
    consumer: BaseConsumer<Guarded>,
    assigned: bool,
    /// group → (topic, partition) → committed offset (the next record to read).
    groups: HashMap<String, BTreeMap<(String, i32), i64>>,
}

impl CommitLog {
    pub fn new(cfg: &MirrorConfig) -> Result<Self> {
        // Drained every pass: a small prefetch is enough and bounds memory on a
        // cluster with a large log.
        let extra = [("queued.max.messages.kbytes", "4096".to_string())];
        // librdkafka assigns partitions only to a client with a group id; this one never
        // joins or commits (and "sluice-mirror" groups are never translated).
        let group = format!("sluice-mirror-{}-log", cfg.pipeline);
        Ok(Self { consumer: consumer_with(cfg, Side::Source, Some(&group), &extra)?, assigned: false, groups: HashMap::new() })
    }

    /// Reads what was committed since the last call, for groups `wanted` accepts. An
    /// error that is not retryable means this cluster does not let the mirror read its
    /// offsets log (the caller asks each group instead).
    pub fn catch_up(&mut self, wanted: impl Fn(&str) -> bool) -> Result<()> {
        if !self.assigned && !self.assign()? {
            return Ok(());
        }
        for _ in 0..MAX_PER_CALL {
            let Some(m) = self.consumer.poll(Duration::ZERO) else { break };
            let m = m.map_err(|e| MirrorError::kafka(&format!("reading the source's {TOPIC}"), &e))?;
            let Some(k) = m.key().and_then(key) else { continue };
            match (k, m.payload()) {
                (Key::Offset { group, topic, partition }, Some(v)) if wanted(group) => {
                    if let Some(o) = offset(v) {
                        self.groups.entry(group.to_string()).or_default().insert((topic.to_string(), partition), o);
                    }
                }
                (Key::Offset { group, topic, partition }, None) => {
                    if let Some(g) = self.groups.get_mut(group) {
                        g.remove(&(topic.to_string(), partition));
                    }
                }
                (Key::Group(group), None) => {
                    self.groups.remove(group);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Assigns every partition of the log from its start; false while the log does not
    /// exist yet (no group has committed on the source).
    fn assign(&mut self) -> Result<bool> {
        let meta = self
            .consumer
            .fetch_metadata(Some(TOPIC), TIMEOUT)
            .map_err(|e| MirrorError::kafka(&format!("looking up the source's {TOPIC}"), &e))?;
        let Some(t) = meta.topics().first() else { return Ok(false) };
        if let Some(err) = t.error() {
            let code = RDKafkaErrorCode::from(err);
            if code == RDKafkaErrorCode::TopicAuthorizationFailed {
                return Err(MirrorError::fatal(format!("the source does not let the mirror read {TOPIC} ({code})")));
            }
            return Ok(false);
        }
        if t.partitions().is_empty() {
            return Ok(false);
        }
        let mut tpl = TopicPartitionList::new();
        for p in t.partitions() {
            tpl.add_partition_offset(TOPIC, p.id(), Offset::Beginning)
                .map_err(|e| MirrorError::kafka(&format!("assigning {TOPIC}"), &e))?;
        }
        self.consumer.assign(&tpl).map_err(|e| MirrorError::kafka(&format!("assigning {TOPIC}"), &e))?;
        self.assigned = true;
        Ok(true)
    }

    /// Each group's committed offsets, sorted by topic and partition.
    pub fn groups(&self) -> impl Iterator<Item = (&str, Vec<(String, i32, i64)>)> {
        self.groups.iter().map(|(g, o)| (g.as_str(), o.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, x: &str) {
        out.extend_from_slice(&(x.len() as i16).to_be_bytes());
        out.extend_from_slice(x.as_bytes());
    }

    #[test]
    fn offset_commit_keys_and_values_of_every_version_parse() {
        for version in [0i16, 1] {
            let mut k = version.to_be_bytes().to_vec();
            s(&mut k, "g1");
            s(&mut k, "orders");
            k.extend_from_slice(&7i32.to_be_bytes());
            assert_eq!(key(&k), Some(Key::Offset { group: "g1", topic: "orders", partition: 7 }));
        }
        let mut k = 2i16.to_be_bytes().to_vec();
        s(&mut k, "g2");
        assert_eq!(key(&k), Some(Key::Group("g2")));
        // A new-protocol record, and truncated keys, are skipped, not misread.
        assert_eq!(key(&5i16.to_be_bytes()), None);
        assert_eq!(key(&[0, 0, 0, 9, b'g']), None);
        assert_eq!(key(&[0]), None);
        // Value v3 (offset, leader epoch, metadata, timestamp) and v4 (flexible).
        for version in [0i16, 1, 3, 4] {
            let mut v = version.to_be_bytes().to_vec();
            v.extend_from_slice(&123_456_789i64.to_be_bytes());
            v.extend_from_slice(&[0; 12]);
            assert_eq!(offset(&v), Some(123_456_789));
        }
        assert_eq!(offset(&[0, 3, 1]), None);
    }
}
