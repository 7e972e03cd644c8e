//! The control plane: time from `pipelines create` to the first change replicated (per
//! provisioning step), against the same pipeline started directly (no control plane);
//! then many small idle pipelines on one server: memory per idle pipeline and CPU at rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD, TempCluster, superuser_client};

fn proc_field_kb(field: &str) -> f64 {
    crate::status_kb("/proc/self/status", field)
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command name: state is field 0, utime 11, stime 12; 100 ticks/s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

struct Api {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<String>) -> Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.header("content-type", "application/yaml").body(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {v}");
        }
        Ok(v)
    }

    async fn wait_workflow(&self, id: i64) -> Result<Value> {
        loop {
            let w = self.call(reqwest::Method::GET, &format!("/v1/tenants/bench/workflows/{id}"), None).await?;
            match w["state"].as_str() {
                Some("succeeded") => return Ok(w),
                Some("failed" | "cancelled") => bail!("workflow {id}: {w}"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

async fn wait_row(dst: &tokio_postgres::Client, table: &str, id: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = dst.query_opt(&format!("SELECT 1 FROM {table} WHERE id = $1"), &[&id]).await.is_ok_and(|r| r.is_some());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{table}: row {id} never arrived");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn control(pipelines: usize, idle_seconds: u64) -> Result<Value> {
    let n = pipelines.max(1);
    let slots = format!("max_replication_slots = {}", n + 10);
    let senders = format!("max_wal_senders = {}", n + 10);
    let conns = format!("max_connections = {}", n * 4 + 50);
    let (src, dst) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let conf = [slots.as_str(), senders.as_str(), conns.as_str()];
        Ok((TempCluster::start(&conf)?, TempCluster::start(&conf)?))
    })
    .await??;
    let s = superuser_client(src.port, "postgres").await?;
    let d = superuser_client(dst.port, "postgres").await?;
    d.batch_execute("CREATE DATABASE ctl").await?;
    let mut tables = String::new();
    for i in 0..=n {
        tables +=
            &format!("CREATE TABLE t{i} (id int8 PRIMARY KEY, v text); INSERT INTO t{i} SELECT g, 'x' FROM generate_series(1, 10) g;");
    }
    s.batch_execute(&tables).await?;

    // The control plane, in this process (its memory is what is measured).
    let db = sluice::control::db::Db::new(&format!(
        "host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=ctl",
        dst.port
    ))
    .map_err(anyhow::Error::msg)?;
    db.migrate().await?;
    let sealer = sluice::control::crypto::Sealer::from_hex(&"ab".repeat(32).into()).map_err(anyhow::Error::msg)?;
    let ctl = sluice::control::Control::new(db, sealer, "bench".into(), Duration::from_secs(15)).await?;
    // The bench's databases are on this machine.
    ctl.set_egress(sluice::control::egress::Egress::parse("loopback").map_err(anyhow::Error::msg)?);
    let token = ctl.bootstrap().await?.context("bootstrap token")?;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let _loops = ctl.spawn_loops(stop);
    let app = sluice::server::router(sluice::server::ServerConfig::default(), None, None, Some(ctl.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let api = Arc::new(Api { url, token, http: reqwest::Client::new() });
    use reqwest::Method as M;
    api.call(M::POST, "/v1/tenants", Some("name: bench".into())).await?;
    api.call(
        M::POST,
        "/v1/tenants/bench/sources",
        Some(format!(
            "{{name: src, host: 127.0.0.1, port: {}, database: postgres, admin_user: {SUPERUSER}, admin_password: {SUPERUSER_PASSWORD}}}",
            src.port
        )),
    )
    .await?;
    api.call(
        M::POST,
        "/v1/tenants/bench/sinks",
        Some(format!(
            "{{name: dst, postgres: {{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: postgres}}}}",
            dst.port
        )),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_base_kb = proc_field_kb("VmRSS:");

    // Baseline: the same kind of pipeline started directly, create to first change.
    let direct_yaml = format!(
        "pipeline: direct\nsource: {{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: postgres, tables: [t{n}]}}\n\
         sink: {{postgres: {{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: postgres}}}}\n",
        src.port, dst.port
    );
    let t = Instant::now();
    let (_m, direct_stop, direct_task) = sluice::demo::spawn_pipeline(&direct_yaml, false)?;
    wait_row(&d, &format!("t{n}"), 10).await?;
    s.execute(&format!("INSERT INTO t{n} VALUES (1000, 'first')"), &[]).await?;
    wait_row(&d, &format!("t{n}"), 1000).await?;
    let direct_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = direct_stop.send(true);
    let _ = direct_task.await;

    // Through the control plane: create, provision, first change.
    let t = Instant::now();
    let v = api.call(M::POST, "/v1/tenants/bench/pipelines", Some("{name: p0, source: src, sink: dst, tables: [t0]}".into())).await?;
    let validate_ms = t.elapsed().as_secs_f64() * 1e3;
    let w = api.wait_workflow(v["workflow"].as_i64().context("workflow id")?).await?;
    let provisioned_ms = t.elapsed().as_secs_f64() * 1e3;
    s.execute("INSERT INTO t0 VALUES (1000, 'first')", &[]).await?;
    wait_row(&d, "t0", 1000).await?;
    let first_change_ms = t.elapsed().as_secs_f64() * 1e3;
    let steps = s_steps(&d, &w).await?;

    // Many small pipelines, then idle.
    let t = Instant::now();
    let mut wfs = Vec::new();
    for i in 1..n {
        let v = api
            .call(M::POST, "/v1/tenants/bench/pipelines", Some(format!("{{name: p{i}, source: src, sink: dst, tables: [t{i}]}}")))
            .await?;
        wfs.push(v["workflow"].as_i64().context("workflow id")?);
    }
    for wf in wfs {
        api.wait_workflow(wf).await?;
    }
    let all_provisioned_s = t.elapsed().as_secs_f64();
    // Every pipeline streaming (its slot active) before measuring rest.
    loop {
        let active: i64 =
            s.query_one("SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name LIKE 'sluice_%'", &[]).await?.get(0);
        if active as usize == n {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("only {active} of {n} pipelines streaming");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu0 = cpu_seconds();
    let t_idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
    let cpu_percent = (cpu_seconds() - cpu0) / t_idle.elapsed().as_secs_f64() * 100.0;
    let rss_kb = proc_field_kb("VmRSS:");
    let out = json!({
        "bench": "control",
        "pipelines": n,
        "create_validate_ms": validate_ms,
        "create_to_provisioned_ms": provisioned_ms,
        "create_to_first_change_ms": first_change_ms,
        "direct_start_to_first_change_ms": direct_ms,
        "control_vs_direct": first_change_ms / direct_ms,
        "steps_ms": steps,
        "all_provisioned_s": all_provisioned_s,
        "rss_base_mb": rss_base_kb / 1024.0,
        "rss_idle_mb": rss_kb / 1024.0,
        "rss_per_idle_pipeline_kb": (rss_kb - rss_base_kb) / n as f64,
        "cpu_at_rest_percent_of_one_core": cpu_percent,
        "idle_seconds": idle_seconds,
    });
    drop((src, dst));
    Ok(out)
}

/// Each provisioning step's duration (ms) from the workflow's history, by the
/// control database's clock.
async fn s_steps(c: &tokio_postgres::Client, w: &Value) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for h in w["history"].as_array().into_iter().flatten() {
        let (a, b) = (h["started_at"].as_str().unwrap_or_default(), h["ended_at"].as_str().unwrap_or_default());
        let ms: f64 = c
            .query_one("SELECT (extract(epoch FROM ($2::text::timestamptz - $1::text::timestamptz)) * 1000)::float8", &[&a, &b])
            .await?
            .get::<_, f64>(0);
        out.insert(h["step"].as_str().unwrap_or("?").to_string(), json!((ms * 10.0).round() / 10.0));
    }
    Ok(Value::Object(out))
}
