//! Shared test harness: one source and one target Postgres cluster per test binary,
//! a fresh database pair per test, and the real `sluice` binary run as a child process.
//! Every test shares the clusters, so a test's replication slots are dropped when its
//! [`Env`] is (they would otherwise hold WAL and slot places for the whole run).
#![allow(dead_code)]

pub mod workload;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sluice_postgres::cluster::TempCluster;
use tokio_postgres::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

static CLUSTERS: OnceLock<(TempCluster, TempCluster)> = OnceLock::new();

pub fn clusters() -> &'static (TempCluster, TempCluster) {
    CLUSTERS.get_or_init(|| {
        let conf = ["max_replication_slots = 64", "max_wal_senders = 64", "max_connections = 400"];
        let src = TempCluster::start(&conf).expect("start source cluster");
        let dst = TempCluster::start(&conf).expect("start target cluster");
        (src, dst)
    })
}

pub async fn connect(port: u16, db: &str) -> Client {
    sluice_postgres::cluster::superuser_client(port, db).await.expect("connect")
}

/// A test's own database pair (same name on source and target).
pub struct Env {
    pub src_port: u16,
    pub dst_port: u16,
    pub db: String,
    pub dir: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Env {
    pub async fn new(name: &str) -> Env {
        let (src, dst) = clusters();
        Self::on(name, src.port, dst.port).await
    }

    pub async fn on(name: &str, src_port: u16, dst_port: u16) -> Env {
        let db = format!("{name}_{}", SEQ.fetch_add(1, Ordering::Relaxed));
        for port in [src_port, dst_port] {
            let c = connect(port, "postgres").await;
            c.batch_execute(&format!("CREATE DATABASE {db}")).await.expect("create database");
        }
        let dir = tempfile::Builder::new().prefix("sluice-test-").tempdir().unwrap().keep();
        Env { src_port, dst_port, db, dir }
    }

    /// A superuser connection string for this test's database on `port`.
    pub fn dsn(&self, port: u16) -> String {
        format!(
            "host=127.0.0.1 port={port} user={} password={} dbname={}",
            sluice_postgres::cluster::SUPERUSER,
            sluice_postgres::cluster::SUPERUSER_PASSWORD,
            self.db
        )
    }

    /// The source database as Sluice's own connection config.
    pub fn src_config(&self) -> sluice_postgres::PgConnConfig {
        sluice_postgres::PgConnConfig::new(
            "127.0.0.1",
            self.src_port,
            sluice_postgres::cluster::SUPERUSER,
            sluice_postgres::cluster::SUPERUSER_PASSWORD.to_string().into(),
            &self.db,
        )
    }

    pub async fn src(&self) -> Client {
        connect(self.src_port, &self.db).await
    }

    pub async fn dst(&self) -> Client {
        connect(self.dst_port, &self.db).await
    }

    /// A pipeline config for `tables`; `extra` is appended (more top-level keys).
    pub fn config(&self, tables: &[&str], extra: &str) -> PathBuf {
        let pw = sluice_postgres::cluster::SUPERUSER_PASSWORD;
        let user = sluice_postgres::cluster::SUPERUSER;
        let text = format!(
            "pipeline: {db}\nsource:\n  host: 127.0.0.1\n  port: {sp}\n  user: {user}\n  password: {pw}\n  database: {db}\n  \
             heartbeat_interval: 500ms\n  tables: [{tables}]\nsink:\n  postgres:\n    host: 127.0.0.1\n    port: {dp}\n    \
             user: {user}\n    password: {pw}\n    database: {db}\n{extra}",
            db = self.db,
            sp = self.src_port,
            dp = self.dst_port,
            tables = tables.join(", "),
        );
        let path = self.dir.join(format!("pipeline-{}.yaml", SEQ.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.dir.join(format!("custom-{}.yaml", SEQ.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts `sluice registry serve` on a free port, stored in the target database;
    /// returns the process and its base URL once it listens.
    pub async fn spawn_registry(&self) -> (Pipeline, String) {
        self.spawn_registry_on(self.dst_port).await
    }

    /// [`Env::spawn_registry`] stored in this test's database of the cluster at `db_port`.
    pub async fn spawn_registry_on(&self, db_port: u16) -> (Pipeline, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dsn = self.dsn(db_port);
        let log = self.dir.join(format!("registry-{}.log", SEQ.fetch_add(1, Ordering::Relaxed)));
        let child = Command::new(BIN)
            .args(["registry", "serve", "--addr", &format!("127.0.0.1:{port}")])
            .env("SLUICE_REGISTRY_DATABASE", dsn)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn sluice registry serve");
        wait_for("the registry to listen", Duration::from_secs(20), || async { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() })
            .await;
        (Pipeline { child, log }, format!("http://127.0.0.1:{port}"))
    }

    /// A pipeline config with a Kafka sink (state in the target database); `sink` adds
    /// keys to the `kafka:` block, `extra` top-level keys.
    pub fn kafka_config(&self, tables: &[&str], brokers: &str, sink: &str, extra: &str) -> PathBuf {
        let pw = sluice_postgres::cluster::SUPERUSER_PASSWORD;
        let user = sluice_postgres::cluster::SUPERUSER;
        let text = format!(
            "pipeline: {db}\nsource:\n  host: 127.0.0.1\n  port: {sp}\n  user: {user}\n  password: {pw}\n  database: {db}\n  \
             heartbeat_interval: 500ms\n  tables: [{tables}]\nsink:\n  kafka:\n    brokers: {brokers}\n{sink}    state:\n      \
             host: 127.0.0.1\n      port: {dp}\n      user: {user}\n      password: {pw}\n      database: {db}\n{extra}",
            db = self.db,
            sp = self.src_port,
            dp = self.dst_port,
            tables = tables.join(", "),
        );
        self.write_config(&text)
    }

    /// Starts `sluice run`; logs go to a file read by [`Pipeline::log`].
    pub fn spawn(&self, config: &std::path::Path) -> Pipeline {
        self.spawn_env(config, &[])
    }

    /// [`Env::spawn`] with more environment variables (test hooks).
    pub fn spawn_env(&self, config: &std::path::Path, vars: &[(&str, &str)]) -> Pipeline {
        spawn_sluice(&self.dir, [std::ffi::OsStr::new("run"), "--config".as_ref(), config.as_os_str()], vars)
    }
}

/// Starts the `sluice` binary with `args` (and environment `vars`); its log goes to a
/// new file in `dir`, read by [`Pipeline::log`].
pub fn spawn_sluice<S: AsRef<std::ffi::OsStr>>(
    dir: &std::path::Path,
    args: impl IntoIterator<Item = S>,
    vars: &[(&str, &str)],
) -> Pipeline {
    let log = dir.join(format!("run-{}.log", SEQ.fetch_add(1, Ordering::Relaxed)));
    let child = Command::new(BIN)
        .args(args)
        .envs(vars.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn sluice");
    Pipeline { child, log }
}

pub struct Pipeline {
    pub child: Child,
    pub log: PathBuf,
}

/// The Python interpreter of the test virtualenv (confluent-kafka, kafka-python).
pub fn python() -> String {
    let venv = std::env::var("SLUICE_VENV").unwrap_or_else(|_| "/var/cache/sluice/venv".into());
    format!("{venv}/bin/python")
}

/// Starts a real Apache Kafka broker (single-node KRaft) on a free port; returns it
/// and its `host:port`. It stops when dropped, or when the test process dies.
pub async fn spawn_broker(_dir: &std::path::Path) -> (sluice_kafka::broker::TempBroker, String) {
    let broker = tokio::task::spawn_blocking(|| sluice_kafka::broker::TempBroker::start(&[]))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("start the Kafka broker: {e}"));
    let addr = broker.addr().to_string();
    (broker, addr)
}

/// moto's S3-compatible server (from PyPI), on a free port of 127.0.0.1, with one
/// bucket: object storage that runs here. Path-style URLs, static credentials (moto
/// accepts any). Stopped when dropped.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
}

impl S3Server {
    pub async fn start(dir: &std::path::Path, bucket: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let venv = std::env::var("SLUICE_VENV").unwrap_or_else(|_| "/var/cache/sluice/venv".into());
        let child = Command::new(format!("{venv}/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start moto_server (bash .ci/install-deps installs it): {e}"));
        let server = Self { child, endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.to_string() };
        let url = format!("{}/{bucket}", server.endpoint);
        wait_for("moto's S3 server", Duration::from_secs(30), || async {
            // Creates the bucket once the server answers.
            Command::new(python())
                .args(["-c", "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], method='PUT'))", &url])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .await;
        server
    }

    /// The `s3:` block of an Iceberg sink (indented under `iceberg:`).
    pub fn sink_settings(&self) -> String {
        format!(
            "    s3: {{endpoint: '{}', region: us-east-1, access_key_id: sluice, secret_access_key: sluice-secret, path_style_access: true}}\n",
            self.endpoint
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Apache Iceberg's REST catalog server (Iceberg Java's `RESTCatalogServer`, jars from
/// Maven Central fetched by .ci/install-deps), on a free port, its tables in an SQLite
/// database of the test's directory and their files under `warehouse`. Stopped when
/// dropped.
pub struct RestCatalogServer {
    child: Child,
    pub uri: String,
}

impl RestCatalogServer {
    pub async fn start(dir: &std::path::Path, warehouse: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let jars = std::env::var("SLUICE_ICEBERG_REST").unwrap_or_else(|_| "/var/cache/sluice/iceberg-rest-1.10.0".into());
        let cp = format!("{jars}/iceberg-open-api-1.10.0.jar:{jars}/iceberg-open-api-1.10.0-test-fixtures.jar");
        let log = std::fs::File::create(dir.join("iceberg-rest.log")).unwrap();
        let child = Command::new("java")
            .args(["-Xmx512m", "-cp", &cp, "org.apache.iceberg.rest.RESTCatalogServer"])
            .env("CATALOG_REST_PORT", port.to_string())
            .env("CATALOG_WAREHOUSE", format!("file://{}", warehouse.display()))
            .env("CATALOG_URI", format!("jdbc:sqlite:file:{}", dir.join("iceberg-rest.db").display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start the Iceberg REST catalog (bash .ci/install-deps fetches it): {e}"));
        let server = Self { child, uri: format!("http://127.0.0.1:{port}") };
        wait_for("the Iceberg REST catalog", Duration::from_secs(60), || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        server
    }
}

impl Drop for RestCatalogServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads every record of `topics` with the Python clients (`mode`: `avro` through
/// Confluent's DeserializingConsumer and the registry at `registry`, `json` through
/// kafka-python) and returns them as JSON objects in partition order.
pub fn consume(mode: &str, brokers: &str, registry: &str, topics: &[String], expect_at_least: usize) -> Vec<serde_json::Value> {
    consume_with(mode, brokers, registry, topics, expect_at_least, &serde_json::json!({}))
}

/// [`consume`] with more client settings for confluent-kafka (security, say).
pub fn consume_with(
    mode: &str,
    brokers: &str,
    registry: &str,
    topics: &[String],
    expect_at_least: usize,
    client: &serde_json::Value,
) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/kafka_consume.py");
    let out = Command::new(python())
        .env("KAFKA_CLIENT_CONFIG", client.to_string())
        .arg(script)
        .args([mode, brokers, registry, &expect_at_least.to_string()])
        .args(topics)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "kafka_consume.py failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

impl Pipeline {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics (with the log) if the pipeline exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("pipeline exited with {st}:\n{}", self.log());
        }
    }
}

impl Drop for Env {
    /// Drops the replication slots of this test's databases (best effort, by `psql`:
    /// `Drop` cannot await). The test's pipelines are gone by now: they were declared
    /// after the `Env`, so they were dropped (killed) first.
    fn drop(&mut self) {
        let sql = format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{db}' AND active_pid IS NOT NULL;
             SELECT pg_sleep(0.2);
             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{db}' AND NOT active;",
            db = self.db
        );
        for port in [self.src_port, self.dst_port] {
            let _ = Command::new("psql")
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=0", "-d", &self.dsn(port), "-c", &sql])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns true, or panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Row count and an ordered digest of the table's rows as text; `None` while the
/// table does not exist.
pub async fn try_digest(c: &Client, table: &str, order_by: &str) -> Option<(i64, String)> {
    let row = c
        // The alias is not a column name: a column named like it would stand for the row.
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(digest_row_::text, E'\\n' ORDER BY {order_by})), '') FROM {table} digest_row_"
            ),
            &[],
        )
        .await
        .ok()?;
    Some((row.get(0), row.get(1)))
}

pub async fn digest(c: &Client, table: &str, order_by: &str) -> (i64, String) {
    try_digest(c, table, order_by).await.unwrap_or_else(|| panic!("digest of {table} failed"))
}

/// Waits until the target's copy of `table` equals the source's.
pub async fn wait_equal(env: &Env, table: &str, order_by: &str, limit: Duration) {
    let (src, dst) = (env.src().await, env.dst().await);
    let deadline = Instant::now() + limit;
    loop {
        // A target table that does not exist yet is not equal to an empty one.
        let a = Some(digest(&src, table, order_by).await);
        let b = try_digest(&dst, table, order_by).await;
        if a == b {
            return;
        }
        assert!(Instant::now() < deadline, "{table}: target {b:?} never matched source {a:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `sluice` to completion with a timeout, returning (exit code, stderr).
pub fn run_to_exit(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child =
        Command::new(BIN).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn sluice");
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Waits until a pipeline of `env` streams from its slot (`sluice_<db>`, held active).
pub async fn wait_slot_active(env: &Env, what: &str) {
    let src = env.src().await;
    let slot = format!("sluice_{}", env.db);
    wait_for(what, Duration::from_secs(30), || async {
        src.query_one("SELECT count(*) FROM pg_replication_slots WHERE active AND slot_name = $1", &[&slot]).await.unwrap().get::<_, i64>(0)
            == 1
    })
    .await;
}

/// Waits until the slot confirmed everything written so far (all delivered).
pub async fn wait_caught_up(env: &Env, slot: &str, limit: Duration) {
    let src = env.src().await;
    let target: String = src.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    wait_for("the slot to confirm the source's position", limit, || {
        let (src, target) = (&src, &target);
        async move {
            src.query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, target],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
        }
    })
    .await;
}

/// The `acct` table the at-least-once sinks' kill -9 tests replicate: 300 rows, each
/// with a version that every update bumps, so a lost change shows as a gap.
pub const ACCT_DDL: &str = "CREATE TABLE acct (id int8 PRIMARY KEY, ver int8 NOT NULL, payload text);
     INSERT INTO acct SELECT g, 1, repeat('x', 100) FROM generate_series(1, 300) g;";

/// Writes single-row and multi-row transactions into `acct` for `seconds`: inserts,
/// deletes and updates that bump `ver`. Returns the statements run.
pub fn spawn_acct_writer(env: &Env, seconds: u64) -> tokio::task::JoinHandle<u64> {
    use rand::Rng as _;
    let dsn = env.dsn(env.src_port);
    tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let (mut next_id, mut n) = (1000i64, 0u64);
        while Instant::now() < deadline {
            let (pick, id, k) = {
                let mut rng = rand::rng();
                (rng.random_range(0..10), rng.random_range(1..300i64), rng.random_range(1..20i64))
            };
            let sql = match pick {
                0 => {
                    next_id += 1;
                    format!("INSERT INTO acct VALUES ({next_id}, 1, 'new')")
                }
                1 => format!("DELETE FROM acct WHERE id = {}", id + 1000),
                2 => format!("UPDATE acct SET ver = ver + 1 WHERE id BETWEEN {id} AND {}", id + k),
                _ => format!("UPDATE acct SET ver = ver + 1 WHERE id = {id}"),
            };
            c.batch_execute(&sql).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        n
    })
}

/// Replication slots in this test's source database (a refused config creates none).
pub async fn slot_count(env: &Env) -> i64 {
    env.src().await.query_one("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()", &[]).await.unwrap().get(0)
}

/// An HTTP endpoint on 127.0.0.1 that records every JSON body POSTed to it (alert
/// webhooks).
pub struct HookReceiver {
    pub url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl HookReceiver {
    pub async fn start() -> Self {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = got.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<serde_json::Value>| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(v);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        HookReceiver { url, got }
    }

    pub fn received(&self) -> Vec<serde_json::Value> {
        self.got.lock().unwrap().clone()
    }

    /// Whether an alert `name` arrived with `status` (firing, resolved).
    pub fn has(&self, name: &str, status: &str) -> bool {
        self.received().iter().any(|v| v["alert"] == name && v["status"] == status)
    }
}

/// A DogStatsD listener (UDP on 127.0.0.1) that keeps every line received.
pub struct StatsdListener {
    pub addr: String,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl StatsdListener {
    pub fn start() -> Self {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap().to_string();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                keep.lock().unwrap().extend(text.lines().map(str::to_string));
            }
        });
        StatsdListener { addr, lines }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}
