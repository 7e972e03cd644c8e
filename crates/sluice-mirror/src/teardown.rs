//! Removing a mirror (the control plane's teardown): its offsets topic on the target
//! always, since that offset map belongs to this mirror alone and nothing else can
//! read it; with `purge`, also the target topics it copied into. The source is not
//! needed (it may be the region that is gone): the topics come from the offset map.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::clusters::{Side, admin, admin_opts, block};
use crate::config::{HEARTBEATS_TOPIC, MirrorConfig};
use crate::copy::load_map;
use crate::error::{MirrorError, Result};

/// Deletes what the mirror made on the target; returns the topics deleted. Deleting
/// a topic that is already gone is not an error (a teardown may be retried).
pub fn teardown(cfg: &MirrorConfig, purge: bool) -> Result<Vec<String>> {
    let mut topics = Vec::new();
    if purge {
        let map = load_map(cfg)?;
        // The heartbeats' target topic may be shared with other mirrors of the same
        // source cluster: it stays.
        topics.extend(
            map.partitions
                .keys()
                .filter(|(t, _)| t != HEARTBEATS_TOPIC)
                .map(|(t, _)| cfg.target_topic(t))
                .collect::<std::collections::BTreeSet<_>>(),
        );
    }
    topics.push(cfg.offsets_topic());
    let admin = admin(cfg, Side::Target)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let res = block(admin.delete_topics(&names, &admin_opts()))
        .map_err(|e| MirrorError::kafka("deleting the mirror's topics on the target", &e))?;
    for r in res {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)) => {}
            Err((t, code)) => return Err(MirrorError::kafka(&format!("deleting topic {t} on the target"), &KafkaError::AdminOp(code))),
        }
    }
    Ok(topics)
}
