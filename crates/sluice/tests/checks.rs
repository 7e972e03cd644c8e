//! Bad input fails fast with one clear line and writes nothing; an idle slot advances.

use std::time::Duration;

use crate::common::*;
use sluice_postgres::cluster::TempCluster;

/// Runs `sluice run` and expects exit 1 with exactly one error line containing `want`.
pub(crate) fn expect_failure(config: &std::path::Path, want: &str) {
    let (code, stderr) = run_to_exit(&["run", "--config", config.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "expected exit 1, stderr:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{stderr}");
    assert!(errors[0].contains(want), "error line should mention {want:?}: {}", errors[0]);
    assert!(!stderr.contains(sluice_postgres::cluster::SUPERUSER_PASSWORD), "password leaked:\n{stderr}");
}

/// Nothing of the pipeline's exists: no slot or publication at the source, no state in the sink.
pub(crate) async fn assert_untouched(env: &Env) {
    let src = env.src().await;
    let slots = slot_count(env).await;
    let pubs: i64 = src.query_one("SELECT count(*) FROM pg_publication", &[]).await.unwrap().get(0);
    assert_eq!((slots, pubs), (0, 0), "the failed run created replication objects");
    let dst = env.dst().await;
    let state: i64 = dst.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'sluice'", &[]).await.unwrap().get(0);
    let tables: i64 = dst.query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &[]).await.unwrap().get(0);
    assert_eq!((state, tables), (0, 0), "the failed run wrote to the sink");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_table_is_named() {
    let env = Env::new("missing").await;
    expect_failure(&env.config(&["public.nope"], ""), "table public.nope does not exist");
    assert_untouched(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn table_without_primary_key_is_refused() {
    let env = Env::new("nopk").await;
    env.src().await.batch_execute("CREATE TABLE logs (at timestamptz, line text)").await.unwrap();
    expect_failure(&env.config(&["logs"], ""), "add a primary key");
    assert_untouched(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_config_key_is_named() {
    let env = Env::new("unknownkey").await;
    env.src().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let text = std::fs::read_to_string(env.config(&["t"], "snapshot: {enabled: true, chunk_size: 5}\n")).unwrap();
    expect_failure(&env.write_config(&text), "unknown field `chunk_size`");
    assert_untouched(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_reported() {
    let env = Env::new("badpw").await;
    env.src().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let text = std::fs::read_to_string(env.config(&["t"], "")).unwrap();
    let text = text.replacen(sluice_postgres::cluster::SUPERUSER_PASSWORD, "not-the-password", 1);
    expect_failure(&env.write_config(&text), "check the user and password");
    assert_untouched(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_level_replica_is_refused() {
    let (_, dst) = clusters();
    let src = TempCluster::start(&["wal_level = replica"]).unwrap();
    let env = Env::on("walreplica", src.port, dst.port).await;
    env.src().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    expect_failure(&env.config(&["t"], ""), "wal_level = logical");
    let dst = env.dst().await;
    let state: i64 = dst.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'sluice'", &[]).await.unwrap().get(0);
    assert_eq!(state, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_in_use_by_another_pipeline_is_refused() {
    let env = Env::new("slotbusy").await;
    env.src().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)").await.unwrap();
    let cfg = env.config(&["t"], "");
    let mut first = env.spawn(&cfg);
    wait_slot_active(&env, "the first pipeline to hold its slot").await;
    expect_failure(&cfg, "is in use by another connection");
    first.assert_running();
    assert_eq!(first.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_json_and_writes_nothing() {
    let env = Env::new("checkjson").await;
    env.src().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let cfg = env.config(&["t"], "");
    let out = std::process::Command::new(BIN).args(["check", "--output", "json", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["tables"][0], "public.t");
    assert_eq!(v["slot_exists"], false);
    assert_untouched(&env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_slot_keeps_advancing_while_other_tables_are_busy() {
    let env = Env::new("idle").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id serial PRIMARY KEY, v text);").await.unwrap();
    let mut p = env.spawn(&env.config(&["quiet"], ""));
    let slot = format!("sluice_{}", env.db);
    let confirmed = || {
        let (src, slot) = (&src, &slot);
        async move {
            src.query_one("SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1 AND active", &[slot])
                .await
                .ok()
                .and_then(|r| r.get::<_, Option<i64>>(0))
                .unwrap_or(0)
        }
    };
    wait_for("streaming to start", Duration::from_secs(30), || async { confirmed().await > 0 }).await;
    for round in 0..3 {
        src.batch_execute("INSERT INTO busy (v) SELECT repeat('x', 200) FROM generate_series(1, 20000)").await.unwrap();
        let written: i64 = src.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await.unwrap().get(0);
        wait_for(&format!("round {round}: confirmed_flush_lsn to pass {written}"), Duration::from_secs(20), || async {
            confirmed().await >= written
        })
        .await;
    }
    let retained: i64 = src
        .query_one("SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0);
    assert!(retained < 16 << 20, "slot holds back {retained} bytes of WAL");
    p.assert_running();
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_least_privilege_replication_role_is_enough() {
    let env = Env::new("leastpriv").await;
    let src = env.src().await;
    let role = format!("repl_{}", env.db);
    src.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');
         CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'repl-pw';
         GRANT SELECT ON t TO {role};
         CREATE PUBLICATION pub_{db} FOR TABLE t;",
        db = env.db
    ))
    .await
    .unwrap();
    // Source section only (it comes first): the replication role and the admin's publication.
    let text = std::fs::read_to_string(env.config(&["t"], ""))
        .unwrap()
        .replacen(&format!("user: {}", sluice_postgres::cluster::SUPERUSER), &format!("user: {role}"), 1)
        .replacen(sluice_postgres::cluster::SUPERUSER_PASSWORD, "repl-pw", 1)
        .replacen("  tables: [", &format!("  publication: pub_{}\n  tables: [", env.db), 1);
    let mut p = env.spawn(&env.write_config(&text));
    wait_equal(&env, "t", "id", Duration::from_secs(30)).await;
    src.batch_execute("INSERT INTO t SELECT g, 'v' FROM generate_series(2, 100) g; UPDATE t SET v = 'b' WHERE id = 1;").await.unwrap();
    wait_equal(&env, "t", "id", Duration::from_secs(30)).await;
    let superuser: bool = src.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role]).await.unwrap().get(0);
    assert!(!superuser);
    // Without a superuser there is no event trigger: one warning saying what that
    // means, and added columns still reach the sink through the new row shape.
    let warning = p.log().lines().filter(|l| l.contains("DDL capture is not installed")).count();
    assert_eq!(warning, 1, "{}", p.log());
    let trigger: bool =
        src.query_one("SELECT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'sluice_ddl_capture')", &[]).await.unwrap().get(0);
    assert!(!trigger, "a role that may not create event triggers leaves none behind");
    src.batch_execute("ALTER TABLE t ADD COLUMN w text; INSERT INTO t VALUES (101, 'v', 'w');").await.unwrap();
    wait_equal(&env, "t", "id", Duration::from_secs(30)).await;
    p.assert_running();
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}
