//! A source transaction far larger than the pipeline holds in memory (2 million rows,
//! about 400 MB of WAL): it reaches the sink in pieces, the pipeline's peak RSS stays
//! under 150 MB, the Postgres sink still commits it whole, and a kill -9 while it is
//! being applied loses nothing and applies nothing twice.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, TopicPartitionList};

use crate::common::*;

const ROWS: i64 = 2_000_000;

/// The most the pipeline process may ever have resident (the bound).
const RSS_LIMIT_KB: u64 = 150 * 1024;

const TABLE_DDL: &str = "CREATE TABLE big (id int8 PRIMARY KEY, n int8 NOT NULL, payload text NOT NULL)";

/// One transaction of `ROWS` inserts of about 200 bytes each.
const INSERT_ALL: &str = "INSERT INTO big SELECT g, 0, repeat(md5(g::text), 4) FROM generate_series(1, 2000000) g";

/// The process's peak resident set (`VmHWM`), in KiB.
fn peak_rss_kb(p: &Pipeline) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).expect("the pipeline is running");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM in kB")
}

/// Count and an order-independent hash of the rows (a digest of 2 million rows as one
/// string would cost the test more than the pipeline).
async fn fingerprint(c: &tokio_postgres::Client) -> Option<(i64, String)> {
    let row = c.query_one("SELECT count(*), coalesce(sum(hashtextextended(t::text, 7)::numeric), 0)::text FROM big t", &[]).await.ok()?;
    Some((row.get(0), row.get(1)))
}

