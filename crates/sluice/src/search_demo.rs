//! `sluice search demo`: the Metrics Summary page served from the built-in search
//! service, fed live from Postgres by a pipeline that denormalizes metrics and their
//! configurations into one document each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use rand::Rng as _;
use serde_json::json;
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD, TempCluster};
use tokio::sync::watch;

use crate::demo::spawn_pipeline;
use crate::metrics_summary::{self as ms, PageQuery};

pub struct DemoOptions {
    pub scale: f64,
    /// Where the page is served.
    pub addr: SocketAddr,
    /// Where the search service listens (port 0: any free port).
    pub search_addr: SocketAddr,
    /// Configuration changes per second written while the page is served.
    pub rate: u32,
    /// Stop after this long (None: at Ctrl-C).
    pub duration: Option<Duration>,
}

struct App {
    http: reqwest::Client,
    search_url: String,
    pg: tokio_postgres::Client,
}

/// Serves the built-in search service on `addr`; returns its URL.
async fn start_search(addr: SocketAddr, data: &std::path::Path) -> Result<String> {
    let api = sluice_search::open_api(data, sluice_search::DEFAULT_REFRESH, None)
        .map_err(|e| anyhow::anyhow!("opening the search data directory: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on --search-addr {addr}"))?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, api).await });
    Ok(url)
}

