//! Random workloads and crashes: at the end the sink equals the source and no change
//! was applied twice (see `common/workload.rs` for how a double apply is caught).

use std::time::Duration;

use crate::common::workload::{SOURCE_DDL, TARGET_DDL, Workload};
use crate::common::*;

async fn setup(name: &str, preload: i64) -> Env {
    let env = Env::new(name).await;
    env.src().await.batch_execute(SOURCE_DDL).await.unwrap();
    env.dst().await.batch_execute(TARGET_DDL).await.unwrap();
    if preload > 0 {
        env.src()
            .await
            .batch_execute(&format!(
                "INSERT INTO accounts SELECT g, nextval('ver_seq'), g, 'pre ' || g, NULL FROM generate_series(1, {preload}) g;
                 INSERT INTO tags SELECT g % 50, 'k' || (g / 50), nextval('ver_seq'), 'pre' FROM generate_series(0, 499) g;"
            ))
            .await
            .unwrap();
    }
    env
}

async fn chunks(dst: &tokio_postgres::Client) -> (i64, i64) {
    dst.query_one("SELECT count(*) FILTER (WHERE done), count(*) FROM sluice.snapshot_chunks", &[])
        .await
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
        .unwrap_or((0, 0))
}

async fn assert_converged(env: &Env) {
    wait_equal(env, "accounts", "id", Duration::from_secs(120)).await;
    wait_equal(env, "tags", "a, b", Duration::from_secs(60)).await;
    let dst = env.dst().await;
    let applied: i64 = dst.query_one("SELECT count(*) FROM applied", &[]).await.unwrap().get(0);
    assert!(applied > 0, "the audit saw no applied rows");
    let unrepl = dst.query_opt("SELECT to_regclass('public.unreplicated')::text", &[]).await.unwrap();
    assert_eq!(unrepl.and_then(|r| r.get::<_, Option<String>>(0)), None, "unreplicated table leaked into the sink");
}

#[tokio::test(flavor = "multi_thread")]
async fn random_workload_for_30s_converges_exactly_once() {
    let env = setup("workload", 20_000).await;
    let mut p = env.spawn(&env.config(&["public.accounts", "tags"], "snapshot: {chunk_rows: 5000}\n"));
    let src = env.src().await;
    let mut w = Workload::new(7, 20_001);
    w.run(&src, Duration::from_secs(32)).await;
    assert!(w.big_txn_done && w.truncate_done);
    p.assert_running();
    assert_converged(&env).await;
    p.assert_running();
    // Unchanged TOAST columns really were exercised: rows with out-of-line docs exist.
    let toasted: i64 = env.dst().await.query_one("SELECT count(*) FROM accounts WHERE length(doc) > 5000", &[]).await.unwrap().get(0);
    assert!(toasted > 0);
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_snapshot_and_streaming_loses_and_repeats_nothing() {
    let env = setup("crash", 600_000).await;
    let cfg = env.config(&["public.accounts", "public.tags"], "snapshot: {chunk_rows: 10000, parallelism: 2}\n");
    let dst = env.dst().await;
    // Writes run throughout: during the snapshot, between kills and while streaming.
    let src = env.src().await;
    let workload = tokio::spawn(async move {
        let mut w = Workload::new(11, 600_001);
        w.run(&src, Duration::from_secs(30)).await;
        w
    });
    // A clean stop in the middle of the snapshot: prompt, exit 0.
    {
        let mut p = env.spawn(&cfg);
        wait_for("snapshot progress", Duration::from_secs(60), || async { chunks(&dst).await.0 > 0 }).await;
        let started = std::time::Instant::now();
        assert_eq!(p.terminate(), Some(0), "{}", p.log());
        assert!(started.elapsed() < Duration::from_secs(5), "stopping took {:?}", started.elapsed());
    }
    let mut kills = 0;
    // Two kills in the middle of the snapshot.
    for _ in 0..2 {
        let mut p = env.spawn(&cfg);
        let before = chunks(&dst).await.0;
        wait_for("snapshot progress", Duration::from_secs(60), || async { chunks(&dst).await.0 > before }).await;
        let (done, total) = chunks(&dst).await;
        p.assert_running();
        p.kill9();
        kills += 1;
        eprintln!("kill {kills}: snapshot {done}/{total} chunks");
        assert!(done < total, "the snapshot finished before the kill");
    }
    // Streaming under load, killed at random moments.
    let mut rng = rand::rng();
    while !workload.is_finished() {
        let mut p = env.spawn(&cfg);
        let wait = rand::Rng::random_range(&mut rng, 1500..5000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        p.assert_running();
        p.kill9();
        kills += 1;
    }
    let w = workload.await.unwrap();
    assert!(kills >= 5, "only {kills} kills");
    assert!(w.big_txn_done);
    let (done, total) = chunks(&dst).await;
    let mut p = env.spawn(&cfg);
    assert_converged(&env).await;
    assert_eq!(chunks(&dst).await.0, chunks(&dst).await.1, "snapshot finished ({done}/{total} before the last start)");
    p.assert_running();
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}
