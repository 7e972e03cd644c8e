//! Pipeline metrics, rendered in the Prometheus text format on `/metrics`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use sluice_core::TableName;
use sluice_core::source::{RetentionHealth, WalStatus};

use sluice_postgres::SnapshotProgress;

/// Upper bounds (ms) of the lag histogram's buckets.
const LAG_BUCKETS_MS: [u64; 22] =
    [1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000];

#[derive(Debug, Default)]
pub struct Metrics {
    pub events: AtomicU64,
    /// Events applied, by source table (written once per batch).
    pub table_events: Mutex<HashMap<TableName, u64>>,
    pub bytes: AtomicU64,
    pub transactions: AtomicU64,
    pub batches: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub lag_last_ms: AtomicI64,
    lag_buckets: [AtomicU64; LAG_BUCKETS_MS.len() + 1],
    lag_sum_ms: AtomicU64,
    lag_count: AtomicU64,
    /// WAL the slot holds back (`pg_current_wal_lsn() - restart_lsn`), -1 when unknown.
    pub wal_retained_bytes: AtomicI64,
    /// The slot's `wal_status`, as [`WalStatus::code`] + 1 (0: not read yet).
    wal_status: AtomicI64,
    /// WAL that may still be written before the slot is at risk (`safe_wal_size`), -1
    /// when unlimited or unknown.
    pub wal_safe_bytes: AtomicI64,
    pub confirmed_lsn: AtomicU64,
    /// 1 while the pipeline is halted on a change the sink refused or a lost slot.
    pub halted: AtomicI64,
    /// Why it is halted: one line, for status and alerts (never row values).
    halt_reason: Mutex<Option<String>>,
    pub snapshot: Arc<SnapshotProgress>,
    /// Rows read again by resyncs, and their chunks taken by the sink.
    pub resync_rows: AtomicU64,
    pub resync_chunks: AtomicU64,
    /// Enrichment keys fetched from their source, and answered by the cache.
    pub enrich_fetched: AtomicU64,
    pub enrich_cached: AtomicU64,
    /// Failed enrichment calls (after retries), rows recorded as failed or deferred,
    /// and rows of those held back.
    pub enrich_errors: AtomicU64,
    pub enrich_failed_rows: AtomicU64,
    pub enrich_dead_letters: AtomicU64,
}

impl Metrics {
    pub fn set_wal_health(&self, h: &RetentionHealth) {
        self.wal_retained_bytes.store(h.retained_bytes.unwrap_or(-1), Ordering::Relaxed);
        self.wal_safe_bytes.store(h.safe_bytes.unwrap_or(-1), Ordering::Relaxed);
        self.wal_status.store(h.status.code() + 1, Ordering::Relaxed);
    }

    pub fn wal_status(&self) -> WalStatus {
        match self.wal_status.load(Ordering::Relaxed) {
            1 => WalStatus::Reserved,
            2 => WalStatus::Extended,
            3 => WalStatus::Unreserved,
            4 => WalStatus::Lost,
            _ => WalStatus::Unknown,
        }
    }

