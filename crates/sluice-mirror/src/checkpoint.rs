//! Consumer-group offsets, translated: a group's committed offset on the source (the
//! next record it would read) becomes the target offset of that same record, through
//! the mirror's exact offset map, and is committed for the same group on the target.
//! A group that has members on the target is consuming there and is left alone, and
//! a group's offset on the target is never moved back (MirrorMaker 2's rules).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sluice_kafka::probe::Guarded;

use crate::clusters::{Side, consumer};
use crate::commit_log::CommitLog;
use crate::config::MirrorConfig;
use crate::error::{MirrorError, Result};
use crate::offsets::{OffsetMap, Translation};

const TIMEOUT: Duration = Duration::from_secs(10);

/// One partition of a group, as `sluice mirror offsets GROUP` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupOffset {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset on the source.
    pub committed: i64,
    pub target_topic: String,
    #[serde(flatten)]
    pub translation: Translation,
}

/// A group's committed offsets: (topic, partition, offset), sorted.
type Committed = Vec<(String, i32, i64)>;

/// The group's committed source offsets for every partition the mirror copies.
fn committed(client: &BaseConsumer<Guarded>, group: &str, map: &OffsetMap) -> Result<Committed> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in map.partitions.keys() {
        tpl.add_partition(t, *p);
    }
    if tpl.count() == 0 {
        return Ok(vec![]);
    }
    let got = client
        .committed_offsets(tpl, TIMEOUT)
        .map_err(|e| MirrorError::kafka(&format!("reading the committed offsets of group {group} on the source"), &e))?;
    let mut out: Vec<_> = got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.topic().to_string(), e.partition(), o)),
            _ => None,
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The translation of `group`'s committed offsets (no writes).
pub fn translate_group(cfg: &MirrorConfig, map: &OffsetMap, group: &str) -> Result<Vec<GroupOffset>> {
    let client = consumer(cfg, Side::Source, Some(group))?;
    Ok(committed(&client, group, map)?
        .into_iter()
        .map(|(topic, partition, committed)| GroupOffset {
            target_topic: cfg.target_topic(&topic),
            translation: map.translate(&topic, partition, committed),
            topic,
            partition,
            committed,
        })
        .collect())
}

/// Whether a source group's offsets are translated: it matches `offsets.groups` and
/// is not a mirror's own.
fn wanted(groups: &regex::Regex, group: &str) -> bool {
    groups.is_match(group) && !group.starts_with("sluice-mirror")
}

/// At most this many target clients are kept between passes (a client per group,
/// since librdkafka fixes the group id): enough for the groups that commit often,
/// without a client for each of thousands of groups that settled long ago.
const TARGET_CLIENTS: usize = 64;

/// The client with `group`'s id on `side` from `clients`, made when missing; when
/// `bound` clients are kept already, one of them is dropped first.
fn group_client<'a>(
    clients: &'a mut HashMap<String, BaseConsumer<Guarded>>,
    cfg: &MirrorConfig,
    side: Side,
    group: &str,
    bound: usize,
) -> Result<&'a BaseConsumer<Guarded>> {
    if !clients.contains_key(group) {
        if clients.len() >= bound
            && let Some(old) = clients.keys().next().cloned()
        {
            clients.remove(&old);
        }
        clients.insert(group.to_string(), consumer(cfg, side, Some(group))?);
    }
    Ok(&clients[group])
}

/// Writes translated offsets of the source's groups to the target, periodically.
pub(crate) struct GroupSync {
    groups: regex::Regex,
    /// The source's commits as they happen; `None` when the source does not let the
    /// mirror read its offsets log, and each group is asked instead.
    log: Option<CommitLog>,
    /// Clients with a group's id on the source, only when the log cannot be read.
    source_clients: HashMap<String, BaseConsumer<Guarded>>,
    /// Clients with a group's id on the target, for the groups written lately (at
    /// most [`TARGET_CLIENTS`]).
    target_clients: HashMap<String, BaseConsumer<Guarded>>,
    /// What each group's translation was when last settled (written, or found as far
    /// on the target): while it stays the same the target is not asked again, which
    /// saves two round trips a group a pass.
    settled: HashMap<String, Committed>,
}

