//! The schema registry, driven by Confluent's Python client.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The Python with confluent-kafka that `.ci/install-deps` prepares.
fn python() -> String {
    let venv = std::env::var("SLUICE_VENV").unwrap_or_else(|_| "/var/cache/sluice/venv".into());
    format!("{venv}/bin/python")
}

#[tokio::test(flavor = "multi_thread")]
async fn confluent_python_client_works_unchanged() {
    let env = Env::new("registry").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dsn = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        env.dst_port,
        sluice_postgres::cluster::SUPERUSER,
        sluice_postgres::cluster::SUPERUSER_PASSWORD,
        env.db
    );
    let child = Command::new(BIN)
        .args(["registry", "serve", "--addr", &format!("127.0.0.1:{port}")])
        .env("SLUICE_REGISTRY_DATABASE", &dsn)
        .stderr(std::fs::File::create(env.dir.join("registry.log")).unwrap())
        .spawn()
        .unwrap();
    let mut server = Pipeline { child, log: env.dir.join("registry.log") };
    wait_for("the registry to listen", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/registry_client.py");
    let out = Command::new(python()).arg(script).arg(format!("http://127.0.0.1:{port}")).stderr(Stdio::piped()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    server.assert_running();
    // Durable: what was acknowledged survives kill -9 of the server.
    server.kill9();
    let child = Command::new(BIN)
        .args(["registry", "serve", "--addr", &format!("127.0.0.1:{port}")])
        .env("SLUICE_REGISTRY_DATABASE", &dsn)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Pipeline { child, log: env.dir.join("registry.log") };
    wait_for("the registry to listen again", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let mut resp = ureq::get(&format!("http://127.0.0.1:{port}/subjects/concurrent-value/versions")).call().unwrap();
    let versions: Vec<i64> = resp.body_mut().read_json().unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
    let mut resp = ureq::get(&format!("http://127.0.0.1:{port}/config/concurrent-value")).call().unwrap();
    let config: serde_json::Value = resp.body_mut().read_json().unwrap();
    assert_eq!(config["compatibilityLevel"], "NONE");
    assert_eq!(server.terminate(), Some(0));
}
