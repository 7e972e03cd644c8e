//! `sluice server`: the migration-check endpoint, the registry under /registry, OpenAPI.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn migrations_endpoint_and_registry_routes() {
    let env = Env::new("server").await;
    env.src()
        .await
        .batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text); CREATE TABLE scratch (id int PRIMARY KEY, v text); CREATE PUBLICATION sluice_shop FOR TABLE orders;")
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(BIN)
        .args(["server", "--addr", &format!("127.0.0.1:{port}")])
        .env("SLUICE_SOURCE", env.dsn(env.src_port))
        .env("SLUICE_REGISTRY_DATABASE", env.dsn(env.dst_port))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Pipeline { child, log: env.dir.join("none") };
    wait_for("server", Duration::from_secs(20), || async { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() }).await;
    let base = format!("http://127.0.0.1:{port}");
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let post = |body: Value| {
        let mut r = agent.post(&format!("{base}/v1/migrations/check")).send_json(body).unwrap();
        let status = r.status().as_u16();
        (status, r.body_mut().read_json::<Value>().unwrap())
    };

    let (status, v) = post(json!({"sql": "ALTER TABLE orders ALTER COLUMN note SET NOT NULL;", "pipeline": "shop"}));
    assert_eq!(status, 200);
    assert_eq!(v["verdict"], "blocked");
    assert_eq!(v["context"], true);
    assert_eq!(v["files"][0]["statements"][0]["findings"][0]["rule"], "set-not-null");
    let (_, v) = post(json!({"sql": "ALTER TABLE scratch ALTER COLUMN v SET NOT NULL;", "pipeline": "shop"}));
    assert_eq!(v["verdict"], "allowed", "scratch is not replicated");

    let (status, v) = post(json!({"sql": "ALTER TABLE t ADD COLUM x int;", "file": "0042.sql"}));
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "parse_error");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("0042.sql:1:"), "{v}");
    let (status, v) = post(json!({"sql": "-- nothing"}));
    assert_eq!((status, v["error"]["type"].as_str()), (400, Some("empty")));
    let (status, v) = post(json!({"sql": "SELECT 1", "source": "host=elsewhere"}));
    assert_eq!((status, v["error"]["type"].as_str()), (400, Some("invalid_request")), "callers cannot pick a database");

    let mut r = agent.get(&format!("{base}/openapi.json")).call().unwrap();
    let doc: Value = r.body_mut().read_json().unwrap();
    assert!(doc["paths"]["/v1/migrations/check"]["post"].is_object());

    let mut r = agent.get(&format!("{base}/registry/schemas/types")).call().unwrap();
    assert_eq!(r.body_mut().read_json::<Value>().unwrap(), json!(["AVRO"]));
    assert_eq!(server.terminate(), Some(0));
}
