//! Enrichment through real pipelines: lookups in a reference table (with its changes
//! re-enriching rows already delivered, killed mid-way), a team's HTTP service going
//! down and coming back under both failure policies, expressions, and bad configs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_postgres::pki::Pki;

/// What the target's enriched orders must be: the source joined by SQL, written
/// independently of the enricher.
const EXPECTED_ORDERS: &str = "(SELECT o.id, o.customer_id, o.amount, c.name AS customer_name, c.tier AS customer_tier,
        (o.amount > 500) AS big FROM orders o LEFT JOIN customers c ON c.id = o.customer_id)";
const TARGET_ORDERS: &str = "(SELECT id, customer_id, amount, customer_name, customer_tier, big FROM orders)";

async fn resyncs(dst: &tokio_postgres::Client, reason: &str) -> (i64, i64, bool) {
    let r = dst
        .query_one(
            "SELECT coalesce(sum(chunks), 0)::int8, coalesce(sum(rows), 0)::int8, coalesce(bool_and(done), false)
             FROM sluice.resyncs WHERE reason LIKE $1",
            &[&reason],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Waits until the target's enriched orders equal the source's join.
async fn wait_enriched(env: &Env, limit: Duration) {
    let (src, dst) = (env.src().await, env.dst().await);
    let deadline = std::time::Instant::now() + limit;
    loop {
        let a = digest(&src, EXPECTED_ORDERS, "id").await;
        let b = try_digest(&dst, TARGET_ORDERS, "id").await;
        if Some(&a) == b.as_ref() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "enriched orders: target {b:?} never matched the source join {a:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Lookup enrichment during the snapshot and streaming; a change to the reference
/// table re-enriches the rows already delivered that point at it, in the background
/// and under a write workload; the pipeline is SIGKILLed during that re-enrichment,
/// resumes it, and the target ends equal to the join computed by SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_enrichment_and_reference_changes_survive_kill9() {
    let env = Env::new("enrich_lookup").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE customers (id int8 PRIMARY KEY, name text, tier text);
         INSERT INTO customers SELECT g, 'customer ' || g, 'basic' FROM generate_series(1, 50) g;
         CREATE TABLE orders (id int8 PRIMARY KEY, customer_id int8, amount numeric(10,2));
         INSERT INTO orders SELECT g, g % 50 + 1, (g % 1000)::numeric FROM generate_series(1, 20000) g;
         INSERT INTO orders VALUES (20001, NULL, 1), (20002, 999, 2);",
    )
    .await
    .unwrap();
    let enrich = "snapshot:\n  chunk_rows: 500\nenrich:\n  - name: customer\n    lookup:\n      table: public.customers\n      key: id\n      \
                  on: customer_id\n      fields: [name, tier]\n  - name: size\n    expression:\n      fields:\n        \
                  - {name: big, expr: \"amount > 500\", type: bool}\n";
    let cfg = env.config(&["orders"], enrich);
    // Each re-enrichment chunk waits 20 ms before its high watermark, so the kill
    // below lands in the middle of it.
    let hook = [("SLUICE_TEST_RESYNC_DELAY_MS", "20")];
    let mut p = env.spawn_env(&cfg, &hook);
    wait_enriched(&env, Duration::from_secs(90)).await;
    let dst = env.dst().await;
    let cols: Vec<String> = dst
        .query("SELECT column_name::text FROM information_schema.columns WHERE table_name = 'orders' ORDER BY ordinal_position", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cols, ["id", "customer_id", "amount", "customer_name", "customer_tier", "big"]);
    assert!(
        dst.query_opt("SELECT 1 FROM information_schema.tables WHERE table_name = 'customers'", &[]).await.unwrap().is_none(),
        "the reference table is streamed for invalidation, never delivered"
    );

    // Streaming: new orders, a moved order, a deleted one.
    src.batch_execute(
        "INSERT INTO orders SELECT g, g % 50 + 1, 900 FROM generate_series(20003, 20100) g;
         UPDATE orders SET customer_id = 7 WHERE id = 5;
         DELETE FROM orders WHERE id = 6;",
    )
    .await
    .unwrap();
    wait_enriched(&env, Duration::from_secs(30)).await;

    // A writer keeps changing orders (amounts, customers) during the re-enrichment.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, src) = (stop.clone(), env.src().await);
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(7);
            let mut next_id = 30_000i64;
            while !stop.load(Ordering::Relaxed) {
                let id = rng.random_range(1..20_000i64);
                match rng.random_range(0..3) {
                    0 => {
                        src.execute("UPDATE orders SET amount = $2::int8::numeric WHERE id = $1", &[&id, &rng.random_range(0..1000i64)])
                            .await
                    }
                    1 => src.execute("UPDATE orders SET customer_id = $2 WHERE id = $1", &[&id, &rng.random_range(1..=50i64)]).await,
                    _ => {
                        next_id += 1;
                        src.execute("INSERT INTO orders VALUES ($1, $2, 10)", &[&next_id, &rng.random_range(1..=50i64)]).await
                    }
                }
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // 20 of 50 customers change: about 8,000 delivered orders point at them.
    src.batch_execute("UPDATE customers SET tier = 'gold', name = name || ' (renamed)' WHERE id <= 20").await.unwrap();
    wait_for("the re-enrichment to be a few chunks in", Duration::from_secs(60), || async {
        let (chunks, _, done) = resyncs(&dst, "enrich:customer%").await;
        chunks >= 4 && !done
    })
    .await;
    p.kill9();
    let (chunks_at_kill, _, _) = resyncs(&dst, "enrich:customer%").await;
    let mut p = env.spawn_env(&cfg, &hook);
    wait_for("the re-enrichment to finish", Duration::from_secs(120), || async {
        let (_, _, done) = resyncs(&dst, "enrich:customer%").await;
        done
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_enriched(&env, Duration::from_secs(60)).await;
    let (chunks, rows, _) = resyncs(&dst, "enrich:customer%").await;
    // Resumed, not started over: only the rows pointing at the changed customers were
    // read (about 8,000 of 20,000+), in chunks of 500 (at most one chunk twice).
    assert!(chunks > chunks_at_kill, "re-enrichment made progress after the restart");
    assert!(rows < 12_000, "re-enrichment read {rows} rows: more than the orders of the changed customers");
    p.assert_running();
    p.terminate();
}

/// The team's service: `{"keys": [...]}` → `{"results": {k: {score, segment}}}`, or
/// 503 while `up` is false. Counts the calls. Over HTTPS, with `pki`'s certificate for
/// `localhost`.
async fn enrichment_service(up: Arc<AtomicBool>, calls: Arc<AtomicU64>, pki: &Pki) -> String {
    use axum::{Json, Router, http::StatusCode, routing::post};
    let app = Router::new().route(
        "/enrich",
        post(move |Json(body): Json<serde_json::Value>| {
            let (up, calls) = (up.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                if !up.load(Ordering::Relaxed) {
                    return Err(StatusCode::SERVICE_UNAVAILABLE);
                }
                let mut results = serde_json::Map::new();
                for k in body["keys"].as_array().unwrap() {
                    let k = k.as_str().unwrap();
                    let n: i64 = k.parse().unwrap();
                    let v = if n % 10 == 0 {
                        serde_json::Value::Null // unknown to the service: no data, not a failure
                    } else {
                        serde_json::json!({"score": n as f64 * 1.5, "segment": format!("s{}", n % 3)})
                    };
                    results.insert(k.to_string(), v);
                }
                Ok(Json(serde_json::json!({ "results": results })))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = sluice::https::server_config(&pki.path("server.pem"), &pki.path("server.key")).unwrap();
    let listener = sluice::https::TlsListener::new(listener, tls).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("https://localhost:{}/enrich", addr.port())
}

/// `(rows, rows with every field, rows marked missing)` of a target table.
async fn http_state(dst: &tokio_postgres::Client, table: &str) -> (i64, i64, i64) {
    let r = dst
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE (score_score IS NOT NULL OR id % 10 = 0) AND _enrichment_missing IS NULL),
                        count(*) FILTER (WHERE _enrichment_missing IS NOT NULL) FROM {table}"
            ),
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The HTTP enricher's service goes down: `mark_missing` delivers rows without the
/// fields and marks them, `dead_letter` holds rows back, `after_ingestion` delivers at
/// once and fills in later; both failures are recorded. Once the service is back,
/// every row carries its fields and nothing is left recorded. The values are checked
/// against what the service computes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_enricher_down_then_back_delivers_every_row_with_its_fields() {
    let env = Env::new("enrich_http").await;
    let (up, calls) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
    // Over HTTPS, trusting the service's private authority (ca_file).
    let pki = Pki::make().expect("make a test CA");
    let url = enrichment_service(up.clone(), calls.clone(), &pki).await;
    let ca = pki.path("ca.pem");
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE marked (id int8 PRIMARY KEY, v text);
         CREATE TABLE held (id int8 PRIMARY KEY, v text);
         CREATE TABLE later (id int8 PRIMARY KEY, v text);
         INSERT INTO marked SELECT g, 'x' FROM generate_series(1, 300) g;
         INSERT INTO held SELECT g, 'x' FROM generate_series(1, 300) g;
         INSERT INTO later SELECT g, 'x' FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    let http = |name: &str, table: &str, extra: &str| {
        format!(
            "  - name: {name}\n    tables: [public.{table}]\n{extra}    http:\n      url: {url}\n      ca_file: {ca}\n      key: id\n      prefix: score_\n      \
             fields: {{score: float, segment: string}}\n      retries: 1\n      backoff: 20ms\n      timeout: 1s\n      \
             breaker_failures: 2\n      breaker_open_for: 500ms\n      max_batch: 100\n",
            ca = ca.display()
        )
    };
    let enrich = format!(
        "enrich:\n{}{}{}",
        http("mm", "marked", "    on_failure: mark_missing\n"),
        http("dl", "held", "    on_failure: dead_letter\n"),
        http("bg", "later", "    apply: after_ingestion\n"),
    );
    let cfg = env.config(&["marked", "held", "later"], &enrich);
    let mut p = env.spawn(&cfg);
    let dst = env.dst().await;
    for t in ["marked", "held", "later"] {
        wait_for(&format!("{t} enriched"), Duration::from_secs(60), || async {
            try_digest(&dst, t, "id").await.is_some() && http_state(&dst, t).await == (300, 300, 0)
        })
        .await;
    }
    let score: Option<f64> = dst.query_one("SELECT score_score FROM marked WHERE id = 7", &[]).await.unwrap().get(0);
    assert_eq!(score, Some(10.5));
    let seg: Option<String> = dst.query_one("SELECT score_segment FROM held WHERE id = 8", &[]).await.unwrap().get(0);
    assert_eq!(seg.as_deref(), Some("s2"));
    let none: Option<f64> = dst.query_one("SELECT score_score FROM held WHERE id = 20", &[]).await.unwrap().get(0);
    assert_eq!(none, None, "a key the service does not know has NULL fields");

    // The service goes down.
    up.store(false, Ordering::Relaxed);
    src.batch_execute(
        "INSERT INTO marked SELECT g, 'y' FROM generate_series(301, 400) g;
         INSERT INTO held SELECT g, 'y' FROM generate_series(301, 400) g;
         UPDATE held SET v = 'changed' WHERE id <= 50;
         INSERT INTO later SELECT g, 'y' FROM generate_series(301, 400) g;",
    )
    .await
    .unwrap();
    wait_for("marked rows delivered without their fields", Duration::from_secs(30), || async {
        http_state(&dst, "marked").await == (400, 300, 100)
    })
    .await;
    let missing: String = dst.query_one("SELECT _enrichment_missing FROM marked WHERE id = 350", &[]).await.unwrap().get(0);
    assert_eq!(missing, "mm");
    // Held back: the new rows are not delivered, the updated ones keep their old state.
    wait_for("held rows recorded as dead letters", Duration::from_secs(30), || async {
        let n: i64 =
            dst.query_one("SELECT count(*) FROM sluice.enrich_failures WHERE enricher = 'dl' AND NOT delivered", &[]).await.unwrap().get(0);
        n == 150
    })
    .await;
    assert_eq!(http_state(&dst, "held").await, (300, 300, 0));
    let v: String = dst.query_one("SELECT v FROM held WHERE id = 10", &[]).await.unwrap().get(0);
    assert_eq!(v, "x", "a held-back update is not applied without its fields");
    // The breaker keeps the pipeline from hammering the dead service.
    let before = calls.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = calls.load(Ordering::Relaxed) - before;
    assert!(during <= 20, "{during} calls in 2 s to a service the breaker should have paused");
    p.assert_running();

    // Back: every row gets its fields, and nothing stays recorded.
    up.store(true, Ordering::Relaxed);
    for t in ["marked", "held", "later"] {
        wait_for(&format!("{t} complete after the service came back"), Duration::from_secs(60), || async {
            http_state(&dst, t).await == (400, 400, 0)
        })
        .await;
    }
    wait_for("no failures left", Duration::from_secs(30), || async {
        let n: i64 = dst.query_one("SELECT count(*) FROM sluice.enrich_failures", &[]).await.unwrap().get(0);
        n == 0
    })
    .await;
    let v: String = dst.query_one("SELECT v FROM held WHERE id = 10", &[]).await.unwrap().get(0);
    assert_eq!(v, "changed");
    let score: Option<f64> = dst.query_one("SELECT score_score FROM marked WHERE id = 351", &[]).await.unwrap().get(0);
    assert_eq!(score, Some(526.5));
    // Kill -9 and a restart: still complete, nothing delivered twice in a way that
    // changes the rows.
    p.kill9();
    let mut p = env.spawn(&cfg);
    src.batch_execute("INSERT INTO later VALUES (401, 'z')").await.unwrap();
    wait_for("later complete after a restart", Duration::from_secs(60), || async { http_state(&dst, "later").await == (401, 401, 0) })
        .await;
    p.assert_running();
    p.terminate();
}

/// Bad enrichers are refused by `sluice check` with one line naming the enricher and
/// the fix, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_enrichers_are_refused_with_one_line() {
    let env = Env::new("enrich_bad").await;
    env.src()
        .await
        .batch_execute(
            "CREATE TABLE customers (id int8 PRIMARY KEY, name text);
             CREATE TABLE orders (id int8 PRIMARY KEY, customer_id int8, name text);
             CREATE TABLE nokey (a int8, customer_id int8);",
        )
        .await
        .unwrap();
    let lookup = |on: &str, fields: &str, extra: &str| {
        format!(
            "enrich:\n  - name: c\n    lookup:\n      table: public.customers\n      key: id\n      on: {on}\n      fields: {fields}\n{extra}"
        )
    };
    let cases: Vec<(Vec<&str>, String, &str)> = vec![
        (vec!["orders"], lookup("customer_id", "[nope]", ""), "column \"nope\" is not in the reference table public.customers"),
        (vec!["orders"], lookup("cust", "[name]", ""), "enrich[0] (c): column \"cust\" is not in public.orders"),
        (vec!["orders"], lookup("customer_id", "[name]", "      prefix: ''\n"), "field \"name\" already exists in public.orders: set a prefix"),
        (vec!["orders"], lookup("customer_id", "[]", ""), "fields: list at least one column"),
        (vec!["nokey"], lookup("customer_id", "[name]", ""), "public.nokey has no primary key"),
        (
            vec!["orders"],
            "enrich:\n  - name: c\n    lookup:\n      table: public.nothere\n      key: id\n      on: customer_id\n      fields: [name]\n".into(),
            "enrich[0] (c): lookup: reference table",
        ),
        (
            vec!["orders"],
            "enrich:\n  - name: c\n    http:\n      url: ftp://x\n      key: id\n      fields: {a: int}\n".into(),
            "use http:// or https://",
        ),
        (
            vec!["orders"],
            "enrich:\n  - name: c\n    http:\n      url: http://127.0.0.1:1/x\n      key: id\n      fields: {a: decimal}\n".into(),
            "unknown variant `decimal`",
        ),
        (
            vec!["orders"],
            "enrich:\n  - name: c\n    expression:\n      fields:\n        - {name: x, expr: \"nope + 1\", type: int}\n".into(),
            "enrich[0] (c): expression: fields[0]: column \"nope\" is not in public.orders",
        ),
        (
            vec!["orders"],
            "enrich:\n  - name: c\n    expression:\n      fields:\n        - {name: x, expr: \"id + 1\", type: money}\n".into(),
            "enrich[0] (c): expression: fields[0]: type",
        ),
        (
            vec!["orders"],
            "enrich:\n  - name: c\n    expression:\n      fields: []\n    lookup:\n      table: a\n      key: b\n      on: c\n      fields: [d]\n".into(),
            "give exactly one of lookup, http or expression",
        ),
        (vec!["orders"], "enrich:\n  - name: Bad\n    expression:\n      fields: []\n".into(), "name: use lowercase letters"),
        (vec!["orders"], "enrich:\n  - name: c\n    expression:\n      fields: []\n    colour: red\n".into(), "unknown field `colour`"),
    ];
    for (tables, extra, want) in cases {
        let cfg = env.config(&tables, &extra);
        let (code, err) = run_to_exit(&["check", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
        assert_eq!(code, Some(1), "{extra}: {err}");
        assert!(err.contains(want), "{extra}\nwanted {want:?} in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let dst = env.dst().await;
    let n: i64 = dst.query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "nothing created in the sink");
}

/// Enriched rows into Kafka as Avro (read back with confluent-kafka): the registered
/// schema carries the enrichers' fields, and a reference change re-sends the affected
/// rows with the new values (op `r`), so a consumer replaying the topic ends with the
/// source's join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enriched_rows_into_kafka_avro_follow_reference_changes() {
    let env = Env::new("enrich_kafka").await;
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let (_registry, url) = env.spawn_registry().await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE customers (id int8 PRIMARY KEY, name text);
         INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 5) g;
         CREATE TABLE items (id int8 PRIMARY KEY, customer_id int8, qty int4);
         INSERT INTO items SELECT g, g % 5 + 1, g FROM generate_series(1, 20) g;",
    )
    .await
    .unwrap();
    let enrich = "enrich:\n  - name: customer\n    lookup: {table: public.customers, key: id, on: customer_id, fields: [name]}\n  \
                  - name: calc\n    expression:\n      fields: [{name: double_qty, expr: \"qty * 2\", type: int}]\n";
    let cfg = env.kafka_config(&["items"], &brokers, &format!("    registry_url: {url}\n"), enrich);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    src.batch_execute("INSERT INTO items VALUES (21, 1, 7); UPDATE customers SET name = 'renamed' WHERE id = 2;").await.unwrap();
    let topic = format!("{}.public.items", env.db);
    // 20 snapshot reads + 1 insert + the 4 items of customer 2 sent again.
    let recs = consume("avro", &brokers, &url, std::slice::from_ref(&topic), 25);
    p.assert_running();
    let mut last: std::collections::BTreeMap<i64, serde_json::Value> = std::collections::BTreeMap::new();
    for r in recs.iter().filter(|r| r["topic"] == topic.as_str()) {
        last.insert(r["key"]["id"].as_i64().unwrap(), r["value"]["after"].clone());
    }
    assert_eq!(last.len(), 21);
    for (id, after) in &last {
        let customer = after["customer_id"].as_i64().unwrap();
        let name = if customer == 2 { "renamed".to_string() } else { format!("customer {customer}") };
        assert_eq!(after["customer_name"], name.as_str(), "item {id}: {after}");
        assert_eq!(after["double_qty"].as_i64(), Some(after["qty"].as_i64().unwrap() * 2), "item {id}: {after}");
    }
    let resent = recs.iter().filter(|r| r["value"]["op"] == "r" && r["value"]["after"]["customer_name"] == "renamed").count();
    assert_eq!(resent, 4, "the items of the renamed customer are sent again");
    p.terminate();
}

/// A lookup on a composite key (`key: [tenant, id]`, `on: [tenant, account_id]`):
/// snapshot, streaming and a reference change, with a NULL in a key column and a key
/// the reference has not got; a key/on count mismatch is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_key_lookup_follows_the_reference_table() {
    let env = Env::new("enrich_composite").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE accounts (tenant int4, id int4, name text, PRIMARY KEY (tenant, id));
         INSERT INTO accounts SELECT t, i, 'acct ' || t || '/' || i FROM generate_series(1, 3) t, generate_series(1, 10) i;
         CREATE TABLE events (id int8 PRIMARY KEY, tenant int4, account_id int4);
         INSERT INTO events SELECT g, g % 3 + 1, g % 10 + 1 FROM generate_series(1, 500) g;
         INSERT INTO events VALUES (501, NULL, 1), (502, 1, 99);",
    )
    .await
    .unwrap();
    let lookup = |on: &str| {
        format!("enrich:\n  - name: account\n    lookup: {{table: public.accounts, key: [tenant, id], on: {on}, fields: [name]}}\n")
    };
    let bad = env.config(&["events"], &lookup("[tenant]"));
    let (code, err) = run_to_exit(&["check", "--config", bad.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("name as many columns in on (1) as in key (2)"), "{err}");

    let mut p = env.spawn(&env.config(&["events"], &lookup("[tenant, account_id]")));
    let expected = "(SELECT e.id, e.tenant, e.account_id, a.name AS account_name
                     FROM events e LEFT JOIN accounts a ON a.tenant = e.tenant AND a.id = e.account_id)";
    let target = "(SELECT id, tenant, account_id, account_name FROM events)";
    let dst = env.dst().await;
    let equal = || async {
        let a = digest(&src, expected, "id").await;
        try_digest(&dst, target, "id").await == Some(a)
    };
    wait_for("the snapshot enriched by the composite key", Duration::from_secs(60), equal).await;
    src.batch_execute(
        "INSERT INTO events VALUES (503, 2, 3), (504, 3, 3);
         UPDATE accounts SET name = 'renamed' WHERE tenant = 2 AND id = 3;
         UPDATE events SET account_id = 3 WHERE id = 1;",
    )
    .await
    .unwrap();
    wait_for("streaming and the reference change", Duration::from_secs(60), equal).await;
    let n: i64 = dst.query_one("SELECT count(*) FROM events WHERE account_name = 'renamed'", &[]).await.unwrap().get(0);
    assert!(n >= 17, "{n} events of account 2/3 renamed");
    p.assert_running();
    p.terminate();
}
