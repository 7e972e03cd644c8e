use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_stream_then_clean_stop() {
    let env = Env::new("smoke").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE items (id int8 PRIMARY KEY, name text, qty int4, big text);
         INSERT INTO items SELECT g, 'item ' || g, g % 7, NULL FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    let cfg = env.config(&["public.items"], "snapshot: {chunk_rows: 700}\n");
    let mut p = env.spawn(&cfg);
    wait_equal(&env, "items", "id", Duration::from_secs(30)).await;
    src.batch_execute(
        "INSERT INTO items VALUES (6000, 'new', 1, repeat('x', 300000));
         UPDATE items SET qty = qty + 1 WHERE id <= 100;
         DELETE FROM items WHERE id BETWEEN 200 AND 300;
         UPDATE items SET id = 7000 WHERE id = 5;
         UPDATE items SET qty = 99 WHERE id = 6000;",
    )
    .await
    .unwrap();
    wait_equal(&env, "items", "id", Duration::from_secs(30)).await;
    p.assert_running();
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn added_column_reaches_the_sink() {
    let env = Env::new("evolve").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE t (id int4 PRIMARY KEY, a text); INSERT INTO t VALUES (1, 'one');").await.unwrap();
    let mut p = env.spawn(&env.config(&["t"], ""));
    wait_equal(&env, "t", "id", Duration::from_secs(30)).await;
    src.batch_execute(
        "ALTER TABLE t ADD COLUMN b numeric(8,2) DEFAULT 1.5;
         INSERT INTO t VALUES (2, 'two', 2.25);
         UPDATE t SET a = 'uno' WHERE id = 1;",
    )
    .await
    .unwrap();
    wait_equal(&env, "t", "id", Duration::from_secs(30)).await;
    let ty: String = env
        .dst()
        .await
        .query_one("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'b'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ty, "numeric(8,2)");
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_reports_events_lag_and_wal() {
    use std::io::{Read as _, Write as _};
    let env = Env::new("metrics").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE m (id int4 PRIMARY KEY)").await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = env.config(&["m"], "");
    let child = std::process::Command::new(BIN)
        .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&cfg)
        .stderr(std::fs::File::create(env.dir.join("metrics.log")).unwrap())
        .spawn()
        .unwrap();
    let mut p = Pipeline { child, log: env.dir.join("metrics.log") };
    // The rows must arrive as changes, not in the snapshot (which the events counter
    // does not count): an empty target table can exist before the slot does, so wait
    // for the stream itself.
    wait_slot_active(&env, "the pipeline to stream from its slot").await;
    src.batch_execute("INSERT INTO m SELECT generate_series(1, 500)").await.unwrap();
    wait_equal(&env, "m", "id", Duration::from_secs(30)).await;
    let scrape = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    // The WAL gauge is sampled with the heartbeat (every 500 ms here), and events are
    // counted just after the sink's commit, which the target can show first.
    let mut body = scrape();
    for _ in 0..50 {
        if body.lines().any(|l| l.starts_with("sluice_wal_retained_bytes{") && !l.ends_with(" 0"))
            && body.lines().any(|l| l.starts_with("sluice_events_total{") && l.ends_with(" 500"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        body = scrape();
    }
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert_eq!(value("sluice_events_total"), 500.0, "{}", p.log());
    assert!(value("sluice_bytes_total") > 0.0);
    assert!(value("sluice_lag_histogram_ms_count") >= 1.0);
    assert!(value("sluice_wal_retained_bytes") > 0.0);
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_table_replicates_through_its_root() {
    let env = Env::new("parts").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE p (id int8 PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE p_lo PARTITION OF p FOR VALUES FROM (MINVALUE) TO (1000);
         CREATE TABLE p_hi PARTITION OF p FOR VALUES FROM (1000) TO (MAXVALUE);
         INSERT INTO p SELECT g, 'v' || g FROM generate_series(1, 2000) g;",
    )
    .await
    .unwrap();
    let mut p = env.spawn(&env.config(&["p"], ""));
    wait_equal(&env, "p", "id", Duration::from_secs(30)).await;
    src.batch_execute(
        "INSERT INTO p VALUES (5000, 'new'), (2500, 'x'); UPDATE p SET id = 7000 WHERE id = 10; DELETE FROM p WHERE id = 1500;",
    )
    .await
    .unwrap();
    wait_equal(&env, "p", "id", Duration::from_secs(30)).await;
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

/// Batches of new rows are copied straight into the target. A key the target holds
/// already (a row written there by someone else) fails that copy once; the table is
/// merged from then on and ends equal to the source.
#[tokio::test(flavor = "multi_thread")]
async fn new_rows_copied_straight_in_fall_back_to_the_merge_on_a_key_already_there() {
    let env = Env::new("copyin").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY, v text, n numeric(10,2), at timestamptz)").await.unwrap();
    let mut p = env.spawn(&env.config(&["t"], ""));
    wait_equal(&env, "t", "id", Duration::from_secs(30)).await;
    src.batch_execute("INSERT INTO t SELECT g, 'row ' || g, g / 3.0, now() FROM generate_series(1, 3000) g").await.unwrap();
    wait_equal(&env, "t", "id", Duration::from_secs(30)).await;
    assert!(!p.log().contains("merging this table's changes"), "{}", p.log());
    env.dst().await.batch_execute("INSERT INTO t VALUES (5000, 'stale', 0, now())").await.unwrap();
    src.batch_execute("INSERT INTO t SELECT g, 'late ' || g, 1, now() FROM generate_series(4001, 5001) g").await.unwrap();
    wait_equal(&env, "t", "id", Duration::from_secs(60)).await;
    assert!(p.log().contains("merging this table's changes from now on"), "the direct copy was never tried: {}", p.log());
    src.batch_execute("INSERT INTO t VALUES (6000, 'after', 2, now()); UPDATE t SET v = 'changed' WHERE id = 1").await.unwrap();
    wait_equal(&env, "t", "id", Duration::from_secs(30)).await;
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}
