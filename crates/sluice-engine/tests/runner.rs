//! The runner end to end, in process: snapshot, streaming, transforms, a clean stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::Op;
use sluice_engine::config::PipelineConfig;
use sluice_engine::metrics::Metrics;
use sluice_engine::pipeline::Pipeline;
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD, TempCluster};
use sluice_sink_memory::received;

async fn wait_until(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_stream_through_transforms_into_memory() {
    let pg = tokio::task::spawn_blocking(|| TempCluster::start(&[])).await.unwrap().unwrap();
    let c = sluice_postgres::cluster::superuser_client(pg.port, "postgres").await.unwrap();
    c.batch_execute(
        "CREATE TABLE t (id int8 PRIMARY KEY, v text, secret text);
         INSERT INTO t SELECT g, 'v' || g, 's' FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let conn = format!("host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: postgres", pg.port);
    let cfg = PipelineConfig::parse(&format!(
        "pipeline: mem1\nsource: {{{conn}, tables: [public.t], heartbeat_interval: 200ms}}\n\
         sink: {{memory: {{name: mem1, state: {{{conn}}}}}}}\n\
         transforms:\n  - rename_fields: {{fields: {{v: value}}}}\n  - drop_fields: {{fields: [secret]}}\n"
    ))
    .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut pipeline = Pipeline::new(cfg, Arc::new(Metrics::default()), rx);
    let task = tokio::spawn(async move { pipeline.run().await });

    wait_until("the snapshot", Duration::from_secs(60), || received("mem1").count == 100).await;
    c.batch_execute("INSERT INTO t VALUES (101, 'new', 's'); UPDATE t SET v = 'changed' WHERE id = 5; DELETE FROM t WHERE id = 7;")
        .await
        .unwrap();
    wait_until("the changes", Duration::from_secs(30), || received("mem1").count == 103).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    let got = received("mem1");
    assert!(got.events[..100].iter().all(|e| e.op == Op::Read));
    let ops: Vec<Op> = got.events[100..].iter().map(|e| e.op).collect();
    assert_eq!(ops, [Op::Insert, Op::Update, Op::Delete]);
    // The transforms shaped what the sink got: `v` renamed, `secret` dropped.
    let names: Vec<&str> = got.events[101].table.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "value"]);
    let after = got.events[101].after.as_ref().unwrap();
    assert_eq!(after[1].as_text(), Some(&b"changed"[..]));
    // Streamed changes arrive in commit order.
    let lsns: Vec<_> = got.events[100..].iter().map(|e| (e.position.commit_lsn, e.position.seq)).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "{lsns:?}");
}

/// `batch.max_wait` gathers changes that arrive apart into one batch (one write to the
/// sink); without it each arrives in a batch of its own.
#[tokio::test(flavor = "multi_thread")]
async fn max_wait_gathers_changes_that_arrive_apart() {
    let pg = tokio::task::spawn_blocking(|| TempCluster::start(&[])).await.unwrap().unwrap();
    let c = sluice_postgres::cluster::superuser_client(pg.port, "postgres").await.unwrap();
    c.batch_execute("CREATE TABLE w (id int8 PRIMARY KEY)").await.unwrap();
    let conn = format!("host: 127.0.0.1, port: {}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: postgres", pg.port);
    let mut batches = Vec::new();
    for (name, wait) in [("wait0", "0s"), ("wait1", "1500ms")] {
        c.batch_execute("DELETE FROM w").await.unwrap(); // each pipeline's snapshot is empty
        let cfg = PipelineConfig::parse(&format!(
            "pipeline: {name}\nsource: {{{conn}, tables: [public.w], heartbeat_interval: 10s}}\n\
             sink: {{memory: {{name: {name}, state: {{{conn}}}}}}}\nbatch: {{max_wait: {wait}}}\n"
        ))
        .unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut pipeline = Pipeline::new(cfg, Arc::new(Metrics::default()), rx);
        let task = tokio::spawn(async move { pipeline.run().await });
        // Streaming has started once a first change arrives.
        c.execute("INSERT INTO w VALUES ($1)", &[&(batches.len() as i64 * 100)]).await.unwrap();
        wait_until("the first change", Duration::from_secs(60), || received(name).count == 1).await;
        let before = received(name).batches;
        for i in 1..=5i64 {
            c.execute("INSERT INTO w VALUES ($1)", &[&(batches.len() as i64 * 100 + i)]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_until("five changes", Duration::from_secs(30), || received(name).count == 6).await;
        batches.push(received(name).batches - before);
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
    assert!(batches[0] >= 4, "without max_wait, changes 100 ms apart go one by one: {batches:?}");
    assert!(batches[1] <= 2, "with max_wait they are gathered: {batches:?}");
}
