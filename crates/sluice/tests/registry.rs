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
