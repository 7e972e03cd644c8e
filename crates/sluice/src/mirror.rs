//! `sluice mirror`: runs a Kafka-to-Kafka mirror (see `sluice_mirror`) and shows how a
//! consumer group's offsets translate to the target.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sluice_mirror::MirrorConfig;
use sluice_mirror::offsets::Translation;

pub fn load(path: &Path) -> anyhow::Result<MirrorConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
    MirrorConfig::parse(&text).map_err(|m| anyhow::anyhow!("invalid config {}: {m}", path.display()))
}

/// Whether the config file describes a mirror (`source: kafka:`).
pub fn is_mirror(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| MirrorConfig::is_mirror(&t))
}

/// Runs the mirror until `stop` turns true (SIGINT/SIGTERM): the batch in flight
/// commits or is aborted, and a restart resumes after the last committed one.
pub async fn run(
    cfg: MirrorConfig,
    metrics_addr: Option<std::net::SocketAddr>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let stats = Arc::new(sluice_mirror::MirrorStats::default());
    if let Some(addr) = metrics_addr {
        let (s, p) = (stats.clone(), cfg.pipeline.clone());
        crate::metrics::serve_text(addr, move || s.render(&p)).await?;
    }
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        f.store(true, Ordering::Relaxed);
    });
    // librdkafka's calls block: the mirror runs on its own thread.
    tokio::task::spawn_blocking(move || sluice_mirror::run(&cfg, &flag, &stats)).await??;
    Ok(())
}

/// Prints the translation of `group`'s committed offsets, one partition a line (or JSON).
pub async fn offsets(cfg: MirrorConfig, group: String, json: bool) -> anyhow::Result<()> {
    let rows = tokio::task::spawn_blocking(move || {
        let map = sluice_mirror::load_map(&cfg)?;
        sluice_mirror::translate_group(&cfg, &map, &group)
    })
    .await??;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("the group has no committed offsets on the mirrored topics");
    }
    for r in rows {
        let what = match r.translation {
            Translation::Exact { target } => format!("{}[{}] @ {target}", r.target_topic, r.partition),
            Translation::Ahead { mirrored_to } => format!("not yet: the mirror has copied up to source offset {mirrored_to}"),
            Translation::Unknown => "not mirrored".into(),
        };
        println!("{}[{}] @ {} -> {what}", r.topic, r.partition, r.committed);
    }
    Ok(())
}

/// `sluice check` for a mirror: both clusters, the topics, the partition counts.
pub async fn check(cfg: MirrorConfig, json: bool) -> anyhow::Result<()> {
    let pipeline = cfg.pipeline.clone();
    let topics = tokio::task::spawn_blocking(move || sluice_mirror::check(&cfg)).await??;
    if json {
        println!("{}", serde_json::json!({"ok": true, "pipeline": pipeline, "topics": topics}));
        return Ok(());
    }
    for t in &topics {
        let state = if t.exists { "exists" } else { "will be created" };
        println!("{} ({} partitions) -> {} ({state})", t.source, t.partitions, t.target);
    }
    println!("ok: mirror {pipeline} can run ({} topics)", topics.len());
    Ok(())
}
