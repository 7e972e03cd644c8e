//! DDL capture: schema changes made under a running workload reach a Postgres sink and
//! a Kafka sink in commit order, with a kill -9 between a schema change and the rows
//! after it; refused changes halt with one line and resume once fixed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::kafka::http_put_json;

/// Runs `sql` in the source, then a few updates that use the new shape.
async fn change(src: &tokio_postgres::Client, sql: &str, then: &str) {
    src.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    src.batch_execute(then).await.unwrap_or_else(|e| panic!("{then}: {e}"));
    tokio::time::sleep(Duration::from_millis(700)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_reach_postgres_and_kafka_under_load_through_kill9() {
    let env = Env::new("ddl_flow").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let (_registry, url) = env.spawn_registry().await;
    let src = env.src().await;
    src.batch_execute(ACCT_DDL).await.unwrap();
    src.batch_execute(
        "ALTER TABLE acct ADD COLUMN note text DEFAULT 'n', ADD COLUMN qty int4 DEFAULT 1, ADD COLUMN old text DEFAULT 'o';
         CREATE TABLE late (id int8 PRIMARY KEY, v text); INSERT INTO late SELECT g, 'before ' || g FROM generate_series(1, 50) g;",
    )
    .await
    .unwrap();
    let pg = env.config(&["acct"], "");
    let kafka_cfg = env.kafka_config(&["acct"], &brokers, &format!("    registry_url: {url}\n"), "");
    let text =
        std::fs::read_to_string(&kafka_cfg).unwrap().replacen(&format!("pipeline: {}\n", env.db), &format!("pipeline: {}_k\n", env.db), 1);
    let kafka_cfg = env.write_config(&text);
    // The Postgres pipeline dies right after it applied the first schema change.
    let mut p = env.spawn_env(&pg, &[("SLUICE_FAILPOINT", "kill-after:ddl")]);
    let mut k = env.spawn(&kafka_cfg);
    for x in [&p, &k] {
        wait_for("streaming", Duration::from_secs(60), || async { x.log().contains("streaming") }).await;
    }
    let installed: bool =
        src.query_one("SELECT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'sluice_ddl_capture')", &[]).await.unwrap().get(0);
    assert!(installed, "sluice run installs the event trigger");
    let writer = spawn_acct_writer(&env, 25);

    // ADD with a constant default: existing rows in the target get it too.
    change(&src, "ALTER TABLE acct ADD COLUMN tag text DEFAULT 'x'", "UPDATE acct SET tag = 'y' WHERE id % 7 = 0").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while p.child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the fail point after the first schema change never fired: {}", p.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(p.log().contains("failpoint: killing this process"), "{}", p.log());
    p = env.spawn(&pg);
    change(&src, "ALTER TABLE acct RENAME COLUMN note TO remark", "UPDATE acct SET remark = 'r' || id WHERE id % 5 = 0").await;
    // Killed between the rename and the rows after it (at whatever point it reached).
    p.kill9();
    k.kill9();
    p = env.spawn(&pg);
    k = env.spawn(&kafka_cfg);
    change(&src, "ALTER TABLE acct ALTER COLUMN qty TYPE int8", "UPDATE acct SET qty = 5000000000 + id WHERE id % 3 = 0").await;
    change(&src, "ALTER TABLE acct DROP COLUMN old", "UPDATE acct SET remark = 'after drop' WHERE id % 11 = 0").await;
    change(&src, "ALTER TABLE acct ALTER COLUMN remark SET NOT NULL", "UPDATE acct SET remark = 'nn' WHERE id = 2").await;
    // A new table in the publications: snapshotted through a resync, then streamed.
    change(
        &src,
        &format!("ALTER PUBLICATION sluice_{db} ADD TABLE late; ALTER PUBLICATION sluice_{db}_k ADD TABLE late", db = env.db),
        "INSERT INTO late SELECT g, 'after ' || g FROM generate_series(51, 60) g; UPDATE late SET v = 'moved' WHERE id = 3",
    )
    .await;
    let statements = writer.await.unwrap();
    for t in ["acct", "late"] {
        wait_equal(&env, t, "id", Duration::from_secs(90)).await;
    }
    let dst = env.dst().await;
    let cols: Vec<String> = dst
        .query("SELECT attname::text || ' ' || format_type(atttypid, atttypmod) || CASE WHEN attnotnull THEN ' not null' ELSE '' END FROM pg_attribute WHERE attrelid = 'acct'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Columns outside the key are created nullable in a target; the source's later
    // SET NOT NULL reached it.
    assert_eq!(cols, ["id bigint not null", "ver bigint", "payload text", "remark text not null", "qty bigint", "tag text"]);
    p.assert_running();

    // Kafka: every version registered, every record decoded by Confluent's consumer,
    // and the last record of each key is the source's row.
    wait_caught_up(&env, &format!("sluice_{}_k", env.db), Duration::from_secs(90)).await;
    let topic = format!("{}_k.public.acct", env.db);
    let rows = src.query("SELECT id, ver, remark, qty, tag FROM acct", &[]).await.unwrap();
    let recs = consume("avro", &brokers, &url, std::slice::from_ref(&topic), rows.len());
    let mut last: BTreeMap<i64, Value> = BTreeMap::new();
    for r in &recs {
        let id = r["key"]["id"].as_i64().unwrap();
        last.insert(id, r["value"]["after"].clone());
    }
    last.retain(|_, v| !v.is_null());
    assert_eq!(last.len(), rows.len(), "one live record per source row");
    for r in &rows {
        let id: i64 = r.get(0);
        // A record keeps the shape it was written in: every key's last version is the
        // source's, and the rows changed after the last column change carry the new shape.
        assert_eq!(last[&id]["ver"], json!(r.get::<_, i64>(1)), "row {id}: a change lost");
        if id % 11 == 0 && id < 300 {
            let want = json!({"id": id, "ver": r.get::<_, i64>(1), "payload": last[&id]["payload"], "remark": r.get::<_, String>(2),
                              "qty": r.get::<_, Option<i64>>(3), "tag": r.get::<_, Option<String>>(4)});
            assert_eq!(last[&id], want, "row {id}");
        }
    }
    let late = consume("avro", &brokers, &url, &[format!("{}_k.public.late", env.db)], 60);
    assert!(late.iter().any(|r| r["value"]["after"]["v"] == "moved"), "the new table's rows reach Kafka");
    let versions: Vec<i64> = crate::kafka::ureq_get(&format!("{url}/subjects/{topic}-value/versions"));
    assert!(versions.len() >= 5, "a version per schema change: {versions:?}");

    // Refused changes: a target view on the column stops the Postgres sink; Avro's
    // BACKWARD gate stops Kafka. Each halts with the statement, then resumes once fixed.
    dst.batch_execute("CREATE VIEW qty_view AS SELECT qty FROM acct").await.unwrap();
    change(&src, "ALTER TABLE acct ALTER COLUMN qty TYPE text", "UPDATE acct SET qty = 'q' || id WHERE id % 4 = 0").await;
    for x in [&p, &k] {
        wait_for("the pipeline to halt", Duration::from_secs(60), || async { x.log().contains("pipeline halted") }).await;
        let line = x.log().lines().find(|l| l.contains("pipeline halted")).unwrap().to_string();
        assert!(line.contains("ALTER TABLE acct ALTER COLUMN qty TYPE text") && line.contains("resumes by itself"), "{line}");
    }
    assert!(p.log().contains("used by a view"), "the Postgres halt says what is in the way");
    p.assert_running();
    k.assert_running();
    dst.batch_execute("DROP VIEW qty_view").await.unwrap();
    http_put_json(&format!("{url}/config/{topic}-value"), &json!({"compatibility": "NONE"}));
    wait_equal(&env, "acct", "id", Duration::from_secs(90)).await;
    wait_caught_up(&env, &format!("sluice_{}_k", env.db), Duration::from_secs(90)).await;
    let recs = consume("avro", &brokers, &url, std::slice::from_ref(&topic), recs.len() + 1);
    assert!(recs.iter().any(|r| r["value"]["after"]["qty"] == "q4"), "rows in the refused shape arrive after the fix");
    eprintln!("{statements} workload statements, {} records", recs.len());
    assert_eq!(p.terminate(), Some(0));
    assert_eq!(k.terminate(), Some(0));
}
