//! Transform chains through real pipelines: into Postgres (snapshot and streaming,
//! across kill -9) and into Kafka (the key and the Avro schema follow the chain), and
//! the errors a bad chain gets before anything is written.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

const CHAIN: &str = r#"transforms:
  - filter: {field: status, equals: draft, when: {ops: [read, insert, update]}}
  - rename_fields: {fields: {note: comment}}
  - drop_fields: {fields: [secret]}
  - cast: {fields: {price: "decimal(10,2)"}}
  - mask: {fields: [email], replacement: "***"}
  - insert_field: {name: region, value: eu, when: {tables: ["public.ord*"]}}
  - compute: {name: doubled, expr: "price * 2", type: "decimal(12,2)"}
  - composite_key: {fields: [org, id], separator: "-", name: order_key}
  - route: {regex: "^public\\.(.*)$", replacement: "sales.${1}_v2"}
"#;

/// What the chain makes of the source table, computed by Postgres itself.
const EXPECTED: &str = "(SELECT org, id, status, round(price, 2)::numeric(10,2) AS price,
    CASE WHEN email IS NULL THEN NULL ELSE '***' END AS email, note AS comment, 'eu'::text AS region,
    (round(price, 2) * 2)::numeric(12,2) AS doubled, org || '-' || id AS order_key FROM orders WHERE status IS DISTINCT FROM 'draft')";

