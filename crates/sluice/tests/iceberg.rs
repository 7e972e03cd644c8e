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
    config_with(env, tables, sink, "")
}

/// `top`: more top-level settings of the pipeline.
fn config_with(env: &Env, tables: &[&str], sink: &str, top: &str) -> (PathBuf, String) {
    let warehouse = env.dir.join("warehouse").display().to_string();
    (config_at(env, tables, &warehouse, sink, top), warehouse)
}

/// A pipeline into the warehouse at `warehouse` (a directory or an `s3://` URL).
fn config_at(env: &Env, tables: &[&str], warehouse: &str, sink: &str, top: &str) -> PathBuf {
    let pw = sluice_postgres::cluster::SUPERUSER_PASSWORD;
    let user = sluice_postgres::cluster::SUPERUSER;
    env.write_config(&format!(
        "pipeline: {db}\nsource:\n  host: 127.0.0.1\n  port: {sp}\n  user: {user}\n  password: {pw}\n  database: {db}\n  \
         heartbeat_interval: 500ms\n  tables: [{tables}]\nsink:\n  iceberg:\n    warehouse: {warehouse}\n{sink}    catalog:\n      sql:\n        \
         host: 127.0.0.1\n        port: {dp}\n        user: {user}\n        password: {pw}\n        database: {db}\n{top}",
        db = env.db,
        sp = env.src_port,
        dp = env.dst_port,
        tables = tables.join(", "),
    ))
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

/// Runs the CLI to its end; its exit code and standard output.
fn run_to_exit_stdout(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).args(args).stderr(Stdio::inherit()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The table as another engine reads it.
fn read(env: &Env, warehouse: &str, namespace: &str, table: &str) -> Value {
    read_at(env, &format!("file://{warehouse}"), None, namespace, table)
}

/// The table as another engine reads it from `warehouse` (a URL), with the files on
/// the S3-compatible server at `s3` if given.
fn read_at(env: &Env, warehouse: &str, s3: Option<&str>, namespace: &str, table: &str) -> Value {
    read_from(env, None, warehouse, s3, namespace, table)
}

/// The table as another engine reads it, through the REST catalog at `rest` if given
/// (else the SQL catalog in the test's database).
fn read_from(env: &Env, rest: Option<&str>, warehouse: &str, s3: Option<&str>, namespace: &str, table: &str) -> Value {
    let sql = format!(
        "postgresql+psycopg2://{}:{}@127.0.0.1:{}/{}",
        sluice_postgres::cluster::SUPERUSER,
        sluice_postgres::cluster::SUPERUSER_PASSWORD,
        env.dst_port,
        env.db
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/iceberg_read.py");
    let mut cmd = Command::new(python());
    if let Some(endpoint) = s3 {
        cmd.env("SLUICE_S3_ENDPOINT", endpoint);
    }
    let out = cmd.args([script, rest.unwrap_or(&sql), warehouse, "sluice", namespace, table]).stderr(Stdio::piped()).output().unwrap();
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
/// the table's history as read by [`read`] (oldest first).
fn commit_ranges(got: &Value) -> Vec<(u64, u64)> {
    got["summaries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| Some((lsn(s["sluice.first-commit-lsn"].as_str()?), lsn(s["sluice.commit-lsn"].as_str()?))))
        .collect()
}

/// No source transaction was committed twice: every streamed commit starts past the
/// previous one's end.
fn assert_no_commit_twice(ranges: &[(u64, u64)]) {
    for w in ranges.windows(2) {
        assert!(w[1].0 > w[0].1, "a commit re-applied source transactions already committed: {w:?}");
    }
}

/// The compacted table equals the source `acct` (id → ver) as every reader sees it:
/// the spec's rule applied to the files, DuckDB, and pyiceberg's own scan; one data
/// file and no delete file left.
fn assert_compacted_acct(got: &Value, expect: &BTreeMap<i64, i64>) {
    assert_eq!((got["data_files"].as_u64(), got["delete_files"].as_u64(), got["snapshots"].as_u64()), (Some(1), Some(0), Some(1)), "{got}");
    for reader in ["rows", "duckdb", "scan"] {
        let rows = got[reader].as_array().unwrap_or_else(|| panic!("{reader}: {got}"));
        let seen: BTreeMap<i64, i64> = rows.iter().map(|r| (r["id"].as_i64().unwrap(), r["ver"].as_i64().unwrap())).collect();
        assert_eq!(rows.len(), seen.len(), "{reader} sees a key twice");
        assert_eq!(&seen, expect, "{reader} reads a table that differs from the source");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upsert_mirrors_the_source_through_kill9_exactly_once() {
    let env = Env::new("iceberg_kill").await;
    let src = env.src().await;
    src.batch_execute(ACCT_DDL).await.unwrap();
    // Maintenance every 3 s: compactions commit between the sink's commits, and some
    // kills land in the middle of one.
    let (cfg, warehouse) = config(&env, &["acct"], "    commit_interval: 700ms\n    maintenance: {interval: 3s, orphan_files_after: 1h}\n");
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
    // An on-demand compaction while the writer and the pipeline run.
    let path = cfg.to_str().unwrap().to_string();
    let (code, err) =
        tokio::task::spawn_blocking(move || run_to_exit(&["iceberg", "compact", "-c", &path], Duration::from_secs(120))).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let statements = writer.await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(90)).await;
    p.assert_running();
    wait_for("the scheduled maintenance", Duration::from_secs(30), || async { p.log().contains("Iceberg table maintained") }).await;
    assert_eq!(p.terminate(), Some(0));
    let before = read(&env, &warehouse, "public", "acct");
    let ranges = commit_ranges(&before);
    assert!(ranges.len() >= 5, "{ranges:?}");
    assert_no_commit_twice(&ranges);

    // Compacted, then everything but the current snapshot expired and every orphan
    // removed: one data file, no delete file, and pyiceberg's own scan reads it.
    let (code, out) = run_to_exit_stdout(&["iceberg", "compact", "-c", cfg.to_str().unwrap(), "--output", "json"]);
    assert_eq!(code, Some(0), "{out}");
    let compacted: Value = serde_json::from_str(out.trim()).unwrap();
    let (code, out) = run_to_exit_stdout(&[
        "iceberg",
        "expire",
        "-c",
        cfg.to_str().unwrap(),
        "--older-than",
        "0s",
        "--orphans-older-than",
        "0s",
        "--output",
        "json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let expired: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(expired["files_removed"].as_u64().unwrap() > 0, "{expired}");
    let got = read(&env, &warehouse, "public", "acct");
    let expect: BTreeMap<i64, i64> =
        src.query("SELECT id, ver FROM acct", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_compacted_acct(&got, &expect);
    let on_disk = walk(&std::path::Path::new(&warehouse).join("public.db/acct"));
    // Only the current metadata, its manifest list, manifest and data file, and the
    // metadata files of its log remain.
    assert!(on_disk.iter().filter(|f| f.ends_with(".parquet")).count() == 1, "{on_disk:?}");
    eprintln!(
        "{statements} statements, {} commits, {} data and {} delete files before the last compaction ({} rows rewritten), {} files removed by expiry",
        ranges.len(),
        before["data_files"],
        before["delete_files"],
        compacted["rows"],
        expired["files_removed"],
    );
}

/// 12 s of the acct writer while the pipeline is killed (-9) three times, and dies once
/// right after a commit, before the source hears of it; returns the pipeline running
/// again, caught up with the source.
async fn acct_workload_through_kills(env: &Env, cfg: &std::path::Path, mut p: Pipeline) -> Pipeline {
    let cfg = &cfg.to_path_buf();
    let writer = spawn_acct_writer(env, 12);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        p.kill9();
        p = env.spawn(cfg);
    }
    p.kill9();
    p = env.spawn_env(cfg, &[("SLUICE_TEST_ICEBERG_ABORT_AFTER_COMMITS", "2")]);
    assert!(wait_exit(&mut p, Duration::from_secs(30)).await, "the hook did not stop the pipeline:\n{}", p.log());
    p = env.spawn(cfg);
    writer.await.unwrap();
    wait_caught_up(env, &format!("sluice_{}", env.db), Duration::from_secs(90)).await;
    p
}

/// The same workload with the files on S3-compatible object storage (moto's server,
/// from PyPI): the sink writes every file there through kill -9, maintenance lists and
/// removes files there, and DuckDB (httpfs) and pyiceberg (pyarrow's S3) read the table
/// from it. Nothing is written to local disk.
#[tokio::test(flavor = "multi_thread")]
async fn upsert_on_s3_storage_mirrors_the_source_through_kill9() {
    let env = Env::new("iceberg_s3").await;
    let s3 = S3Server::start(&env.dir, "lake").await;
    let src = env.src().await;
    src.batch_execute(ACCT_DDL).await.unwrap();
    // A bucket that does not exist: one line, before anything is created.
    let cfg = config_at(&env, &["acct"], "s3://no-such-bucket/w", &s3.sink_settings(), "");
    let (code, err) = run_to_exit(&["run", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{err}");
    let line = err.lines().find(|l| l.contains("sink.iceberg.warehouse")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("cannot write files under s3://no-such-bucket/w") && line.contains("check the bucket exists"), "{line}");
    assert_eq!(slot_count(&env).await, 0, "a refused config created a replication slot");
    let warehouse = format!("s3://{}/warehouse", s3.bucket);
    let sink = format!("{}    commit_interval: 700ms\n    maintenance: {{interval: 3s, orphan_files_after: 1h}}\n", s3.sink_settings());
    let cfg = config_at(&env, &["acct"], &warehouse, &sink, "");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    p = acct_workload_through_kills(&env, &cfg, p).await;
    wait_for("the scheduled maintenance", Duration::from_secs(30), || async { p.log().contains("Iceberg table maintained") }).await;
    assert_eq!(p.terminate(), Some(0));
    let before = read_at(&env, &warehouse, Some(&s3.endpoint), "public", "acct");
    let ranges = commit_ranges(&before);
    assert!(ranges.len() >= 3, "{ranges:?}");
    assert_no_commit_twice(&ranges);
    let (code, out) = run_to_exit_stdout(&["iceberg", "compact", "-c", cfg.to_str().unwrap(), "--output", "json"]);
    assert_eq!(code, Some(0), "{out}");
    let args = ["iceberg", "expire", "-c", cfg.to_str().unwrap(), "--older-than", "0s", "--orphans-older-than", "0s", "--output", "json"];
    let (code, out) = run_to_exit_stdout(&args);
    assert_eq!(code, Some(0), "{out}");
    let expired: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(expired["files_removed"].as_u64().unwrap() > 0, "expiry removed nothing from the bucket: {expired}");
    let got = read_at(&env, &warehouse, Some(&s3.endpoint), "public", "acct");
    let expect: BTreeMap<i64, i64> =
        src.query("SELECT id, ver FROM acct", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_compacted_acct(&got, &expect);
    assert!(!env.dir.join("warehouse").exists(), "files were written to local disk");
}

/// A partitioned, sorted table: rows land in their partitions' directories, updates
/// that move a row to another partition leave no copy behind (the equality deletes are
/// unpartitioned, so they apply in every partition), through a kill -9 and a
/// compaction. A transform on a column the table lacks fails in one line.
#[tokio::test(flavor = "multi_thread")]
async fn partitioned_and_sorted_tables_mirror_the_source() {
    let env = Env::new("iceberg_part").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE orders (id int8 PRIMARY KEY, created_at timestamptz NOT NULL, region text, amount int4);
         INSERT INTO orders SELECT g, '2024-03-01'::timestamptz + (g % 5) * interval '1 day' + g * interval '1 second',
                                   (ARRAY['eu','us','ap'])[1 + g % 3], g FROM generate_series(1, 500) g;",
    )
    .await
    .unwrap();
    // A transform on a column the table does not have: one line, nothing created.
    let bad = "    tables:\n      public.orders: {partition_by: ['day(created)']}\n";
    let (cfg, _) = config(&env, &["orders"], bad);
    let (code, err) = run_to_exit(&["run", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{err}");
    let line = err.lines().find(|l| l.contains("sink.iceberg.tables.public.orders.partition_by")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("\"day(created)\" names column \"created\", which the table does not have"), "{line}");
    assert_eq!(slot_count(&env).await, 0, "a refused config created a replication slot");
    assert!(!env.dir.join("warehouse/public.db").exists(), "a refused config created files");

    let layout = "    commit_interval: 500ms\n    maintenance: {interval: 0s}\n    tables:\n      public.orders: \
                  {partition_by: ['day(created_at)', 'bucket(4, id)'], sort_by: [created_at desc]}\n";
    let (cfg, warehouse) = config(&env, &["orders"], layout);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    src.batch_execute(
        "UPDATE orders SET created_at = created_at + interval '3 days' WHERE id % 7 = 0;
         UPDATE orders SET amount = amount + 1000 WHERE id % 11 = 0;
         DELETE FROM orders WHERE id % 13 = 0;
         INSERT INTO orders SELECT g, '2024-04-01'::timestamptz + g * interval '1 minute', 'eu', g FROM generate_series(501, 600) g;",
    )
    .await
    .unwrap();
    p.kill9();
    p = env.spawn(&cfg);
    src.batch_execute("UPDATE orders SET created_at = '2025-01-01', id = id + 10000 WHERE id % 17 = 0; DELETE FROM orders WHERE id = 600;")
        .await
        .unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    assert_eq!(p.terminate(), Some(0));
    let expect: BTreeMap<i64, (String, i32)> = src
        .query("SELECT id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS'), amount FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let rows_of = |got: &Value, reader: &str| -> BTreeMap<i64, (String, i32)> {
        let rows = got[reader].as_array().unwrap_or_else(|| panic!("{reader}: {got}"));
        let m: BTreeMap<i64, (String, i32)> = rows
            .iter()
            .map(|r| {
                (r["id"].as_i64().unwrap(), (r["created_at"].as_str().unwrap()[..19].to_string(), r["amount"].as_i64().unwrap() as i32))
            })
            .collect();
        assert_eq!(m.len(), rows.len(), "{reader} sees a key twice");
        m
    };
    let got = read(&env, &warehouse, "public", "orders");
    assert_eq!(got["partition_spec"], serde_json::json!(["created_at_day:day", "id_bucket:bucket[4]"]));
    assert_eq!(got["sort_order"], serde_json::json!(["created_at:DESC"]));
    assert_eq!(got["files_sorted"], Value::Bool(true), "a data file's rows are not in the table's sort order");
    let paths = got["data_paths"].as_array().unwrap();
    assert!(paths.iter().all(|p| p.as_str().unwrap().contains("/data/created_at_day=")), "{paths:?}");
    assert!(paths.len() > 8, "rows of many days and buckets share files: {paths:?}");
    assert_eq!(rows_of(&got, "rows"), expect, "the files (with the spec's delete rule) differ from the source");
    assert_eq!(rows_of(&got, "duckdb"), expect, "DuckDB reads a table that differs from the source");
    // Compacted: the live rows rewritten into their partitions, sorted within each file.
    let (code, out) = run_to_exit_stdout(&["iceberg", "compact", "-c", cfg.to_str().unwrap(), "--output", "json"]);
    assert_eq!(code, Some(0), "{out}");
    let got = read(&env, &warehouse, "public", "orders");
    assert_eq!(got["delete_files"].as_u64(), Some(0), "{}", got["summary"]);
    assert!(got["data_paths"].as_array().unwrap().iter().all(|p| p.as_str().unwrap().contains("/data/created_at_day=")));
    assert_eq!(got["files_sorted"], Value::Bool(true), "a compacted file's rows are not in the table's sort order");
    for reader in ["rows", "duckdb", "scan"] {
        assert_eq!(rows_of(&got, reader), expect, "{reader} reads a compacted table that differs from the source");
    }
}

/// A REST catalog (Iceberg Java's own server): the catalog cannot share a transaction
/// with the checkpoint, so each snapshot records the commit LSN it holds and a restart
/// skips what a table holds. Deaths exactly between a catalog commit and the checkpoint
/// (during the snapshot and streaming), kill -9 and maintenance: no batch twice, the
/// table equals the source, pyiceberg's REST client and DuckDB read it.
#[tokio::test(flavor = "multi_thread")]
async fn rest_catalog_mirrors_the_source_exactly_once() {
    let env = Env::new("iceberg_rest").await;
    let warehouse = env.dir.join("warehouse");
    let rest = RestCatalogServer::start(&env.dir, &warehouse).await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE acct (id int8 PRIMARY KEY, ver int8 NOT NULL, payload text);
         INSERT INTO acct SELECT g, 1, repeat('x', 100) FROM generate_series(1, 900) g; ANALYZE acct;",
    )
    .await
    .unwrap();
    let pw = sluice_postgres::cluster::SUPERUSER_PASSWORD;
    let user = sluice_postgres::cluster::SUPERUSER;
    let sink = format!(
        "    commit_interval: 700ms\n    maintenance: {{interval: 3s, orphan_files_after: 1h}}\n    state: {{host: 127.0.0.1, port: {}, \
         user: {user}, password: {pw}, database: {}}}\n",
        env.dst_port, env.db
    );
    let cfg = config_at(&env, &["acct"], &warehouse.display().to_string(), &sink, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let catalog = text.find("    catalog:\n").unwrap();
    let rest_catalog = format!("    catalog:\n      rest: {{uri: '{}'}}\nsnapshot: {{chunk_rows: 300, parallelism: 1}}\n", rest.uri);
    std::fs::write(&cfg, format!("{}{rest_catalog}", &text[..catalog])).unwrap();
    // The second snapshot chunk is committed, then the process dies before its done
    // mark: the restart delivers it again and must not commit it twice.
    let mut p = env.spawn_env(&cfg, &[("SLUICE_TEST_ICEBERG_ABORT_BEFORE_CHUNK_DONE", "1")]);
    assert!(wait_exit(&mut p, Duration::from_secs(90)).await, "the chunk hook did not stop the pipeline:\n{}", p.log());
    p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    let writer = spawn_acct_writer(&env, 12);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        p.kill9();
        p = env.spawn(&cfg);
    }
    // Twice: die after the catalog took a commit, before the checkpoint moved.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        p.kill9();
        p = env.spawn_env(&cfg, &[("SLUICE_TEST_ICEBERG_ABORT_BEFORE_CHECKPOINT", "2")]);
        assert!(wait_exit(&mut p, Duration::from_secs(30)).await, "the checkpoint hook did not stop the pipeline:\n{}", p.log());
    }
    p = env.spawn(&cfg);
    writer.await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(90)).await;
    wait_for("the scheduled maintenance", Duration::from_secs(30), || async { p.log().contains("Iceberg table maintained") }).await;
    assert_eq!(p.terminate(), Some(0));
    let wh = format!("file://{}", warehouse.display());
    let before = read_from(&env, Some(&rest.uri), &wh, None, "public", "acct");
    let chunks: Vec<&str> = before["summaries"].as_array().unwrap().iter().filter_map(|s| s["sluice.snapshot-chunk"].as_str()).collect();
    let mut unique = chunks.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(chunks.len(), unique.len(), "a snapshot chunk was committed twice: {chunks:?}");
    assert!(unique.len() >= 3 && unique.contains(&"public.acct/1"), "{chunks:?}");
    let ranges = commit_ranges(&before);
    assert!(ranges.len() >= 4, "{ranges:?}");
    assert_no_commit_twice(&ranges);
    let (code, out) = run_to_exit_stdout(&["iceberg", "compact", "-c", cfg.to_str().unwrap(), "--output", "json"]);
    assert_eq!(code, Some(0), "{out}");
    let args = ["iceberg", "expire", "-c", cfg.to_str().unwrap(), "--older-than", "0s", "--orphans-older-than", "0s", "--output", "json"];
    let (code, out) = run_to_exit_stdout(&args);
    assert_eq!(code, Some(0), "{out}");
    let got = read_from(&env, Some(&rest.uri), &wh, None, "public", "acct");
    let expect: BTreeMap<i64, i64> =
        src.query("SELECT id, ver FROM acct", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_compacted_acct(&got, &expect);
    // Nothing in the SQL catalog's tables: the REST catalog holds the table.
    let dst = env.dst().await;
    let sql_catalog: bool = dst.query_one("SELECT to_regclass('iceberg_tables') IS NOT NULL", &[]).await.unwrap().get(0);
    assert!(!sql_catalog, "the SQL catalog's tables were created");
}

/// numeric(6,2) widened to numeric(12,2) while the pipeline streams: the type OID stays,
/// only the type modifier in the Relation message changes, and the field's precision
/// follows (Iceberg allows a decimal's precision to grow).
#[tokio::test(flavor = "multi_thread")]
async fn a_decimal_widened_mid_stream_widens_the_field() {
    let env = Env::new("iceberg_decimal").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE dm (id int8 PRIMARY KEY, amount numeric(6,2)); INSERT INTO dm VALUES (1, 1234.56);").await.unwrap();
    let (cfg, warehouse) = config(&env, &["dm"], "    commit_interval: 300ms\n");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    src.batch_execute("INSERT INTO dm VALUES (2, 9999.99)").await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    src.batch_execute("ALTER TABLE dm ALTER COLUMN amount TYPE numeric(12,2); INSERT INTO dm VALUES (3, 1234567890.12);").await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    p.assert_running();
    let got = read(&env, &warehouse, "public", "dm");
    assert_eq!(got["schema"], serde_json::json!(["1:id:long", "2:amount:decimal(12, 2)"]));
    let duck = duck_by_id(&got);
    let amounts: Vec<&str> = (1..=3).map(|i| duck[&i]["amount"].as_str().unwrap()).collect();
    assert_eq!(amounts, ["1234.56", "9999.99", "1234567890.12"]);
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

/// The rows as DuckDB reads them, by id (a field a file predates reads as null).
/// The filter transform on an upsert table keeps exactly the rows outside the filter:
/// an update that moves a row into it deletes the row from the table, one that moves
/// it out inserts it, through the snapshot, streaming and a kill -9.
#[tokio::test(flavor = "multi_thread")]
async fn a_filter_keeps_exactly_the_rows_outside_it_through_kill9() {
    let env = Env::new("iceberg_filter").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE orders (id int8 PRIMARY KEY, status text NOT NULL);
         INSERT INTO orders SELECT g, CASE WHEN g % 5 = 0 THEN 'draft' ELSE 'open' END FROM generate_series(1, 400) g;",
    )
    .await
    .unwrap();
    let top = "transforms:\n  - filter: {field: status, equals: draft}\n";
    let (cfg, warehouse) = config_with(&env, &["orders"], "    commit_interval: 300ms\n", top);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    // Into the filter (open -> draft), out of it (draft -> open), and back.
    src.batch_execute("UPDATE orders SET status = 'draft' WHERE id % 7 = 0 AND id <= 200").await.unwrap();
    src.batch_execute("UPDATE orders SET status = 'open' WHERE id % 10 = 0 AND id <= 200").await.unwrap();
    p.kill9();
    src.batch_execute(
        "UPDATE orders SET status = 'draft' WHERE id % 3 = 0 AND id > 200;
         UPDATE orders SET status = 'open' WHERE id % 15 = 0 AND id > 300;
         INSERT INTO orders VALUES (1000, 'draft'), (1001, 'open');
         DELETE FROM orders WHERE id IN (1, 2, 35);",
    )
    .await
    .unwrap();
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // a commit interval
    let want: BTreeMap<i64, String> = src
        .query("SELECT id, status FROM orders WHERE status <> 'draft'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let got: BTreeMap<i64, String> = duck_by_id(&read(&env, &warehouse, "public", "orders"))
        .into_iter()
        .map(|(id, r)| (id, r["status"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(got.len(), want.len(), "rows outside the filter");
    assert_eq!(got, want);
    assert_eq!(p.terminate(), Some(0));
}

fn duck_by_id(got: &Value) -> BTreeMap<i64, Value> {
    got["duckdb"].as_array().unwrap().iter().map(|r| (r["id"].as_i64().unwrap(), r.clone())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn added_columns_and_widened_types_reach_the_table_and_a_narrowing_halts() {
    let env = Env::new("iceberg_evolve").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE sc (id int8 PRIMARY KEY, n int4, note text); INSERT INTO sc VALUES (1, 1, 'a'), (2, 2, 'b');")
        .await
        .unwrap();
    let (cfg, warehouse) = config(&env, &["sc"], "    commit_interval: 300ms\n");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(90), || async { p.log().contains("streaming") }).await;
    src.batch_execute("INSERT INTO sc VALUES (3, 3, 'c')").await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    // A column added, an int widened to bigint, and rows using both, in one transaction
    // with a change of the old shape before them; then a kill -9 before it is committed
    // is likely, and the restart must take the old shape again.
    src.batch_execute(
        "BEGIN; UPDATE sc SET note = 'a2' WHERE id = 1;
         ALTER TABLE sc ADD COLUMN extra text; ALTER TABLE sc ALTER COLUMN n TYPE int8;
         INSERT INTO sc VALUES (4, 5000000000, 'd', 'x'); UPDATE sc SET extra = 'y' WHERE id = 2; COMMIT;",
    )
    .await
    .unwrap();
    p.kill9();
    p = env.spawn(&cfg);
    src.batch_execute("UPDATE sc SET n = 6000000000 WHERE id = 3").await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    let got = read(&env, &warehouse, "public", "sc");
    let duck = duck_by_id(&got);
    let expect: BTreeMap<i64, (i64, String, Option<String>)> = src
        .query("SELECT id, n, note, extra FROM sc", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let seen: BTreeMap<i64, (i64, String, Option<String>)> = duck
        .iter()
        .map(|(id, r)| (*id, (r["n"].as_i64().unwrap(), r["note"].as_str().unwrap().to_string(), r["extra"].as_str().map(str::to_string))))
        .collect();
    assert_eq!(got["duckdb"].as_array().unwrap().len(), duck.len(), "DuckDB sees a key twice");
    assert_eq!(seen, expect, "DuckDB reads a table that differs from the source after the schema change");
    // pyiceberg reads the files written before the change (n as int, no extra) with the
    // new schema.
    let fields: Vec<String> = got["schema"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    assert_eq!(fields, ["1:id:long", "2:n:long", "3:note:string", "4:extra:string"], "{got}");

    // A narrowing (bigint back to int) cannot be followed: the pipeline halts, says so in
    // one line, and keeps running until a person acts.
    src.batch_execute(
        "DELETE FROM sc WHERE n > 2147483647; ALTER TABLE sc ALTER COLUMN n TYPE int4; INSERT INTO sc VALUES (9, 9, 'z', NULL);",
    )
    .await
    .unwrap();
    wait_for("the halt", Duration::from_secs(60), || async { p.log().contains("pipeline halted") }).await;
    let log = p.log();
    let line = log.lines().find(|l| l.contains("pipeline halted")).unwrap();
    assert!(line.contains("column n of public.sc was narrowed from bigint to integer"), "{line}");
    p.assert_running();
    let after = read(&env, &warehouse, "public", "sc");
    assert!(!duck_by_id(&after).contains_key(&9), "a row of the narrowed shape was written: {after}");
    assert!(line.contains("accept_narrowing: true"), "{line}");
    // With the narrowing accepted, the rows go into the wider field (every value fits).
    p.kill9();
    let (cfg, _) = config(&env, &["sc"], "    commit_interval: 300ms\n    accept_narrowing: true\n");
    p = env.spawn(&cfg);
    src.batch_execute("INSERT INTO sc VALUES (10, 10, 'w', NULL)").await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    let after = duck_by_id(&read(&env, &warehouse, "public", "sc"));
    assert_eq!((after[&9]["n"].as_i64(), after[&10]["n"].as_i64()), (Some(9), Some(10)));
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn changelog_is_exact_through_kill9_during_snapshot_and_streaming() {
    let env = Env::new("iceberg_log_kill").await;
    let src = env.src().await;
    src.batch_execute(ACCT_DDL).await.unwrap();
    src.batch_execute(
        "CREATE TABLE big (id int8 PRIMARY KEY, payload text); INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 200000) g;",
    )
    .await
    .unwrap();
    let (cfg, warehouse) = config_with(
        &env,
        &["acct", "big"],
        "    mode: changelog\n    commit_interval: 700ms\n",
        "snapshot: {chunk_rows: 2000, parallelism: 2}\n",
    );
    // Kills while the snapshot runs, each right after a chunk more was committed: a
    // chunk is committed with its done mark, so it is in the table once, or delivered
    // again whole.
    let dst = env.dst().await;
    let done = || async {
        dst.query_one("SELECT count(*) FILTER (WHERE done), count(*) FROM sluice.snapshot_chunks", &[])
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap_or((0, 0))
    };
    let mut p = env.spawn(&cfg);
    let mut during_snapshot = 0;
    let mut last = 0;
    for _ in 0..5 {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let (now, total) = loop {
            let (d, t) = done().await;
            if d > last || std::time::Instant::now() > deadline {
                break (d, t);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if total > 0 && now >= total {
            break;
        }
        p.kill9();
        during_snapshot += 1;
        last = now;
        p = env.spawn(&cfg);
    }
    assert!(during_snapshot >= 3, "the snapshot ended before three kills landed in it");
    wait_for("streaming", Duration::from_secs(120), || async { p.log().contains("streaming") }).await;
    p = acct_workload_through_kills(&env, &cfg, p).await;
    assert_eq!(p.terminate(), Some(0));

    // Every snapshot row once.
    let big = read(&env, &warehouse, "public", "big");
    let rows = big["duckdb"].as_array().unwrap();
    let ids: std::collections::BTreeSet<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!((rows.len(), ids.len()), (200_000, 200_000), "snapshot rows missing or doubled after {during_snapshot} kills");
    assert!(rows.iter().all(|r| r["_op"] == "r"));

    // Replaying the changelog in (_lsn, _seq) order gives the source table, and each
    // update bumps the version by exactly one: a doubled change would repeat one, a
    // lost one would skip one.
    let acct = read(&env, &warehouse, "public", "acct");
    let mut log: Vec<&Value> = acct["duckdb"].as_array().unwrap().iter().collect();
    log.sort_by_key(|r| (r["_lsn"].as_i64(), r["_seq"].as_i64()));
    let mut state: BTreeMap<i64, i64> = BTreeMap::new();
    for r in &log {
        let id = r["id"].as_i64().unwrap();
        match r["_op"].as_str().unwrap() {
            "r" | "c" => assert!(state.insert(id, r["ver"].as_i64().unwrap()).is_none(), "id {id} created twice: {r}"),
            "u" => {
                let ver = r["ver"].as_i64().unwrap();
                let old = state.insert(id, ver);
                assert_eq!(old, Some(ver - 1), "update of id {id} to version {ver} doubled, lost or out of order");
            }
            "d" => assert!(state.remove(&id).is_some(), "id {id} deleted twice: {r}"),
            op => panic!("unexpected _op {op}"),
        }
    }
    let expect: BTreeMap<i64, i64> =
        src.query("SELECT id, ver FROM acct", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(state, expect, "replaying the changelog does not give the source table");
    eprintln!("{} changelog rows, {during_snapshot} kills during the snapshot", log.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_fail_in_one_line_and_create_nothing() {
    let env = Env::new("iceberg_input").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY)").await.unwrap();
    let dst = env.dst().await;
    let count = |sql: &'static str| {
        let dst = &dst;
        async move {
            let exists: bool = dst.query_one("SELECT to_regclass('iceberg_tables') IS NOT NULL", &[]).await.unwrap().get(0);
            if exists { dst.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) } else { 0 }
        }
    };
    // A catalog kind Sluice does not have.
    let (cfg, _) = config(&env, &["t"], "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("    catalog:\n      sql:", "    catalog:\n      hive:");
    std::fs::write(&cfg, text).unwrap();
    let (code, err) = run_to_exit(&["run", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("unknown field `hive`"), "{err}");
    // A warehouse that cannot take files: refused before any slot, namespace or table.
    let (cfg, _) = config(&env, &["t"], "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let warehouse = text.lines().find(|l| l.trim_start().starts_with("warehouse:")).unwrap().to_string();
    std::fs::write(&cfg, text.replace(&warehouse, "    warehouse: /proc/sluice-warehouse")).unwrap();
    let (code, err) = run_to_exit(&["run", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{err}");
    let line = err.lines().find(|l| l.contains("sink.iceberg.warehouse")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("cannot write files under /proc/sluice-warehouse"), "{line}");
    assert_eq!(count("SELECT count(*) FROM iceberg_tables").await, 0);
    assert_eq!(count("SELECT count(*) FROM iceberg_namespace_properties").await, 0);
    assert_eq!(slot_count(&env).await, 0, "a refused config created a replication slot");
}
