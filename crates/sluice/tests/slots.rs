//! Slot health: a source that invalidates a slot holding too much WAL
//! (`max_slot_wal_keep_size`), the halt that says so, and the recovery that brings the
//! sink back without emptying it (`sluice recover`, then `on_slot_lost: resync`).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::common::*;
use sluice_postgres::cluster::TempCluster;

const ROWS: i64 = 20_000;

/// Pauses (SIGSTOP) or resumes (SIGCONT) the pipeline process.
fn signal(p: &Pipeline, sig: &str) {
    assert!(Command::new("kill").args([sig, &p.child.id().to_string()]).status().unwrap().success());
}

/// Writes changes (updates, deletes, inserts) and switches WAL segments with
/// checkpoints until the source invalidates `slot`. Returns the rows changed.
async fn lose_slot(src: &tokio_postgres::Client, slot: &str, round: i64) -> i64 {
    let mut changed = 0;
    for i in 0..200 {
        let base = round * 1_000_000 + i * 10;
        src.batch_execute(&format!(
            "UPDATE items SET v = 'lost-{round}-{i}', n = n + 1 WHERE id % 50 = {i} % 50;
             DELETE FROM items WHERE id % 211 = {i};
             INSERT INTO items SELECT {base} + g, 'added', 0 FROM generate_series(1, 10) g;"
        ))
        .await
        .unwrap();
        changed += 1;
        src.batch_execute("SELECT pg_switch_wal(); CHECKPOINT;").await.unwrap();
        let status: Option<String> =
            src.query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await.unwrap().get(0);
        if status.as_deref() == Some("lost") {
            // And changes after the loss, which no stream can carry any more.
            src.batch_execute(&format!(
                "UPDATE items SET v = 'after-{round}', n = n + 1 WHERE id % 37 = {round};
                 DELETE FROM items WHERE id % 101 = {round};
                 INSERT INTO items SELECT {round} * 1000000 + 900000 + g, 'after', 0 FROM generate_series(1, 50) g;"
            ))
            .await
            .unwrap();
            return changed;
        }
    }
    panic!("slot {slot} was never invalidated");
}

