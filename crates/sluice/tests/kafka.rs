//! Postgres → Kafka through a real broker (Apache Kafka, KRaft), read back by clients nobody here
//! wrote: Confluent's Python DeserializingConsumer against Sluice's registry, and the
//! pure-Python kafka-python.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

fn records_of<'a>(recs: &'a [Value], topic: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["topic"] == topic).collect()
}

/// Replays change records (in order) into the state they leave: key id → `after`.
fn replay(recs: &[&Value]) -> BTreeMap<i64, Value> {
    let mut state = BTreeMap::new();
    for r in recs {
        let v = &r["value"];
        if v.is_null() {
            continue; // tombstone
        }
        match v["op"].as_str().unwrap() {
            "c" | "u" | "r" => {
                state.insert(v["after"]["id"].as_i64().unwrap(), v["after"].clone());
            }
            "d" => {
                state.remove(&v["before"]["id"].as_i64().unwrap());
            }
            op => panic!("unexpected op {op}"),
        }
    }
    state
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_changes_decode_with_confluent_consumer() {
    let env = Env::new("kafka_avro").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let (_registry, url) = env.spawn_registry().await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE items (id int8 PRIMARY KEY, name text NOT NULL, price numeric(10,2), tags text[], at timestamptz, blob bytea);
         INSERT INTO items SELECT g, 'item ' || g, g * 1.25, ARRAY['a', NULL, 't' || g], '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 hour', '\\x00ff'
         FROM generate_series(1, 40) g;",
    )
    .await
    .unwrap();
    let cfg = env.kafka_config(&["items"], &brokers, &format!("    registry_url: {url}\n    partitions: 3\n"), "");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    src.batch_execute(
        "INSERT INTO items VALUES (100, 'new', 9.99, '{}', now(), NULL);
         UPDATE items SET name = 'renamed', price = NULL WHERE id = 3;
         DELETE FROM items WHERE id = 5;
         UPDATE items SET id = 1000 WHERE id = 7;
         BEGIN; UPDATE items SET price = price + 1 WHERE id <= 10; DELETE FROM items WHERE id = 100; COMMIT;",
    )
    .await
    .unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    p.assert_running();

    let topic = format!("{}.public.items", env.db);
    // 40 snapshot + 1 insert + 1 update + (delete + tombstone) + key change (delete +
    // tombstone + create) + 8 updates (ids 1-10 but 5 and 7) + (delete + tombstone).
    let want = 40 + 1 + 1 + 2 + 3 + 8 + 2;
    let recs = consume("avro", &brokers, &url, std::slice::from_ref(&topic), want);
    let recs = records_of(&recs, &topic);
    assert_eq!(recs.len(), want, "records: {recs:#?}");

    // Snapshot reads first, marked as such.
    let reads: Vec<_> = recs.iter().filter(|r| r["value"]["op"] == "r").collect();
    assert_eq!(reads.len(), 40);
    assert!(reads.iter().all(|r| r["value"]["source"]["snapshot"] == "true" && r["value"]["before"].is_null()));
    let first = reads.iter().find(|r| r["key"]["id"] == 1).unwrap();
    assert_eq!(
        first["value"]["after"],
        json!({"id": 1, "name": "item 1", "price": "1.25", "tags": ["a", null, "t1"], "at": "2024-01-01T01:00:00+00:00", "blob": "AP8="})
    );

    // Every delete is followed by its tombstone (same key, null value) in its partition.
    for (i, r) in recs.iter().enumerate() {
        if r["value"]["op"] == "d" {
            let next = recs[i + 1..].iter().find(|n| n["partition"] == r["partition"]).expect("tombstone after delete");
            assert_eq!(next["key"], r["key"]);
            assert!(next["value"].is_null());
        }
    }
    // The key change is a delete of 7 and a create of 1000.
    assert!(recs.iter().any(|r| r["key"]["id"] == 7 && r["value"]["op"] == "d"));
    let moved = recs.iter().find(|r| r["key"]["id"] == 1000).unwrap();
    assert_eq!(moved["value"]["op"], "c");
    let upd = recs.iter().find(|r| r["key"]["id"] == 3 && r["value"]["op"] == "u").unwrap();
    assert_eq!(upd["value"]["after"]["price"], Value::Null);
    assert_eq!(upd["value"]["source"]["table"], "items");
    assert_eq!(upd["value"]["source"]["connector"], "postgresql");
    assert!(upd["value"]["source"]["lsn"].as_i64().unwrap() > 0);

    // The records replay into exactly the source table.
    let state = replay(&recs);
    let rows = src.query("SELECT id, name, price::text FROM items ORDER BY id", &[]).await.unwrap();
    assert_eq!(state.len(), rows.len());
    for row in rows {
        let id: i64 = row.get(0);
        let after = &state[&id];
        assert_eq!(after["name"], row.get::<_, String>(1));
        assert_eq!(after["price"].as_str(), row.get::<_, Option<String>>(2).as_deref(), "price of {id}");
    }

    // Confluent's subject naming, one registered version each.
    let subjects: Vec<String> = ureq_get(&format!("{url}/subjects"));
    assert!(subjects.contains(&format!("{topic}-key")) && subjects.contains(&format!("{topic}-value")), "{subjects:?}");
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

pub(crate) fn ureq_get<T: serde::de::DeserializeOwned>(url: &str) -> T {
    let out = std::process::Command::new(python())
        .args(["-c", "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "GET {url}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(crate) fn http_put_json(url: &str, body: &Value) {
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import sys, urllib.request; r = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method='PUT', \
             headers={'Content-Type': 'application/vnd.schemaregistry.v1+json'}); urllib.request.urlopen(r).read()",
            url,
            &body.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "PUT {url}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_changes_read_by_kafka_python() {
    let env = Env::new("kafka_json").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE notes (id int4 PRIMARY KEY, body text, n int8, d date, ok bool);
         INSERT INTO notes VALUES (1, 'tab\there', 10, '2024-02-29', true), (2, NULL, NULL, NULL, NULL);",
    )
    .await
    .unwrap();
    let cfg = env.kafka_config(&["notes"], &brokers, "    encoding: json\n    tombstones: false\n    topic: cdc.{table}\n", "");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    src.batch_execute("UPDATE notes SET body = 'x' WHERE id = 2; DELETE FROM notes WHERE id = 1;").await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    let recs = consume("json", &brokers, "", &["cdc.notes".to_string()], 4);
    assert_eq!(recs.len(), 4, "no tombstones when disabled: {recs:#?}");
    let by_op = |op: &str| recs.iter().find(|r| r["value"]["op"] == op).unwrap_or_else(|| panic!("no {op} record"));
    let read = recs.iter().find(|r| r["key"] == json!({"id": 1})).unwrap();
    assert_eq!(read["value"]["after"], json!({"id": 1, "body": "tab\there", "n": 10, "d": 19782, "ok": true}));
    assert_eq!(by_op("u")["value"]["after"]["body"], "x");
    assert_eq!(by_op("d")["value"]["before"]["id"], 1);
    assert_eq!(by_op("d")["key"], json!({"id": 1}));
    p.assert_running();
}

/// `filtered_updates: delete`: an update that a filter drops becomes a delete of the
/// row (and its tombstone), so a compacted topic loses the row; by default it is dropped,
/// as in Kafka Connect.
#[tokio::test(flavor = "multi_thread")]
async fn filtered_updates_can_be_sent_as_deletes() {
    let env = Env::new("kafka_filter").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE docs (id int4 PRIMARY KEY, status text); INSERT INTO docs VALUES (1, 'live'), (2, 'draft');")
        .await
        .unwrap();
    let chain = "transforms:\n  - filter: {field: status, equals: draft}\n";
    let cfg = env.kafka_config(&["docs"], &brokers, "    encoding: json\n    topic: cdc.{table}\n    filtered_updates: delete\n", chain);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    src.batch_execute("UPDATE docs SET status = 'draft' WHERE id = 1; UPDATE docs SET status = 'live' WHERE id = 2;").await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    // The snapshot's row 1; its update into the filter as a delete and a tombstone; row
    // 2's update out of the filter.
    let recs = consume("json", &brokers, "", &["cdc.docs".to_string()], 4);
    let ops: Vec<(Value, Value)> = recs.iter().map(|r| (r["key"]["id"].clone(), r["value"]["op"].clone())).collect();
    assert_eq!(ops, [(json!(1), json!("r")), (json!(1), json!("d")), (json!(1), Value::Null), (json!(2), json!("u"))], "{recs:#?}");
    assert_eq!(recs[2]["value"], Value::Null, "a tombstone follows the delete");
    p.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_loses_nothing_and_keeps_per_key_order() {
    let env = Env::new("kafka_kill").await;
    let (broker, brokers) = spawn_broker(&env.dir).await;
    let (_registry, url) = env.spawn_registry().await;
    let src = env.src().await;
    src.batch_execute(ACCT_DDL).await.unwrap();
    let cfg = env.kafka_config(&["acct"], &brokers, &format!("    registry_url: {url}\n    partitions: 2\n"), "");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;

    // Every update bumps `ver`, so a lost change shows as a gap in a key's versions.
    let writer = spawn_acct_writer(&env, 20);
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill").args([sig, &broker.pid().expect("broker pid").to_string()]).status().unwrap();
        assert!(st.success());
    };
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // Once, the broker stops answering first: records pile up unacknowledged in
        // the producer, and a pipeline that confirmed them to the source anyway
        // would lose them with the kill.
        if round == 2 {
            signal("-STOP");
            tokio::time::sleep(Duration::from_millis(2000)).await;
        }
        p.kill9();
        if round == 2 {
            signal("-CONT");
        }
        p = env.spawn(&cfg);
    }
    let statements = writer.await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(90)).await;
    p.assert_running();

    let topic = format!("{}.public.acct", env.db);
    let raw = consume("avro", &brokers, &url, std::slice::from_ref(&topic), 300);
    let recs = records_of(&raw, &topic);
    // Deduplicate: a streamed change is identified by (commit_lsn, event_seq), a
    // snapshot read by its key.
    let mut seen = HashSet::new();
    let mut dups = 0;
    let mut unique: Vec<&Value> = Vec::new();
    for r in &recs {
        let v = &r["value"];
        let id = if v.is_null() {
            continue;
        } else if v["op"] == "r" {
            format!("r{}", v["after"]["id"])
        } else {
            format!("{}:{}", v["source"]["commit_lsn"], v["source"]["event_seq"])
        };
        if seen.insert(id) {
            unique.push(r);
        } else {
            dups += 1;
        }
    }
    // Per key, changes are in commit order, and versions have no gap.
    let mut last: HashMap<i64, (i64, i64, i64)> = HashMap::new();
    for r in &unique {
        let v = &r["value"];
        let row = if v["op"] == "d" { &v["before"] } else { &v["after"] };
        let id = row["id"].as_i64().unwrap();
        let pos = (v["source"]["commit_lsn"].as_i64().unwrap_or(0), v["source"]["event_seq"].as_i64().unwrap_or(0));
        if let Some((lsn, seq, ver)) = last.get(&id) {
            assert!((*lsn, *seq) < pos || v["op"] == "r", "key {id} out of order: {r}");
            if v["op"] == "u" {
                assert_eq!(row["ver"].as_i64().unwrap(), ver + 1, "key {id}: a version is missing before {r}");
            }
        }
        let ver = row["ver"].as_i64().unwrap_or(0);
        last.insert(id, (pos.0, pos.1, ver));
    }
    let state = replay(&unique);
    let rows = src.query("SELECT id, ver FROM acct ORDER BY id", &[]).await.unwrap();
    let expect: BTreeMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let got: BTreeMap<i64, i64> = state.iter().map(|(k, v)| (*k, v["ver"].as_i64().unwrap())).collect();
    assert_eq!(got, expect, "replayed topic differs from the source");
    eprintln!("{statements} statements, {} records, {dups} duplicates after 5 kill -9", recs.len());
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_register_or_halt_until_fixed() {
    let env = Env::new("kafka_ddl").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let (_registry, url) = env.spawn_registry().await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE ev (id int8 PRIMARY KEY, n int8); INSERT INTO ev VALUES (1, 1);").await.unwrap();
    let cfg = env.kafka_config(&["ev"], &brokers, &format!("    registry_url: {url}\n"), "");
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    let topic = format!("{}.public.ev", env.db);
    let subject = format!("{topic}-value");

    // A nullable column added: a new, compatible version; old and new records decode.
    src.batch_execute("ALTER TABLE ev ADD COLUMN note text; INSERT INTO ev VALUES (2, 2, 'hi');").await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    let versions: Vec<i64> = ureq_get(&format!("{url}/subjects/{subject}/versions"));
    assert_eq!(versions, vec![1, 2]);
    let recs = consume("avro", &brokers, &url, std::slice::from_ref(&topic), 2);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1]["value"]["after"], json!({"id": 2, "n": 2, "note": "hi"}));
    assert!(recs[0]["value"]["after"].get("note").is_none(), "the old record keeps its own schema");

    // Narrowing n (bigint → int) is not BACKWARD compatible: the pipeline halts and
    // writes nothing in the new shape.
    src.batch_execute("ALTER TABLE ev ALTER COLUMN n TYPE int4; INSERT INTO ev VALUES (3, 3, 'after');").await.unwrap();
    wait_for("the pipeline to halt", Duration::from_secs(60), || async { p.log().contains("pipeline halted") }).await;
    let log = p.log();
    assert!(log.contains(&subject) && log.contains("under BACKWARD") && log.contains("column n changed from long to int"), "{log}");
    p.assert_running();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(consume("avro", &brokers, &url, std::slice::from_ref(&topic), 2).len(), 2, "nothing written after the halt");
    let versions: Vec<i64> = ureq_get(&format!("{url}/subjects/{subject}/versions"));
    assert_eq!(versions, vec![1, 2]);

    // The operator accepts the change; the pipeline resumes by itself, nothing lost.
    http_put_json(&format!("{url}/config/{subject}"), &json!({"compatibility": "NONE"}));
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(60)).await;
    let recs = consume("avro", &brokers, &url, std::slice::from_ref(&topic), 3);
    let last = recs.iter().find(|r| r["key"]["id"] == 3).expect("row 3 delivered after the fix");
    assert_eq!(last["value"]["after"], json!({"id": 3, "n": 3, "note": "after"}));
    assert_eq!(p.terminate(), Some(0));
}