pub async fn run(o: DemoOptions, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let scale = ms::Scale::new(o.scale)?;
    // Bind the page's address first: a taken port fails before minutes of loading.
    let page_listener = tokio::net::TcpListener::bind(o.addr).await.with_context(|| format!("cannot listen on --addr {}", o.addr))?;
    println!("starting a throwaway Postgres server...");
    let pg = tokio::task::spawn_blocking(|| TempCluster::start(&[])).await??;
    let admin = sluice_postgres::cluster::superuser_client(pg.port, "postgres").await.context("connecting to the demo server")?;
    for db in ["metrics", "sluice_state"] {
        admin.batch_execute(&format!("CREATE DATABASE {db}")).await.with_context(|| format!("creating database {db}"))?;
    }
    let src = sluice_postgres::cluster::superuser_client(pg.port, "metrics").await.context("connecting to the demo server")?;
    println!("creating the dataset: {} active metrics, {} configurations (--scale {})...", scale.metrics, scale.configurations, o.scale);
    let t = Instant::now();
    ms::create_dataset(&src, scale, 0.42).await.map_err(|e| anyhow::anyhow!("{e:#}"))?;
    println!("  done in {:.1}s", t.elapsed().as_secs_f64());

    let data = tempfile::Builder::new().prefix("sluice-search-demo-").tempdir()?;
    let search_url = start_search(o.search_addr, data.path()).await?;
    println!("search service (Elasticsearch API) at {search_url}");

    let yaml = format!(
        "pipeline: metrics_summary\nsource: {{host: 127.0.0.1, port: {p}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: metrics, heartbeat_interval: 1s}}\n\
         sink:\n  search:\n    url: {search_url}\n    index: metrics\n    document:{doc}    state: {{host: 127.0.0.1, port: {p}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: sluice_state}}\n",
        p = pg.port,
        doc = ms::DOCUMENT_YAML,
    );
    let (metrics, stop_tx, runner) = spawn_pipeline(&yaml, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;

    let http = reqwest::Client::new();
    let docs: i64 = src.query_one("SELECT count(*) FROM metrics", &[]).await?.get(0);
    println!("building {docs} documents (metric + org + configurations) into index `metrics`...");
    let t = Instant::now();
    loop {
        let n = ms::count(&http, &search_url, "metrics").await.unwrap_or(0);
        if n >= docs as u64 && metrics.snapshot.chunks_done.load(Ordering::Relaxed) > 0 {
            break;
        }
        if runner.is_finished() {
            runner.await??;
            bail!("the pipeline stopped during the initial load");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    println!("  {docs} documents in {secs:.1}s ({:.0} docs/s)", docs as f64 / secs);

    // The same page views on both systems: same answers, different speed.
    let queries = ms::sample_queries(30, 11);
    let (mut pg_us, mut es_us) = (Vec::new(), Vec::new());
    for q in &queries {
        let (a, ta) = ms::timed(ms::page_postgres(&src, q)).await?;
        let (b, tb) = ms::timed(ms::page_search(&http, &search_url, "metrics", q)).await?;
        a.same_page(&b).with_context(|| format!("the two systems disagree on {q:?}"))?;
        pg_us.push(ta);
        es_us.push(tb);
    }
    let p = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        ms::quantile(v, q) / 1000.0
    };
    println!(
        "{} page views, same page from both: Postgres join p50 {:.1} ms, p90 {:.1} ms | search p50 {:.1} ms, p90 {:.1} ms",
        queries.len(),
        p(&mut pg_us, 0.5),
        p(&mut pg_us, 0.9),
        p(&mut es_us, 0.5),
        p(&mut es_us, 0.9)
    );

    let app =
        Arc::new(App { http, search_url: search_url.clone(), pg: sluice_postgres::cluster::superuser_client(pg.port, "metrics").await? });
    let router = axum::Router::new()
        .route("/", axum::routing::get(|| async { Html(PAGE) }))
        .route("/api/page", axum::routing::get(api_page))
        .with_state(app);
    let page_addr = page_listener.local_addr()?;
    tokio::spawn(async move { axum::serve(page_listener, router).await });
    println!(
        "serving the Metrics Summary page at http://{page_addr}/ (JSON: /api/page?tags=env:prod&type=gauge&text=cpu&sort=last_seen&page=0&backend=search|postgres)"
    );
    if o.rate > 0 {
        println!("changing {} configurations per second; each change reaches its metric's document:", o.rate);
    }

    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut written = 0u64;
    loop {
        if o.duration.is_some_and(|d| started.elapsed() >= d) || *shutdown.borrow() {
            break;
        }
        if runner.is_finished() {
            runner.await??;
            bail!("the pipeline stopped while streaming");
        }
        let tick = Instant::now();
        let per_tick = o.rate.div_ceil(10);
        if per_tick > 0 {
            let ids: Vec<i64> = {
                let mut r = rand::rng();
                (0..per_tick).map(|_| r.random_range(1..=scale.configurations.max(1) as i64)).collect()
            };
            src.execute("UPDATE metric_configurations SET setting = setting || '+', updated_at = now() WHERE id = ANY($1)", &[&ids])
                .await?;
            written += u64::from(per_tick);
        }
        if o.rate > 0 && last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "  t={:>4}s  changes {written:>7}  lag p50 <= {} ms  p99 <= {} ms",
                started.elapsed().as_secs(),
                metrics.lag_quantile_ms(0.5).unwrap_or(0),
                metrics.lag_quantile_ms(0.99).unwrap_or(0)
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed())) => {}
            _ = shutdown.changed() => {}
        }
    }
    let _ = stop_tx.send(true);
    runner.await??;
    println!(
        "stopped after {written} changes; lag p50 <= {} ms, p99 <= {} ms (source commit to document indexed)",
        metrics.lag_quantile_ms(0.5).unwrap_or(0),
        metrics.lag_quantile_ms(0.99).unwrap_or(0)
    );
    Ok(())
}

#[derive(serde::Deserialize)]
struct ApiParams {
    #[serde(default)]
    tags: Option<String>,
    #[serde(default, rename = "type")]
    metric_type: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    sort: Option<String>,
    #[serde(default)]
    page: Option<u32>,
    #[serde(default)]
    backend: Option<String>,
}

