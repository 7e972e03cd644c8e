//! The Metrics Summary benchmark: the page's queries on Postgres (the join with facet
//! counts) and on the search index built by a pipeline, same data, same run; the initial
//! load; the lag from a configuration's commit to its metric's document being
//! searchable; the service's own `_bulk` rate.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use rand::Rng as _;
use serde_json::{Value, json};
use sluice::metrics_summary as ms;
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD};
use tokio::sync::Mutex;

use crate::{connect, peak_rss_mb, peak_rss_mb_of, servers, start_pipeline};

/// The search service in its own process (this binary's `search-serve`), so its memory
/// is measured apart from the pipeline's.
struct Service {
    child: Child,
    url: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn peak_rss_mb(&self) -> f64 {
        peak_rss_mb_of(&format!("/proc/{}/status", self.child.id()))
    }
}

async fn start_service(data: &std::path::Path, refresh_ms: u64) -> Result<Service> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(std::env::current_exe()?)
        .args(["search-serve", "--addr", &format!("127.0.0.1:{port}"), "--refresh-ms", &refresh_ms.to_string(), "--data"])
        .arg(data)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the search service")?;
    let svc = Service { child, url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "the search service did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(svc)
}

/// `search-serve`: the service alone (what `sluice search serve` runs).
pub async fn serve(addr: std::net::SocketAddr, data: std::path::PathBuf, refresh_ms: u64) -> Result<()> {
    let api = sluice_search::open_api(&data, Duration::from_millis(refresh_ms), None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, api).await?;
    Ok(())
}

/// Microseconds in, milliseconds (two decimals) out.
fn ms_percentiles(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let to_ms = |us: f64| (us / 10.0).round() / 100.0;
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    json!({"p50_ms": to_ms(ms::quantile(&s, 0.5)), "p90_ms": to_ms(ms::quantile(&s, 0.9)), "p99_ms": to_ms(ms::quantile(&s, 0.99)), "mean_ms": to_ms(mean)})
}

/// Every document built by Postgres in one statement: the baseline for the initial load
/// (what producing the documents costs before any indexing).
const ALL_DOCS: &str = "
SELECT m.id::text, (to_jsonb(m) || jsonb_build_object('org_name', o.name, 'org_plan', o.plan,
    'configurations', COALESCE((SELECT jsonb_agg(jsonb_build_object('id', c.id, 'kind', c.kind, 'setting', c.setting, 'enabled', c.enabled) ORDER BY c.id)
                               FROM metric_configurations c WHERE c.metric_id = m.id), '[]'),
    'configuration_count', (SELECT count(*) FROM metric_configurations c WHERE c.metric_id = m.id)))::text
FROM metrics m LEFT JOIN orgs o ON o.id = m.org_id";

