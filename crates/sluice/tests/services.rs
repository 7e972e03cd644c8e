//! The registry and the search service of `sluice server`, over HTTPS, behind the
//! control plane's tokens: every route refuses a caller without one, and a tenant
//! reaches only its own registry context and indices, with Confluent's and
//! OpenSearch's own clients.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;
use crate::control::{Ctl, free_port};
use sluice_postgres::pki::Pki;

/// The test CA's certificate (PEM file), trusted by [`call`] and the Python clients.
static CA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// An HTTPS client that trusts the test CA only.
fn client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(CA.get().unwrap()).unwrap()).unwrap();
        reqwest::Client::builder().tls_certs_only([ca]).build().unwrap()
    })
}

/// A request over HTTPS with a Bearer token; status and JSON.
async fn call(method: &str, url: &str, token: Option<&str>, body: Option<String>) -> (u16, Value) {
    crate::control::call_with(client(), method, url, token, body).await
}

/// Every route of the registry, `{s}` standing for a subject.
const REGISTRY: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/subjects"),
    ("POST", "/subjects/{s}"),
    ("DELETE", "/subjects/{s}"),
    ("POST", "/subjects/{s}/versions"),
    ("GET", "/subjects/{s}/versions"),
    ("GET", "/subjects/{s}/versions/1"),
    ("DELETE", "/subjects/{s}/versions/1"),
    ("GET", "/subjects/{s}/versions/1/schema"),
    ("GET", "/schemas/ids/1"),
    ("GET", "/schemas/ids/1/schema"),
    ("GET", "/schemas/ids/1/subjects"),
    ("GET", "/schemas/ids/1/versions"),
    ("GET", "/schemas/types"),
    ("GET", "/config"),
    ("PUT", "/config"),
    ("DELETE", "/config"),
    ("GET", "/config/{s}"),
    ("PUT", "/config/{s}"),
    ("DELETE", "/config/{s}"),
    ("GET", "/mode"),
    ("PUT", "/mode"),
    ("GET", "/mode/{s}"),
    ("PUT", "/mode/{s}"),
    ("POST", "/compatibility/subjects/{s}/versions/1"),
    ("GET", "/contexts"),
];

/// Every route of the search service, `{i}` standing for an index.
const SEARCH: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/_cluster/health"),
    ("GET", "/_cat/indices"),
    ("POST", "/_bulk"),
    ("POST", "/_refresh"),
    ("PUT", "/{i}"),
    ("GET", "/{i}"),
    ("HEAD", "/{i}"),
    ("DELETE", "/{i}"),
    ("POST", "/{i}/_bulk"),
    ("POST", "/{i}/_refresh"),
    ("GET", "/{i}/_mapping"),
    ("PUT", "/{i}/_mapping"),
    ("POST", "/{i}/_doc"),
    ("PUT", "/{i}/_doc/1"),
    ("GET", "/{i}/_doc/1"),
    ("HEAD", "/{i}/_doc/1"),
    ("DELETE", "/{i}/_doc/1"),
    ("PUT", "/{i}/_create/1"),
    ("POST", "/{i}/_update/1"),
    ("GET", "/{i}/_search"),
    ("POST", "/{i}/_search"),
    ("GET", "/{i}/_count"),
    ("POST", "/{i}/_count"),
];