async fn api_page(State(app): State<Arc<App>>, Query(p): Query<ApiParams>) -> Response {
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let q = PageQuery {
        tags: nonempty(p.tags).map(|t| t.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()).unwrap_or_default(),
        metric_type: nonempty(p.metric_type),
        text: nonempty(p.text),
        sort: if p.sort.as_deref() == Some("last_seen") { ms::Sort::LastSeen } else { ms::Sort::Name },
        page: p.page.unwrap_or(0),
    };
    let postgres = p.backend.as_deref() == Some("postgres");
    let t = Instant::now();
    let r = if postgres { ms::page_postgres(&app.pg, &q).await } else { ms::page_search(&app.http, &app.search_url, "metrics", &q).await };
    let took = t.elapsed().as_secs_f64() * 1000.0;
    match r {
        Ok(r) => axum::Json(json!({
            "backend": if postgres { "postgres" } else { "search" },
            "took_ms": took,
            "total": r.total,
            "metrics": r.rows,
            "facets": {"type": r.types, "tags": r.tags},
        }))
        .into_response(),
        Err(e) => (axum::http::StatusCode::BAD_REQUEST, axum::Json(json!({"error": format!("{e:#}")}))).into_response(),
    }
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Metrics Summary</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
form{display:flex;gap:.5em;flex-wrap:wrap;margin-bottom:1em}
input,select,button{padding:.3em}
.wrap{display:flex;gap:2em}
.facets{min-width:14em}
.facets li{cursor:pointer;list-style:none}
table{border-collapse:collapse}
td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left;font-size:90%}
#took{color:#666}
</style></head><body>
<h1>Metrics Summary</h1>
<form id="f">
<input name="text" placeholder="word in name (cpu)">
<input name="tags" placeholder="tags (env:prod,team:team3)" size="30">
<select name="type"><option value="">any type</option><option>gauge</option><option>count</option><option>rate</option><option>distribution</option></select>
<select name="sort"><option value="name">name</option><option value="last_seen">last seen</option></select>
<select name="backend"><option value="search">search index</option><option value="postgres">Postgres join</option></select>
<input name="page" type="number" value="0" min="0" style="width:4em">
<button>Search</button> <span id="took"></span>
</form>
<div class="wrap">
<div class="facets"><h3>Type</h3><ul id="types"></ul><h3>Tags</h3><ul id="tags"></ul></div>
<div><div id="total"></div><table><thead><tr><th>name</th><th>type</th><th>unit</th><th>tags</th><th>last seen</th><th>configs</th></tr></thead><tbody id="rows"></tbody></table></div>
</div>
<script>
const f = document.getElementById('f');
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
async function load() {
  const r = await fetch('/api/page?' + new URLSearchParams(new FormData(f)));
  const d = await r.json();
  if (!r.ok) { document.getElementById('took').textContent = d.error; return; }
  document.getElementById('took').textContent = d.backend + ': ' + d.took_ms.toFixed(1) + ' ms';
  document.getElementById('total').textContent = d.total + ' metrics';
  document.getElementById('rows').innerHTML = d.metrics.map(m =>
    `<tr><td>${esc(m.name)}</td><td>${esc(m.type)}</td><td>${esc(m.unit)}</td><td>${esc((m.tags||[]).join(' '))}</td><td>${esc(m.last_seen)}</td><td>${esc(m.configuration_count)}</td></tr>`).join('');
  const facet = (id, list, field) => document.getElementById(id).innerHTML = list.map(([k, n]) =>
    `<li data-f="${field}" data-v="${esc(k)}">${esc(k)} (${n})</li>`).join('');
  facet('types', d.facets.type, 'type'); facet('tags', d.facets.tags, 'tags');
}
document.querySelector('.facets').onclick = e => {
  const li = e.target.closest('li'); if (!li) return;
  const el = f.elements[li.dataset.f];
  el.value = li.dataset.f === 'tags' && el.value ? el.value + ',' + li.dataset.v : li.dataset.v;
  f.elements.page.value = 0; load();
};
f.onsubmit = e => { e.preventDefault(); load(); };
load();
</script></body></html>"#;