    /// Halted (with the one line saying why) or running again (`None`).
    pub fn set_halted(&self, reason: Option<String>) {
        self.halted.store(reason.is_some() as i64, Ordering::Relaxed);
        *self.halt_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    pub fn halt_reason(&self) -> Option<String> {
        self.halt_reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn observe_lag_ms(&self, ms: i64) {
        let ms = ms.max(0);
        self.lag_last_ms.store(ms, Ordering::Relaxed);
        let i = LAG_BUCKETS_MS.iter().position(|&b| ms as u64 <= b).unwrap_or(LAG_BUCKETS_MS.len());
        self.lag_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.lag_sum_ms.fetch_add(ms as u64, Ordering::Relaxed);
        self.lag_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Approximate lag quantile (the bucket's upper bound), in ms.
    pub fn lag_quantile_ms(&self, q: f64) -> Option<u64> {
        lag_quantile_of(&self.lag_counts(), q)
    }

    /// The lag histogram's bucket counts (the difference of two readings is the
    /// histogram of a phase).
    pub fn lag_counts(&self) -> Vec<u64> {
        self.lag_buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }
}

/// Approximate lag quantile of bucket `counts` (see [`Metrics::lag_counts`]), in ms.
pub fn lag_quantile_of(counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return Some(LAG_BUCKETS_MS.get(i).copied().unwrap_or(u64::MAX));
        }
    }
    None
}

/// A Prometheus label value: backslash, quote and newline escaped.
pub fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

type Read = fn(&Metrics) -> String;

fn count(a: &AtomicU64) -> String {
    a.load(Ordering::Relaxed).to_string()
}

/// The families with one sample per pipeline: name, help, type, value.
const SCALARS: &[(&str, &str, &str, Read)] = &[
    ("sluice_events_total", "Change events applied to the sink.", "counter", |m| count(&m.events)),
    ("sluice_bytes_total", "Bytes of row data applied to the sink.", "counter", |m| count(&m.bytes)),
    ("sluice_transactions_total", "Source transactions applied.", "counter", |m| count(&m.transactions)),
    ("sluice_batches_total", "Sink batches committed.", "counter", |m| count(&m.batches)),
    ("sluice_errors_total", "Errors met (each retried or fatal).", "counter", |m| count(&m.errors)),
    ("sluice_reconnects_total", "Times the pipeline reconnected after a transient error.", "counter", |m| count(&m.reconnects)),
    ("sluice_lag_ms", "Lag of the last applied transaction, source commit to sink commit.", "gauge", |m| {
        m.lag_last_ms.load(Ordering::Relaxed).to_string()
    }),
    ("sluice_wal_retained_bytes", "WAL retained by the replication slot.", "gauge", |m| {
        m.wal_retained_bytes.load(Ordering::Relaxed).to_string()
    }),
    (
        "sluice_wal_safe_bytes",
        "WAL that may still be written before the slot is at risk (safe_wal_size; -1: no max_slot_wal_keep_size).",
        "gauge",
        |m| m.wal_safe_bytes.load(Ordering::Relaxed).to_string(),
    ),
    ("sluice_confirmed_lsn", "Last LSN confirmed to the source, as a number.", "gauge", |m| count(&m.confirmed_lsn)),
    (
        "sluice_pipeline_halted",
        "1 while the pipeline is halted: a change the sink refused, a lost slot (the log and status say why).",
        "gauge",
        |m| m.halted.load(Ordering::Relaxed).to_string(),
    ),
    ("sluice_snapshot_rows_total", "Rows copied by the initial snapshot.", "counter", |m| count(&m.snapshot.rows_copied)),
    ("sluice_snapshot_chunks_done", "Snapshot chunks finished.", "gauge", |m| count(&m.snapshot.chunks_done)),
    ("sluice_snapshot_chunks_total", "Snapshot chunks planned.", "gauge", |m| count(&m.snapshot.chunks_total)),
    ("sluice_resync_rows_total", "Rows read again from the source by resyncs.", "counter", |m| count(&m.resync_rows)),
    ("sluice_resync_chunks_total", "Resync chunks the sink took.", "counter", |m| count(&m.resync_chunks)),
    ("sluice_enrich_keys_fetched_total", "Enrichment keys fetched from a reference table or service.", "counter", |m| {
        count(&m.enrich_fetched)
    }),
    ("sluice_enrich_keys_cached_total", "Enrichment keys answered by the cache.", "counter", |m| count(&m.enrich_cached)),
    ("sluice_enrich_errors_total", "Enrichment calls that failed after their retries.", "counter", |m| count(&m.enrich_errors)),
    ("sluice_enrich_failed_rows_total", "Rows recorded in sluice.enrich_failures (failed or deferred).", "counter", |m| {
        count(&m.enrich_failed_rows)
    }),
    ("sluice_enrich_dead_letters_total", "Rows held back by a dead_letter policy until their enricher answers.", "counter", |m| {
        count(&m.enrich_dead_letters)
    }),
];

impl Metrics {
    /// One pipeline's metrics, labelled `pipeline="<name>"`.
    pub fn render(&self, pipeline: &str) -> String {
        render_all(&[(format!("pipeline=\"{}\"", label_value(pipeline)), self)])
    }
}

/// Several pipelines' metrics in one exposition: each family's HELP and TYPE once,
/// then a sample per pipeline under its labels (`pipeline="a",tenant="t"`, escaped).
pub fn render_all(pipelines: &[(String, &Metrics)]) -> String {
    let mut s = String::new();
    for (name, help, kind, read) in SCALARS {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (l, m) in pipelines {
            let _ = writeln!(s, "{name}{{{l}}} {}", read(m));
        }
    }
    let _ = writeln!(
        s,
        "# HELP sluice_slot_wal_status The replication slot's wal_status (1 on the current one): reserved, extended, unreserved (at risk), lost.\n# TYPE sluice_slot_wal_status gauge"
    );
    for (l, m) in pipelines {
        let status = m.wal_status();
        for st in [WalStatus::Reserved, WalStatus::Extended, WalStatus::Unreserved, WalStatus::Lost] {
            let _ = writeln!(s, "sluice_slot_wal_status{{{l},status=\"{}\"}} {}", st.as_str(), (st == status) as u8);
        }
    }
    let _ =
        writeln!(s, "# HELP sluice_table_events_total Change events applied, by source table.\n# TYPE sluice_table_events_total counter");
    for (l, m) in pipelines {
        let mut tables: Vec<(String, u64)> =
            m.table_events.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(t, n)| (t.to_string(), *n)).collect();
        tables.sort();
        for (t, n) in tables {
            let _ = writeln!(s, "sluice_table_events_total{{{l},table=\"{}\"}} {n}", label_value(&t));
        }
    }
    let _ = writeln!(s, "# HELP sluice_lag_histogram_ms Lag from source commit to sink commit.\n# TYPE sluice_lag_histogram_ms histogram");
    for (l, m) in pipelines {
        let mut cum = 0;
        for (i, b) in m.lag_buckets.iter().enumerate() {
            cum += b.load(Ordering::Relaxed);
            let le = LAG_BUCKETS_MS.get(i).map_or("+Inf".to_string(), |v| v.to_string());
            let _ = writeln!(s, "sluice_lag_histogram_ms_bucket{{{l},le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(s, "sluice_lag_histogram_ms_sum{{{l}}} {}", m.lag_sum_ms.load(Ordering::Relaxed));
        let _ = writeln!(s, "sluice_lag_histogram_ms_count{{{l}}} {}", m.lag_count.load(Ordering::Relaxed));
    }
    s
}

/// Serves `/metrics` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, pipeline: String, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    serve_text(addr, move || metrics.render(&pipeline)).await
}

/// Serves `/metrics` with what `render` returns (Prometheus text) until the process
/// ends: pipelines and mirrors alike.
pub async fn serve_text(addr: std::net::SocketAddr, render: impl Fn() -> String + Clone + Send + Sync + 'static) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], render()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_quantiles_come_from_buckets() {
        let m = Metrics::default();
        for ms in [1, 3, 3, 40, 400] {
            m.observe_lag_ms(ms);
        }
        assert_eq!(m.lag_quantile_ms(0.5), Some(3));
        assert_eq!(m.lag_quantile_ms(0.99), Some(500));
        let text = m.render("p");
        assert!(text.contains("sluice_lag_histogram_ms_bucket{pipeline=\"p\",le=\"+Inf\"} 5"), "{text}");
        assert!(text.contains("sluice_lag_histogram_ms_count{pipeline=\"p\"} 5"));
        m.set_wal_health(&RetentionHealth { status: WalStatus::Unreserved, retained_bytes: Some(9), safe_bytes: Some(-5) });
        let text = m.render("p");
        assert!(text.contains("sluice_slot_wal_status{pipeline=\"p\",status=\"unreserved\"} 1"), "{text}");
        assert!(text.contains("sluice_slot_wal_status{pipeline=\"p\",status=\"reserved\"} 0"), "{text}");
    }

    #[test]
    fn several_pipelines_share_each_family_header() {
        let (a, b) = (Metrics::default(), Metrics::default());
        b.events.store(7, Ordering::Relaxed);
        let text =
            render_all(&[("pipeline=\"a\",tenant=\"t1\"".into(), &a), (format!("pipeline=\"{}\",tenant=\"t2\"", label_value("b\"x")), &b)]);
        assert_eq!(text.matches("# TYPE sluice_events_total counter").count(), 1, "{text}");
        assert!(text.contains("sluice_events_total{pipeline=\"a\",tenant=\"t1\"} 0"), "{text}");
        assert!(text.contains("sluice_events_total{pipeline=\"b\\\"x\",tenant=\"t2\"} 7"), "{text}");
        let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let n = types.len();
        types.dedup();
        assert_eq!(types.len(), n, "a family's TYPE appears once");
    }

    /// The shipped monitoring files parse, and name only metrics `render` exports.
    #[test]
    fn deploy_files_name_only_exported_metrics() {
        let rules = include_str!("../../../deploy/prometheus-alerts.yaml");
        let dashboard = include_str!("../../../deploy/grafana-dashboard.json");
        serde_yaml::from_str::<serde_yaml::Value>(rules).expect("prometheus-alerts.yaml is YAML");
        serde_json::from_str::<serde_json::Value>(dashboard).expect("grafana-dashboard.json is JSON");
        let m = Metrics::default();
        m.table_events.lock().unwrap().insert(TableName::new("public", "t"), 1);
        let text = m.render("p");
        let mut named = 0;
        for file in [rules, dashboard] {
            for (i, _) in file.match_indices("sluice_") {
                let name: String = file[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if name == "sluice_" || name.starts_with("sluice_control") {
                    continue;
                }
                named += 1;
                assert!(text.contains(&format!("{name}{{")), "{name} is not a metric Sluice exports");
            }
        }
        assert!(named > 15, "only {named} metric names found");
    }
}