/// Samples the sink table's row count until stopped; returns the smallest seen.
fn watch_min_count(env: &Env, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<i64> {
    let (port, db) = (env.dst_port, env.db.clone());
    let min = Arc::new(AtomicI64::new(i64::MAX));
    tokio::spawn(async move {
        let c = connect(port, &db).await;
        while !stop.load(Ordering::Relaxed) {
            let n: i64 = c.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
            min.fetch_min(n, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        min.load(Ordering::Relaxed)
    })
}

/// The pipeline is paused while the source generates WAL until its slot is lost; on
/// resuming it halts with one line (still running, not exiting). `sluice recover`
/// (refused while the slot was healthy) replaces the slot and reads every table again
/// under a write workload, through a kill -9 mid-recovery, and the sink ends equal to
/// the source, including rows changed and deleted while the slot was lost, without its
/// table ever emptying. Then, with `on_slot_lost: resync`, a second loss recovers by
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_halts_and_recovers_without_emptying_the_sink() {
    let source = tokio::task::spawn_blocking(|| TempCluster::start(&["max_slot_wal_keep_size = 1MB"])).await.unwrap().unwrap();
    let env = Env::on("slots", source.port, clusters().1.port).await;
    let src = env.src().await;
    src.batch_execute(&format!(
        "CREATE TABLE items (id int8 PRIMARY KEY, v text, n int4);
         INSERT INTO items SELECT g, md5(g::text), 0 FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .unwrap();
    let slot = format!("sluice_{}", env.db);
    // Alerts to a webhook, metrics to a DogStatsD listener.
    let alerts = HookReceiver::start().await;
    let statsd = StatsdListener::start();
    let cfg = env.config(&["items"], &format!("snapshot:\n  chunk_rows: 2000\nalerts:\n  webhook_url: {}\n  window: 5s\n", alerts.url));
    let cfg_s = cfg.to_str().unwrap();
    // Resync chunks wait between read and high watermark: the kill lands mid-recovery.
    let hook = [("SLUICE_TEST_RESYNC_DELAY_MS", "400"), ("SLUICE_DOGSTATSD", &statsd.addr), ("SLUICE_DOGSTATSD_INTERVAL", "1s")];
    let mut p = env.spawn_env(&cfg, &hook);
    wait_equal(&env, "items", "id", Duration::from_secs(60)).await;

    // Nothing to recover while the slot is healthy: one line, non-zero exit.
    let (code, err) = run_to_exit(&["recover", "-c", cfg_s], Duration::from_secs(30));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("is not lost") && err.trim().lines().count() == 1, "{err}");

    // A change streamed before the loss, so the per-table event counts have something
    // to report (whether any change reaches the pipeline between SIGCONT and the halt
    // is a matter of timing).
    src.batch_execute("UPDATE items SET n = n + 1 WHERE id = 1").await.unwrap();
    wait_equal(&env, "items", "id", Duration::from_secs(30)).await;

    // Paused while the source writes on and removes the WAL the slot needed.
    signal(&p, "-STOP");
    lose_slot(&src, &slot, 1).await;
    signal(&p, "-CONT");
    wait_for("the halt on the lost slot", Duration::from_secs(30), || async { p.log().contains("was invalidated by the source") }).await;
    let halt = p.log().lines().find(|l| l.contains("was invalidated by the source")).unwrap().to_string();
    assert!(halt.contains("sluice recover -c") && halt.contains("max_slot_wal_keep_size = 1MB"), "{halt}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.assert_running();
    wait_for("a firing pipeline_halted alert", Duration::from_secs(20), || async { alerts.has("pipeline_halted", "firing") }).await;
    let fired = alerts.received().into_iter().find(|v| v["alert"] == "pipeline_halted").unwrap();
    assert!(fired["text"].as_str().unwrap().contains("was invalidated by the source"), "{fired}");
    // The lag and event metrics arrived with their tags; the slot's status is lost (3).
    let tags = format!("pipeline:{},sink:postgres", env.db);
    let has_all = |lines: &[String]| {
        let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix) && l.contains(&tags));
        has("sluice.lag_ms:") && has("sluice.events:") && has("sluice.slot.wal_status:3|g") && has("sluice.table.events:")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !has_all(&statsd.lines()) {
        assert!(std::time::Instant::now() < deadline, "DogStatsD lines: {:?}", statsd.lines());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(statsd.lines().iter().any(|l| l.starts_with("sluice.table.events:") && l.ends_with(",table:public.items")));
    let dst = env.dst().await;
    assert_ne!(digest(&src, "items", "id").await, digest(&dst, "items", "id").await, "the changes were lost: the sink must differ");

    // Recover under a write workload, killed mid-way; the sink never empties.
    let stop = Arc::new(AtomicBool::new(false));
    let min = watch_min_count(&env, stop.clone());
    let writer = spawn_items_writer(&env, stop.clone());
    let (code, err) = run_to_exit(&["recover", "-c", cfg_s, "--no-wait"], Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    wait_for("recovery chunks", Duration::from_secs(60), || async {
        dst.query_one("SELECT coalesce(sum(chunks), 0)::int8 FROM sluice.resyncs", &[]).await.unwrap().get::<_, i64>(0) >= 3
    })
    .await;
    // The slot is replaced: the halt alert resolves (the process that fired it sends it).
    wait_for("the resolved alert", Duration::from_secs(10), || async { alerts.has("pipeline_halted", "resolved") }).await;
    let done: bool = dst.query_one("SELECT bool_and(done) FROM sluice.resyncs", &[]).await.unwrap().get(0);
    assert!(!done, "the recovery ended before the kill");
    assert!(p.log().contains("replaced the lost replication slot"), "{}", p.log());
    p.kill9();
    let mut p = env.spawn_env(&cfg, &hook);
    wait_for("the recovery to finish", Duration::from_secs(120), || async {
        dst.query_one("SELECT coalesce(bool_and(done), false) FROM sluice.resyncs", &[]).await.unwrap().get::<_, bool>(0)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_equal(&env, "items", "id", Duration::from_secs(60)).await;
    let min = min.await.unwrap();
    assert!(min >= ROWS * 9 / 10, "the sink's table shrank to {min} rows during the recovery");
    p.assert_running();
    p.kill9();

    // With on_slot_lost: resync, a second loss recovers by itself.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("  heartbeat_interval: 500ms\n", "  heartbeat_interval: 500ms\n  on_slot_lost: resync\n");
    let cfg2 = env.write_config(&text);
    let p = env.spawn(&cfg2);
    wait_for("streaming", Duration::from_secs(30), || async { p.log().contains("INFO streaming") }).await;
    wait_equal(&env, "items", "id", Duration::from_secs(60)).await;
    signal(&p, "-STOP");
    lose_slot(&src, &slot, 2).await;
    signal(&p, "-CONT");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p.log().contains("replaced the lost replication slot") {
        assert!(std::time::Instant::now() < deadline, "no automatic recovery:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_equal(&env, "items", "id", Duration::from_secs(120)).await;
    drop(p);
    drop(env);
    drop(source);
}

/// Updates, deletes and inserts on `items` until stopped.
fn spawn_items_writer(env: &Env, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    use rand::Rng as _;
    let (port, db) = (env.src_port, env.db.clone());
    tokio::spawn(async move {
        let c = connect(port, &db).await;
        let mut next = 5_000_000i64;
        while !stop.load(Ordering::Relaxed) {
            let (pick, id) = {
                let mut rng = rand::rng();
                (rng.random_range(0..4), rng.random_range(1..ROWS))
            };
            let sql = match pick {
                0 => {
                    next += 1;
                    format!("INSERT INTO items VALUES ({next}, 'w', 0)")
                }
                1 => format!("DELETE FROM items WHERE id = {id}"),
                _ => format!("UPDATE items SET n = n + 1, v = 'w' WHERE id BETWEEN {id} AND {id} + 5"),
            };
            c.batch_execute(&sql).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}
