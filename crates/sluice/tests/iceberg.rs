//! The Iceberg sink, read back by DuckDB's Iceberg extension and by pyiceberg with
//! pyarrow (tests/python/iceberg_read.py):
//! upsert tables mirror the source through five kill -9 with no commit applied twice; a
//! changelog holds each change once; a table without a key is refused in one line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn config(env: &Env, tables: &[&str], sink: &str) -> (PathBuf, String) {
    let pw = sluice_postgres::cluster::SUPERUSER_PASSWORD;
    let user = sluice_postgres::cluster::SUPERUSER;
    let warehouse = env.dir.join("warehouse").display().to_string();
    let path = env.write_config(&format!(
        "pipeline: {db}\nsource:\n  host: 127.0.0.1\n  port: {sp}\n  user: {user}\n  password: {pw}\n  database: {db}\n  \
         heartbeat_interval: 500ms\n  tables: [{tables}]\nsink:\n  iceberg:\n    warehouse: {warehouse}\n{sink}    catalog:\n      sql:\n        \
         host: 127.0.0.1\n        port: {dp}\n        user: {user}\n        password: {pw}\n        database: {db}\n",
        db = env.db,
        sp = env.src_port,
        dp = env.dst_port,
        tables = tables.join(", "),
    ));
    (path, warehouse)
}

