//! What TLS costs: the same WAL drained by Postgres → Postgres and Postgres → Kafka
//! pipelines, each once in the clear and once over TLS (Postgres `sslmode=verify-full`
//! on the replication stream, the catalog and the sink; Kafka SASL_SSL with
//! SCRAM-SHA-512), alternating the order each round. Certificates come from a
//! throwaway CA made with the `openssl` command.
//!
//! Capture alone is measured the same way, as the yardstick for both: `pg_recvlogical`
//! (libpq and OpenSSL, `sslmode=require`) and Sluice into its null sink. What TLS
//! costs the walsender shows in the first; what it costs Sluice's reader, in the gap
//! between the two.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD, TempCluster};
use sluice_postgres::pki::Pki;

use crate::{connect, create_bench_table, peak_rss_mb, start_pipeline, write_rows};

#[derive(Clone, Copy, PartialEq)]
enum Sink {
    Postgres,
    Kafka,
    /// The memory sink keeping nothing: capture and the whole pipeline, no delivery.
    Null,
    /// `pg_recvlogical` into `/dev/null`: not Sluice, the yardstick.
    Recvlogical,
}

impl Sink {
    fn label(self) -> &'static str {
        match self {
            Sink::Postgres => "to_pg",
            Sink::Kafka => "to_kafka",
            Sink::Null => "to_null",
            Sink::Recvlogical => "recvlogical",
        }
    }
}

struct Run<'a> {
    pki: &'a Pki,
    /// librdkafka's `compression.type` for both runs.
    compression: &'a str,
    src: u16,
    dst: u16,
    brokers: &'a str,
    secure_brokers: &'a str,
}