async fn wait_same(env: &Env, limit: Duration) {
    let (src, dst) = (env.src().await, env.dst().await);
    let want = fingerprint(&src).await;
    let deadline = Instant::now() + limit;
    loop {
        let got = fingerprint(&dst).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "target {got:?} never matched source {want:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Rows the sink wrote into the target's `big`, by statement kind, counted by
/// statement-level triggers: a change applied twice shows as a count above the source's.
async fn applied(dst: &tokio_postgres::Client) -> (i64, i64) {
    let r = dst
        .query_one(
            "SELECT coalesce(sum(n) FILTER (WHERE op = 'INSERT'), 0)::int8, coalesce(sum(n) FILTER (WHERE op = 'UPDATE'), 0)::int8 FROM big_applied",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Whether a session other than this one holds a write lock on the target's `big`:
/// the sink's transaction is open on it.
async fn sink_writing(dst: &tokio_postgres::Client) -> bool {
    dst.query_one(
        "SELECT count(*) > 0 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
          WHERE c.relname = 'big' AND l.mode = 'RowExclusiveLock' AND l.granted AND l.pid <> pg_backend_pid()",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_million_row_transaction_reaches_postgres_whole_in_bounded_memory_and_survives_kill9() {
    let env = Env::new("bigtxn_pg").await;
    let (src, dst) = (env.src().await, env.dst().await);
    src.batch_execute(TABLE_DDL).await.unwrap();
    // The target exists beforehand, with triggers that count what the sink writes.
    dst.batch_execute(&format!(
        "{TABLE_DDL};
         CREATE TABLE big_applied (op text, n int8);
         CREATE FUNCTION count_applied() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO big_applied SELECT TG_OP, count(*) FROM changed; RETURN NULL; END $$;
         CREATE TRIGGER counted_inserts AFTER INSERT ON big REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_applied();
         CREATE TRIGGER counted_updates AFTER UPDATE ON big REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_applied();"
    ))
    .await
    .unwrap();
    let cfg = env.config(&["big"], "");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;

    // 1. Two million inserts in one transaction.
    let started = Instant::now();
    src.batch_execute(INSERT_ALL).await.unwrap();
    // The sink commits the transaction whole: while it is being applied, none of it shows.
    wait_for("the sink to write", Duration::from_secs(120), || sink_writing(&dst)).await;
    let visible: i64 = dst.query_one("SELECT count(*) FROM big", &[]).await.unwrap().get(0);
    assert_eq!(visible, 0, "part of a source transaction is visible in the target before its commit");
    wait_same(&env, Duration::from_secs(300)).await;
    let peak = peak_rss_kb(&p);
    eprintln!("2M-row insert transaction applied in {:?}; peak RSS {} MiB", started.elapsed(), peak / 1024);
    assert!(peak < RSS_LIMIT_KB, "peak RSS {peak} KiB while applying a 2M-row transaction (limit {RSS_LIMIT_KB} KiB)");
    assert!(p.log().contains("in pieces"), "the transaction was not handed on in pieces");
    assert_eq!(applied(&dst).await, (ROWS, 0));

    // 2. Two million updates in one transaction; kill -9 while the sink applies them.
    src.batch_execute("UPDATE big SET n = n + 1").await.unwrap();
    wait_for("the sink to write the updates", Duration::from_secs(120), || sink_writing(&dst)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let peak_before_kill = peak_rss_kb(&p);
    p.kill9();
    // The open target transaction died with the connection: nothing of it is applied.
    wait_for("the killed sink's session to end", Duration::from_secs(30), || async { !sink_writing(&dst).await }).await;
    let updated: i64 = dst.query_one("SELECT count(*) FROM big WHERE n = 1", &[]).await.unwrap().get(0);
    assert_eq!(updated, 0, "a killed pipeline left part of a source transaction in the target");
    let mut p = env.spawn(&cfg);
    wait_same(&env, Duration::from_secs(300)).await;
    let peak_after = peak_rss_kb(&p);
    eprintln!("2M-row update transaction: peak RSS {} MiB before the kill, {} MiB after", peak_before_kill / 1024, peak_after / 1024);
    assert!(peak_before_kill.max(peak_after) < RSS_LIMIT_KB, "peak RSS {peak_before_kill}/{peak_after} KiB (limit {RSS_LIMIT_KB})");
    // Every row inserted once and updated once, across the kill.
    assert_eq!(applied(&dst).await, (ROWS, ROWS), "a change was applied twice (or lost)");
    p.assert_running();
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_million_row_transaction_reaches_kafka_in_bounded_memory_and_survives_kill9() {
    let env = Env::new("bigtxn_kafka").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let src = env.src().await;
    src.batch_execute(TABLE_DDL).await.unwrap();
    let cfg = env.kafka_config(&["big"], &brokers, "    encoding: json\n    tombstones: false\n    topic: big.{table}\n", "");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;

    src.batch_execute(INSERT_ALL).await.unwrap();
    let topic = "big.big";
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "large-txn-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let high = |c: &BaseConsumer| c.fetch_watermarks(topic, 0, Duration::from_secs(5)).map(|(_, h)| h).unwrap_or(0);
    // Kill once a part of the transaction is in the topic, before all of it is.
    wait_for("records in the topic", Duration::from_secs(180), || async { high(&consumer) > 100_000 }).await;
    let peak_before_kill = peak_rss_kb(&p);
    p.kill9();
    let at_kill = high(&consumer);
    assert!(at_kill < ROWS, "the kill came after the whole transaction was delivered ({at_kill} records)");
    let mut p = env.spawn(&cfg);
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(300)).await;
    let peak_after = peak_rss_kb(&p);
    eprintln!("2M-row transaction to Kafka: peak RSS {} MiB before the kill, {} MiB after", peak_before_kill / 1024, peak_after / 1024);
    assert!(peak_before_kill.max(peak_after) < RSS_LIMIT_KB, "peak RSS {peak_before_kill}/{peak_after} KiB (limit {RSS_LIMIT_KB})");

    // Read it all back: every change of the transaction is there (at least once: those
    // sent before the kill are sent again), identified by its position in the
    // transaction, and the rows are the source's.
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let end = high(&consumer);
    let (mut seqs, mut ids, mut records) = (HashSet::new(), HashSet::new(), 0i64);
    let mut commit_lsns = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while records < end {
        assert!(Instant::now() < deadline, "read {records} of {end} records");
        let Some(m) = consumer.poll(Duration::from_secs(1)) else { continue };
        let m = m.unwrap();
        records += 1;
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(v["op"], "c");
        let id = v["after"]["id"].as_i64().unwrap();
        assert_eq!(v["after"]["payload"].as_str().unwrap().len(), 128, "row {id}");
        ids.insert(id);
        seqs.insert(v["source"]["event_seq"].as_i64().unwrap());
        commit_lsns.insert(v["source"]["commit_lsn"].as_i64().unwrap());
    }
    eprintln!("{records} records for {ROWS} changes ({} sent again after the kill)", records - ROWS);
    assert_eq!(commit_lsns.len(), 1, "one source transaction");
    assert_eq!(ids.len() as i64, ROWS, "every row reached the topic");
    assert_eq!(seqs.len() as i64, ROWS, "every change has its own position in the transaction");
    assert_eq!(seqs.iter().max().copied(), Some(ROWS - 1));
    p.assert_running();
    assert_eq!(p.terminate(), Some(0));
}