async fn setup(env: &Env) -> tokio_postgres::Client {
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE orders (org int8, id int8, status text, price numeric, email text, note text, secret text,
                              PRIMARY KEY (org, id));
         INSERT INTO orders SELECT g % 3, g, CASE WHEN g % 5 = 0 THEN 'draft' ELSE 'paid' END, g * 1.005,
                CASE WHEN g % 4 = 0 THEN NULL ELSE 'u' || g || '@x.org' END, 'note ' || g, 'pw' || g
         FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    src
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_into_postgres_survives_kill9() {
    let env = Env::new("xform_pg").await;
    let src = setup(&env).await;
    let cfg = env.config(&["orders"], &format!("snapshot: {{chunk_rows: 50}}\n{CHAIN}"));
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    let (dst, source_view) = (env.dst().await, EXPECTED);
    let equal = || async {
        let a = try_digest(&env.src().await, source_view, "order_key").await;
        let b = try_digest(&dst, "sales.orders_v2", "order_key").await;
        a.is_some() && a == b
    };
    wait_for("the snapshot through the chain", Duration::from_secs(60), equal).await;

    for round in 0..3i64 {
        let base = 1000 + round * 100;
        src.batch_execute(&format!(
            "INSERT INTO orders SELECT g % 3, g, CASE WHEN g % 2 = 0 THEN 'draft' ELSE 'paid' END, g / 7.0, 'n' || g || '@y', 'x', 's'
             FROM generate_series({base}, {base} + 40) g;
             UPDATE orders SET price = price + 1.237, note = note || '!' WHERE id % 7 = {round} AND status = 'paid';
             UPDATE orders SET status = 'paid' WHERE status = 'draft' AND id % 3 = {round};
             UPDATE orders SET status = 'draft' WHERE status = 'paid' AND id % 13 = {round};
             DELETE FROM orders WHERE id % 11 = {round};"
        ))
        .await
        .unwrap();
        if round < 2 {
            p.kill9();
            p = env.spawn(&cfg);
        }
    }
    wait_for("the stream through the chain", Duration::from_secs(90), equal).await;
    // The chain's shape: the composite key is the target's primary key.
    let pk: Vec<String> = dst
        .query(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = 'sales.orders_v2'::regclass AND i.indisprimary",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pk, ["order_key"]);
    p.assert_running();
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_into_kafka_shapes_key_and_schema() {
    let env = Env::new("xform_kafka").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let (_registry, url) = env.spawn_registry().await;
    let src = setup(&env).await;
    src.batch_execute("DELETE FROM orders WHERE id > 10").await.unwrap();
    let chain = format!("{CHAIN}  - insert_field: {{name: at_lsn, source: lsn}}\n");
    let cfg = env.kafka_config(&["orders"], &brokers, &format!("    registry_url: {url}\n    tombstones: false\n"), &chain);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    src.batch_execute("INSERT INTO orders VALUES (1, 500, 'paid', 2.5, 'a@b', 'hello', 'pw'), (1, 501, 'draft', 1, 'c@d', 'no', 'pw')")
        .await
        .unwrap();
    let topic = format!("{}.sales.orders_v2", env.db);
    // 10 rows minus 2 drafts (ids 5, 10), plus one streamed insert (the draft is filtered).
    let recs = consume("avro", &brokers, &url, std::slice::from_ref(&topic), 9);
    assert_eq!(recs.len(), 9, "{recs:#?}");
    let new = recs.iter().find(|r| r["key"] == json!({"order_key": "1-500"})).expect("the streamed row, keyed by the composite key");
    let after = &new["value"]["after"];
    assert_eq!(after["price"], "2.50");
    assert_eq!(after["email"], "***");
    assert_eq!(after["comment"], "hello");
    assert_eq!(after["region"], "eu");
    assert!(after.get("secret").is_none() && after.get("note").is_none());
    assert!(after["at_lsn"].as_str().unwrap().contains('/'), "{after}");
    assert_eq!(new["value"]["source"]["table"], "orders_v2");
    assert!(recs.iter().all(|r| r["value"]["after"]["status"] != "draft"));
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_chains_are_refused_before_anything_is_written() {
    let env = Env::new("xform_bad").await;
    setup(&env).await;
    let cases = [
        ("transforms:\n  - cast: {fields: {price: integr}}\n", "transforms[0] (cast): field \"price\": unknown type"),
        (
            "transforms:\n  - rename_fields: {fields: {note: comment}}\n  - drop_fields: {fields: [note]}\n",
            "transforms[1] (drop_fields): column \"note\" is not in public.orders",
        ),
        (
            "transforms:\n  - cast: {fields: {email: int}}\n  - mask: {fields: [id], hash: sha256}\n",
            "transforms[1] (mask): column \"id\" is part of the key",
        ),
        ("transforms:\n  - composite_key: {fields: [org, status], name: k}\n", "REPLICA IDENTITY FULL"),
        ("transforms:\n  - filtr: {field: status, equals: x}\n", "unknown variant `filtr`"),
        ("transforms:\n  - unwrap: {}\n", "transforms[0] (unwrap): the postgres sink writes rows, without change envelopes"),
        (
            "transforms:\n  - timestamp_converter: {fields: {note: unix_ms}}\n",
            "transforms[0] (timestamp_converter): column \"note\" (text): text is not a timestamp",
        ),
    ];
    for (chain, want) in cases {
        let cfg = env.config(&["orders"], chain);
        let (code, stderr) = run_to_exit(&["check", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
        assert_ne!(code, Some(0), "{chain}");
        assert!(stderr.contains(want), "{chain}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    // Nothing was created in the source or the target.
    assert_eq!(slot_count(&env).await, 0);
    assert!(try_digest(&env.dst().await, "sales.orders_v2", "1").await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn unwrap_writes_row_states_and_tombstones() {
    let env = Env::new("xform_unwrap").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE ev (id int8 PRIMARY KEY, at timestamptz, n int4);
         INSERT INTO ev VALUES (1, '2024-01-01 00:00:01.5+00', 1), (2, NULL, 2);",
    )
    .await
    .unwrap();
    let chain =
        "transforms:\n  - timestamp_converter: {fields: {at: unix_ms}}\n  - insert_header: {name: team, value: sales}\n  - unwrap: {}\n";
    let cfg = env.kafka_config(&["ev"], &brokers, "    encoding: json\n    topic: \"u.{table}\"\n", chain);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    src.batch_execute("UPDATE ev SET n = 20 WHERE id = 2; DELETE FROM ev WHERE id = 1; UPDATE ev SET id = 3 WHERE id = 2;").await.unwrap();
    let recs = consume("json", &brokers, "", &["u.ev".to_string()], 6);
    let got: Vec<_> = recs.iter().map(|r| (r["key"]["id"].clone(), r["value"].clone())).collect();
    assert_eq!(
        got,
        vec![
            (json!(1), json!({"id": 1, "at": 1_704_067_201_500i64, "n": 1})),
            (json!(2), json!({"id": 2, "at": null, "n": 2})),
            (json!(2), json!({"id": 2, "at": null, "n": 20})),
            (json!(1), serde_json::Value::Null),
            (json!(2), serde_json::Value::Null),
            (json!(3), json!({"id": 3, "at": null, "n": 20})),
        ],
        "row states, a tombstone per delete and per key change"
    );
    assert!(recs.iter().all(|r| r["headers"] == json!({"team": "sales"})), "insert_header on every record: {recs:#?}");
    assert_eq!(p.terminate(), Some(0));
}