impl Run<'_> {
    fn yaml(&self, name: &str, sink: Sink, tls: bool) -> String {
        let ca = self.pki.path("ca.pem");
        let pg_tls = if tls { format!("sslmode: verify-full, sslrootcert: {}", ca.display()) } else { "sslmode: disable".into() };
        let conn = |port: u16| {
            format!("host: localhost, port: {port}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench, {pg_tls}")
        };
        let sink = match sink {
            Sink::Postgres => format!("{{postgres: {{{}, schema: {name}}}}}", conn(self.dst)),
            Sink::Null | Sink::Recvlogical => format!("{{memory: {{name: {name}, keep: false, state: {{{}}}}}}}", conn(self.dst)),
            Sink::Kafka if tls => format!(
                "{{kafka: {{brokers: '{}', encoding: json, topic_prefix: {name}, properties: {{security.protocol: SASL_SSL, \
                 sasl.mechanism: SCRAM-SHA-512, sasl.username: sluice, sasl.password: bench-secret, ssl.ca.location: '{}', \
                 compression.type: {}}}, state: {{{}}}}}}}",
                self.secure_brokers,
                ca.display(),
                self.compression,
                conn(self.dst)
            ),
            Sink::Kafka => format!(
                "{{kafka: {{brokers: '{}', encoding: json, topic_prefix: {name}, properties: {{compression.type: {}}}, state: {{{}}}}}}}",
                self.brokers,
                self.compression,
                conn(self.dst)
            ),
        };
        format!(
            "pipeline: {name}\nsource: {{{}, tables: [public.bench], slot: {name}, publication: bench_pub}}\nsink: {sink}\n\
             snapshot: {{enabled: false}}\n",
            conn(self.src)
        )
    }

    /// Seconds for the pipeline `name` to apply `rows` changes from its slot.
    async fn drain(&self, name: &str, sink: Sink, tls: bool, rows: u64, end: &str) -> Result<f64> {
        let t = Instant::now();
        if sink == Sink::Recvlogical {
            let (port, name, end) = (self.src, name.to_string(), end.to_string());
            let sslmode = if tls { "require" } else { "disable" };
            tokio::task::spawn_blocking(move || crate::recvlogical_sslmode(port, &name, "bench_pub", &end, sslmode)).await??;
            return Ok(t.elapsed().as_secs_f64());
        }
        let (metrics, stop, handle) = start_pipeline(&self.yaml(name, sink, tls))?;
        while metrics.events.load(Ordering::Relaxed) < rows {
            if handle.is_finished() {
                handle.await??;
                bail!("pipeline {name} stopped");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let s = t.elapsed().as_secs_f64();
        let _ = stop.send(true);
        handle.await??;
        Ok(s)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn tls(rows: u64, row_bytes: usize, rounds: usize, compression: &str) -> Result<serde_json::Value> {
    let pki = Pki::make().context("making a throwaway CA (needs the openssl command)")?;
    let conf: Vec<String> = vec![
        "max_wal_size = 4GB".into(),
        "ssl = on".into(),
        format!("ssl_cert_file = '{}'", pki.path("server.pem").display()),
        format!("ssl_key_file = '{}'", pki.path("server.key").display()),
    ];
    let (src, dst) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let conf: Vec<&str> = conf.iter().map(String::as_str).collect();
        Ok((TempCluster::start(&conf)?, TempCluster::start(&conf)?))
    })
    .await??;
    for port in [src.port, dst.port] {
        connect(port, "postgres").await?.batch_execute("CREATE DATABASE bench").await?;
    }
    let keystore = pki.path("kafka-keystore.pem");
    let broker =
        tokio::task::spawn_blocking(move || sluice_kafka::broker::TempBroker::start_secured(&[], &keystore, &[("sluice", "bench-secret")]))
            .await??;
    let s = connect(src.port, "bench").await?;
    create_bench_table(&s, "bench_pub").await?;
    let names: Vec<(String, Sink, bool)> = (0..rounds)
        .flat_map(|r| {
            // Alternate which goes first, so warming up favours neither.
            let modes = if r % 2 == 0 { [false, true] } else { [true, false] };
            [Sink::Recvlogical, Sink::Null, Sink::Postgres, Sink::Kafka]
                .into_iter()
                .flat_map(move |sink| modes.map(|tls| (format!("{}_{}_{r}", sink.label(), if tls { "tls" } else { "plain" }), sink, tls)))
        })
        .collect();
    for (name, _, _) in &names {
        s.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')")).await?;
    }
    write_rows(&s, rows, row_bytes, 1000).await?;
    let end: String = s.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let run = Run {
        pki: &pki,
        compression,
        src: src.port,
        dst: dst.port,
        brokers: broker.addr(),
        secure_brokers: broker.secure_addr().unwrap_or_default(),
    };
    let mut secs: std::collections::BTreeMap<(&str, bool), Vec<f64>> = Default::default();
    for (name, sink, tls) in &names {
        let t = run.drain(name, *sink, *tls, rows, &end).await?;
        eprintln!("{name}: {t:.2} s ({:.0} rows/s)", rows as f64 / t);
        secs.entry((sink.label(), *tls)).or_default().push(t);
    }
    let rate = |sink: Sink, tls: bool| rows as f64 / median(secs[&(sink.label(), tls)].clone());
    let report = |sink: Sink| {
        let (plain, tls) = (rate(sink, false), rate(sink, true));
        serde_json::json!({
            "plain_rows_per_s": plain, "tls_rows_per_s": tls, "tls_vs_plain": tls / plain,
            "tls_cost_pct": (1.0 - tls / plain) * 100.0,
            "plain_seconds": secs[&(sink.label(), false)], "tls_seconds": secs[&(sink.label(), true)],
        })
    };
    Ok(serde_json::json!({
        "bench": "tls", "rows": rows, "row_bytes": row_bytes, "rounds": rounds, "kafka_compression": compression,
        "pg_recvlogical": report(Sink::Recvlogical),
        "capture_null_sink": report(Sink::Null),
        "postgres_to_postgres": report(Sink::Postgres),
        "postgres_to_kafka_json": report(Sink::Kafka),
        "peak_rss_mb": peak_rss_mb(),
    }))
}
