//! The schema registry, driven by Confluent's Python client.

use std::process::{Command, Stdio};

use crate::common::*;

/// The Python with confluent-kafka that `.ci/install-deps` prepares.
fn python() -> String {
    let venv = std::env::var("SLUICE_VENV").unwrap_or_else(|_| "/var/cache/sluice/venv".into());
    format!("{venv}/bin/python")
}

#[tokio::test(flavor = "multi_thread")]
async fn confluent_python_client_works_unchanged() {
    let env = Env::new("registry").await;
    let (mut server, url) = env.spawn_registry().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/registry_client.py");
    let out = Command::new(python()).arg(script).arg(&url).stderr(Stdio::piped()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    server.assert_running();
    // Durable: what was acknowledged survives kill -9 of the server.
    server.kill9();
    let (mut server, url) = env.spawn_registry().await;
    let mut resp = ureq::get(&format!("{url}/subjects/concurrent-value/versions")).call().unwrap();
    let versions: Vec<i64> = resp.body_mut().read_json().unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
    let mut resp = ureq::get(&format!("{url}/config/concurrent-value")).call().unwrap();
    let config: serde_json::Value = resp.body_mut().read_json().unwrap();
    assert_eq!(config["compatibilityLevel"], "NONE");
    assert_eq!(server.terminate(), Some(0));
}

/// The registry outlives a restart of its database (the next request reconnects), and
/// takes schemas of any size (a 400-column table's is far past a btree entry's 2.7 KB).
#[tokio::test(flavor = "multi_thread")]
async fn registry_reconnects_after_its_database_restarts_and_takes_wide_schemas() {
    let src = sluice_postgres::cluster::TempCluster::start(&[]).unwrap();
    let mut db = sluice_postgres::cluster::TempCluster::start(&[]).unwrap();
    let env = Env::on("registry_restart", src.port, db.port).await;
    let (mut server, url) = env.spawn_registry().await;
    let fields: Vec<String> =
        (0..400).map(|i| format!(r#"{{"name":"column_number_{i}","type":["null","string"],"default":null}}"#)).collect();
    let wide = format!(r#"{{"type":"record","name":"wide","fields":[{}]}}"#, fields.join(","));
    assert!(wide.len() > 20_000);
    let register = |subject: &str, schema: &str| {
        let body = serde_json::json!({ "schema": schema }).to_string();
        ureq::post(&format!("{url}/subjects/{subject}/versions"))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .send(body)
            .map(|mut r| r.body_mut().read_json::<serde_json::Value>().unwrap())
    };
    let first = register("wide-value", &wide).expect("a wide schema registers");
    assert_eq!(register("wide-value", &wide).unwrap()["id"], first["id"], "the same schema gets the same id");
    assert_eq!(register("other-value", &wide).unwrap()["id"], first["id"], "and the same id under another subject");

    db.stop().unwrap();
    db.start_again().unwrap();
    // The first request after the restart may find the old connection dead; it answers
    // 500 at worst, and the next one is served on a new connection.
    let narrow = r#"{"type":"record","name":"narrow","fields":[{"name":"id","type":"long"}]}"#;
    let mut answered = None;
    for _ in 0..3 {
        if let Ok(v) = register("narrow-value", narrow) {
            answered = Some(v);
            break;
        }
    }
    let answered = answered.unwrap_or_else(|| panic!("the registry did not reconnect:\n{}", server.log()));
    assert!(answered["id"].as_i64().unwrap() > first["id"].as_i64().unwrap(), "{answered}");
    assert!(server.log().contains("reconnecting"), "{}", server.log());
    server.assert_running();
    assert_eq!(server.terminate(), Some(0));
}
