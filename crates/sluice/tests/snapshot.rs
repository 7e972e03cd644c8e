//! Tables whose key is not one integer column are copied in parallel chunks too: key
//! ranges cut at a sample of the keys. A kill -9 mid-snapshot resumes chunk by chunk,
//! under writes, and the target ends equal to the source.

use std::time::{Duration, Instant};

use crate::common::*;

const ROWS: i64 = 200_000;

async fn chunks_of(dst: &tokio_postgres::Client, table: &str) -> (i64, i64) {
    dst.query_one("SELECT count(*) FILTER (WHERE done), count(*) FROM sluice.snapshot_chunks WHERE table_name = $1", &[&table])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread")]
async fn uuid_and_keyless_tables_snapshot_in_parallel_chunks_and_survive_kill9() {
    let env = Env::new("snap_keys").await;
    let src = env.src().await;
    src.batch_execute(&format!(
        "CREATE TABLE docs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), n int8 NOT NULL, body text NOT NULL);
         INSERT INTO docs (n, body) SELECT g, repeat('d', 200) FROM generate_series(1, {ROWS}) g;
         -- No primary key: a unique index over text and integer columns is its identity.
         CREATE TABLE events (source text NOT NULL, seq int4 NOT NULL, body text);
         CREATE UNIQUE INDEX events_key ON events (source, seq);
         ALTER TABLE events REPLICA IDENTITY USING INDEX events_key;
         INSERT INTO events SELECT 'src' || (g % 37), g, repeat('e', 200) FROM generate_series(1, {ROWS}) g;
         ANALYZE docs, events;"
    ))
    .await
    .unwrap();
    let cfg = env.config(&["docs", "events"], "snapshot: {chunk_rows: 10000, parallelism: 2}\n");
    let dst = env.dst().await;

    // Writes run during the snapshot, across the kill and after it.
    let writer_src = env.src().await;
    let writer = tokio::spawn(async move {
        let (mut i, until) = (0i64, Instant::now() + Duration::from_secs(15));
        while Instant::now() < until {
            i += 1;
            writer_src
                .batch_execute(&format!(
                    "UPDATE docs SET body = 'changed {i}' WHERE n % 997 = {k};
                     INSERT INTO docs (n, body) VALUES (-{i}, 'new');
                     DELETE FROM docs WHERE n = {i} * 13;
                     UPDATE events SET body = 'changed {i}' WHERE seq % 991 = {k};
                     INSERT INTO events VALUES ('late', {i}, 'late');
                     DELETE FROM events WHERE source = 'src5' AND seq = {i} * 37 + 5;",
                    k = i % 997
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        i
    });

    let mut p = env.spawn(&cfg);
    wait_for("snapshot progress on both tables", Duration::from_secs(60), || async {
        chunks_of(&dst, "public.docs").await.0 > 0 && chunks_of(&dst, "public.events").await.0 > 0
    })
    .await;
    p.kill9();
    let (docs, events) = (chunks_of(&dst, "public.docs").await, chunks_of(&dst, "public.events").await);
    eprintln!("killed with docs {}/{} and events {}/{} chunks done", docs.0, docs.1, events.0, events.1);
    assert!(docs.1 >= 10 && events.1 >= 10, "the tables were not split: docs {docs:?}, events {events:?}");
    assert!(docs.0 + events.0 < docs.1 + events.1, "the snapshot finished before the kill");

    let mut p = env.spawn(&cfg);
    let statements = writer.await.unwrap();
    wait_equal(&env, "docs", "id", Duration::from_secs(120)).await;
    wait_equal(&env, "events", "source, seq", Duration::from_secs(60)).await;
    let (docs, events) = (chunks_of(&dst, "public.docs").await, chunks_of(&dst, "public.events").await);
    assert_eq!((docs.0, events.0), (docs.1, events.1), "every chunk is done");
    let lsns: i64 = dst.query_one("SELECT count(DISTINCT snapshot_lsn) FROM sluice.snapshot_chunks", &[]).await.unwrap().get(0);
    assert!(lsns >= 2, "the resumed snapshot read its chunks as of a later position than the first");
    // Every row was copied once: the chunks' row counts add up to the rows copied.
    let copied: i64 = dst.query_one("SELECT sum(rows)::int8 FROM sluice.snapshot_chunks", &[]).await.unwrap().get(0);
    assert!(copied >= 2 * ROWS - 2 * statements && copied <= 2 * ROWS + 2 * statements, "{copied} rows copied");
    p.assert_running();
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}
