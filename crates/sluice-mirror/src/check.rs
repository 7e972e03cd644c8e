//! `sluice check` for a mirror: both clusters answer, the topics exist, and no target
//! topic would be refused for its partition count; nothing is written.

use serde::Serialize;

use crate::clusters::{Side, check_partition_counts, consumer, metadata, source_topics};
use crate::config::MirrorConfig;
use crate::copy::load_map;
use crate::error::Result;

/// One source topic and what it becomes on the target.
#[derive(Debug, Serialize)]
pub struct CheckedTopic {
    pub source: String,
    pub target: String,
    pub partitions: i32,
    /// Whether the target topic exists already (otherwise the mirror creates it).
    pub exists: bool,
}

pub fn check(cfg: &MirrorConfig) -> Result<Vec<CheckedTopic>> {
    let source = consumer(cfg, Side::Source, None)?;
    let smeta = metadata(cfg, Side::Source, &source)?;
    let target = consumer(cfg, Side::Target, None)?;
    let tmeta = metadata(cfg, Side::Target, &target)?;
    let topics = source_topics(cfg, &smeta, true)?;
    check_partition_counts(cfg, &topics, &tmeta, &load_map(cfg)?)?;
    Ok(topics
        .into_iter()
        .map(|t| {
            let target = cfg.target_topic(&t.name);
            let exists = tmeta.topics().iter().any(|x| x.name() == target && x.error().is_none());
            CheckedTopic { source: t.name, target, partitions: t.partitions, exists }
        })
        .collect())
}

/// The brokers each cluster advertises (the config key of its side, host, port), from
/// its metadata: librdkafka connects to these, not only to the bootstrap brokers the
/// config names, so a server that limits where it connects checks them too.
pub fn advertised_brokers(cfg: &MirrorConfig) -> Result<Vec<(&'static str, String, u16)>> {
    let mut out = Vec::new();
    for side in [Side::Source, Side::Target] {
        let client = consumer(cfg, side, None)?;
        let meta = metadata(cfg, side, &client)?;
        out.extend(meta.brokers().iter().map(|b| (side.key(), b.host().to_string(), u16::try_from(b.port()).unwrap_or_default())));
    }
    Ok(out)
}
