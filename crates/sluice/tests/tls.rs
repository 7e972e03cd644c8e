//! TLS to Postgres: a cluster that takes only TLS connections (`hostssl` lines only,
//! a test CA made here with the `openssl` command), reached with libpq's `sslmode`s.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD, TempCluster};
use sluice_postgres::{PgConnConfig, SslMode};

use crate::common::*;

/// A certificate authority, a second one nobody trusts, server certificates for
/// `localhost` and for another name, and a client certificate for role `certuser`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make() -> Pki {
        let dir = tempfile::Builder::new().prefix("sluice-pki-").tempdir().unwrap().keep();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&dir).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, pem, subj) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=sluice test {ca}"));
            run(&[&["req", "-x509"][..], &ec, &["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]].concat());
        }
        let leaf = |name: &str, cn: &str, ext: &str| {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
            run(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")]].concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        };
        let server = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n";
        leaf("server", "localhost", &format!("{server}subjectAltName=DNS:localhost\n"));
        leaf("elsewhere", "db.elsewhere.test", &format!("{server}subjectAltName=DNS:db.elsewhere.test\n"));
        leaf("client", "certuser", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n");
        // The server (run as `postgres` when the tests run as root) reads its files
        // here, and refuses a key others can read.
        let as_root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let owner = if Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success()) { "postgres" } else { "nobody" };
        for f in std::fs::read_dir(&dir).unwrap() {
            let p = f.unwrap().path();
            let mode = if p.extension().is_some_and(|e| e == "key") { 0o600 } else { 0o644 };
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
            if as_root && p.file_name().is_some_and(|n| n == "server.key" || n == "elsewhere.key") {
                assert!(Command::new("chown").arg(owner).arg(&p).status().unwrap().success());
            }
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Pki { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

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
    let pki = Pki::make();
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