pub async fn metrics_summary(scale: f64, queries: usize, rate: u64, seconds: u64, refresh_ms: u64) -> Result<Value> {
    let scale = ms::Scale::new(scale)?;
    let (src, dst) = servers().await?;
    let s = connect(src.port, "bench").await?;
    eprintln!("creating the dataset: {} metrics, {} configurations...", scale.metrics, scale.configurations);
    let t = Instant::now();
    ms::create_dataset(&s, scale, 0.42).await?;
    let dataset_s = t.elapsed().as_secs_f64();
    let docs: i64 = s.query_one("SELECT count(*) FROM metrics", &[]).await?.get(0);

    let data = std::env::temp_dir().join(format!("sluice-bench-search-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let svc = start_service(&data, refresh_ms).await?;
    let http = reqwest::Client::new();

    // Initial load through the real pipeline: documents built in the source, `_bulk`.
    // First with one request at a time (the baseline: how the sink loaded before), into
    // its own index from its own slot, then with the sink's default requests in flight.
    let yaml = |pipeline: &str, index: &str, in_flight: &str| {
        format!(
            "pipeline: {pipeline}\nsource: {{host: 127.0.0.1, port: {sp}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench, heartbeat_interval: 1s}}\n\
             sink:\n  search:\n    url: {url}\n    index: {index}\n{in_flight}    document:{doc}    state: {{host: 127.0.0.1, port: {dp}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench}}\n",
            sp = src.port,
            dp = dst.port,
            url = svc.url,
            doc = ms::DOCUMENT_YAML,
        )
    };
    // Starts a pipeline and waits for its load: (the pipeline, seconds to acknowledged,
    // seconds to searchable).
    let load = async |yaml: String, index: &str| -> Result<_> {
        let t = Instant::now();
        let (metrics, stop, handle) = start_pipeline(&yaml)?;
        while metrics.snapshot.chunks_done.load(Ordering::Relaxed) == 0 {
            ensure!(!handle.is_finished(), "the pipeline stopped during the initial load");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let acked_s = t.elapsed().as_secs_f64();
        ms::wait_for_count(&http, &svc.url, index, docs as u64, Duration::from_secs(60)).await?;
        Ok(((metrics, stop, handle), acked_s, t.elapsed().as_secs_f64()))
    };
    eprintln!("initial load of {docs} documents, one _bulk request at a time...");
    let ((_, serial_stop, serial), _, serial_s) =
        load(yaml("bench_serial", "metrics_serial", "    max_in_flight_requests: 1\n"), "metrics_serial").await?;
    let _ = serial_stop.send(true);
    serial.await??;
    eprintln!("  searchable in {serial_s:.1}s");
    eprintln!("initial load of {docs} documents, requests in flight (default)...");
    let ((metrics, stop, handle), acked_s, load_s) = load(yaml("bench", "metrics", ""), "metrics").await?;
    eprintln!("  acknowledged in {acked_s:.1}s, searchable in {load_s:.1}s");

    // The page, both ways; every page must be the same.
    let qs = ms::sample_queries(queries, 2026);
    for q in qs.iter().take(5) {
        ms::page_postgres(&s, q).await?;
        ms::page_search(&http, &svc.url, "metrics", q).await?;
    }
    eprintln!("{} page views on Postgres and on the index...", qs.len());
    let (mut pg_us, mut es_us) = (Vec::new(), Vec::new());
    for q in &qs {
        let (a, ta) = ms::timed(ms::page_postgres(&s, q)).await?;
        let (b, tb) = ms::timed(ms::page_search(&http, &svc.url, "metrics", q)).await?;
        a.same_page(&b).with_context(|| format!("Postgres and the index disagree on {q:?}"))?;
        pg_us.push(ta);
        es_us.push(tb);
    }
    let (pg, es) = (ms_percentiles(&pg_us), ms_percentiles(&es_us));
    eprintln!("  postgres {pg}\n  search   {es}");

    // Lag: configurations changed at a steady rate; each change carries a marker that is
    // searched for until its metric's document shows it.
    eprintln!("lag at {rate} configuration updates/s for {seconds}s...");
    let pending: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let lags: Arc<Mutex<Vec<f64>>> = Arc::default();
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let poller = {
        let (pending, lags, writing, http, url) = (pending.clone(), lags.clone(), writing.clone(), http.clone(), svc.url.clone());
        tokio::spawn(async move {
            let deadline_after_writes = Duration::from_secs(60);
            let mut stopped_at: Option<Instant> = None;
            loop {
                let markers: Vec<String> = pending.lock().await.keys().cloned().collect();
                if !writing.load(Ordering::Relaxed) {
                    let at = *stopped_at.get_or_insert_with(Instant::now);
                    if markers.is_empty() || at.elapsed() > deadline_after_writes {
                        return markers.len();
                    }
                }
                if !markers.is_empty() {
                    let body = json!({"size": 500, "_source": ["configurations"], "query": {"nested": {"path": "configurations",
                        "query": {"terms": {"configurations.setting": markers}}}}});
                    let r: Value = match http.post(format!("{url}/metrics/_search")).json(&body).send().await {
                        Ok(r) => r.json().await.unwrap_or(Value::Null),
                        Err(_) => Value::Null,
                    };
                    let now = Instant::now();
                    let mut p = pending.lock().await;
                    for h in r["hits"]["hits"].as_array().into_iter().flatten() {
                        for c in h["_source"]["configurations"].as_array().into_iter().flatten() {
                            if let Some(t0) = c["setting"].as_str().and_then(|m| p.remove(m)) {
                                lags.lock().await.push((now - t0).as_secs_f64() * 1e6);
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let writer = connect(src.port, "bench").await?;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let (start, mut n, mut used) = (Instant::now(), 0u64, HashSet::new());
    while start.elapsed() < Duration::from_secs(seconds) {
        // A configuration changed twice before it shows would hide its first marker.
        let id = loop {
            let id = rand::rng().random_range(1..=scale.configurations as i64);
            if used.insert(id) {
                break id;
            }
        };
        let marker = format!("lag{n}");
        let t0 = Instant::now();
        pending.lock().await.insert(marker.clone(), t0);
        writer.execute("UPDATE metric_configurations SET setting = $1 WHERE id = $2", &[&marker, &id]).await?;
        n += 1;
        tokio::time::sleep_until((start + interval * n as u32).into()).await;
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    writing.store(false, Ordering::Relaxed);
    let unseen = poller.await?;
    ensure!(unseen == 0, "{unseen} of {n} changes never became searchable");
    let lag = ms_percentiles(&lags.lock().await);
    eprintln!("  {lag}");
    let pipeline_rss = peak_rss_mb();
    let reconnects = metrics.reconnects.load(Ordering::Relaxed);
    let _ = stop.send(true);
    handle.await??;

    // Baseline: Postgres producing every document alone; then the same documents sent
    // straight to the service with `_bulk` (the service's indexing rate on its own).
    let t = Instant::now();
    let rows = s.query(ALL_DOCS, &[]).await?;
    let build_s = t.elapsed().as_secs_f64();
    let mapping: Value = http.get(format!("{}/metrics/_mapping", svc.url)).send().await?.json().await?;
    let r = http.put(format!("{}/metrics_bulk", svc.url)).json(&json!({"mappings": mapping["metrics"]["mappings"]})).send().await?;
    ensure!(r.status().is_success(), "creating metrics_bulk: {}", r.text().await?);
    let t = Instant::now();
    for chunk in rows.chunks(1000) {
        let mut body = String::with_capacity(chunk.len() * 1500);
        for row in chunk {
            body.push_str(&json!({"index": {"_id": row.get::<_, String>(0)}}).to_string());
            body.push('\n');
            body.push_str(row.get::<_, &str>(1));
            body.push('\n');
        }
        let v: Value = http
            .post(format!("{}/metrics_bulk/_bulk", svc.url))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?
            .json()
            .await?;
        if v["errors"] != json!(false) {
            bail!("bulk errors: {}", v.to_string().chars().take(500).collect::<String>());
        }
    }
    let bulk_s = t.elapsed().as_secs_f64();
    ms::wait_for_count(&http, &svc.url, "metrics_bulk", docs as u64, Duration::from_secs(60)).await?;
    let children: i64 = s.query_one("SELECT count(*) FROM metric_configurations", &[]).await?.get(0);
    let service_rss = svc.peak_rss_mb();
    drop(svc);
    let _ = std::fs::remove_dir_all(&data);

    let p90 = |v: &Value| v["p90_ms"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "bench": "metrics_summary",
        "metrics": docs,
        "configurations": children,
        "dataset_s": (dataset_s * 10.0).round() / 10.0,
        "initial_load": {
            "acked_s": (acked_s * 10.0).round() / 10.0,
            "searchable_s": (load_s * 10.0).round() / 10.0,
            "docs_per_s": (docs as f64 / load_s).round(),
            "postgres_builds_all_docs_s": (build_s * 10.0).round() / 10.0,
            "ratio_to_postgres_build": ((load_s / build_s) * 100.0).round() / 100.0,
            "one_request_at_a_time": {"searchable_s": (serial_s * 10.0).round() / 10.0, "docs_per_s": (docs as f64 / serial_s).round()},
            "speedup_over_one_at_a_time": ((serial_s / load_s) * 100.0).round() / 100.0,
        },
        "service_bulk": {"docs_per_s": (docs as f64 / bulk_s).round(), "nested_docs_per_s": ((docs + children) as f64 / bulk_s).round(), "s": (bulk_s * 10.0).round() / 10.0},
        "page_queries": queries,
        "refresh_interval_ms": refresh_ms,
        "postgres_join": pg,
        "search": es,
        "speedup_p90": ((p90(&pg) / p90(&es)) * 10.0).round() / 10.0,
        "lag": {"rate_per_s": achieved.round(), "changes": n, "commit_to_searchable": lag},
        "peak_rss_mb": {"search_service": service_rss.round(), "pipeline_and_bench": pipeline_rss.round()},
        "pipeline_reconnects": reconnects,
    }))
}