fn tenant_services(url: &str, tenant: &str, token: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/tenant_services.py");
    let ca = CA.get().unwrap().to_str().unwrap();
    let out = Command::new(python()).args([script, url, tenant, token, ca]).output().unwrap();
    assert!(out.status.success(), "tenant_services.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn token(url: &str, admin: &str, tenant: &str, role: &str) -> String {
    let (s, v) =
        call("POST", &format!("{url}/v1/tenants/{tenant}/tokens"), Some(admin), Some(format!("{{name: t-{role}, role: {role}}}"))).await;
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_and_search_take_tokens_and_keep_tenants_apart() {
    let ctl = Ctl::new("svc_auth").await;
    let data = ctl.env.dir.join("search");
    let pki = Pki::make().expect("make a test CA");
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    CA.set(pki.path("ca.pem")).unwrap();
    let vars = [
        ("SLUICE_REGISTRY_DATABASE", ctl.dsn.as_str()),
        ("SLUICE_SEARCH_DATA", data.to_str().unwrap()),
        ("SLUICE_TLS_CERT", cert.to_str().unwrap()),
        ("SLUICE_TLS_KEY", key.to_str().unwrap()),
        ("SLUICE_SEARCH_MAX_INDICES_PER_TENANT", "2"),
    ];
    let port = free_port();
    let mut server = ctl.server_env("s1", port, None, &vars).await;
    let url = format!("https://localhost:{port}");
    // Plain HTTP gets no answer from an HTTPS listener.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/healthz")).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "plain HTTP is not served next to HTTPS");
    for t in ["acme", "globex"] {
        let (s, v) = call("POST", &format!("{url}/v1/tenants"), Some(&ctl.admin), Some(format!("name: {t}"))).await;
        assert_eq!(s, 201, "{v}");
    }
    let acme = token(&url, &ctl.admin, "acme", "tenant_admin").await;
    let viewer = token(&url, &ctl.admin, "acme", "tenant_viewer").await;
    let globex = token(&url, &ctl.admin, "globex", "tenant_admin").await;

    // Nothing answers without a token.
    let routes = || {
        REGISTRY
            .iter()
            .map(|(m, p)| (*m, format!("/registry{}", p.replace("{s}", "orders-value"))))
            .chain(SEARCH.iter().map(|(m, p)| (*m, format!("/search{}", p.replace("{i}", "acme.orders")))))
    };
    for (method, path) in routes() {
        let (s, _) = call(method, &format!("{url}{path}"), None, None).await;
        assert_eq!(s, 401, "{method} {path} without a token");
        let (s, _) = call(method, &format!("{url}{path}"), Some("slc_not_a_token"), None).await;
        assert_eq!(s, 401, "{method} {path} with an unknown token");
    }

    // Each tenant through the clients its teams use: plain subject names land in the
    // tenant's context, indices are named <tenant>.<name>, the other's are out of reach.
    let (u, a) = (url.clone(), acme.clone());
    let seen = tokio::task::spawn_blocking(move || tenant_services(&u, "acme", &a)).await.unwrap();
    assert_eq!(seen["round_trip"], serde_json::json!({"id": 7, "who": "acme"}), "{seen}");
    assert_eq!(seen["subjects"], serde_json::json!([":.acme:orders-value"]), "{seen}");
    assert_eq!(seen["other_context"], 404, "{seen}");
    assert_eq!(seen["bad_token"], 401, "{seen}");
    assert_eq!(seen["hits"], 1, "{seen}");
    assert_eq!(seen["cat"], serde_json::json!(["acme.orders"]), "{seen}");
    for name in ["other.orders", "orders", "*"] {
        assert_eq!(seen[format!("search {name}")], 403, "{seen}");
    }
    assert_eq!(seen["search bad_token"], 401, "{seen}");
    let (u, g) = (url.clone(), globex.clone());
    let seen = tokio::task::spawn_blocking(move || tenant_services(&u, "globex", &g)).await.unwrap();
    assert_eq!(seen["subjects"], serde_json::json!([":.globex:orders-value"]), "{seen}");
    assert_eq!(seen["cat"], serde_json::json!(["globex.orders"]), "{seen}");

    // globex's token on every route naming acme's subject or index: missing or
    // forbidden, never served; the routes naming nothing show globex's only.
    for (method, path) in REGISTRY
        .iter()
        .map(|(m, p)| (*m, format!("/registry{}", p.replace("{s}", ":.acme:orders-value"))))
        .chain(SEARCH.iter().map(|(m, p)| (*m, format!("/search{}", p.replace("{i}", "acme.orders")))))
    {
        let (s, v) = call(method, &format!("{url}{path}"), Some(&globex), None).await;
        let names_nothing = !(path.contains("acme") || path.contains("/schemas/ids/"));
        if matches!(path.as_str(), "/registry/config" | "/registry/mode") && method != "GET" {
            assert_eq!(s, 403, "{method} {path}: the registry-wide settings are a platform admin's: {v}");
        } else if names_nothing {
            assert!(s < 300 || s == 403, "{method} {path}: {s} {v}");
            assert!(!v.to_string().contains("acme"), "{method} {path} shows acme's: {v}");
        } else if path.contains("/schemas/ids/") {
            // Ids are numbered per context: globex's own id 1, never acme's.
            let (s, v) = call(method, &format!("{url}{path}?subject=:.acme:"), Some(&globex), None).await;
            assert_eq!(s, 404, "{method} {path}?subject=:.acme: {v}");
        } else {
            assert!(s == 403 || s == 404, "{method} {path} as globex: {s} {v}");
        }
    }
    let bulk = client()
        .post(format!("{url}/search/_bulk"))
        .bearer_auth(&globex)
        .header("content-type", "application/x-ndjson")
        .body("{\"index\":{\"_index\":\"globex.orders\",\"_id\":\"2\"}}\n{\"who\":\"g\"}\n{\"delete\":{\"_index\":\"acme.orders\",\"_id\":\"1\"}}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(bulk.status().as_u16(), 403, "a _bulk with one action on another tenant's index is refused whole");

    // A viewer reads and never writes.
    let (s, _) = call("GET", &format!("{url}/registry/subjects"), Some(&viewer), None).await;
    assert_eq!(s, 200);
    let (s, _) = call("DELETE", &format!("{url}/registry/subjects/orders-value"), Some(&viewer), None).await;
    assert_eq!(s, 403);
    let (s, _) = call("POST", &format!("{url}/search/acme.orders/_search"), Some(&viewer), None).await;
    assert_eq!(s, 200);
    let (s, _) = call("DELETE", &format!("{url}/search/acme.orders"), Some(&viewer), None).await;
    assert_eq!(s, 403);

    // acme's things are intact; a platform admin sees both tenants'.
    let (s, v) = call("GET", &format!("{url}/search/acme.orders/_doc/1"), Some(&acme), None).await;
    assert_eq!((s, v["_source"]["who"].as_str()), (200, Some("acme")), "{v}");
    let (s, v) = call("GET", &format!("{url}/registry/subjects/orders-value/versions"), Some(&acme), None).await;
    assert_eq!((s, v), (200, serde_json::json!([1])));
    let (_, v) = call("GET", &format!("{url}/registry/subjects"), Some(&ctl.admin), None).await;
    assert_eq!(v, serde_json::json!([":.acme:orders-value", ":.globex:orders-value"]));

    // A pipeline's search sink reaches the same service over HTTPS, trusting the test CA
    // given inline (ca_pem),
    // with the tenant's token as its password: rows become documents in the tenant's index.
    let env = &ctl.env;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE items (id int8 PRIMARY KEY, name text); INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 50) g;",
    )
    .await
    .unwrap();
    let (user, pw) = (sluice_postgres::cluster::SUPERUSER, sluice_postgres::cluster::SUPERUSER_PASSWORD);
    let cfg = env.write_config(&format!(
        "pipeline: {db}_search\nsource: {{host: 127.0.0.1, port: {sp}, user: {user}, password: {pw}, database: {db}, tables: [public.items], \
         heartbeat_interval: 500ms}}\nsink:\n  search:\n    url: {url}/search\n    index: acme.items\n    username: acme\n    password: {acme}\n    \
         ca_pem: {ca:?}\n    document: {{table: public.items}}\n    state: {{host: 127.0.0.1, port: {dp}, user: {user}, password: {pw}, database: {db}}}\n",
        db = env.db,
        sp = env.src_port,
        dp = env.dst_port,
        ca = std::fs::read_to_string(CA.get().unwrap()).unwrap(), // inline, as a tenant gives it
    ));
    let mut p = env.spawn(&cfg);
    let count = |n: i64| {
        let (url, acme) = (url.clone(), acme.clone());
        move || {
            let (url, acme) = (url.clone(), acme.clone());
            async move { call("GET", &format!("{url}/search/acme.items/_count"), Some(&acme), None).await.1["count"].as_i64() == Some(n) }
        }
    };
    wait_for("the snapshot in acme.items", std::time::Duration::from_secs(60), count(50)).await;
    src.batch_execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(51, 60) g;").await.unwrap();
    wait_for("the streamed rows in acme.items", std::time::Duration::from_secs(60), count(60)).await;
    p.assert_running();
    assert!(!p.log().contains(&acme), "the token is never logged");
    assert_eq!(p.terminate(), Some(0), "{}", p.log());

    // Each tenant's indices are capped (2 here): acme holds acme.orders and acme.items,
    // so a third is refused, created neither by name nor by a write; globex, holding
    // one, still creates its second.
    let put = |path: &str, token: &str, body: Value| {
        let req = client().put(format!("{url}/search/{path}")).bearer_auth(token).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, v) = put("acme.third", &acme, serde_json::json!({})).await;
    assert_eq!((s, v["error"]["type"].as_str()), (400, Some("validation_exception")), "{v}");
    let reason = v["error"]["reason"].as_str().unwrap();
    assert!(reason.contains("tenant [acme] has [2]/[2] indices") && reason.contains("--search-max-indices-per-tenant"), "{reason}");
    let (s, v) = put("acme.third/_doc/1", &acme, serde_json::json!({"x": 1})).await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = call("GET", &format!("{url}/search/acme.third"), Some(&acme), None).await;
    assert_eq!(s, 404, "nothing half-made");
    let (s, v) = put("globex.more", &globex, serde_json::json!({})).await;
    assert_eq!(s, 200, "{v}");

    // A Kafka sink's Avro schemas go to the same registry over HTTPS, the tenant's token
    // as basic auth in the URL (Confluent's URL credentials), into the tenant's context.
    // The authority is named by a file (another CA: refused) or given inline (the test
    // CA, as a tenant gives it: trusted).
    let (_broker, brokers) = spawn_broker(&env.dir).await;
    let registry = format!("https://acme:{acme}@localhost:{port}/registry");
    let kafka = |ca: &str| {
        env.kafka_config(
            &["items"],
            &brokers,
            &format!("    registry_url: {registry}\n    {ca}\n    registry_context: acme\n    topic_prefix: acme\n"),
            "",
        )
    };
    let wrong = kafka(&format!("registry_ca_file: {}", pki.path("other-ca.pem").display()));
    let (code, stderr) = run_to_exit(&["run", "--config", wrong.to_str().unwrap()], std::time::Duration::from_secs(60));
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(code == Some(1) && errors.len() == 1, "{stderr}");
    assert!(errors[0].contains("unknown CA") && errors[0].contains("registry_ca_file"), "{}", errors[0]);
    assert!(!stderr.contains(&acme), "the token is not in the error: {stderr}");
    let inline = std::fs::read_to_string(CA.get().unwrap()).unwrap();
    let mut p = env.spawn(&kafka(&format!("registry_ca_pem: {inline:?}")));
    wait_for("the items schema in acme's context", std::time::Duration::from_secs(60), || async {
        let (_, v) = call("GET", &format!("{url}/registry/subjects"), Some(&acme), None).await;
        v.as_array().is_some_and(|s| s.iter().any(|s| s.as_str().is_some_and(|s| s.starts_with(":.acme:acme.") && s.contains("items"))))
    })
    .await;
    p.assert_running();
    assert!(!p.log().contains(&acme), "the token is never logged");
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
    server.proc.assert_running();
}

#[test]
fn server_refuses_plain_http_off_loopback_and_bad_certificate_files() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).arg("server").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).trim().to_string())
    };
    let (code, err) = run(&["--addr", "0.0.0.0:0"]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--tls-cert") && err.contains("--plain-http"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let (code, err) = run(&["--addr", "127.0.0.1:0", "--tls-cert", junk.to_str().unwrap(), "--tls-key", junk.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--tls-cert") && err.contains("junk.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_cannot_reach_loopback_or_server_files_unless_the_server_allows_it() {
    use crate::control::{call as http, superuser_pw};
    let ctl = Ctl::new("egress").await;
    let mut strict = ctl.server_env("strict", free_port(), None, &[("SLUICE_ALLOW_EGRESS", "")]).await;
    let url = strict.url.clone();
    let (s, v) = http("POST", &format!("{url}/v1/tenants"), Some(&ctl.admin), Some("name: acme".into())).await;
    assert_eq!(s, 201, "{v}");
    let base = format!("{url}/v1/tenants/acme");
    let refused = |v: &Value, field: &str| {
        assert_eq!(v["error"]["type"], "egress_refused", "{v}");
        assert_eq!(v["error"]["field"], field, "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains("loopback") && m.contains("--allow-egress"), "{m}");
    };
    let (s, v) =
        http("POST", &format!("{base}/sources"), Some(&ctl.admin), Some(ctl.source_yaml("main", "postgres", superuser_pw()))).await;
    assert_eq!(s, 422, "{v}");
    refused(&v, "host");
    let (s, v) = http("POST", &format!("{base}/sinks"), Some(&ctl.admin), Some(ctl.sink_yaml("replica"))).await;
    assert_eq!(s, 422, "{v}");
    refused(&v, "postgres.host");
    let lookup = format!(
        "name: tier\nlookup: {{table: public.customers, key: name, on: customer, fields: [tier], connection: \
         {{host: localhost, port: {}, user: postgres, password: x, database: d}}}}\n",
        ctl.env.src_port
    );
    let (s, v) = http("POST", &format!("{base}/enrichers"), Some(&ctl.admin), Some(lookup.clone())).await;
    assert_eq!(s, 422, "{v}");
    refused(&v, "lookup.connection.host");
    let hook = "name: hook\nhttp: {url: 'http://169.254.169.254/latest/meta-data', key: id, fields: {x: string}}\n";
    let (s, v) = http("POST", &format!("{base}/enrichers"), Some(&ctl.admin), Some(hook.into())).await;
    assert_eq!(s, 422, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("link-local"), "{v}");
    // The tenant's alert webhook is a host the server posts to as well.
    let (s, v) =
        http("PUT", &format!("{base}/alerts"), Some(&ctl.admin), Some("webhook_url: 'http://127.0.0.1:9/hook?token=t0ps3cret'\n".into()))
            .await;
    assert_eq!(s, 422, "{v}");
    refused(&v, "webhook_url");
    assert!(!v.to_string().contains("t0ps3cret"), "the webhook's secret is not echoed: {v}");
    let (_, v) = http("GET", &format!("{base}/alerts"), Some(&ctl.admin), None).await;
    assert_eq!(v["configured"], false, "nothing stored: {v}");
    // Settings that would make the server read its own files, or give up delivery
    // guarantees, are refused whatever the policy.
    for (props, field) in [
        ("{ssl.ca.location: /etc/ssl/private/server.key}", "kafka.properties.ssl.ca.location"),
        ("{enable.idempotence: 'false'}", "kafka.properties.enable.idempotence"),
        ("{acks: '0'}", "kafka.properties.acks"),
        ("{debug: all}", "kafka.properties.debug"),
    ] {
        let sink = format!(
            "name: k\nkafka: {{brokers: 'kafka.example.com:9092', encoding: json, properties: {props}, state: {{host: db.example.com, user: u, password: p, database: d}}}}\n"
        );
        let (s, v) = http("POST", &format!("{base}/sinks"), Some(&ctl.admin), Some(sink)).await;
        assert_eq!((s, v["error"]["field"].as_str()), (422, Some(field)), "{v}");
    }
    let (_, v) = http("GET", &format!("{base}/sources"), Some(&ctl.admin), None).await;
    assert_eq!(v["sources"], serde_json::json!([]), "nothing was created");
    strict.proc.kill9();

    // The operator allows loopback: the same source is created.
    let open =
        ctl.server_env("open", free_port(), None, &[("SLUICE_ALLOW_EGRESS", "loopback"), ("SLUICE_MAX_PIPELINES_PER_TENANT", "1")]).await;
    let base = format!("{}/v1/tenants/acme", open.url);
    let (s, v) =
        http("POST", &format!("{base}/sources"), Some(&ctl.admin), Some(ctl.source_yaml("main", "postgres", superuser_pw()))).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = http("POST", &format!("{base}/enrichers"), Some(&ctl.admin), Some(lookup)).await;
    assert_eq!(s, 201, "{v}");

    // A GET-then-PUT round trip keeps the stored password: the sink still reaches its
    // database afterwards, so a pipeline can be created on it (creation connects).
    let (s, v) = http("POST", &format!("{base}/sinks"), Some(&ctl.admin), Some(ctl.sink_yaml("replica"))).await;
    assert_eq!(s, 201, "{v}");
    let (_, shown) = http("GET", &format!("{base}/sinks/replica"), Some(&ctl.admin), None).await;
    assert_eq!(shown["postgres"]["password"], "(set)", "{shown}");
    let (s, v) = http("PUT", &format!("{base}/sinks/replica"), Some(&ctl.admin), Some(shown.to_string())).await;
    assert_eq!(s, 200, "{v}");
    ctl.env.src().await.batch_execute("CREATE TABLE orders (id int8 PRIMARY KEY)").await.unwrap();
    let pipeline = "{name: p, source: main, sink: replica, tables: [orders]}";
    let (s, v) = http("POST", &format!("{base}/pipelines"), Some(&ctl.admin), Some(pipeline.into())).await;
    assert_eq!(s, 201, "{v}");
    let wf = v["workflow"].as_i64().unwrap_or_else(|| panic!("a provisioning workflow: {v}"));
    crate::control::wait_workflow(&open.url, &ctl.admin, "acme", wf, Duration::from_secs(60)).await;
    wait_equal(&ctl.env, "orders", "id", Duration::from_secs(60)).await;

    // One pipeline per tenant on this server: a second is refused whole (no row, no
    // provisioning), naming the quota and the flag that sets it.
    let (s, v) = http(
        "POST",
        &format!("{base}/pipelines"),
        Some(&ctl.admin),
        Some("{name: q, source: main, sink: replica, tables: [orders]}".into()),
    )
    .await;
    assert_eq!((s, v["error"]["type"].as_str()), (403, Some("quota_exceeded")), "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("holds 1 of its 1 pipelines") && m.contains("--max-pipelines-per-tenant"), "{m}");
    let (_, v) = http("GET", &format!("{base}/pipelines"), Some(&ctl.admin), None).await;
    assert_eq!(v["pipelines"].as_array().map(Vec::len), Some(1), "{v}");

    // The operator narrows the policy and the server restarts under the same id: the
    // stored hosts were allowed when saved, and are checked again before anything
    // connects (as a name that now resolves to loopback would be).
    let mut open = open;
    open.proc.kill9();
    let narrowed = ctl.server_env("open", free_port(), None, &[("SLUICE_ALLOW_EGRESS", "")]).await;
    let base = format!("{}/v1/tenants/acme", narrowed.url);
    ctl.env.src().await.batch_execute("INSERT INTO orders VALUES (1)").await.unwrap();
    wait_for("the pipeline to be refused at start", Duration::from_secs(30), || async {
        let (_, v) = http("GET", &format!("{base}/pipelines/p"), Some(&ctl.admin), None).await;
        let error = v["status"]["error"].as_str().unwrap_or("");
        v["status"]["state"] == "failed" && error.contains("egress refused") && error.contains("loopback")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dst = ctl.env.dst().await;
    assert_eq!(dst.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0), 0, "nothing was delivered");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_refuses_alias_bombs_and_form_posts_and_keeps_serving() {
    use crate::control::call as http;
    let ctl = Ctl::new("bodies").await;
    let server = ctl.server("b1", free_port(), None).await;
    let url = server.url.clone();
    // The "billion laughs": ten levels of ten aliases each, about 60 KB of text.
    let mut bomb = String::from("name: x\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        bomb.push_str(&format!("l{i}: &l{i} [{}]\n", vec![format!("*l{}", i - 1); 10].join(", ")));
    }
    while bomb.len() < 60_000 {
        bomb.push_str(&format!("# {}\n", "padding ".repeat(10)));
    }
    let t = std::time::Instant::now();
    let (s, v) = http("POST", &format!("{url}/v1/tenants"), Some(&ctl.admin), Some(bomb)).await;
    let took = t.elapsed();
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["type"], "yaml_alias", "{v}");
    assert!(took < std::time::Duration::from_millis(500), "answered in {took:?}");
    let form = reqwest::Client::new()
        .post(format!("{url}/v1/tenants"))
        .bearer_auth(&ctl.admin)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=evil")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 415, "a form post is refused");
    let (s, _) = http("GET", &format!("{url}/healthz"), None, None).await;
    assert_eq!(s, 200, "still serving");
    // Migration checks take the control plane's tokens, and JSON only.
    let check = |token: Option<&str>, kind: &str| {
        let mut r = reqwest::Client::new()
            .post(format!("{url}/v1/migrations/check"))
            .header("content-type", kind.to_string())
            .body(r#"{"sql": "ALTER TABLE t ADD COLUMN c int"}"#);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(check(None, "application/json").await, 401);
    assert_eq!(check(Some(&ctl.admin), "text/plain").await, 415);
    assert_eq!(check(Some(&ctl.admin), "application/json").await, 200);
    let (_, v) = http("GET", &format!("{url}/v1/tenants"), Some(&ctl.admin), None).await;
    assert_eq!(v["tenants"], serde_json::json!([]), "nothing was created: {v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_expire_and_platform_admins_list_and_revoke_every_token() {
    use crate::control::{call as http, cli};
    let ctl = Ctl::new("tokens").await;
    let server = ctl.server("t1", free_port(), None).await;
    let url = server.url.clone();
    let (s, _) = http("POST", &format!("{url}/v1/tenants"), Some(&ctl.admin), Some("name: acme".into())).await;
    assert_eq!(s, 201);
    let base = format!("{url}/v1/tenants/acme");
    let (s, v) =
        http("POST", &format!("{base}/tokens"), Some(&ctl.admin), Some("{name: short, role: tenant_admin, expires_in: 10s}".into())).await;
    assert_eq!((s, v["error"]["field"].as_str()), (422, Some("expires_in")), "{v}");
    let (s, v) =
        http("POST", &format!("{base}/tokens"), Some(&ctl.admin), Some("{name: ci, role: tenant_admin, expires_in: 90d}".into())).await;
    assert_eq!(s, 201, "{v}");
    assert!(v["expires_at"].is_string(), "{v}");
    let (ci, ci_id) = (v["token"].as_str().unwrap().to_string(), v["id"].as_i64().unwrap());
    let (s, v) = http("POST", &format!("{base}/tokens"), Some(&ctl.admin), Some("{name: ops, role: tenant_viewer}".into())).await;
    assert_eq!(s, 201, "{v}");
    let (ops, ops_id) = (v["token"].as_str().unwrap().to_string(), v["id"].as_i64().unwrap());
    assert_eq!(http("GET", &base, Some(&ci), None).await.0, 200);

    // Past its expiry a token is unknown, on every route.
    let c = ctl.control().await;
    c.execute("UPDATE sluice_control.tokens SET expires_at = now() - interval '1 second' WHERE id = $1", &[&ci_id]).await.unwrap();
    assert_eq!(http("GET", &base, Some(&ci), None).await.0, 401);

    // A platform admin lists every tenant's tokens (never a value or a hash) and revokes any.
    let (s, v) = http("GET", &format!("{url}/v1/tokens"), Some(&ctl.admin), None).await;
    assert_eq!(s, 200, "{v}");
    let tokens = v["tokens"].as_array().unwrap();
    assert!(tokens.iter().any(|t| t["id"] == ops_id && t["tenant"] == "acme"), "{v}");
    assert!(!v.to_string().contains(&ops) && !v.to_string().contains("hash"), "{v}");
    assert_eq!(http("GET", &format!("{url}/v1/tokens"), Some(&ops), None).await.0, 403);
    assert_eq!(http("DELETE", &format!("{url}/v1/tokens/{ops_id}"), Some(&ops), None).await.0, 403);
    let (code, out, err) = cli(&url, &ctl.admin, "", &["tokens", "revoke", &ops_id.to_string(), "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(http("GET", &base, Some(&ops), None).await.0, 401);
    // The last platform admin token stays.
    let admin_id = tokens.iter().find(|t| t["role"] == "platform_admin").unwrap()["id"].as_i64().unwrap();
    assert_eq!(http("DELETE", &format!("{url}/v1/tokens/{admin_id}"), Some(&ctl.admin), None).await.0, 404);
    let (code, out, err) = cli(&url, &ctl.admin, "", &["tokens", "list", "--all", "--output", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("platform_admin"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_in_a_thousand_requests() {
    use crate::control::call as http;
    let ctl = Ctl::new("fuzz").await;
    let server = ctl.server("f1", free_port(), None).await;
    let url = server.url.clone();
    let (s, _) = http("POST", &format!("{url}/v1/tenants"), Some(&ctl.admin), Some("name: acme".into())).await;
    assert_eq!(s, 201);
    let (s, v) =
        http("POST", &format!("{url}/v1/tenants/acme/tokens"), Some(&ctl.admin), Some("{name: fuzz, role: tenant_admin}".into())).await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    // Requests go to the token's own tenant (others answer 404 before anything else),
    // and to ids that exist nowhere (a generated id must not revoke the token itself).
    let dir = &ctl.env.dir;
    std::fs::write(dir.join("schemathesis.toml"), "[parameters]\ntenant = \"acme\"\nid = \"987654321\"\n").unwrap();
    let har = dir.join("schemathesis.har");
    let st = python().replace("/python", "/st");
    let (toml, har_arg, spec) = (dir.join("schemathesis.toml"), har.clone(), format!("{url}/openapi.json"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .arg("--config-file")
            .arg(toml)
            .args(["run", &spec, "--checks", "not_a_server_error", "--max-examples", "120", "--seed", "1", "--workers", "2"])
            .args(["--header", &format!("Authorization: Bearer {token}"), "--report", "har", "--report-har-path"])
            .arg(har_arg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    let har: Value = serde_json::from_slice(&std::fs::read(&har).expect("schemathesis wrote its HAR file")).unwrap();
    let entries = har["log"]["entries"].as_array().unwrap();
    let errors: Vec<String> = entries
        .iter()
        .filter(|e| e["response"]["status"].as_i64().unwrap_or(0) >= 500)
        .map(|e| format!("{} {} -> {}", e["request"]["method"], e["request"]["url"], e["response"]["status"]))
        .collect();
    assert!(errors.is_empty(), "5xx answers: {errors:?}\n{log}");
    assert!(entries.len() >= 1000, "only {} requests were generated:\n{log}", entries.len());
    assert!(out.status.success(), "schemathesis failed:\n{log}{}", String::from_utf8_lossy(&out.stderr));
}
