//! DogStatsD: pipeline metrics pushed over UDP to a Datadog agent (or any DogStatsD
//! server) beside the Prometheus endpoint, for teams whose dashboards live in Datadog.
//! Every series carries the tags `pipeline`, `sink` and, under the control plane,
//! `tenant`; per-table counts add `table`.
//!
//! Gauges are sent as they stand; counters as the increase since the last flush
//! (DogStatsD's `c` type sums what it receives), so a restarted agent loses one
//! interval, never double counts. Sending is fire and forget (UDP): a missing agent
//! costs nothing and never slows a pipeline.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Datagrams stay under a typical MTU so none are fragmented.
const MAX_DATAGRAM: usize = 1400;

pub struct DogStatsd {
    socket: UdpSocket,
    interval: Duration,
    last_flush: Option<Instant>,
    /// Counter values at the last flush, by series (tags and name).
    sent: HashMap<String, u64>,
    buf: String,
}

impl DogStatsd {
    /// A client sending to `addr` (`host:port`) every `interval`.
    pub fn connect(addr: &str, interval: Duration) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(addr).map(|()| s)).map_err(|e| {
            anyhow::anyhow!(
                "cannot send DogStatsD metrics to {addr}: {e}: give --dogstatsd as host:port (the agent's UDP port, usually 8125)"
            )
        })?;
        socket.set_nonblocking(true)?;
        Ok(Self { socket, interval, last_flush: None, sent: HashMap::new(), buf: String::with_capacity(MAX_DATAGRAM) })
    }

    /// Whether a flush is due (then it counts as done).
    pub fn due(&mut self) -> bool {
        if self.last_flush.is_some_and(|t| t.elapsed() < self.interval) {
            return false;
        }
        self.last_flush = Some(Instant::now());
        true
    }

    /// Sends one pipeline's metrics; `tags` as `key:value` pairs.
    pub fn emit(&mut self, tags: &[(&str, &str)], m: &Metrics) {
        let tags = tags.iter().map(|(k, v)| format!("{k}:{}", clean(v))).collect::<Vec<_>>().join(",");
        let gauge = |a: &AtomicI64| a.load(Ordering::Relaxed);
        let gauges = [
            ("lag_ms", gauge(&m.lag_last_ms)),
            ("wal_retained_bytes", gauge(&m.wal_retained_bytes)),
            ("wal_safe_bytes", gauge(&m.wal_safe_bytes)),
            ("slot.wal_status", m.wal_status().code()),
            ("pipeline.halted", gauge(&m.halted)),
            ("snapshot.chunks_done", m.snapshot.chunks_done.load(Ordering::Relaxed) as i64),
            ("snapshot.chunks_total", m.snapshot.chunks_total.load(Ordering::Relaxed) as i64),
        ];
        for (name, v) in gauges {
            self.line(&format!("sluice.{name}:{v}|g|#{tags}"));
        }
        let counter = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            ("events", counter(&m.events)),
            ("bytes", counter(&m.bytes)),
            ("transactions", counter(&m.transactions)),
            ("batches", counter(&m.batches)),
            ("errors", counter(&m.errors)),
            ("reconnects", counter(&m.reconnects)),
            ("snapshot.rows", counter(&m.snapshot.rows_copied)),
            ("resync.rows", counter(&m.resync_rows)),
            ("enrich.errors", counter(&m.enrich_errors)),
            ("enrich.failed_rows", counter(&m.enrich_failed_rows)),
            ("enrich.dead_letters", counter(&m.enrich_dead_letters)),
        ];
        for (name, v) in counters {
            self.count(&tags, name, v);
        }
        let tables: Vec<(String, u64)> =
            m.table_events.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(t, n)| (t.to_string(), *n)).collect();
        for (t, n) in tables {
            self.count(&format!("{tags},table:{}", clean(&t)), "table.events", n);
        }
        self.flush();
    }

    fn count(&mut self, tags: &str, name: &str, total: u64) {
        let key = format!("{name}|{tags}");
        let before = self.sent.insert(key, total).unwrap_or(0);
        // A restarted pipeline starts its counters again: its first value is the delta.
        let delta = if total >= before { total - before } else { total };
        self.line(&format!("sluice.{name}:{delta}|c|#{tags}"));
    }

    fn line(&mut self, line: &str) {
        if !self.buf.is_empty() && self.buf.len() + 1 + line.len() > MAX_DATAGRAM {
            self.flush();
        }
        if !self.buf.is_empty() {
            self.buf.push('\n');
        }
        let _ = write!(self.buf, "{line}");
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            // No agent listening, or a full buffer: metrics are best effort.
            let _ = self.socket.send(self.buf.as_bytes());
            self.buf.clear();
        }
    }
}

/// Tag values may not hold the protocol's separators.
fn clean(v: &str) -> String {
    v.chars().map(|c| if matches!(c, ',' | '|' | '#' | '\n' | ' ') { '_' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real UDP listener receives gauges and counter deltas with their tags.
    #[test]
    fn sends_gauges_and_counter_deltas_with_tags() {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        listener.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut d = DogStatsd::connect(&listener.local_addr().unwrap().to_string(), Duration::from_secs(10)).unwrap();
        let m = Metrics::default();
        m.events.store(10, Ordering::Relaxed);
        m.lag_last_ms.store(42, Ordering::Relaxed);
        m.table_events.lock().unwrap().insert(sluice_core::TableName::new("public", "orders"), 7);
        let tags = [("pipeline", "orders"), ("tenant", "shop, inc"), ("sink", "postgres")];
        let recv = |l: &UdpSocket| {
            let mut all = String::new();
            let mut buf = [0u8; 2048];
            while let Ok(n) = l.recv(&mut buf) {
                all.push_str(std::str::from_utf8(&buf[..n]).unwrap());
                all.push('\n');
                l.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            }
            l.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            all
        };
        d.emit(&tags, &m);
        let first = recv(&listener);
        assert!(first.contains("sluice.lag_ms:42|g|#pipeline:orders,tenant:shop__inc,sink:postgres"), "{first}");
        assert!(first.contains("sluice.events:10|c|#pipeline:orders"), "{first}");
        assert!(first.contains("sluice.table.events:7|c|#pipeline:orders,tenant:shop__inc,sink:postgres,table:public.orders"), "{first}");
        m.events.store(15, Ordering::Relaxed);
        d.emit(&tags, &m);
        let second = recv(&listener);
        assert!(second.contains("sluice.events:5|c|"), "{second}");
    }
}