impl GroupSync {
    pub fn new(cfg: &MirrorConfig) -> Result<Self> {
        let g = &cfg.offsets.groups;
        let groups = regex::Regex::new(&format!("^(?:{g})$")).map_err(|e| MirrorError::fatal(format!("offsets.groups: {e}")))?;
        let log = if g.is_empty() { None } else { Some(CommitLog::new(cfg)?) };
        Ok(Self { groups, log, source_clients: HashMap::new(), target_clients: HashMap::new(), settled: HashMap::new() })
    }

    /// Every matching source group's committed offsets: from the offsets log, or, when
    /// the source does not allow reading it, by asking each group.
    fn source_offsets(&mut self, cfg: &MirrorConfig, map: &OffsetMap, source: &BaseConsumer<Guarded>) -> Result<Vec<(String, Committed)>> {
        if let Some(log) = self.log.as_mut() {
            let groups = &self.groups;
            match log.catch_up(|g| wanted(groups, g)) {
                Ok(()) => return Ok(log.groups().map(|(g, o)| (g.to_string(), o)).collect()),
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "asking each consumer group for its offsets instead");
                    self.log = None;
                }
            }
        }
        let list = source.fetch_group_list(None, TIMEOUT).map_err(|e| MirrorError::kafka("listing the source's consumer groups", &e))?;
        let names: Vec<String> = list.groups().iter().map(|g| g.name().to_string()).filter(|n| wanted(&self.groups, n)).collect();
        let mut out = Vec::with_capacity(names.len());
        for group in names {
            let offsets = committed(group_client(&mut self.source_clients, cfg, Side::Source, &group, usize::MAX)?, &group, map)?;
            out.push((group, offsets));
        }
        Ok(out)
    }

    /// One pass over the source's groups; returns how many partition offsets it wrote.
    pub fn run(
        &mut self,
        cfg: &MirrorConfig,
        map: &OffsetMap,
        source: &BaseConsumer<Guarded>,
        target: &BaseConsumer<Guarded>,
    ) -> Result<usize> {
        if cfg.offsets.groups.is_empty() {
            return Ok(0);
        }
        let mut written = 0;
        for (group, src) in self.source_offsets(cfg, map, source)? {
            let mut wanted = Vec::new();
            for (topic, p, off) in &src {
                if let Translation::Exact { target } = map.translate(topic, *p, *off) {
                    wanted.push((cfg.target_topic(topic), *p, target));
                }
            }
            if wanted.is_empty() || self.settled.get(&group) == Some(&wanted) {
                continue;
            }
            let there =
                target.fetch_group_list(Some(&group), TIMEOUT).map_err(|e| MirrorError::kafka("describing a group on the target", &e))?;
            if there.groups().iter().any(|g| !g.members().is_empty()) {
                continue; // consuming on the target: its own commits win
            }
            let mut want = TopicPartitionList::new();
            for (topic, p, target) in &wanted {
                want.add_partition_offset(topic, *p, Offset::Offset(*target))
                    .map_err(|e| MirrorError::kafka("building a group offset", &e))?;
            }
            let client = group_client(&mut self.target_clients, cfg, Side::Target, &group, TARGET_CLIENTS)?;
            let have = client
                .committed_offsets(want.clone(), TIMEOUT)
                .map_err(|e| MirrorError::kafka(&format!("reading group {group}'s offsets on the target"), &e))?;
            let mut write = TopicPartitionList::new();
            for e in want.elements() {
                let current = have.find_partition(e.topic(), e.partition()).and_then(|x| match x.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
                if let Offset::Offset(t) = e.offset()
                    && current.is_none_or(|c| c < t)
                {
                    write
                        .add_partition_offset(e.topic(), e.partition(), Offset::Offset(t))
                        .map_err(|e| MirrorError::kafka("building a group offset", &e))?;
                }
            }
            if write.count() == 0 {
                self.settled.insert(group, wanted);
                continue;
            }
            match client.commit(&write, CommitMode::Sync) {
                Ok(()) => {
                    self.settled.insert(group.clone(), wanted);
                    written += write.count();
                    tracing::debug!(group = %group, partitions = write.count(), "wrote translated group offsets to the target");
                }
                // The group became active on the target meanwhile: its commits win.
                Err(e) => tracing::debug!(group = %group, error = %e, "did not write translated group offsets"),
            }
        }
        Ok(written)
    }
}
