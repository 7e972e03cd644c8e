//! TLS everywhere: a Postgres cluster that takes only TLS connections (`hostssl` lines
//! only), reached with libpq's `sslmode`s, and a Kafka broker with a SASL_SSL listener
//! (SCRAM-SHA-512); certificates from a test CA made with the `openssl` command.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD, TempCluster};
use sluice_postgres::{PgConnConfig, SslMode};

use crate::common::*;
use sluice_postgres::pki::Pki;

/// Starts a cluster with `ssl = on` whose `pg_hba.conf` has only `hostssl` lines:
/// `certuser` by client certificate, everyone else by password.
async fn tls_cluster(pki: &Pki) -> TempCluster {
    let conf = [
        "ssl = on".to_string(),
        format!("ssl_cert_file = '{}'", pki.path("server.pem").display()),
        format!("ssl_key_file = '{}'", pki.path("server.key").display()),
        format!("ssl_ca_file = '{}'", pki.path("ca.pem").display()),
    ];
    let cluster = tokio::task::spawn_blocking(move || TempCluster::start(&conf.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap()
        .expect("start the TLS cluster");
    std::fs::write(
        cluster.data_dir().join("pg_hba.conf"),
        "local all all trust\nlocal replication all trust\n\
         hostssl all certuser 127.0.0.1/32 cert\n\
         hostssl all all 127.0.0.1/32 scram-sha-256\nhostssl replication all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    let admin = connect(cluster.port, "postgres").await;
    admin.batch_execute("SELECT pg_reload_conf(); CREATE ROLE certuser LOGIN").await.unwrap();
    cluster
}

fn superuser(port: u16, db: &str, mode: SslMode, rootcert: Option<&Path>, host: &str) -> PgConnConfig {
    let mut c = PgConnConfig::new(host, port, SUPERUSER, SUPERUSER_PASSWORD.to_string().into(), db);
    c.sslmode = mode;
    c.sslrootcert = rootcert.map(Path::to_path_buf);
    c
}

/// `sluice check` on a config whose source is `source` (YAML lines): its exit code and
/// stderr.
fn check(env: &Env, source: &str) -> (Option<i32>, String) {
    let pw = SUPERUSER_PASSWORD;
    let text = format!(
        "pipeline: {db}\nsource:\n{source}  user: {SUPERUSER}\n  password: {pw}\n  database: {db}\n  tables: [t]\n\
         sink:\n  postgres:\n    host: 127.0.0.1\n    port: {dp}\n    user: {SUPERUSER}\n    password: {pw}\n    database: {db}\n",
        db = env.db,
        dp = env.dst_port,
    );
    let cfg = env.write_config(&text);
    let out = Command::new(BIN).args(["check", "--config"]).arg(cfg).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_over_verified_tls_snapshots_streams_and_says_why_tls_failed() {
    let pki = Pki::make().expect("make a test CA");
    let cluster = tls_cluster(&pki).await;
    let (_, dst) = clusters();
    let env = Env::on("tls", cluster.port, dst.port).await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY, v text); INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 3000) g;")
        .await
        .unwrap();

    // verify-full by name, with the test CA: snapshot, then the replication stream.
    let ca = pki.path("ca.pem");
    let source = format!(
        "  host: localhost\n  port: {}\n  sslmode: verify-full\n  sslrootcert: {}\n  heartbeat_interval: 500ms\n",
        cluster.port,
        ca.display()
    );
    let pw = SUPERUSER_PASSWORD;
    let cfg = env.write_config(&format!(
        "pipeline: {db}\nsource:\n{source}  user: {SUPERUSER}\n  password: {pw}\n  database: {db}\n  tables: [t]\n\
         sink:\n  postgres:\n    host: 127.0.0.1\n    port: {dp}\n    user: {SUPERUSER}\n    password: {pw}\n    database: {db}\n",
        db = env.db,
        dp = env.dst_port,
    ));
    let mut p = env.spawn(&cfg);
    wait_equal(&env, "t", "id", Duration::from_secs(60)).await;
    src.batch_execute(
        "INSERT INTO t SELECT g, 'streamed ' || g FROM generate_series(3001, 4000) g; UPDATE t SET v = 'changed' WHERE id <= 10;",
    )
    .await
    .unwrap();
    wait_equal(&env, "t", "id", Duration::from_secs(60)).await;
    // Every connection of the pipeline to the source is TLS, the walsender's included
    // (pg_hba.conf would refuse any other, and this says so directly).
    let (walsenders, plain): (i64, i64) = {
        let row = src
            .query_one(
                "SELECT count(*) FILTER (WHERE a.backend_type = 'walsender'), count(*) FILTER (WHERE NOT s.ssl)
                   FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'sluice' OR a.application_name LIKE 'sluice:%'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(walsenders >= 1, "the replication stream is connected");
    assert_eq!(plain, 0, "no connection of the pipeline is without TLS");
    p.assert_running();
    assert_eq!(p.terminate(), Some(0), "{}", p.log());

    // Each failure: a non-zero exit and one line naming the host and the cause.
    let port = cluster.port;
    let other = pki.path("other-ca.pem");
    let (code, err) =
        check(&env, &format!("  host: localhost\n  port: {port}\n  sslmode: verify-full\n  sslrootcert: {}\n", other.display()));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("TLS to localhost:{port} failed")) && err.contains("unknown CA"), "{err}");

    // The authority given inline, as a tenant who may not name files gives it: trusted
    // as the file is; another authority inline fails the same way; text that holds no
    // certificate is refused before anything connects.
    let inline = |pem: &std::path::Path| {
        format!(
            "  host: localhost\n  port: {port}\n  sslmode: verify-full\n  sslrootcert_pem: {:?}\n",
            std::fs::read_to_string(pem).unwrap()
        )
    };
    let (code, err) = check(&env, &inline(&ca));
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = check(&env, &inline(&other));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("TLS to localhost:{port} failed")) && err.contains("unknown CA"), "{err}");
    let (code, err) =
        check(&env, &format!("  host: localhost\n  port: {port}\n  sslmode: verify-full\n  sslrootcert_pem: not a certificate\n"));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("sslrootcert_pem holds no certificate"), "{err}");

    let (code, err) = check(&env, &format!("  host: 127.0.0.1\n  port: {port}\n  sslmode: disable\n"));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("accepts only TLS connections") && err.contains("sslmode"), "{err}");

    let (code, err) = check(&env, &format!("  host: 127.0.0.1\n  port: {port}\n  sslmode: verify-full\n  sslrootcert: {}\n", ca.display()));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("IP address") && err.contains("verify-ca"), "{err}");

    // The target cluster has no TLS at all.
    let (code, err) = check(&env, &format!("  host: localhost\n  port: {}\n  sslmode: require\n", env.dst_port));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not support SSL"), "{err}");

    // verify-ca takes a certificate issued for another name; verify-full does not.
    let admin = connect(port, "postgres").await;
    let swap = |name: &str| {
        let (pem, key) = (pki.path(&format!("{name}.pem")), pki.path(&format!("{name}.key")));
        [
            format!("ALTER SYSTEM SET ssl_cert_file = '{}'", pem.display()),
            format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
            "SELECT pg_reload_conf()".to_string(),
        ]
    };
    for sql in swap("elsewhere") {
        admin.batch_execute(&sql).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, err) = check(&env, &format!("  host: localhost\n  port: {port}\n  sslmode: verify-full\n  sslrootcert: {}\n", ca.display()));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("hostname mismatch") && err.contains("localhost"), "{err}");
    let (code, err) = check(&env, &format!("  host: localhost\n  port: {port}\n  sslmode: verify-ca\n  sslrootcert: {}\n", ca.display()));
    assert_eq!(code, Some(0), "{err}");
    for sql in swap("server") {
        admin.batch_execute(&sql).await.unwrap();
    }

    // Client certificate authentication: `certuser` has no password, only its
    // certificate (pg_hba.conf: cert).
    let mut c = superuser(port, "postgres", SslMode::VerifyFull, Some(&ca), "localhost");
    c.user = "certuser".into();
    c.password = String::new().into();
    let e = sluice_postgres::connect(&c, "the source").await.expect_err("no certificate, no connection");
    assert!(e.to_string().contains("certuser"), "{e}");
    c.sslcert = Some(pki.path("client.pem"));
    c.sslkey = Some(pki.path("client.key"));
    let client = sluice_postgres::connect(&c, "the source").await.unwrap();
    let who: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "certuser");
    let ssl: bool = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl);
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_sink_over_sasl_ssl_is_read_back_by_confluent_client() {
    let pki = Pki::make().expect("make a test CA");
    let keystore = pki.path("kafka-keystore.pem");
    let broker = tokio::task::spawn_blocking(move || {
        sluice_kafka::broker::TempBroker::start_secured(&[], &keystore, &[("sluice", "sluice-secret-1"), ("reader", "reader-secret-2")])
    })
    .await
    .unwrap()
    .expect("start a SASL_SSL broker");
    let secure = broker.secure_addr().unwrap().to_string();
    let env = Env::new("kafka_tls").await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY, v text); INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g;")
        .await
        .unwrap();
    let ca = pki.path("ca.pem");
    let sink = |user: &str, password: &str| {
        format!(
            "    encoding: json\n    properties:\n      security.protocol: SASL_SSL\n      sasl.mechanism: SCRAM-SHA-512\n      \
             sasl.username: {user}\n      sasl.password: {password}\n      ssl.ca.location: {}\n",
            ca.display()
        )
    };
    let cfg = env.kafka_config(&["t"], &secure, &sink("sluice", "sluice-secret-1"), "");
    let mut p = env.spawn(&cfg);
    src.batch_execute("INSERT INTO t SELECT g, 'streamed ' || g FROM generate_series(501, 600) g;").await.unwrap();
    let topic = format!("{}.public.t", env.db);
    let client = serde_json::json!({
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "reader", "sasl.password": "reader-secret-2", "ssl.ca.location": ca,
    });
    let (topics, secure2) = (vec![topic.clone()], secure.clone());
    let recs = tokio::task::spawn_blocking(move || consume_with("confluent-json", &secure2, "", &topics, 600, &client)).await.unwrap();
    let ids: std::collections::BTreeSet<i64> = recs.iter().filter_map(|r| r["value"]["after"]["id"].as_i64()).collect();
    assert_eq!(ids.len(), 600, "every row reached the topic over SASL_SSL");
    let log = p.log();
    assert!(!log.contains("sluice-secret-1"), "the SASL password is never logged");
    p.assert_running();
    assert_eq!(p.terminate(), Some(0), "{}", p.log());

    // Wrong credentials: one line naming the cause, non-zero exit.
    let bad = env.kafka_config(&["t"], &secure, &sink("sluice", "not-the-password"), "");
    let out = Command::new(BIN).args(["check", "--config"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("SASL authentication") || err.contains("Authentication failed"), "{err}");
    assert!(err.contains("sasl.password"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
}
