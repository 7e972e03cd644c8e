//! Postgres restarts under a running pipeline: it recovers by itself and catches up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::*;
use sluice_postgres::cluster::TempCluster;

#[tokio::test(flavor = "multi_thread")]
async fn source_and_sink_restarts_while_streaming() {
    let mut src = TempCluster::start(&[]).unwrap();
    let mut dst = TempCluster::start(&[]).unwrap();
    let env = Env::on("restart", src.port, dst.port).await;
    env.src().await.batch_execute("CREATE TABLE events (id int8 PRIMARY KEY, v text)").await.unwrap();
    let mut p = env.spawn(&env.config(&["events"], ""));

    // A writer that keeps going through outages, counting what committed.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, committed) = (stop.clone(), committed.clone());
        let (port, db) = (env.src_port, env.db.clone());
        tokio::spawn(async move {
            let mut id = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let c = connect_retry(port, &db).await;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    id += 1;
                    if c.execute("INSERT INTO events VALUES ($1, 'v')", &[&id]).await.is_err() {
                        break;
                    }
                    committed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    wait_equal_nonempty(&env).await;

    src.stop().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    src.start_again().unwrap();
    let after_source = committed.load(Ordering::Relaxed);
    wait_for("writes after the source restart", Duration::from_secs(30), || async {
        committed.load(Ordering::Relaxed) > after_source + 200
    })
    .await;

    dst.stop().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    dst.start_again().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_equal(&env, "events", "id", Duration::from_secs(60)).await;
    p.assert_running();
    let log = p.log();
    assert!(log.matches("reconnecting").count() >= 2, "expected reconnects in the log:\n{log}");
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

async fn connect_retry(port: u16, db: &str) -> tokio_postgres::Client {
    loop {
        if let Ok(c) = sluice_postgres::cluster::superuser_client(port, db).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_equal_nonempty(env: &Env) {
    let dst = env.dst().await;
    wait_for("first rows in the sink", Duration::from_secs(30), || async {
        try_digest(&dst, "events", "id").await.is_some_and(|d| d.0 > 100)
    })
    .await;
}