/// The table as another engine reads it.
fn read(env: &Env, warehouse: &str, namespace: &str, table: &str) -> Value {
    let uri = format!(
        "postgresql+psycopg2://{}:{}@127.0.0.1:{}/{}",
        sluice_postgres::cluster::SUPERUSER,
        sluice_postgres::cluster::SUPERUSER_PASSWORD,
        env.dst_port,
        env.db
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/iceberg_read.py");
    let out = Command::new(python())
        .args([script, &uri, &format!("file://{warehouse}"), "sluice", namespace, table])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "iceberg_read.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn wait_exit(p: &mut Pipeline, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = p.child.try_wait() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Each streamed commit's range of source transactions, from the snapshot summaries in
/// the table's history (oldest first).
async fn commit_ranges(env: &Env, table: &str) -> Vec<(u64, u64)> {
    let dst = env.dst().await;
    let location: String =
        dst.query_one("SELECT metadata_location FROM iceberg_tables WHERE table_name = $1", &[&table]).await.unwrap().get(0);
    let meta: Value = serde_json::from_slice(&std::fs::read(location.strip_prefix("file://").unwrap()).unwrap()).unwrap();
    let mut snaps: Vec<&Value> = meta["snapshots"].as_array().unwrap().iter().collect();
    snaps.sort_by_key(|s| s["sequence-number"].as_i64());
    snaps
        .iter()
        .filter_map(|s| Some((lsn(s["summary"]["sluice.first-commit-lsn"].as_str()?), lsn(s["summary"]["sluice.commit-lsn"].as_str()?))))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn upsert_mirrors_the_source_through_kill9_exactly_once() {
    let env = Env::new("iceberg_kill").await;
    let src = env.src().await;
    src.batch_execute(ACCT_DDL).await.unwrap();
    let (cfg, warehouse) = config(&env, &["acct"], "    commit_interval: 700ms\n");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    let writer = spawn_acct_writer(&env, 20);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        p.kill9();
        p = env.spawn(&cfg);
    }
    // Three deaths exactly between a commit and the source hearing of it: the restart
    // is sent again what that commit holds, and must skip it.
    for _ in 0..3 {
        p.kill9();
        p = env.spawn_env(&cfg, &[("SLUICE_TEST_ICEBERG_ABORT_AFTER_COMMITS", "2")]);
        let exited = wait_exit(&mut p, Duration::from_secs(30)).await;
        assert!(exited, "the hook did not stop the pipeline after its second commit:\n{}", p.log());
    }
    p = env.spawn(&cfg);
    let statements = writer.await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(90)).await;
    p.assert_running();

    let got = read(&env, &warehouse, "public", "acct");
    let rows = got["rows"].as_array().unwrap();
    let mut table: BTreeMap<i64, i64> = BTreeMap::new();
    for r in rows {
        let id = r["id"].as_i64().unwrap();
        assert!(table.insert(id, r["ver"].as_i64().unwrap()).is_none(), "key {id} appears twice in the Iceberg table");
    }
    let expect: BTreeMap<i64, i64> =
        src.query("SELECT id, ver FROM acct", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(table, expect, "the Iceberg table differs from the source");
    // DuckDB's Iceberg extension applies the equality deletes itself.
    let duck: BTreeMap<i64, i64> =
        got["duckdb"].as_array().unwrap().iter().map(|r| (r["id"].as_i64().unwrap(), r["ver"].as_i64().unwrap())).collect();
    assert_eq!(got["duckdb"].as_array().unwrap().len(), duck.len(), "DuckDB sees a key twice");
    assert_eq!(duck, expect, "DuckDB reads a table that differs from the source");
    // No source transaction was committed twice: every streamed commit starts past the
    // previous one's end.
    let ranges = commit_ranges(&env, "acct").await;
    assert!(ranges.len() >= 5, "{ranges:?}");
    for w in ranges.windows(2) {
        assert!(w[1].0 > w[0].1, "a commit re-applied source transactions already committed: {w:?}");
    }
    eprintln!(
        "{statements} statements, {} commits, {} data files and {} delete files after 5 kill -9 and 3 deaths right after a commit; pyiceberg's own scan: {}",
        ranges.len(),
        got["data_files"],
        got["delete_files"],
        got["scan_error"].as_str().map_or_else(|| format!("{} rows", got["scan"].as_array().map_or(0, Vec::len)), str::to_string)
    );
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn changelog_holds_each_change_once_in_order() {
    let env = Env::new("iceberg_log").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE ev (id int8 PRIMARY KEY, n int4, amount numeric(10,2), at timestamptz, day date, note text);
         INSERT INTO ev VALUES (1, 1, 1.50, '2024-01-01 00:00:00+00', '2024-01-01', 'a'), (2, 1, NULL, NULL, NULL, NULL);",
    )
    .await
    .unwrap();
    let (cfg, warehouse) = config(&env, &["ev"], "    mode: changelog\n    commit_interval: 300ms\n");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    src.batch_execute(
        "INSERT INTO ev VALUES (3, 1, -12.25, '2024-02-29 12:00:00+02', '2024-02-29', 'c');
         UPDATE ev SET n = 2 WHERE id = 1; UPDATE ev SET n = 3 WHERE id = 1; DELETE FROM ev WHERE id = 2;",
    )
    .await
    .unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    let got = read(&env, &warehouse, "public", "ev");
    let rows = got["rows"].as_array().unwrap();
    let ops: Vec<(&str, i64)> = {
        let mut v: Vec<&Value> = rows.iter().collect();
        v.sort_by_key(|r| (r["_lsn"].as_i64(), r["_seq"].as_i64(), r["id"].as_i64()));
        v.iter().map(|r| (r["_op"].as_str().unwrap(), r["id"].as_i64().unwrap())).collect()
    };
    assert_eq!(ops, [("r", 1), ("r", 2), ("c", 3), ("u", 1), ("u", 1), ("d", 2)], "{rows:?}");
    let c = rows.iter().find(|r| r["_op"] == "c").unwrap();
    assert_eq!((c["amount"].as_str(), c["day"].as_str(), c["note"].as_str()), (Some("-12.25"), Some("2024-02-29"), Some("c")));
    assert_eq!(c["at"].as_str(), Some("2024-02-29T10:00:00+00:00"), "timestamptz kept as UTC");
    // A changelog is appends only: pyiceberg's own scan and DuckDB read it whole.
    assert_eq!(got["scan"].as_array().map(Vec::len), Some(rows.len()), "{got}");
    assert_eq!(got["duckdb"].as_array().map(Vec::len), Some(rows.len()), "{got}");
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_key_is_refused_in_upsert_mode() {
    let env = Env::new("iceberg_bad").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE nokey (a int4, b text)").await.unwrap();
    let (cfg, _) = config(&env, &["nokey"], "");
    let (code, err) = run_to_exit(&["run", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("table public.nokey has no primary key"), "{err}");
    let dst = env.dst().await;
    let tables: i64 = dst.query_one("SELECT count(*) FROM pg_tables WHERE tablename = 'iceberg_tables'", &[]).await.unwrap().get(0);
    let registered: i64 = if tables > 0 { dst.query_one("SELECT count(*) FROM iceberg_tables", &[]).await.unwrap().get(0) } else { 0 };
    assert_eq!(registered, 0, "no table was created");
}
