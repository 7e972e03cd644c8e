//! Resync: tables read again from the source while the pipeline keeps streaming,
//! through `sluice run` and `sluice resync`, with the pipeline killed mid-resync.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ITEMS: i64 = 60_000;

/// (chunks done, all done) of the resync requests in the sink.
async fn resync_state(dst: &tokio_postgres::Client) -> (i64, bool) {
    let r = dst.query_one("SELECT coalesce(sum(chunks), 0)::int8, coalesce(bool_and(done), false) FROM sluice.resyncs", &[]).await.unwrap();
    (r.get(0), r.get(1))
}

/// The sink drifted (rows deleted, changed and added by hand); a resync of two tables
/// (one with a composite text key) runs under a steady write workload, the pipeline is
/// SIGKILLed mid-resync and restarted, and the sink ends equal to the source, while a
/// third table kept streaming during the resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_repairs_a_drifted_sink_while_streaming_and_survives_kill9() {
    let env = Env::new("resync").await;
    env.src()
        .await
        .batch_execute(&format!(
            "CREATE TABLE items (id int8 PRIMARY KEY, v text, n int4);
             INSERT INTO items SELECT g, md5(g::text), g % 1000 FROM generate_series(1, {ITEMS}) g;
             CREATE TABLE pairs (a int4, b text, v text, PRIMARY KEY (a, b));
             INSERT INTO pairs SELECT g % 300, 'k''' || g, md5(g::text) FROM generate_series(1, 6000) g;
             CREATE TABLE other (id serial PRIMARY KEY, v text);"
        ))
        .await
        .unwrap();
    let cfg = env.config(&["items", "pairs", "other"], "snapshot:\n  chunk_rows: 500\n");
    // The pipeline waits 15 ms between reading a chunk and its high watermark: changes
    // in that moment, which the read missed, must win over the chunk.
    let hook = [("SLUICE_TEST_RESYNC_DELAY_MS", "15")];
    let mut p = env.spawn_env(&cfg, &hook);
    wait_equal(&env, "items", "id", Duration::from_secs(60)).await;
    wait_equal(&env, "pairs", "a, b", Duration::from_secs(60)).await;

    // Drift: what a person or a bad job might do to a replica.
    let dst = env.dst().await;
    dst.batch_execute(
        "DELETE FROM items WHERE id % 97 = 0;
         UPDATE items SET v = 'drift' WHERE id % 89 = 0;
         INSERT INTO items VALUES (-5, 'extra', 0), (999999999, 'extra', 0);
         INSERT INTO items SELECT g, 'gap', 0 FROM generate_series(70001, 70100) g;
         DELETE FROM pairs WHERE a = 7;
         UPDATE pairs SET v = 'drift' WHERE a = 8;
         INSERT INTO pairs VALUES (5, 'zzz-extra', 'extra'), (-1, 'a', 'extra');",
    )
    .await
    .unwrap();
    assert_ne!(digest(&env.src().await, "items", "id").await, digest(&dst, "items", "id").await);

    // Writes keep coming on all three tables throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let (port, dst_port, db) = (env.src_port, env.dst_port, env.db.clone());
        tokio::spawn(async move {
            let (c, sink) = (connect(port, &db).await, connect(dst_port, &db).await);
            let mut rng = StdRng::seed_from_u64(7);
            let mut next = ITEMS + 1;
            let mut hot = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let id = rng.random_range(1..next);
                if rng.random_range(0..20) == 0 {
                    // Where the resync reads now: its last key done, in the sink.
                    let q = "SELECT last_key[1]::int8 FROM sluice.resyncs WHERE table_name = 'public.items'";
                    hot = sink.query_opt(q, &[]).await.ok().flatten().and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0);
                }
                let sql = match rng.random_range(0..8) {
                    6 => format!(
                        "UPDATE items SET v = 'hot' || n, n = n + 1 WHERE id BETWEEN {0} AND {0} + 3",
                        hot + rng.random_range(1..600)
                    ),
                    7 => format!("DELETE FROM items WHERE id = {}", hot + rng.random_range(1..600)),
                    0 => {
                        next += 1;
                        format!("INSERT INTO items VALUES ({next}, 'new', 1)")
                    }
                    1 => format!("DELETE FROM items WHERE id = {id}"),
                    2 => format!("UPDATE items SET v = 'upd' || n, n = n + 1 WHERE id BETWEEN {id} AND {id} + 20"),
                    3 => format!("UPDATE pairs SET v = 'upd' WHERE a = {} AND b LIKE 'k''1%'", id % 300),
                    4 => format!("DELETE FROM pairs WHERE a = {} AND b = 'k''{id}'", id % 300),
                    _ => "INSERT INTO other (v) VALUES ('x')".to_string(),
                };
                c.batch_execute(&sql).await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };

    let cfg_s = cfg.to_str().unwrap();
    let (code, err) =
        run_to_exit(&["resync", "-c", cfg_s, "--table", "public.items", "--table", "pairs", "--no-wait"], Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");

    // Streaming goes on during the resync: a row written now arrives before it ends.
    let src = env.src().await;
    let marker: i32 = src.query_one("INSERT INTO other (v) VALUES ('marker') RETURNING id", &[]).await.unwrap().get(0);
    let t = Instant::now();
    wait_for("the marker row during the resync", Duration::from_secs(20), || async {
        dst.query_opt("SELECT 1 FROM other WHERE id = $1", &[&marker]).await.unwrap().is_some()
    })
    .await;
    let marker_ms = t.elapsed().as_millis();
    let (chunks, done) = resync_state(&dst).await;
    assert!(!done, "the resync ended before the marker arrived ({chunks} chunks): make the table bigger");

    // Kill mid-resync, then restart: it goes on from its last chunk.
    wait_for("a few resync chunks", Duration::from_secs(60), || async { resync_state(&dst).await.0 >= 20 }).await;
    let (before_kill, done) = resync_state(&dst).await;
    assert!(!done, "the resync ended before the kill");
    p.kill9();
    p = env.spawn_env(&cfg, &hook);
    wait_for("the resync to finish", Duration::from_secs(180), || async { resync_state(&dst).await.1 }).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    wait_equal(&env, "items", "id", Duration::from_secs(60)).await;
    wait_equal(&env, "pairs", "a, b", Duration::from_secs(60)).await;
    wait_equal(&env, "other", "id", Duration::from_secs(60)).await;
    let (chunks, _) = resync_state(&dst).await;
    let (rows, deleted): (i64, i64) = {
        let r = dst.query_one("SELECT sum(rows)::int8, sum(deleted)::int8 FROM sluice.resyncs", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    // Extra rows (ids -5, 70001..70100, 999999999 and two pairs) are gone: at least
    // the ones no workload write touched.
    assert!(deleted >= 100, "deleted {deleted}");
    assert!(rows >= ITEMS, "rows {rows}");
    // Resumed, not restarted: the chunks before the kill were not read again (a restart
    // would read about `before_kill` chunks more than one pass needs).
    let src_rows: i64 = src.query_one("SELECT (SELECT count(*) FROM items) + (SELECT count(*) FROM pairs)", &[]).await.unwrap().get(0);
    let one_pass = src_rows / 500 + 2;
    assert!(
        chunks <= one_pass + 4 + before_kill / 2,
        "chunks {chunks}, one pass {one_pass}, killed after {before_kill}: the resync started over"
    );
    let log = p.log();
    assert!(log.contains("resync of table complete"), "{log}");
    eprintln!("marker row arrived {marker_ms} ms into the resync; {chunks} chunks, {rows} rows, {deleted} deleted");
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

/// `sluice resync` refuses tables the pipeline does not have, in one line, and records
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_of_an_unknown_table_is_refused() {
    let env = Env::new("resync_bad").await;
    env.src().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE heap (a int, b text);").await.unwrap();
    let cfg = env.config(&["t", "heap"], "");
    let cfg_s = cfg.to_str().unwrap();
    let (code, err) = run_to_exit(&["resync", "-c", cfg_s, "--table", "public.heap"], Duration::from_secs(30));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("public.heap has no primary key"), "{err}");
    let (code, err) = run_to_exit(&["resync", "-c", cfg_s, "--table", "public.nope"], Duration::from_secs(30));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("public.nope") && err.contains("public.t"), "{err}");
    let (code, err) = run_to_exit(&["resync", "-c", cfg_s, "--table", "a.b.c"], Duration::from_secs(30));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("schema.table"), "{err}");
    let n: Option<i64> = env.dst().await.query_opt("SELECT count(*) FROM sluice.resyncs", &[]).await.ok().flatten().map(|r| r.get(0));
    assert!(n.unwrap_or(0) == 0, "a refused resync recorded a request");
}
