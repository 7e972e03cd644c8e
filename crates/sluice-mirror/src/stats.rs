//! What a running mirror reports in `/metrics` (Prometheus text): records and batches
//! copied, restarts, and per source partition the lag in records (the source's end
//! minus the mirror's position) and in milliseconds (commit time minus the timestamp
//! of the partition's last copied record, MirrorMaker 2's replication latency).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct MirrorStats {
    pub(crate) records: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) batches: AtomicU64,
    /// Records not copied because they came from the target (active/active).
    pub(crate) looped: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) partitions: Mutex<BTreeMap<(String, i32), PartitionStats>>,
}

#[derive(Default, Clone, Copy)]
pub(crate) struct PartitionStats {
    pub lag_records: Option<i64>,
    pub latency_ms: Option<i64>,
}

impl MirrorStats {
    pub(crate) fn partition(&self, topic: &str, partition: i32, f: impl FnOnce(&mut PartitionStats)) {
        let mut m = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry((topic.to_string(), partition)).or_default());
    }

    /// A summary for the control plane's status column: the counters, and the lag
    /// summed over partitions (records) and at its worst (ms).
    pub fn summary(&self) -> serde_json::Value {
        let parts = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let lag: i64 = parts.values().filter_map(|p| p.lag_records).sum();
        let latency = parts.values().filter_map(|p| p.latency_ms).max();
        let n = |v: &AtomicU64| v.load(Ordering::Relaxed);
        serde_json::json!({
            "records": n(&self.records), "bytes": n(&self.bytes), "batches": n(&self.batches), "looped": n(&self.looped),
            "restarts": n(&self.restarts), "heartbeats": n(&self.heartbeats), "partitions": parts.len(),
            "lag_records": lag, "latency_ms_max": latency,
        })
    }

    /// The Prometheus text exposition of the mirror named `pipeline`.
    pub fn render(&self, pipeline: &str) -> String {
        let mut s = String::new();
        let l = format!("pipeline=\"{pipeline}\"");
        for (name, help, v) in [
            ("sluice_mirror_records_total", "Records copied to the target (committed).", &self.records),
            ("sluice_mirror_bytes_total", "Key and value bytes copied to the target (committed).", &self.bytes),
            ("sluice_mirror_batches_total", "Transactions committed on the target.", &self.batches),
            ("sluice_mirror_looped_records_total", "Records not copied back to the cluster they came from.", &self.looped),
            ("sluice_mirror_restarts_total", "Restarts after a retryable failure.", &self.restarts),
            ("sluice_mirror_heartbeats_total", "Heartbeats written to the source's heartbeats topic.", &self.heartbeats),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{l}}} {}", v.load(Ordering::Relaxed));
        }
        let parts = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            s,
            "# HELP sluice_mirror_lag_records Source records not yet copied, per partition.\n# TYPE sluice_mirror_lag_records gauge"
        );
        for ((t, p), st) in parts.iter() {
            if let Some(v) = st.lag_records {
                let _ = writeln!(s, "sluice_mirror_lag_records{{{l},topic=\"{t}\",partition=\"{p}\"}} {v}");
            }
        }
        let _ = writeln!(
            s,
            "# HELP sluice_mirror_replication_latency_ms Commit time minus the source timestamp of the partition's last copied record.\n\
             # TYPE sluice_mirror_replication_latency_ms gauge"
        );
        for ((t, p), st) in parts.iter() {
            if let Some(v) = st.latency_ms {
                let _ = writeln!(s, "sluice_mirror_replication_latency_ms{{{l},topic=\"{t}\",partition=\"{p}\"}} {v}");
            }
        }
        s
    }
}
