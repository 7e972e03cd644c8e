//! `sluice-bench large-txn`: one source transaction of `rows` inserts (then one of as
//! many updates) through a `sluice run` process into the Postgres sink: the process's
//! peak RSS (`VmHWM`) against its idle RSS, and the time from the source commit to the
//! last row applied against pg_recvlogical draining the same transaction from its own
//! slot (the decoding limit).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD};

use crate::procs::{Proc, events_applied, free_port, sluice_bin, usage};

pub async fn large_txn(rows: u64, row_bytes: usize, max_transaction_memory: &str) -> Result<Value> {
    let work = tempfile::tempdir()?;
    let (src, dst) = crate::servers().await?;
    let s = crate::connect(src.port, "bench").await?;
    s.batch_execute("CREATE TABLE bench (id int8 PRIMARY KEY, payload text); ALTER TABLE bench ALTER COLUMN payload SET STORAGE PLAIN")
        .await?;
    let cfg = work.path().join("big.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pipeline: big\nsource: {{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench, tables: [public.bench]}}\n\
             sink: {{postgres: {{host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench}}}}\n\
             snapshot: {{enabled: false}}\nbatch: {{max_transaction_memory: {max_transaction_memory}}}\n",
            src.port, dst.port
        ),
    )?;
    let port = free_port()?;
    let p = Proc(
        Command::new(sluice_bin()?)
            .args(["run", "--log", "warn", "--metrics-addr", &format!("127.0.0.1:{port}"), "-c"])
            .arg(&cfg)
            .stderr(std::fs::File::create(work.path().join("big.log"))?)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let q = "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'sluice_big' AND active)";
    while !s.query_one(q, &[]).await?.get::<_, bool>(0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, idle_rss) = usage(p.id());
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
    let payload = row_bytes.saturating_sub(32).max(1);
    let mut runs = Vec::new();
    for (what, sql) in [
        ("insert", format!("INSERT INTO bench SELECT g, rpad(md5(g::text), {payload}, 'x') FROM generate_series(1, {rows}) g")),
        ("update", format!("UPDATE bench SET payload = rpad(md5((id + 1)::text), {payload}, 'y')")),
    ] {
        s.batch_execute(&format!("SELECT pg_create_logical_replication_slot('recv_{what}', 'pgoutput')")).await?;
        eprintln!("one transaction: {rows} rows ({what})...");
        let before = tokio::task::block_in_place(|| events_applied(&agent, port));
        let start: String = s.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        s.batch_execute(&sql).await?;
        let t = Instant::now();
        let end: String = s.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
        let wal_mb: f64 = s.query_one("SELECT ($1::text::pg_lsn - $2::text::pg_lsn)::float8 / 1e6", &[&end, &start]).await?.get(0);
        loop {
            if tokio::task::block_in_place(|| events_applied(&agent, port)) >= before + rows {
                break;
            }
            if t.elapsed() > Duration::from_secs(1800) {
                bail!("the {what} transaction was not applied within 30 min; see {}", work.path().join("big.log").display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        let (cpu, peak) = usage(p.id());
        let t = Instant::now();
        crate::recvlogical(src.port, &format!("recv_{what}"), "sluice_big", &end)?;
        let recv_s = t.elapsed().as_secs_f64();
        s.batch_execute(&format!("SELECT pg_drop_replication_slot('recv_{what}')")).await?;
        runs.push(json!({
            "transaction": what, "rows": rows, "wal_mb": wal_mb,
            "sluice": {"seconds": secs, "rows_per_s": rows as f64 / secs, "peak_rss_mb_so_far": peak, "cpu_s_so_far": cpu},
            "pg_recvlogical": {"seconds": recv_s, "rows_per_s": rows as f64 / recv_s},
            "ratio": recv_s / secs,
        }));
    }
    let d = crate::connect(dst.port, "bench").await?;
    if !crate::bench_equal(&s, &d).await? {
        bail!("the target differs from the source");
    }
    let (_, peak) = usage(p.id());
    Ok(json!({
        "bench": "large-txn", "rows": rows, "row_bytes": row_bytes, "max_transaction_memory": max_transaction_memory,
        "runs": runs, "idle_rss_mb": idle_rss, "peak_rss_mb": peak,
        "note": "RSS of the sluice run process alone; ratio = pg_recvlogical seconds / Sluice seconds (source commit to last row applied)",
    }))
}
