//! The search platform end to end: `sluice search serve` (the built-in
//! Elasticsearch-compatible service) fed by a pipeline whose documents are denormalized
//! from five tables; kill -9 of the pipeline and of the service; the service's own
//! durability and error bodies; an independent client (opensearch-py).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use rand::Rng;
use serde_json::{Value, json};

/// `(status, body)` of an HTTP request; error statuses are answers, not failures.
fn http(method: &str, url: &str, body: Option<&str>) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let resp = match (method, body) {
        ("GET", None) => agent.get(url).call(),
        ("DELETE", None) => agent.delete(url).call(),
        ("HEAD", None) => agent.head(url).call(),
        ("PUT", Some(b)) => agent.put(url).header("content-type", "application/json").send(b),
        ("POST", Some(b)) => agent.post(url).header("content-type", "application/x-ndjson").send(b),
        ("POST", None) => agent.post(url).send_empty(),
        (m, _) => panic!("unsupported {m}"),
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

struct SearchService {
    proc: Pipeline,
    url: String,
    port: u16,
    data: std::path::PathBuf,
}

fn spawn_search_at(dir: &std::path::Path, port: u16) -> Pipeline {
    let data = dir.join("search-data");
    let log = dir.join(format!("search-{}.log", rand::rng().random::<u32>()));
    let child = Command::new(BIN)
        .args(["search", "serve", "--addr", &format!("127.0.0.1:{port}"), "--data"])
        .arg(&data)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn sluice search serve");
    Pipeline { child, log }
}

async fn spawn_search(dir: &std::path::Path) -> SearchService {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let proc = spawn_search_at(dir, port);
    let s = SearchService { proc, url: format!("http://127.0.0.1:{port}"), port, data: dir.to_owned() };
    s.wait_up().await;
    s
}

impl SearchService {
    async fn wait_up(&self) {
        let port = self.port;
        wait_for("the search service to listen", Duration::from_secs(20), || async move {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
    }

    async fn restart_after_kill9(&mut self) {
        self.proc.kill9();
        self.proc = spawn_search_at(&self.data, self.port);
        self.wait_up().await;
    }

    /// Every document of `index` (refreshed first), id → source.
    fn all_docs(&self, index: &str) -> BTreeMap<String, Value> {
        http("POST", &format!("{}/{index}/_refresh", self.url), None);
        let mut out = BTreeMap::new();
        let mut after: Option<Value> = None;
        loop {
            let mut q = json!({"size": 500, "sort": [{"id": "asc"}]});
            if let Some(a) = &after {
                q["search_after"] = a.clone();
            }
            let (status, r) = http("POST", &format!("{}/{index}/_search", self.url), Some(&q.to_string()));
            assert_eq!(status, 200, "{r}");
            let hits = r["hits"]["hits"].as_array().unwrap().clone();
            if hits.is_empty() {
                return out;
            }
            after = Some(hits.last().unwrap()["sort"].clone());
            for h in hits {
                out.insert(h["_id"].as_str().unwrap().to_owned(), strip_nulls(h["_source"].clone()));
            }
        }
    }
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(o.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        v => v,
    }
}

const SCHEMA: &str = "
CREATE TABLE orgs (id int8 PRIMARY KEY, name text NOT NULL, plan text);
CREATE TABLE metrics (id int8 PRIMARY KEY, org_id int8, name text NOT NULL, type text, unit text, last_seen timestamptz);
CREATE TABLE metric_configurations (id int8 PRIMARY KEY, metric_id int8 NOT NULL, kind text, setting text, enabled boolean);
ALTER TABLE metric_configurations REPLICA IDENTITY FULL;
CREATE INDEX ON metric_configurations (metric_id);
CREATE TABLE tags (id int8 PRIMARY KEY, name text NOT NULL);
CREATE TABLE metric_tags (metric_id int8, tag_id int8, PRIMARY KEY (metric_id, tag_id));
CREATE INDEX ON metric_tags (tag_id);
INSERT INTO orgs SELECT g, 'org' || g, CASE WHEN g % 2 = 0 THEN 'pro' ELSE 'free' END FROM generate_series(1, 3) g;
INSERT INTO metrics SELECT g, 1 + g % 3, 'system cpu ' || g, (ARRAY['gauge','count','rate'])[1 + g % 3], 'ms',
       '2026-01-01'::timestamptz + g * interval '1 hour' FROM generate_series(1, 60) g;
INSERT INTO metric_configurations SELECT g, 1 + g % 60, (ARRAY['aggregation','tag_index','rollup'])[1 + g % 3], 'v' || g, g % 2 = 0
       FROM generate_series(1, 180) g;
INSERT INTO tags SELECT g, 'env:' || g FROM generate_series(1, 6) g;
INSERT INTO metric_tags SELECT m, t FROM generate_series(1, 60) m, generate_series(1, 6) t WHERE (m + t) % 3 = 0;
";

const DOCUMENT: &str = "    document:
      table: public.metrics
      text_fields: [name]
      relations:
        - {name: org, kind: one, table: public.orgs, column: org_id, fields: [name, plan], flatten: true}
        - {name: configurations, kind: many, table: public.metric_configurations, column: metric_id, fields: [id, kind, setting, enabled]}
        - {name: tags, kind: many_to_many, table: public.tags, through: public.metric_tags, column: metric_id, through_column: tag_id, fields: [name], flatten: true}
      counts:
        - {name: configuration_count, relation: configurations}
";

/// The documents, written independently of the sink's SQL: what a fresh rebuild holds.
const EXPECTED: &str = "
SELECT m.id::text, jsonb_build_object('id', m.id, 'org_id', m.org_id, 'name', m.name, 'type', m.type, 'unit', m.unit,
    'last_seen', m.last_seen, 'org_name', o.name, 'org_plan', o.plan,
    'configurations', COALESCE((SELECT jsonb_agg(jsonb_build_object('id', c.id, 'kind', c.kind, 'setting', c.setting, 'enabled', c.enabled) ORDER BY c.id)
                               FROM metric_configurations c WHERE c.metric_id = m.id), '[]'),
    'tags', COALESCE((SELECT jsonb_agg(t.name ORDER BY t.id) FROM metric_tags mt JOIN tags t ON t.id = mt.tag_id WHERE mt.metric_id = m.id), '[]'),
    'configuration_count', (SELECT count(*) FROM metric_configurations c WHERE c.metric_id = m.id))::text
FROM metrics m LEFT JOIN orgs o ON o.id = m.org_id";

async fn expected(src: &tokio_postgres::Client) -> BTreeMap<String, Value> {
    src.query(EXPECTED, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), strip_nulls(serde_json::from_str(&r.get::<_, String>(1)).unwrap())))
        .collect()
}

fn search_config(env: &Env, url: &str, index: &str, document: &str) -> std::path::PathBuf {
    let pw = sluice_postgres::cluster::SUPERUSER_PASSWORD;
    let user = sluice_postgres::cluster::SUPERUSER;
    env.write_config(&format!(
        "pipeline: {db}\nsource:\n  host: 127.0.0.1\n  port: {sp}\n  user: {user}\n  password: {pw}\n  database: {db}\n  \
         heartbeat_interval: 500ms\nsink:\n  search:\n    url: {url}\n    index: {index}\n    bulk_max_docs: 25\n{document}    state:\n      \
         host: 127.0.0.1\n      port: {dp}\n      user: {user}\n      password: {pw}\n      database: {db}\n",
        db = env.db,
        sp = env.src_port,
        dp = env.dst_port,
    ))
}

async fn wait_index_equals_source(env: &Env, svc: &SearchService, index: &str, limit: Duration) {
    let src = env.src().await;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let want = expected(&src).await;
        let got = svc.all_docs(index);
        if want == got {
            return;
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
            let differ: Vec<_> =
                want.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).take(2).map(|(k, v)| (k, v, &got[k])).collect();
            panic!(
                "index never matched the source: {} vs {} docs; missing {missing:?}; extra {extra:?}; differing {differ:?}",
                got.len(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Schema changes on a table documents are built from rebuild every document, also the
/// ones no row change touches; one that breaks the document definition halts naming it.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_rebuild_every_document() {
    let env = Env::new("search_ddl").await;
    let src = env.src().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let svc = spawn_search(&env.dir).await;
    let mut p = env.spawn(&search_config(&env, &svc.url, "metrics", DOCUMENT));
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    wait_index_equals_source(&env, &svc, "metrics", Duration::from_secs(60)).await;
    // The root's columns are all in its documents: renamed and added ones reach every one.
    src.batch_execute("ALTER TABLE metrics RENAME COLUMN unit TO units; ALTER TABLE metrics ADD COLUMN owner text DEFAULT 'ops';")
        .await
        .unwrap();
    wait_for("every document in the new shape", Duration::from_secs(60), || async {
        let docs = svc.all_docs("metrics");
        docs.len() == 60 && docs.values().all(|d| d.get("unit").is_none() && d["units"] == "ms" && d["owner"] == "ops")
    })
    .await;
    // A column the definition names is dropped: the documents cannot be built.
    src.batch_execute("ALTER TABLE orgs DROP COLUMN plan").await.unwrap();
    wait_for("the pipeline to halt", Duration::from_secs(60), || async { p.log().contains("pipeline halted") }).await;
    let line = p.log().lines().find(|l| l.contains("pipeline halted")).unwrap().to_string();
    assert!(line.contains("ALTER TABLE orgs DROP COLUMN plan") && line.contains("plan"), "{line}");
    p.assert_running();
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn denormalized_documents_follow_every_table() {
    let env = Env::new("search_denorm").await;
    let src = env.src().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let svc = spawn_search(&env.dir).await;
    let cfg = search_config(&env, &svc.url, "metrics", DOCUMENT);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    p.assert_running();
    wait_index_equals_source(&env, &svc, "metrics", Duration::from_secs(30)).await;
    let doc = &svc.all_docs("metrics")["7"];
    assert_eq!(doc["org_name"], "org2", "{doc}");
    assert_eq!(doc["configurations"].as_array().unwrap().len(), 3, "{doc}");
    assert_eq!(doc["configuration_count"], 3);

    // A change in each table, and the documents it touches.
    src.batch_execute(
        "INSERT INTO metric_configurations VALUES (1000, 7, 'aggregation', 'new', true);
         UPDATE metric_configurations SET setting = 'changed' WHERE id = 8;
         DELETE FROM metric_configurations WHERE id = 9;
         UPDATE metric_configurations SET metric_id = 8 WHERE id = 10;
         UPDATE orgs SET name = 'renamed' WHERE id = 2;
         UPDATE tags SET name = 'env:renamed' WHERE id = 1;
         INSERT INTO metric_tags VALUES (7, 4) ON CONFLICT DO NOTHING;
         DELETE FROM metric_tags WHERE metric_id = 8;
         UPDATE metrics SET type = 'distribution', name = 'disk usage seven' WHERE id = 7;
         DELETE FROM metrics WHERE id = 11;
         INSERT INTO metrics VALUES (61, NULL, 'brand new', 'gauge', 's', NULL);",
    )
    .await
    .unwrap();
    wait_index_equals_source(&env, &svc, "metrics", Duration::from_secs(30)).await;
    let docs = svc.all_docs("metrics");
    assert!(!docs.contains_key("11"), "a deleted root removes its document");
    assert_eq!(docs["7"]["configuration_count"], 4);
    assert!(docs["61"].get("org_name").is_none());

    // The page's queries work on the denormalized documents.
    let q = json!({
        "size": 50,
        "query": {"bool": {
            "must": [{"match": {"name": "usage"}}],
            "filter": [{"term": {"type": "distribution"}}, {"nested": {"path": "configurations", "query": {"bool": {"must": [
                {"term": {"configurations.kind": "aggregation"}}, {"term": {"configurations.setting": "new"}}]}}}}]
        }},
        "aggs": {"types": {"terms": {"field": "type"}}, "orgs": {"terms": {"field": "org_name"}}}
    });
    let (status, r) = http("POST", &format!("{}/metrics/_search", svc.url), Some(&q.to_string()));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["hits"]["total"]["value"], 1, "{r}");
    assert_eq!(r["hits"]["hits"][0]["_id"], "7");
    // A nested query matches one configuration, not fields spread over two.
    let q = json!({"query": {"nested": {"path": "configurations", "query": {"bool": {"must": [
        {"term": {"configurations.setting": "new"}}, {"term": {"configurations.kind": "rollup"}}]}}}}});
    let (_, r) = http("POST", &format!("{}/metrics/_count", svc.url), Some(&q.to_string()));
    assert_eq!(r["count"], 0, "{r}");
    let dead = env.dst().await.query_one("SELECT count(*) FROM sluice.search_dead_letters", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(dead, 0);
    assert_eq!(p.terminate(), Some(0));
}

/// A random workload over all five tables while the pipeline and the search service
/// are killed (-9) in turn: the index ends equal to a fresh rebuild from the source.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_pipeline_and_search_service_index_equals_rebuild() {
    let env = Env::new("search_kill").await;
    let src = env.src().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let mut svc = spawn_search(&env.dir).await;
    let cfg = search_config(&env, &svc.url, "metrics", DOCUMENT);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, src) = (stop.clone(), env.src().await);
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut next_id = 5000i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (m, c, t, o, k) = {
                    let mut r = rand::rng();
                    (
                        r.random_range(1..80i64),
                        r.random_range(1..400i64),
                        r.random_range(1..7i64),
                        r.random_range(1..4i64),
                        r.random_range(0..9u8),
                    )
                };
                next_id += 1;
                let sql = match k {
                    0 => format!("INSERT INTO metric_configurations VALUES ({next_id}, {m}, 'rollup', 'w{next_id}', true)"),
                    1 => format!("UPDATE metric_configurations SET setting = setting || '+', enabled = NOT enabled WHERE id = {c}"),
                    2 => format!("DELETE FROM metric_configurations WHERE id = {c}"),
                    3 => format!("UPDATE metric_configurations SET metric_id = {m} WHERE id = {c}"),
                    4 => format!("UPDATE orgs SET name = 'org{o}-{next_id}' WHERE id = {o}"),
                    5 => format!(
                        "INSERT INTO metric_tags VALUES ({m}, {t}) ON CONFLICT DO NOTHING; DELETE FROM metric_tags WHERE metric_id = {} AND tag_id = {t}",
                        m + 1
                    ),
                    6 => format!("UPDATE tags SET name = 'env:{next_id}' WHERE id = {t}"),
                    7 => format!(
                        "INSERT INTO metrics VALUES ({m}, {o}, 'metric {next_id}', 'gauge', 'ms', now()) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, org_id = EXCLUDED.org_id"
                    ),
                    _ => format!("DELETE FROM metrics WHERE id = {m}"),
                };
                src.batch_execute(&format!("BEGIN; {sql}; COMMIT")).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            n
        })
    };
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        if round % 2 == 0 {
            p.kill9();
            p = env.spawn(&cfg);
        } else {
            svc.restart_after_kill9().await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statements = writer.await.unwrap();
    wait_index_equals_source(&env, &svc, "metrics", Duration::from_secs(90)).await;
    p.assert_running();
    // The last documents were acknowledged by the service and confirmed by the pipeline:
    // a kill -9 of the service now must lose none of them (translog replay).
    p.kill9();
    svc.restart_after_kill9().await;
    wait_index_equals_source(&env, &svc, "metrics", Duration::from_secs(10)).await;
    let dead = env.dst().await.query_one("SELECT count(*) FROM sluice.search_dead_letters", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(dead, 0);
    eprintln!("{statements} statements; index equals the rebuild");
}

/// The initial load keeps several `_bulk` requests in flight while it builds the next
/// page: a kill -9 mid-load resumes after the last page whose requests, and all before
/// it, were acknowledged, and the index ends equal to the source. (Saving a page's key
/// when it is sent rather than acknowledged loses the pages in flight: this test fails
/// with that change.)
#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_the_initial_load_with_requests_in_flight_resumes_equal() {
    let env = Env::new("search_load_kill").await;
    let src = env.src().await;
    src.batch_execute(SCHEMA).await.unwrap();
    src.batch_execute(
        "INSERT INTO metrics SELECT g, 1 + g % 3, 'disk io ' || g, 'gauge', 'ms', now() FROM generate_series(61, 8000) g;
         INSERT INTO metric_configurations SELECT g, 61 + g % 7940, 'rollup', 'r' || g, g % 2 = 0 FROM generate_series(181, 24000) g;",
    )
    .await
    .unwrap();
    let svc = spawn_search(&env.dir).await;
    // Every third request is refused (429) and retried after a backoff, so a kill often
    // finds requests sent but not yet indexed.
    let (url, _) = spawn_busy_proxy(svc.url.clone(), 0, 3).await;
    let cfg = search_config(&env, &url, "metrics", &format!("    max_in_flight_requests: 4\n{DOCUMENT}"));
    let dst = env.dst().await;
    let loading = async || {
        dst.query_opt("SELECT last_key IS NOT NULL AND NOT done FROM sluice.search_loads", &[])
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, bool>(0))
    };
    let mut kills = 0;
    let mut p = env.spawn(&cfg);
    for _ in 0..3 {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !loading().await && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !loading().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..150))).await;
        p.kill9();
        kills += 1;
        p = env.spawn(&cfg);
    }
    assert!(kills > 0, "the load finished before it could be killed: make it larger");
    wait_index_equals_source(&env, &svc, "metrics", Duration::from_secs(120)).await;
    p.assert_running();
    eprintln!("{kills} kills during the initial load; index equals the rebuild");
}

/// The service alone: an acknowledged bulk survives kill -9 before any refresh; bad
/// input gets Elasticsearch's error bodies and spoils nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn service_durability_and_errors() {
    let dir = tempfile::Builder::new().prefix("sluice-search-").tempdir().unwrap().keep();
    let mut svc = spawn_search(&dir).await;
    let u = svc.url.clone();
    // No periodic refresh: only the translog can bring these documents back.
    let (s, r) = http(
        "PUT",
        &format!("{u}/docs"),
        Some(
            r#"{"settings": {"index": {"refresh_interval": "-1"}}, "mappings": {"properties": {"n": {"type": "long"}, "tag": {"type": "keyword"}}}}"#,
        ),
    );
    assert_eq!(s, 200, "{r}");
    let mut body = String::new();
    for i in 0..1000 {
        body.push_str(&format!("{{\"index\":{{\"_id\":\"{i}\"}}}}\n{{\"n\":{i},\"tag\":\"t{}\"}}\n", i % 7));
    }
    let (s, r) = http("POST", &format!("{u}/docs/_bulk"), Some(&body));
    assert_eq!((s, &r["errors"]), (200, &json!(false)), "{r}");
    let (_, r) = http("GET", &format!("{u}/docs/_doc/999"), None);
    assert_eq!(r["_source"]["n"], 999, "a read by id is real-time: {r}");
    svc.restart_after_kill9().await;
    http("POST", &format!("{u}/docs/_refresh"), None);
    let (_, r) = http("POST", &format!("{u}/docs/_count"), Some("{}"));
    assert_eq!(r["count"], 1000, "acknowledged documents lost across kill -9: {r}");

    // Versions: external versions never go back.
    let (s, _) = http("PUT", &format!("{u}/docs/_doc/v?version=10&version_type=external"), Some(r#"{"n": 1}"#));
    assert_eq!(s, 201);
    let (s, r) = http("PUT", &format!("{u}/docs/_doc/v?version=9&version_type=external"), Some(r#"{"n": 2}"#));
    assert_eq!((s, r["error"]["type"].as_str()), (409, Some("version_conflict_engine_exception")), "{r}");

    // Bad input, one by one; the service answers each and keeps running.
    let cases: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        ("POST", "/docs/_bulk", Some("{\"index\":{\"_id\":\"x\"}}\n{\"n\":1}\nnot json\n"), 400, "illegal_argument_exception"),
        ("POST", "/docs/_bulk", Some("{\"explode\":{\"_id\":\"x\"}}\n{}\n"), 400, "illegal_argument_exception"),
        ("POST", "/docs/_search", Some(r#"{"query": {"fuzzy_wuzzy": {}}}"#), 400, "parsing_exception"),
        ("POST", "/docs/_search", Some(r#"{"query": {"term": {"n": "abc"}}}"#), 400, "query_shard_exception"),
        ("POST", "/docs/_search", Some(r#"{"aggs": {"x": {"terms": {}}}}"#), 400, "parsing_exception"),
        ("POST", "/docs/_search", Some("{not json"), 400, "x_content_parse_exception"),
        ("POST", "/nope/_search", Some("{}"), 404, "index_not_found_exception"),
        ("PUT", "/docs", Some("{}"), 400, "resource_already_exists_exception"),
        ("PUT", "/Bad", Some("{}"), 400, "invalid_index_name_exception"),
        ("PUT", "/m2", Some(r#"{"mappings": {"properties": {"x": {"type": "strng"}}}}"#), 400, "mapper_parsing_exception"),
    ];
    for (m, path, body, status, kind) in cases {
        let (s, r) = http(m, &format!("{u}{path}"), body);
        assert_eq!((s, r["error"]["type"].as_str()), (status, Some(kind)), "{m} {path}: {r}");
        assert_eq!(r["status"], status);
    }
    // A malformed action line rejects the whole request before anything is applied.
    let (_, r) = http("GET", &format!("{u}/docs/_doc/x"), None);
    assert_eq!(r["found"], false);
    // A document that does not fit the mapping fails alone; the rest of the bulk lands.
    let (s, r) = http(
        "POST",
        &format!("{u}/docs/_bulk?refresh=true"),
        Some(
            "{\"index\":{\"_id\":\"a\"}}\n{\"n\":\"not a number\"}\n{\"index\":{\"_id\":\"b\"}}\n{\"n\":5}\n{\"index\":{\"_id\":\"c\"}}\n{bad json\n",
        ),
    );
    assert_eq!(s, 200);
    assert_eq!(r["errors"], true);
    let items = r["items"].as_array().unwrap();
    assert_eq!(items[0]["index"]["status"], 400);
    assert_eq!(items[0]["index"]["error"]["type"], "document_parsing_exception");
    assert_eq!(items[1]["index"]["status"], 201);
    assert_eq!(items[2]["index"]["status"], 400);
    let (_, r) = http("POST", &format!("{u}/docs/_count"), Some("{}"));
    assert_eq!(r["count"], 1002, "{r}");
    svc.proc.assert_running();
}

/// opensearch-py, a client nobody here wrote, against the built-in service.
#[tokio::test(flavor = "multi_thread")]
async fn opensearch_py_client_works_against_the_service() {
    let dir = tempfile::Builder::new().prefix("sluice-search-").tempdir().unwrap().keep();
    let svc = spawn_search(&dir).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/opensearch_compat.py");
    let out = Command::new(python()).arg(script).arg(&svc.url).output().unwrap();
    assert!(
        out.status.success(),
        "opensearch_compat.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A document definition that cannot work is refused by `sluice check` with the fix.
#[tokio::test(flavor = "multi_thread")]
async fn bad_documents_are_refused_with_the_fix() {
    let env = Env::new("search_bad").await;
    env.src().await.batch_execute(SCHEMA).await.unwrap();
    env.src().await.batch_execute("CREATE TABLE loose (id int8 PRIMARY KEY, metric_id int8)").await.unwrap();
    let svc = spawn_search(&env.dir).await;
    let cases = [
        (DOCUMENT.replace("table: public.metrics", "table: public.metricz"), "table public.metricz does not exist in source"),
        (DOCUMENT.replace("column: org_id", "column: org"), "has no column `org`"),
        (
            DOCUMENT
                .replace("public.metric_configurations", "public.loose")
                .replace("fields: [id, kind, setting, enabled]", "fields: [id]"),
            "REPLICA IDENTITY FULL",
        ),
        (
            DOCUMENT.replace(
                "counts:\n        - {name: configuration_count, relation: configurations}",
                "counts:\n        - {name: n, relation: nope}",
            ),
            "no relation named `nope`",
        ),
        (DOCUMENT.replace("text_fields: [name]", "text_fields: [last_seen]"), "not text"),
        (DOCUMENT.replace("kind: many_to_many", "kind: lots"), "unknown variant `lots`"),
    ];
    for (doc, want) in cases {
        let cfg = search_config(&env, &svc.url, "metrics", &doc);
        let (code, err) = run_to_exit(&["check", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
        assert_eq!(code, Some(1), "{want}: {err}");
        assert!(err.contains(want), "{want}: {err}");
    }
    // Nothing was created: no slot, no index.
    // (Other tests run pipelines on the same cluster: count this database's slots.)
    assert_eq!(slot_count(&env).await, 0);
    let (s, _) = http("HEAD", &format!("{}/metrics", svc.url), None);
    assert_eq!(s, 404);
    let state =
        env.dst().await.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'sluice'", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(state, 0, "sluice check created state tables");
}

/// `sluice search demo` end to end at a small scale: the dataset, the load, the page
/// asked of both systems (the demo refuses to serve if they disagree), the page's JSON
/// API from either backend, and the page itself.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_summary_demo_serves_the_same_page_from_both_systems() {
    let dir = tempfile::Builder::new().prefix("sluice-demo-").tempdir().unwrap().keep();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = dir.join("demo.out");
    let child = Command::new(BIN)
        .args(["search", "demo", "--scale", "0.005", "--rate", "20", "--duration", "6s", "--addr", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.join("demo.err")).unwrap())
        .spawn()
        .unwrap();
    let mut demo = Pipeline { child, log: dir.join("demo.err") };
    let printed = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_for("the demo to serve its page", Duration::from_secs(120), || async { printed().contains("serving the Metrics Summary page") })
        .await;
    demo.assert_running();
    assert!(printed().contains("same page from both"), "{}", printed());
    let base = format!("http://127.0.0.1:{port}");
    let (s, search) = http("GET", &format!("{base}/api/page?tags=env:prod&sort=last_seen"), None);
    assert_eq!(s, 200, "{search}");
    let (_, pg) = http("GET", &format!("{base}/api/page?tags=env:prod&sort=last_seen&backend=postgres"), None);
    assert_eq!((search["backend"].as_str(), pg["backend"].as_str()), (Some("search"), Some("postgres")));
    assert!(search["total"].as_u64().unwrap() > 0, "{search}");
    assert_eq!(search["facets"]["type"].as_array().unwrap().len(), pg["facets"]["type"].as_array().unwrap().len());
    let (s, bad) = http("GET", &format!("{base}/api/page?text=cpu.*"), None);
    assert_eq!(s, 400, "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("one word"), "{bad}");
    let page = ureq::get(&format!("{base}/")).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(page.contains("Metrics Summary"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = demo.child.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "the demo did not stop after --duration");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "{}\n{}", printed(), demo.log());
    assert!(printed().contains("changes"), "{}", printed());
}

/// `sluice server --search-data`: the search service embedded under /search.
#[tokio::test(flavor = "multi_thread")]
async fn main_server_embeds_the_search_service() {
    let dir = tempfile::Builder::new().prefix("sluice-server-search-").tempdir().unwrap().keep();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(BIN)
        .args(["server", "--addr", &format!("127.0.0.1:{port}"), "--search-data"])
        .arg(dir.join("search"))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let mut server = Pipeline { child, log: dir.join("server.log") };
    wait_for("the server to listen", Duration::from_secs(20), || async move { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() })
        .await;
    let u = format!("http://127.0.0.1:{port}/search");
    let (s, r) = http("PUT", &format!("{u}/things"), Some(r#"{"mappings": {"properties": {"k": {"type": "keyword"}}}}"#));
    assert_eq!(s, 200, "{r}");
    let (s, r) = http("POST", &format!("{u}/things/_bulk?refresh=true"), Some("{\"index\":{\"_id\":\"1\"}}\n{\"k\":\"a\"}\n"));
    assert_eq!((s, &r["errors"]), (200, &json!(false)), "{r}");
    let (_, r) = http("POST", &format!("{u}/things/_search"), Some(r#"{"query": {"term": {"k": "a"}}}"#));
    assert_eq!(r["hits"]["total"]["value"], 1, "{r}");
    let (s, _) = http("GET", &format!("http://127.0.0.1:{port}/healthz"), None);
    assert_eq!(s, 200);
    server.assert_running();
    assert_eq!(server.terminate(), Some(0));
}

/// `(doc_id, status, reason)` of the dead letters of `index`.
async fn dead_letters(dst: &tokio_postgres::Client, index: &str) -> Vec<(String, i32, String)> {
    dst.query("SELECT doc_id, status, reason FROM sluice.search_dead_letters WHERE index_name = $1 ORDER BY doc_id::int8", &[&index])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1), r.get::<_, String>(2)))
        .collect()
}

/// A document the service refuses for good (a mapping conflict) goes to the dead-letter
/// table with the reason; the rest of its batch lands, the pipeline keeps going, and a
/// later fix of the row replaces the dead letter's document in the index.
#[tokio::test(flavor = "multi_thread")]
async fn refused_documents_are_dead_lettered_not_retried_forever() {
    let env = Env::new("search_dead").await;
    let src = env.src().await;
    src.batch_execute(SCHEMA).await.unwrap();
    src.batch_execute("UPDATE metrics SET unit = '5' WHERE id % 10 <> 0").await.unwrap();
    let svc = spawn_search(&env.dir).await;
    // An index made earlier by someone else, where `unit` is a number: a metric whose
    // unit is 'ms' cannot be indexed there.
    let (s, r) = http(
        "PUT",
        &format!("{}/conflicted", svc.url),
        Some(r#"{"mappings": {"properties": {"unit": {"type": "long"}, "id": {"type": "long"}}}}"#),
    );
    assert_eq!(s, 200, "{r}");
    let cfg = search_config(&env, &svc.url, "conflicted", DOCUMENT);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    let dst = env.dst().await;
    wait_for("the refused documents in the dead-letter table", Duration::from_secs(30), || async {
        dead_letters(&dst, "conflicted").await.len() == 6
    })
    .await;
    let letters = dead_letters(&dst, "conflicted").await;
    assert_eq!(letters.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), ["10", "20", "30", "40", "50", "60"]);
    assert!(letters.iter().all(|l| l.1 == 400 && l.2.contains("document_parsing_exception")), "{letters:?}");
    let docs = svc.all_docs("conflicted");
    assert_eq!(docs.len(), 54, "the rest of each batch landed");
    // The pipeline goes on: a fixed row and a new change both arrive.
    src.batch_execute("UPDATE metrics SET unit = '7' WHERE id = 10; UPDATE metrics SET name = 'after' WHERE id = 11").await.unwrap();
    wait_for("the fixed document", Duration::from_secs(30), || async {
        let d = svc.all_docs("conflicted");
        d.get("10").is_some_and(|d| d["unit"] == "7") && d.get("11").is_some_and(|d| d["name"] == "after")
    })
    .await;
    p.assert_running();
    assert!(!p.log().contains("retrying"), "refused documents must not be retried: {}", p.log());
    assert_eq!(p.terminate(), Some(0));
}

/// Between the pipeline and the service: answers the first `reject` `_bulk` requests with
/// 429 (Elasticsearch's back-pressure answer) and passes everything else through.
/// A proxy to the service that answers 429 to the first `reject` `_bulk` requests, and
/// then to every `reject_every`th one (0: none); returns its URL and how many it refused.
async fn spawn_busy_proxy(target: String, reject: usize, reject_every: usize) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use axum::response::IntoResponse as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let rejected = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = rejected.clone();
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (counter, seen, client, target) = (counter.clone(), seen.clone(), client.clone(), target.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let busy = parts.uri.path().ends_with("/_bulk") && {
                let k = seen.fetch_add(1, Ordering::SeqCst);
                k < reject || (reject_every > 0 && k % reject_every == 0)
            };
            if busy {
                counter.fetch_add(1, Ordering::SeqCst);
                let busy = json!({"error": {"type": "es_rejected_execution_exception", "reason": "rejected execution"}, "status": 429});
                return (axum::http::StatusCode::TOO_MANY_REQUESTS, axum::Json(busy)).into_response();
            }
            let url = format!("{target}{}", parts.uri.path_and_query().map_or("/", |p| p.as_str()));
            let mut fwd = client.request(parts.method, url).body(body);
            if let Some(ct) = parts.headers.get("content-type") {
                fwd = fwd.header("content-type", ct);
            }
            let resp = fwd.send().await.unwrap();
            let status = axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
            (status, [("content-type", "application/json")], resp.bytes().await.unwrap()).into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rejected)
}

/// A busy service (429) delays documents; it never loses them or dead-letters them.
#[tokio::test(flavor = "multi_thread")]
async fn busy_service_is_retried_with_backoff() {
    let env = Env::new("search_busy").await;
    let src = env.src().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let svc = spawn_search(&env.dir).await;
    let (proxy, rejected) = spawn_busy_proxy(svc.url.clone(), 4, 0).await;
    let cfg = search_config(&env, &proxy, "metrics", DOCUMENT);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    src.batch_execute("UPDATE metric_configurations SET setting = 'after-busy' WHERE id = 5; DELETE FROM metrics WHERE id = 3")
        .await
        .unwrap();
    wait_index_equals_source(&env, &svc, "metrics", Duration::from_secs(30)).await;
    assert_eq!(rejected.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert!(p.log().contains("retrying the bulk request"), "{}", p.log());
    assert!(dead_letters(&env.dst().await, "metrics").await.is_empty());
    p.assert_running();
    assert_eq!(p.terminate(), Some(0));
}
