//! The control plane through its real parts: `sluice server` processes on a control
//! database, the API over HTTP, the CLI, real source and target Postgres clusters.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{BIN, Env, Pipeline as Proc, connect, spawn_broker, wait_equal, wait_for};
use crate::common::{HookReceiver, StatsdListener};
use serde_json::Value;

const KEY: &str = "6b1f0f6c2c1e4b8a9d7e5c3a1b2c4d6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c";
const STEPS: &[&str] =
    &["check_source", "create_role", "create_publication", "create_slot", "heartbeat", "prepare_sink", "snapshot", "start"];

pub(crate) struct Ctl {
    pub(crate) env: Env,
    pub(crate) dsn: String,
    pub(crate) admin: String,
}

pub(crate) struct Server {
    pub(crate) proc: Proc,
    pub(crate) url: String,
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Ctl {
    pub(crate) async fn new(name: &str) -> Ctl {
        let env = Env::new(name).await;
        let ctl_db = format!("{}_ctl", env.db);
        connect(env.dst_port, "postgres").await.batch_execute(&format!("CREATE DATABASE {ctl_db}")).await.unwrap();
        let dsn = format!(
            "host=127.0.0.1 port={} user={} password={} dbname={ctl_db}",
            env.dst_port,
            sluice_postgres::cluster::SUPERUSER,
            sluice_postgres::cluster::SUPERUSER_PASSWORD
        );
        let out = Command::new(BIN).arg("bootstrap").env("SLUICE_CONTROL_DATABASE", &dsn).output().unwrap();
        assert!(out.status.success(), "bootstrap: {}", String::from_utf8_lossy(&out.stderr));
        let admin = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(admin.starts_with("slc_"));
        Ctl { env, dsn, admin }
    }

    /// The installation id that prefixes this control plane's object names.
    async fn install(&self) -> String {
        self.control().await.query_one("SELECT id FROM sluice_control.installation", &[]).await.unwrap().get(0)
    }

    pub(crate) async fn control(&self) -> tokio_postgres::Client {
        connect(self.env.dst_port, &format!("{}_ctl", self.env.db)).await
    }

    /// Starts a server (`id` names it in leases) on `port`; `failpoint` kills it there.
    pub(crate) async fn server(&self, id: &str, port: u16, failpoint: Option<&str>) -> Server {
        self.server_env(id, port, failpoint, &[]).await
    }

    /// [`Ctl::server`] with more environment variables.
    pub(crate) async fn server_env(&self, id: &str, port: u16, failpoint: Option<&str>, vars: &[(&str, &str)]) -> Server {
        let log = self.env.dir.join(format!("server-{id}-{}.log", Instant::now().elapsed().as_nanos() ^ u128::from(free_port())));
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--addr", &format!("127.0.0.1:{port}"), "--server-id", id])
            .env("SLUICE_CONTROL_DATABASE", &self.dsn)
            .env("SLUICE_MASTER_KEY", KEY)
            // Everything here runs on this machine: its tenants may reach loopback.
            .env("SLUICE_ALLOW_EGRESS", "loopback")
            .env("RUST_LOG", "info")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(f) = failpoint {
            cmd.env("SLUICE_FAILPOINT", f);
        }
        let child = cmd.spawn().unwrap();
        let mut proc = Proc { child, log };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(_)) = proc.child.try_wait() {
                break; // a failpoint may fire before it listens
            }
            assert!(Instant::now() < deadline, "server did not listen:\n{}", proc.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server { proc, url }
    }

    pub(crate) fn source_yaml(&self, name: &str, user: &str, password: &str) -> String {
        format!(
            "name: {name}\nhost: 127.0.0.1\nport: {}\ndatabase: {}\nadmin_user: {user}\nadmin_password: {password}\nheartbeat_interval: 500ms\n",
            self.env.src_port, self.env.db
        )
    }

    pub(crate) fn sink_yaml(&self, name: &str) -> String {
        format!(
            "name: {name}\npostgres:\n  host: 127.0.0.1\n  port: {}\n  user: {}\n  password: {}\n  database: {}\n",
            self.env.dst_port,
            sluice_postgres::cluster::SUPERUSER,
            sluice_postgres::cluster::SUPERUSER_PASSWORD,
            self.env.db
        )
    }
}

pub(crate) fn superuser_pw() -> &'static str {
    sluice_postgres::cluster::SUPERUSER_PASSWORD
}

pub(crate) async fn call(method: &str, url: &str, token: Option<&str>, body: Option<String>) -> (u16, Value) {
    call_with(&reqwest::Client::new(), method, url, token, body).await
}

/// [`call`] through client `c` (one trusting a test CA, say).
pub(crate) async fn call_with(c: &reqwest::Client, method: &str, url: &str, token: Option<&str>, body: Option<String>) -> (u16, Value) {
    let mut req = c.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/yaml").body(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Runs a CLI command against `url`; returns (exit code, stdout, stderr).
pub(crate) fn cli(url: &str, token: &str, tenant: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).env("SLUICE_URL", url).env("SLUICE_TOKEN", token).env("SLUICE_TENANT", tenant).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

async fn workflow_state(url: &str, token: &str, tenant: &str, id: i64) -> Value {
    call("GET", &format!("{url}/v1/tenants/{tenant}/workflows/{id}"), Some(token), None).await.1
}

pub(crate) async fn wait_workflow(url: &str, token: &str, tenant: &str, id: i64, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let w = workflow_state(url, token, tenant, id).await;
        match w["state"].as_str() {
            Some("succeeded") => return w,
            Some("failed" | "cancelled") => panic!("workflow {id} ended: {w:#}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "workflow {id} did not finish: {w:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (slots, publications, roles) of this installation in the source.
async fn source_objects(ctl: &Ctl) -> (Vec<String>, Vec<String>, Vec<String>) {
    let env = &ctl.env;
    let prefix = format!("sluice_{}_p%", ctl.install().await);
    let c = connect(env.src_port, &env.db).await;
    let list = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>();
    (
        list(
            c.query("SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database() ORDER BY 1", &[]).await.unwrap(),
        ),
        list(c.query("SELECT pubname::text FROM pg_publication ORDER BY 1", &[]).await.unwrap()),
        list(c.query("SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1 ORDER BY 1", &[&prefix]).await.unwrap()),
    )
}

/// Tenant `t` with a tenant-admin token, a source and a sink; returns the token.
async fn tenant_with_resources(ctl: &Ctl, url: &str, t: &str) -> String {
    let (s, _) = call("POST", &format!("{url}/v1/tenants"), Some(&ctl.admin), Some(format!("name: {t}"))).await;
    assert_eq!(s, 201);
    let (s, v) =
        call("POST", &format!("{url}/v1/tenants/{t}/tokens"), Some(&ctl.admin), Some("{name: ops, role: tenant_admin}".into())).await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let (s, v) =
        call("POST", &format!("{url}/v1/tenants/{t}/sources"), Some(&token), Some(ctl.source_yaml("main", "postgres", superuser_pw())))
            .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call("POST", &format!("{url}/v1/tenants/{t}/sinks"), Some(&token), Some(ctl.sink_yaml("replica"))).await;
    assert_eq!(s, 201, "{v}");
    token
}

async fn create_orders(env: &Env, table: &str, rows: i64) {
    env.src()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int8 PRIMARY KEY, customer text NOT NULL, amount numeric(12,2));
             INSERT INTO {table} SELECT g, 'c' || g, g / 10.0 FROM generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
}

/// A pipeline created through the CLI replicates a workload, survives kill -9 of its
/// server, pauses and resumes, runs as a least-privilege role, and its teardown leaves
/// nothing in the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_through_the_cli_replicates_survives_a_restart_and_tears_down_cleanly() {
    let ctl = Ctl::new("ctl_life").await;
    let env = &ctl.env;
    create_orders(env, "orders", 5000).await;
    env.src().await.batch_execute("CREATE TABLE secrets (id int PRIMARY KEY, s text)").await.unwrap();
    let port = free_port();
    let mut server = ctl.server("s1", port, None).await;
    let url = server.url.clone();
    let (code, _, err) = cli(&url, &ctl.admin, "", &["tenants", "create", "shop"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(&url, &ctl.admin, "shop", &["tokens", "create", "ci", "--role", "tenant_admin", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let token = serde_json::from_str::<Value>(&out).unwrap()["token"].as_str().unwrap().to_string();
    let src = env.write_config(&ctl.source_yaml("main", "postgres", superuser_pw()));
    let sink = env.write_config(&ctl.sink_yaml("replica"));
    assert_eq!(cli(&url, &token, "shop", &["sources", "create", "-f", src.to_str().unwrap()]).0, 0);
    assert_eq!(cli(&url, &token, "shop", &["sinks", "create", "-f", sink.to_str().unwrap()]).0, 0);
    let p = env.write_config("name: orders\nsource: main\nsink: replica\ntables: [public.orders]\n");
    let (code, out, err) = cli(&url, &token, "shop", &["pipelines", "create", "-f", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}\n{}", server.proc.log());
    assert!(err.contains("create_slot") && err.contains("snapshot"), "progress per step: {err}");
    wait_equal(env, "orders", "id", Duration::from_secs(60)).await;

    // The pipeline runs as its own role: replication, SELECT on its tables only.
    let s = env.src().await;
    let r = s
        .query_one(
            "SELECT rolname::text, rolsuper, rolreplication, has_table_privilege(oid, 'public.orders', 'SELECT'),
                    has_table_privilege(oid, 'public.secrets', 'SELECT'), has_table_privilege(oid, 'public.orders', 'INSERT')
             FROM pg_roles WHERE rolname LIKE $1",
            &[&format!("sluice_{}_p%", ctl.install().await)],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, bool>(1), r.get::<_, bool>(2), r.get::<_, bool>(3), r.get::<_, bool>(4), r.get::<_, bool>(5)),
        (false, true, true, false, false)
    );
    let role: String = r.get(0);
    // The snapshot is in the target before streaming starts: wait for the walsender.
    wait_for("the walsender to run as the pipeline's role", Duration::from_secs(15), || async {
        let users: i64 = s.query_one("SELECT count(*) FROM pg_stat_replication WHERE usename = $1", &[&role]).await.unwrap().get(0);
        users == 1
    })
    .await;

    // Changes while the server is killed and restarted: nothing lost, nothing twice.
    let writer = tokio::spawn({
        let s = env.src().await;
        async move {
            for i in 0..60 {
                s.batch_execute(&format!(
                    "BEGIN; INSERT INTO orders VALUES ({id}, 'new', 1); UPDATE orders SET amount = amount + 1 WHERE id = {u}; DELETE FROM orders WHERE id = {d}; COMMIT;",
                    id = 100_000 + i, u = 1 + i * 7, d = 2 + i * 11
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.proc.kill9();
    // The master key is rotated while the server is down: every stored secret is
    // re-sealed under the new key, and the restarted server has only the new key.
    let rotated = rotate_keys(&ctl, NEW_KEY, KEY);
    assert_eq!(rotated["key_id"].as_str().map(str::len), Some(8), "{rotated}");
    let resealed =
        |table: &str| rotated["tables"].as_array().unwrap().iter().find(|t| t["table"] == table).map(|t| t["resealed"].as_u64().unwrap());
    assert_eq!((resealed("sources"), resealed("sinks"), resealed("pipelines")), (Some(1), Some(1), Some(1)), "{rotated}");
    let again = rotate_keys(&ctl, NEW_KEY, KEY);
    assert!(again["tables"].as_array().unwrap().iter().all(|t| t["resealed"] == 0), "a second rotation has nothing to do: {again}");
    let mut server = ctl.server_env("s1", port, None, &[("SLUICE_MASTER_KEY", NEW_KEY)]).await;
    writer.await.unwrap();
    wait_equal(env, "orders", "id", Duration::from_secs(60)).await;
    let (code, out, _) = cli(&url, &token, "shop", &["pipelines", "show", "orders", "--output", "json"]);
    assert_eq!(code, 0);
    let show: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(show["desired"], "running");
    assert_eq!(show["server"], "s1");
    wait_for("status published", Duration::from_secs(10), || async {
        let (_, out, _) = cli(&url, &token, "shop", &["pipelines", "show", "orders", "--output", "json"]);
        serde_json::from_str::<Value>(&out).unwrap()["status"]["events"].as_u64().unwrap_or(0) > 0
    })
    .await;

    // Pause: streaming stops, the slot keeps the position; resume catches up.
    let (code, out, err) = cli(&url, &token, "shop", &["pipelines", "pause", "orders", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let wf = serde_json::from_str::<Value>(&out).unwrap()["workflow"].as_i64().unwrap();
    wait_workflow(&url, &token, "shop", wf, Duration::from_secs(60)).await;
    s.batch_execute("INSERT INTO orders VALUES (900001, 'while paused', 5)").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dst = env.dst().await;
    assert_eq!(dst.query_one("SELECT count(*) FROM orders WHERE id = 900001", &[]).await.unwrap().get::<_, i64>(0), 0, "paused");
    let (code, out, _) = cli(&url, &token, "shop", &["pipelines", "resume", "orders", "--output", "json"]);
    assert_eq!(code, 0);
    let wf = serde_json::from_str::<Value>(&out).unwrap()["workflow"].as_i64().unwrap();
    wait_workflow(&url, &token, "shop", wf, Duration::from_secs(60)).await;
    wait_equal(env, "orders", "id", Duration::from_secs(60)).await;

    // Workflows are listed with their step history.
    let (code, out, _) = cli(&url, &token, "shop", &["workflows", "show", "1"]);
    assert_eq!(code, 0);
    for step in STEPS {
        assert!(out.contains(step), "{step} in history:\n{out}");
    }

    // Teardown with purge: no slot, publication or role left; the target table gone.
    let (code, out, err) = cli(&url, &token, "shop", &["pipelines", "delete", "orders", "--purge", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let wf = serde_json::from_str::<Value>(&out).unwrap()["workflow"].as_i64().unwrap();
    wait_workflow(&url, &token, "shop", wf, Duration::from_secs(90)).await;
    let (slots, pubs, roles) = source_objects(&ctl).await;
    assert!(slots.is_empty() && pubs.is_empty() && roles.is_empty(), "left behind: {slots:?} {pubs:?} {roles:?}");
    assert!(dst.query_one("SELECT to_regclass('public.orders') IS NULL", &[]).await.unwrap().get::<_, bool>(0));
    let (s404, _) = call("GET", &format!("{url}/v1/tenants/shop/pipelines/orders"), Some(&token), None).await;
    assert_eq!(s404, 404);
    // The admin password never left the server: not in answers, logs or the clear columns.
    let (_, v) = call("GET", &format!("{url}/v1/tenants/shop/sources/main"), Some(&token), None).await;
    assert!(!v.to_string().contains(superuser_pw()));
    assert!(!server.proc.log().contains(superuser_pw()));
    let c = ctl.control().await;
    let leaked: i64 = c
        .query_one(
            "SELECT count(*) FROM sluice_control.sources WHERE spec::text LIKE '%' || $1 || '%' OR position(convert_to($1, 'UTF8') in sealed) > 0",
            &[&superuser_pw()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0, "passwords are sealed at rest");
    // A sealed value is bound to its row: copied into another, it does not open, and
    // a rotation that meets it changes nothing.
    c.execute("UPDATE sluice_control.sinks SET sealed = (SELECT sealed FROM sluice_control.sources LIMIT 1)", &[]).await.unwrap();
    let before: Vec<u8> = c.query_one("SELECT sealed FROM sluice_control.sources", &[]).await.unwrap().get(0);
    let out = Command::new(BIN)
        .args(["keys", "rotate"])
        .env("SLUICE_CONTROL_DATABASE", &ctl.dsn)
        .env("SLUICE_MASTER_KEY", "33".repeat(32))
        .env("SLUICE_MASTER_KEY_PREVIOUS", NEW_KEY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("sinks \"replica\"") && err.contains("another row"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let after: Vec<u8> = c.query_one("SELECT sealed FROM sluice_control.sources", &[]).await.unwrap().get(0);
    assert_eq!(before, after, "nothing re-sealed");
    assert_eq!(server.proc.terminate(), Some(0));
}

const NEW_KEY: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

/// `sluice keys rotate --output json` to `current`, opening values under `previous`.
fn rotate_keys(ctl: &Ctl, current: &str, previous: &str) -> Value {
    let out = Command::new(BIN)
        .args(["keys", "rotate", "--output", "json"])
        .env("SLUICE_CONTROL_DATABASE", &ctl.dsn)
        .env("SLUICE_MASTER_KEY", current)
        .env("SLUICE_MASTER_KEY_PREVIOUS", previous)
        .output()
        .unwrap();
    assert!(out.status.success(), "keys rotate: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The server is killed (SIGKILL) at every provisioning step, once after the step's
/// effect but before its record and once right after its record; each restart resumes
/// the workflow, which completes with one of each object and every step recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_survives_a_kill_at_every_step() {
    let ctl = Ctl::new("ctl_crash").await;
    let env = &ctl.env;
    create_orders(env, "orders", 3000).await;
    let port = free_port();
    let mut server = ctl.server("s1", port, None).await;
    let url = server.url.clone();
    let token = tenant_with_resources(&ctl, &url, "team").await;
    server.proc.terminate();
    // Created while no server runs: the workflow waits, and each server below takes
    // it one step further before it is killed.
    let server = ctl.server("s1", port, None).await;
    let (s, v) = call(
        "POST",
        &format!("{url}/v1/tenants/team/pipelines"),
        Some(&token),
        Some("{name: orders, source: main, sink: replica, tables: [orders]}".into()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let wf = v["workflow"].as_i64().unwrap();
    drop(server); // kill -9 (Drop), likely before it starts the first step
    for step in STEPS {
        for when in ["kill-before-record", "kill-after"] {
            let fp = format!("{when}:provision.{step}");
            let mut s = ctl.server("s1", port, Some(&fp)).await;
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if let Ok(Some(st)) = s.proc.child.try_wait() {
                    assert!(st.code().is_none(), "killed by a signal at {fp}: {st}\n{}", s.proc.log());
                    break;
                }
                assert!(Instant::now() < deadline, "failpoint {fp} never fired:\n{}", s.proc.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(s.proc.log().contains(&fp), "{}", s.proc.log());
        }
    }
    let mut server = ctl.server("s1", port, None).await;
    let w = wait_workflow(&url, &token, "team", wf, Duration::from_secs(60)).await;
    // Every step ran to success once after its recorded success; the kills before the
    // record show as attempts that never ended.
    let history = w["history"].as_array().unwrap();
    for step in STEPS {
        let ok = history.iter().filter(|h| h["step"] == *step && h["outcome"] == "succeeded").count();
        assert_eq!(ok, 1, "{step}: {history:#?}");
        let attempts = history.iter().filter(|h| h["step"] == *step).count();
        assert!(attempts >= 2, "{step} was re-run after the kill before its record: {history:#?}");
    }
    let (slots, pubs, roles) = source_objects(&ctl).await;
    assert_eq!((slots.len(), pubs.len(), roles.len()), (1, 1, 1), "{slots:?} {pubs:?} {roles:?}");
    env.src().await.batch_execute("UPDATE orders SET amount = 0 WHERE id <= 10; INSERT INTO orders VALUES (5001, 'x', 1)").await.unwrap();
    wait_equal(env, "orders", "id", Duration::from_secs(60)).await;
    let dup: i64 = env.dst().await.query_one("SELECT count(*) - count(DISTINCT id) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(dup, 0);
    server.proc.terminate();
}

/// Two servers on one control database: the one running the pipelines is killed; the
/// other continues them from their checkpoints within 30 s, and no slot ever has two
/// readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_servers_pipelines_move_to_the_other_within_30s() {
    let ctl = Ctl::new("ctl_ha").await;
    let env = &ctl.env;
    let (pa, pb) = (free_port(), free_port());
    let mut a = ctl.server("a", pa, None).await;
    let url = a.url.clone();
    let token = tenant_with_resources(&ctl, &url, "team").await;
    let mut wfs = Vec::new();
    for i in 0..3 {
        create_orders(env, &format!("t{i}"), 1000).await;
        let (s, v) = call(
            "POST",
            &format!("{url}/v1/tenants/team/pipelines"),
            Some(&token),
            Some(format!("{{name: p{i}, source: main, sink: replica, tables: [t{i}]}}")),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        wfs.push(v["workflow"].as_i64().unwrap());
    }
    for wf in wfs {
        wait_workflow(&url, &token, "team", wf, Duration::from_secs(60)).await;
    }
    let b = ctl.server("b", pb, None).await;
    let owners = || async {
        let (_, v) = call("GET", &format!("{}/v1/tenants/team/pipelines", b.url), Some(&token), None).await;
        v["pipelines"].as_array().unwrap().iter().map(|p| p["server"].as_str().unwrap_or("-").to_string()).collect::<Vec<_>>()
    };
    wait_for("all pipelines running", Duration::from_secs(30), || async { owners().await.iter().all(|o| o != "-") }).await;
    let before = owners().await;
    let victim_is_a = before.iter().any(|o| o == "a");
    // Writes keep coming; the server holding (some of) the pipelines dies.
    let writer = tokio::spawn({
        let s = env.src().await;
        async move {
            for i in 0..150 {
                let t = i % 3;
                s.batch_execute(&format!(
                    "INSERT INTO t{t} VALUES ({}, 'w', 1); UPDATE t{t} SET amount = amount + 1 WHERE id = {};",
                    10_000 + i,
                    1 + i
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (survivor, survivor_url) = if victim_is_a {
        a.proc.kill9();
        ("b", b.url.clone())
    } else {
        ("a", a.url.clone())
    };
    let killed_at = Instant::now();
    let mut b = b;
    if !victim_is_a {
        b.proc.kill9();
    }
    let src = env.src().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Never two readers on one slot.
        let most: i64 = src
            .query_one("SELECT coalesce(max(n), 0) FROM (SELECT count(*) n FROM pg_stat_replication GROUP BY application_name) x", &[])
            .await
            .unwrap()
            .get(0);
        assert!(most <= 1, "a slot has two readers");
        let (_, v) = call("GET", &format!("{survivor_url}/v1/tenants/team/pipelines"), Some(&token), None).await;
        let moved = v["pipelines"].as_array().unwrap().iter().all(|p| p["server"] == survivor && p["status"]["server"] == survivor);
        let streaming: i64 = src
            .query_one("SELECT count(*) FROM pg_replication_slots WHERE active AND database = current_database()", &[])
            .await
            .unwrap()
            .get(0);
        if moved && streaming == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "pipelines did not move to {survivor} within 30 s: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("pipelines moved to {survivor} after {:?}", killed_at.elapsed());
    writer.await.unwrap();
    for i in 0..3 {
        wait_equal(env, &format!("t{i}"), "id", Duration::from_secs(60)).await;
    }
}

/// Every tenant route, walked from the OpenAPI document: another tenant's token gets
/// 404 for each (read, list, change, delete), a viewer cannot change anything, no token
/// gets 401, and tenant A's resources are unchanged afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_on_every_route() {
    let ctl = Ctl::new("ctl_iso").await;
    let env = &ctl.env;
    create_orders(env, "orders", 100).await;
    let mut server = ctl.server("s1", free_port(), None).await;
    let url = server.url.clone();
    let a = tenant_with_resources(&ctl, &url, "alpha").await;
    let b = tenant_with_resources(&ctl, &url, "beta").await;
    let (s, v) = call(
        "POST",
        &format!("{url}/v1/tenants/alpha/pipelines"),
        Some(&a),
        Some("{name: orders, source: main, sink: replica, tables: [orders]}".into()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let wf = v["workflow"].as_i64().unwrap();
    wait_workflow(&url, &a, "alpha", wf, Duration::from_secs(60)).await;
    let (_, v) = call("POST", &format!("{url}/v1/tenants/alpha/tokens"), Some(&a), Some("{name: look, role: tenant_viewer}".into())).await;
    let viewer = v["token"].as_str().unwrap().to_string();
    let viewer_id = v["id"].as_i64().unwrap();
    let enricher = "{name: derived, expression: {fields: [{name: x2, expr: 'id * 2', type: int}]}}";
    let (s, v) = call("POST", &format!("{url}/v1/tenants/alpha/enrichers"), Some(&a), Some(enricher.into())).await;
    assert_eq!(s, 201, "{v}");
    let (ka, kb) = crate::mirror::brokers().await;
    crate::mirror::py_async(["create", &ka, "iso_orders", "1"].map(String::from).to_vec()).await;
    let mirror = format!(
        "{{name: orders, source: {{kafka: {{cluster: a, brokers: '{ka}', topics: [iso_orders]}}}}, sink: {{kafka: {{cluster: b, brokers: '{kb}'}}}}}}"
    );
    let (s, v) = call("POST", &format!("{url}/v1/tenants/alpha/mirrors"), Some(&a), Some(mirror.clone())).await;
    assert_eq!(s, 201, "{v}");
    let before = call("GET", &format!("{url}/v1/tenants/alpha/pipelines"), Some(&a), None).await.1;

    let (_, doc) = call("GET", &format!("{url}/openapi.json"), None, None).await;
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/tenants/{tenant}") {
            continue;
        }
        let section = path.split('/').nth(4).unwrap_or("");
        let concrete = path
            .replace("{tenant}", "alpha")
            .replace(
                "{name}",
                match section {
                    "sources" => "main",
                    "sinks" => "replica",
                    "enrichers" => "derived",
                    _ => "orders",
                },
            )
            .replace("{id}", &if section == "tokens" { viewer_id } else { wf }.to_string())
            .replace("{group}", "g");
        for method in item.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            let body = match section {
                "sources" => Some(ctl.source_yaml("main", "postgres", superuser_pw())),
                "sinks" => Some(ctl.sink_yaml("replica")),
                "enrichers" => Some(enricher.into()),
                "pipelines" => Some("{name: orders, source: main, sink: replica, tables: [orders]}".into()),
                "mirrors" => Some(mirror.clone()),
                "tokens" => Some("{name: x, role: tenant_admin}".into()),
                _ => None,
            };
            let (s, v) = call(&m, &format!("{url}{concrete}"), Some(&b), body.clone()).await;
            assert_eq!(s, 404, "{m} {concrete} with another tenant's token: {v}");
            assert!(!v.to_string().contains("main\""), "nothing of alpha's leaks: {v}");
            let (s, _) = call(&m, &format!("{url}{concrete}"), None, body.clone()).await;
            assert_eq!(s, 401, "{m} {concrete} without a token");
            if m != "GET" {
                let (s, v) = call(&m, &format!("{url}{concrete}"), Some(&viewer), body).await;
                assert_eq!(s, 403, "{m} {concrete} with a viewer token: {v}");
            } else {
                let (s, v) = call(&m, &format!("{url}{concrete}"), Some(&viewer), None).await;
                assert_eq!(s, 200, "{m} {concrete} with a viewer token: {v}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 33, "walked {checked} tenant routes");
    // The tenant list shows a tenant token its own tenant only; creating tenants is
    // for platform admins.
    let (_, v) = call("GET", &format!("{url}/v1/tenants"), Some(&b), None).await;
    assert_eq!(v["tenants"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(call("POST", &format!("{url}/v1/tenants"), Some(&b), Some("name: gamma".into())).await.0, 403);
    // Nothing of alpha's changed.
    let after = call("GET", &format!("{url}/v1/tenants/alpha/pipelines"), Some(&a), None).await.1;
    assert_eq!(before["pipelines"][0]["spec"], after["pipelines"][0]["spec"]);
    assert_eq!(after["pipelines"][0]["desired"], "running");
    let (s, v) = call("GET", &format!("{url}/v1/tenants/alpha/mirrors/orders"), Some(&a), None).await;
    assert_eq!((s, v["desired"].as_str()), (200, Some("running")), "{v}");
    assert_eq!(call("GET", &format!("{url}/v1/tenants/alpha/sources/main"), Some(&a), None).await.0, 200);
    assert_eq!(call("GET", &format!("{url}/v1/tenants/alpha/tokens"), Some(&a), None).await.1["tokens"].as_array().unwrap().len(), 2);
    let (slots, _, _) = source_objects(&ctl).await;
    assert_eq!(slots.len(), 1);
    // /metrics: per pipeline, labelled with its tenant; each tenant sees its own only.
    let scrape = |token: Option<String>| {
        let url = format!("{url}/metrics");
        async move {
            let mut req = reqwest::Client::new().get(url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let sample = r#"sluice_events_total{pipeline="orders",tenant="alpha",sink="postgres"}"#;
    env.src().await.batch_execute("INSERT INTO orders VALUES (100001, 'scraped', 1)").await.unwrap();
    wait_for("alpha's pipeline in /metrics", Duration::from_secs(20), || async {
        let (s, text) = scrape(Some(a.clone())).await;
        s == 200 && text.lines().any(|l| l.starts_with(sample) && !l.ends_with(" 0"))
    })
    .await;
    let (s, text) = scrape(Some(ctl.admin.clone())).await;
    assert!(s == 200 && text.contains(sample), "a platform admin sees every pipeline: {text}");
    let (s, text) = scrape(Some(b.clone())).await;
    assert!(s == 200 && !text.contains("alpha"), "beta sees nothing of alpha's: {text}");
    assert!(text.contains("# TYPE sluice_events_total counter"), "{text}");
    assert_eq!(scrape(None).await.0, 401, "/metrics without a token");
    server.proc.terminate();
}

/// Bad input is refused with a clear error naming the field, and nothing is created:
/// no pipeline, no workflow, nothing in the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_field_and_nothing_is_created() {
    let ctl = Ctl::new("ctl_bad").await;
    let env = &ctl.env;
    create_orders(env, "orders", 10).await;
    env.src().await.batch_execute("CREATE ROLE weak LOGIN PASSWORD 'weak-pw'; GRANT SELECT ON orders TO weak").await.unwrap();
    let mut server = ctl.server("s1", free_port(), None).await;
    let url = server.url.clone();
    let t = tenant_with_resources(&ctl, &url, "team").await;
    let post = |path: &str, body: &str| {
        let (url, t, path, body) = (url.clone(), t.clone(), path.to_string(), body.to_string());
        async move { call("POST", &format!("{url}/v1/tenants/team/{path}"), Some(&t), Some(body)).await }
    };
    let expect = |r: (u16, Value), status: u16, kind: &str, field: Option<&str>, words: &str| {
        assert_eq!(r.0, status, "{}", r.1);
        assert_eq!(r.1["error"]["type"], kind, "{}", r.1);
        if let Some(f) = field {
            assert_eq!(r.1["error"]["field"], f, "{}", r.1);
        }
        let m = r.1["error"]["message"].as_str().unwrap();
        assert!(m.contains(words) && !m.contains('\n'), "{m}");
    };
    expect(post("sources", "{name: x, host: [").await, 422, "invalid_source", None, "");
    expect(
        post("sources", &ctl.source_yaml("x", "postgres", "p").replace("host:", "hots: h\nhost:")).await,
        422,
        "invalid_source",
        None,
        "unknown field `hots`",
    );
    expect(
        post("sources", &ctl.source_yaml("x", "postgres", "p").replace(&env.src_port.to_string(), "1")).await,
        422,
        "source_unreachable",
        Some("host"),
        "check host, port",
    );
    expect(post("sources", &ctl.source_yaml("Bad Name", "postgres", "p")).await, 422, "invalid_source", Some("name"), "a-z");
    expect(
        post("sinks", "{name: s2, postgres: {host: h, user: u, password: p, database: d, prot: 1}}").await,
        422,
        "invalid_sink",
        None,
        "unknown field `prot`",
    );
    expect(
        post("sinks", "{name: s2, kafka: {brokers: b, state: {host: h, user: u, password: p, database: d}}}").await,
        422,
        "invalid_sink",
        Some("kafka.registry_url"),
        "registry",
    );
    expect(
        post("pipelines", "{name: p, source: main, sink: replica, tables: [nope]}").await,
        422,
        "invalid_pipeline",
        Some("tables"),
        "not found",
    );
    expect(
        post("pipelines", "{name: p, source: nope, sink: replica, tables: [orders]}").await,
        422,
        "invalid_pipeline",
        Some("source"),
        "no source named",
    );
    expect(
        post("pipelines", "{name: p, source: main, sink: replica, tables: [orders], transforms: [{cast: {fields: {nope: int}}}]}").await,
        422,
        "invalid_pipeline",
        Some("transforms"),
        "nope",
    );
    expect(
        post("pipelines", "{name: p, source: main, sink: replica, tables: [orders], tabels: []}").await,
        422,
        "invalid_pipeline",
        None,
        "unknown field `tabels`",
    );
    // Provisioning needs an admin that can create roles and owns the tables.
    assert_eq!(post("sources", &ctl.source_yaml("weakdb", "weak", "weak-pw")).await.0, 201);
    expect(
        post("pipelines", "{name: p, source: weakdb, sink: replica, tables: [orders]}").await,
        422,
        "insufficient_privileges",
        Some("source"),
        "CREATEROLE REPLICATION",
    );
    // The CLI: one line, non-zero exit.
    let bad = env.write_config("name: p\nsource: weakdb\nsink: replica\ntables: [orders]\n");
    let (code, _, err) = cli(&url, &t, "team", &["pipelines", "create", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.starts_with("error: ") && err.trim().lines().count() == 1 && err.contains("CREATEROLE"), "{err}");
    let broken = env.write_config("name: p\nsource: [\n");
    let (code, _, err) = cli(&url, &t, "team", &["pipelines", "create", "-f", broken.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not valid YAML") && err.trim().lines().count() == 1, "{err}");
    // Nothing half-created.
    let c = ctl.control().await;
    let n: i64 = c
        .query_one("SELECT (SELECT count(*) FROM sluice_control.pipelines) + (SELECT count(*) FROM sluice_control.workflows)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let (slots, pubs, roles) = source_objects(&ctl).await;
    assert!(slots.is_empty() && pubs.is_empty() && roles.is_empty());
    // A server without its master key refuses to start, in one line.
    let out = Command::new(BIN)
        .args(["server", "--addr", "127.0.0.1:0"])
        .env("SLUICE_CONTROL_DATABASE", &ctl.dsn)
        .env_remove("SLUICE_MASTER_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("SLUICE_MASTER_KEY") && err.trim().lines().count() == 1, "{err}");
    server.proc.terminate();
}

/// A source without `wal_level=logical`: provisioning sets it (ALTER SYSTEM), reports
/// that a restart is needed, waits with backoff, and completes once Postgres restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_sets_wal_level_and_waits_for_the_restart() {
    let mut replica_only =
        tokio::task::spawn_blocking(|| sluice_postgres::cluster::TempCluster::start(&["wal_level = replica"]).unwrap()).await.unwrap();
    let (_, dst) = crate::common::clusters();
    let env = Env::on("ctl_wal", replica_only.port, dst.port).await;
    let ctl = Ctl::new("ctl_wal_ctl").await;
    // This test's source is the replica-only cluster; the control database and sink
    // stay where `Ctl` put them.
    let ctl = Ctl { env: Env { src_port: env.src_port, dst_port: env.dst_port, db: env.db.clone(), dir: env.dir.clone() }, ..ctl };
    create_orders(&ctl.env, "orders", 100).await;
    let mut server = ctl.server("s1", free_port(), None).await;
    let url = server.url.clone();
    let token = tenant_with_resources(&ctl, &url, "team").await;
    let (s, v) = call(
        "POST",
        &format!("{url}/v1/tenants/team/pipelines"),
        Some(&token),
        Some("{name: orders, source: main, sink: replica, tables: [orders]}".into()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let wf = v["workflow"].as_i64().unwrap();
    wait_for("the restart to be asked for", Duration::from_secs(30), || async {
        let w = workflow_state(&url, &token, "team", wf).await;
        w["state"] == "retrying" && w["error"].as_str().is_some_and(|e| e.contains("restart Postgres"))
    })
    .await;
    let setting: String = connect(replica_only.port, "postgres")
        .await
        .query_one("SELECT setting FROM pg_file_settings WHERE name = 'wal_level' AND sourcefile LIKE '%auto.conf'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, "logical");
    let _restarted = tokio::task::spawn_blocking(move || {
        replica_only.stop().unwrap();
        replica_only.start_again().unwrap();
        replica_only
    })
    .await
    .unwrap();
    wait_workflow(&url, &token, "team", wf, Duration::from_secs(90)).await;
    wait_equal(&ctl.env, "orders", "id", Duration::from_secs(60)).await;
    server.proc.terminate();
}

/// Resync through the API and the CLI: a drifted target is brought back to the source
/// while the pipeline streams; bad requests are refused with a field; a paused pipeline
/// refuses it. A Kafka pipeline's teardown with purge removes its topics and subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_through_the_cli_and_kafka_purge() {
    let ctl = Ctl::new("ctl_resync").await;
    let env = &ctl.env;
    create_orders(env, "orders", 20_000).await;
    let statsd = StatsdListener::start();
    let vars = [("SLUICE_DOGSTATSD", statsd.addr.as_str()), ("SLUICE_DOGSTATSD_INTERVAL", "1s")];
    let server = ctl.server_env("s1", free_port(), None, &vars).await;
    let url = server.url.clone();
    let token = tenant_with_resources(&ctl, &url, "shop").await;
    let p = env.write_config("name: orders\nsource: main\nsink: replica\ntables: [public.orders]\n");
    let (code, out, err) = cli(&url, &token, "shop", &["pipelines", "create", "-f", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}\n{}", server.proc.log());
    wait_equal(env, "orders", "id", Duration::from_secs(60)).await;

    let dst = env.dst().await;
    dst.batch_execute("DELETE FROM orders WHERE id % 50 = 0; UPDATE orders SET customer = 'drift' WHERE id % 77 = 0; INSERT INTO orders VALUES (-1, 'extra', 0)")
        .await
        .unwrap();
    let (code, out, err) = cli(&url, &token, "shop", &["pipelines", "resync", "orders", "--table", "public.orders"]);
    assert_eq!(code, 0, "{out}{err}\n{}", server.proc.log());
    assert!(err.contains("public.orders") && err.contains("done"), "progress shown: {err}");
    wait_equal(env, "orders", "id", Duration::from_secs(60)).await;
    let (_, wfs) = call("GET", &format!("{url}/v1/tenants/shop/workflows?pipeline=orders"), Some(&token), None).await;
    let resync = wfs["workflows"].as_array().unwrap().iter().find(|w| w["kind"] == "resync").cloned().expect("a resync workflow");
    let progress = &resync["params"]["progress"][0];
    assert_eq!((progress["table"].as_str(), progress["done"].as_bool()), (Some("public.orders"), Some(true)), "{resync}");
    assert!(progress["rows"].as_i64().unwrap() >= 20_000 && progress["deleted"].as_i64().unwrap() >= 1, "{resync}");

    // The server's DogStatsD metrics carry the tenant.
    wait_for("DogStatsD metrics with the tenant", Duration::from_secs(20), || async {
        statsd.lines().iter().any(|l| l.starts_with("sluice.events:") && l.contains("pipeline:orders,tenant:shop,sink:postgres"))
    })
    .await;

    // Alerts: the tenant's settings (webhook hidden when read back); a retained-WAL
    // threshold of 1 byte fires slot_at_risk, raising it resolves it.
    let hook = HookReceiver::start().await;
    let alerts_url = format!("{url}/v1/tenants/shop/alerts");
    let (s, v) = call("PUT", &alerts_url, Some(&token), Some(format!("webhook_url: {}\nretained_bytes: 1\n", hook.url))).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call("GET", &alerts_url, Some(&token), None).await;
    assert_eq!((s, v["webhook_url"].as_str()), (200, Some("(secret)")), "{v}");
    wait_for("a firing slot_at_risk alert", Duration::from_secs(30), || async { hook.has("slot_at_risk", "firing") }).await;
    let fired = hook.received().into_iter().find(|v| v["alert"] == "slot_at_risk").unwrap();
    assert_eq!((fired["tenant"].as_str(), fired["pipeline"].as_str()), (Some("shop"), Some("orders")), "{fired}");
    let (s, v) = call("PUT", &alerts_url, Some(&token), Some(format!("webhook_url: {}\n", hook.url))).await;
    assert_eq!(s, 200, "{v}");
    wait_for("the resolved slot_at_risk alert", Duration::from_secs(30), || async { hook.has("slot_at_risk", "resolved") }).await;
    for (body, field) in [("webhook_url: ftp://x\n", "webhook_url"), ("webhook_url: http://x\nretained_bytes: 0\n", "retained_bytes")] {
        let (s, v) = call("PUT", &alerts_url, Some(&token), Some(body.into())).await;
        assert_eq!((s, v["error"]["field"].as_str()), (422, Some(field)), "{v}");
    }
    let (s, v) = call("PUT", &alerts_url, Some(&token), Some("webhook_url: http://x\nlag: 5\n".into())).await;
    assert_eq!(s, 422, "{v}");

    // Bad requests: an unknown table (field tables), unknown keys; nothing started.
    let (s, v) =
        call("POST", &format!("{url}/v1/tenants/shop/pipelines/orders/resync"), Some(&token), Some("tables: [public.nope]".into())).await;
    assert_eq!((s, v["error"]["field"].as_str()), (422, Some("tables")), "{v}");
    let (s, v) =
        call("POST", &format!("{url}/v1/tenants/shop/pipelines/orders/resync"), Some(&token), Some("tabels: [public.orders]".into())).await;
    assert_eq!(s, 422, "{v}");
    let (code, _, err) = cli(&url, &token, "shop", &["pipelines", "resync", "orders", "--table", "public.nope"]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Recovery is for a lost slot only (tests/slots.rs loses one).
    let (code, _, err) = cli(&url, &token, "shop", &["pipelines", "recover", "orders"]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing to recover") && err.trim().lines().count() == 1, "{err}");
    let (code, out, _) = cli(&url, &token, "shop", &["pipelines", "pause", "orders", "--output", "json"]);
    assert_eq!(code, 0);
    let wf = serde_json::from_str::<Value>(&out).unwrap()["workflow"].as_i64().unwrap();
    wait_workflow(&url, &token, "shop", wf, Duration::from_secs(60)).await;
    let (s, v) = call("POST", &format!("{url}/v1/tenants/shop/pipelines/orders/resync"), Some(&token), None).await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("resume"), "{v}");

    // Kafka: teardown with purge removes the pipeline's topic and its schema subjects.
    let (broker, brokers) = spawn_broker(&env.dir).await;
    let (mut registry, registry_url) = env.spawn_registry().await;
    let sink = format!(
        "name: bus\nkafka:\n  brokers: {brokers}\n  registry_url: {registry_url}\n  state:\n    host: 127.0.0.1\n    port: {}\n    user: {}\n    password: {}\n    database: {}\n",
        env.dst_port,
        sluice_postgres::cluster::SUPERUSER,
        superuser_pw(),
        env.db
    );
    let (s, v) = call("POST", &format!("{url}/v1/tenants/shop/sinks"), Some(&token), Some(sink)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call(
        "POST",
        &format!("{url}/v1/tenants/shop/pipelines"),
        Some(&token),
        Some("name: events\nsource: main\nsink: bus\ntables: [public.orders]\n".into()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    wait_workflow(&url, &token, "shop", v["workflow"].as_i64().unwrap(), Duration::from_secs(120)).await;
    let subjects = || async {
        let (_, v) = call("GET", &format!("{registry_url}/subjects?deleted=true"), None, None).await;
        v.as_array().unwrap().iter().filter_map(|s| s.as_str().map(String::from)).collect::<Vec<_>>()
    };
    // The topic is the tenant's name and the pipeline's runner name (unless the sink sets
    // a prefix); its subjects are in the tenant's registry context.
    let value = subjects().await.into_iter().find(|s| s.ends_with(".public.orders-value")).expect("a value subject");
    let topic = value.strip_prefix(":.shop:").expect("subjects in the tenant's context").trim_end_matches("-value").to_string();
    assert!(topic.starts_with("shop."), "{topic}");
    assert!(subjects().await.contains(&format!(":.shop:{topic}-key")), "{:?}", subjects().await);
    assert!(kafka_topics(&brokers).contains(&topic), "{:?}", kafka_topics(&brokers));
    let (s, v) = call("DELETE", &format!("{url}/v1/tenants/shop/pipelines/events?purge=true"), Some(&token), None).await;
    assert_eq!(s, 202, "{v}");
    wait_workflow(&url, &token, "shop", v["workflow"].as_i64().unwrap(), Duration::from_secs(120)).await;
    assert!(subjects().await.iter().all(|s| !s.contains(&topic)), "subjects left: {:?}", subjects().await);
    assert!(!kafka_topics(&brokers).contains(&topic), "topic left: {:?}", kafka_topics(&brokers));
    drop(broker);
    registry.kill9();
}

/// An Iceberg sink is a tenant resource like the others: created through the API
/// (its secrets never returned), a pipeline into it fills its table, and teardown with
/// purge drops the table from the catalog and removes its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iceberg_sinks_are_tenant_resources_and_purge_drops_their_tables() {
    let ctl = Ctl::new("ctl_iceberg").await;
    let env = &ctl.env;
    create_orders(env, "orders", 2_000).await;
    let server = ctl.server("s1", free_port(), None).await;
    let url = server.url.clone();
    let token = tenant_with_resources(&ctl, &url, "shop").await;
    let warehouse = env.dir.join("lake");
    let sink = format!(
        "name: lake\niceberg:\n  warehouse: {}\n  commit_interval: 500ms\n  catalog:\n    sql:\n      host: 127.0.0.1\n      port: {}\n      \
         user: {}\n      password: {}\n      database: {}\n",
        warehouse.display(),
        env.dst_port,
        sluice_postgres::cluster::SUPERUSER,
        superuser_pw(),
        env.db
    );
    let (s, v) = call("POST", &format!("{url}/v1/tenants/shop/sinks"), Some(&token), Some(sink)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call("GET", &format!("{url}/v1/tenants/shop/sinks"), Some(&token), None).await;
    assert_eq!(s, 200);
    assert!(!v.to_string().contains(superuser_pw()), "a sink's password was returned: {v}");
    let (s, v) = call(
        "POST",
        &format!("{url}/v1/tenants/shop/pipelines"),
        Some(&token),
        Some("name: analytics\nsource: main\nsink: lake\ntables: [public.orders]\n".into()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    wait_workflow(&url, &token, "shop", v["workflow"].as_i64().unwrap(), Duration::from_secs(120)).await;
    let dst = env.dst().await;
    let table_dir = warehouse.join("public.db/orders");
    wait_for("the Iceberg table's snapshot", Duration::from_secs(60), || async {
        let registered: i64 =
            dst.query_one("SELECT count(*) FROM pg_tables WHERE tablename = 'iceberg_tables'", &[]).await.unwrap().get::<_, i64>(0);
        registered > 0
            && dst.query_one("SELECT count(*) FROM iceberg_tables WHERE table_name = 'orders'", &[]).await.unwrap().get::<_, i64>(0) == 1
            && table_dir.join("data").exists()
    })
    .await;
    let (s, v) = call("DELETE", &format!("{url}/v1/tenants/shop/pipelines/analytics?purge=true"), Some(&token), None).await;
    assert_eq!(s, 202, "{v}");
    wait_workflow(&url, &token, "shop", v["workflow"].as_i64().unwrap(), Duration::from_secs(120)).await;
    let left: i64 = dst.query_one("SELECT count(*) FROM iceberg_tables WHERE table_name = 'orders'", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "the Iceberg table is still in the catalog");
    assert!(!table_dir.exists(), "the table's files are left under {}", table_dir.display());
}

/// The broker's topics, listed by kafka-python.
pub(crate) fn kafka_topics(brokers: &str) -> Vec<String> {
    let out = Command::new(crate::common::python())
        .args(["-c", "import sys, kafka; print('\\n'.join(sorted(kafka.KafkaConsumer(bootstrap_servers=sys.argv[1]).topics())))", brokers])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

/// Enrichers are a tenant's resources: created through the CLI, shown with secrets
/// redacted, referenced by name from pipelines (whose role is granted the reference
/// table), refused with a field when bad or unknown (also to another tenant), not
/// deletable while used; replacing one re-provisions its pipelines, which re-enrich
/// the rows they already delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrichers_are_tenant_resources_referenced_by_pipelines() {
    let ctl = Ctl::new("ctl_enrich").await;
    let env = &ctl.env;
    create_orders(env, "orders", 2000).await;
    env.src()
        .await
        .batch_execute("CREATE TABLE customers (name text PRIMARY KEY, tier text); INSERT INTO customers SELECT 'c' || g, 'basic' FROM generate_series(1, 2000) g;")
        .await
        .unwrap();
    let server = ctl.server("s1", free_port(), None).await;
    let url = server.url.clone();
    let token = tenant_with_resources(&ctl, &url, "shop").await;
    let other = tenant_with_resources(&ctl, &url, "other").await;
    let base = format!("{url}/v1/tenants/shop/enrichers");

    let f = env.write_config("name: tier\nlookup: {table: public.customers, key: name, on: customer, fields: [tier]}\n");
    let (code, out, err) = cli(&url, &token, "shop", &["enrichers", "create", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let secret = "name: svc\nhttp: {url: 'http://127.0.0.1:9/x', key: id, fields: {s: int}, headers: {Authorization: Bearer sekrit-123}}\n";
    let (s, v) = call("POST", &base, Some(&token), Some(secret.into())).await;
    assert_eq!(s, 201, "{v}");
    for u in [format!("{base}/svc"), base.clone()] {
        let (s, v) = call("GET", &u, Some(&token), None).await;
        assert_eq!(s, 200);
        assert!(!v.to_string().contains("sekrit") && v.to_string().contains("(set)"), "header value redacted: {v}");
    }
    // Bad input: one field named, nothing stored.
    let (s, v) =
        call("POST", &base, Some(&token), Some("name: x\nlookup: {table: t, key: k, on: o, fields: [f], bogus: 1}\n".into())).await;
    assert_eq!(s, 422, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("bogus"), "{v}");
    let (s, v) = call("POST", &base, Some(&token), Some("name: x\nhttp: {url: 'ftp://h', key: k, fields: {a: int}}\n".into())).await;
    assert_eq!((s, v["error"]["field"].as_str()), (422, Some("http")), "{v}");
    let (s, _) = call("POST", &base, Some(&token), Some(secret.into())).await;
    assert_eq!(s, 409, "a second enricher of the same name");
    // Another tenant sees nothing of it and cannot use it.
    let (s, _) = call("GET", &format!("{base}/tier"), Some(&other), None).await;
    assert!(s == 403 || s == 404, "{s}");
    let (s, v) = call(
        "POST",
        &format!("{url}/v1/tenants/other/pipelines"),
        Some(&other),
        Some("name: orders\nsource: main\nsink: replica\ntables: [public.orders]\nenrichers: [tier]\n".into()),
    )
    .await;
    assert_eq!((s, v["error"]["field"].as_str()), (422, Some("enrichers")), "{v}");

    // An enricher that does not fit the pipeline's tables: refused, field `enrichers`.
    let (s, v) = call(
        "POST",
        &base,
        Some(&token),
        Some("name: bad\nlookup: {table: public.customers, key: name, on: nope, fields: [tier]}\n".into()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = call(
        "POST",
        &format!("{url}/v1/tenants/shop/pipelines"),
        Some(&token),
        Some("name: bad\nsource: main\nsink: replica\ntables: [public.orders]\nenrichers: [bad]\n".into()),
    )
    .await;
    assert_eq!((s, v["error"]["field"].as_str()), (422, Some("enrichers")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("column \"nope\" is not in public.orders"), "{v}");
    assert_eq!(call("DELETE", &format!("{base}/bad"), Some(&token), None).await.0, 200);
    let p = env.write_config("name: orders\nsource: main\nsink: replica\ntables: [public.orders]\nenrichers: [tier]\n");
    let (code, out, err) = cli(&url, &token, "shop", &["pipelines", "create", "-f", p.to_str().unwrap(), "--output", "json"]);
    assert_eq!(code, 0, "{out}{err}\n{}", server.proc.log());
    let wf = serde_json::from_str::<Value>(&out).unwrap()["workflow"].as_i64().unwrap();
    wait_workflow(&url, &token, "shop", wf, Duration::from_secs(120)).await;
    let dst = env.dst().await;
    let count = |sql: &'static str| {
        let dst = &dst;
        async move { dst.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(-1) }
    };
    wait_for("orders enriched by the pipeline's role", Duration::from_secs(60), || async {
        count("SELECT count(*) FROM orders WHERE tier_tier = 'basic'").await == 2000
    })
    .await;
    // A reference change reaches the rows that use it.
    env.src().await.batch_execute("UPDATE customers SET tier = 'gold' WHERE name IN ('c1', 'c2')").await.unwrap();
    wait_for("the reference change re-enriches", Duration::from_secs(60), || async {
        count("SELECT count(*) FROM orders WHERE tier_tier = 'gold'").await == 2
    })
    .await;
    let (s, v) = call("DELETE", &format!("{base}/tier"), Some(&token), None).await;
    assert_eq!(s, 409, "in use: {v}");
    // The pipeline's status counts the lookups.
    wait_for("enrichment counters in the status", Duration::from_secs(20), || async {
        let (_, v) = call("GET", &format!("{url}/v1/tenants/shop/pipelines/orders"), Some(&token), None).await;
        let e = &v["status"]["enrich"];
        e["keys_fetched"].as_u64().unwrap_or(0) + e["keys_cached"].as_u64().unwrap_or(0) > 0
    })
    .await;

    // Replaced: the pipeline is re-provisioned and re-enriches what it delivered.
    let (s, v) = call(
        "PUT",
        &format!("{base}/tier"),
        Some(&token),
        Some("name: tier\nlookup: {table: public.customers, key: name, on: customer, fields: [tier], prefix: cust_}\n".into()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["pipelines"], serde_json::json!(["orders"]), "{v}");
    let wf = v["workflows"][0].as_i64().expect("an update workflow");
    wait_workflow(&url, &token, "shop", wf, Duration::from_secs(120)).await;
    wait_for("every delivered row re-enriched with the new definition", Duration::from_secs(90), || async {
        count("SELECT count(*) FROM orders WHERE cust_tier IS NOT NULL").await == 2000
            && count("SELECT count(*) FROM orders WHERE cust_tier = 'gold'").await == 2
    })
    .await;
    // What the pipeline's enrichment did, through the API: the re-enrichments with
    // their progress, then failures of a service that does not answer.
    let report = || async {
        let (s, v) = call("GET", &format!("{url}/v1/tenants/shop/pipelines/orders/enrichment"), Some(&token), None).await;
        assert_eq!(s, 200, "{v}");
        v
    };
    let v = report().await;
    let runs = v["re_enrichments"].as_array().unwrap();
    assert!(runs.iter().any(|r| r["reason"] == "enrich:tier changed" && r["done"] == true && r["rows"].as_i64() >= Some(2000)), "{v}");
    assert!(runs.iter().any(|r| r["reason"] == "enrich:tier reference change" && r["done"] == true), "{v}");
    let dead = format!(
        "name: score\non_failure: mark_missing\nhttp: {{url: 'http://127.0.0.1:{}/x', key: id, fields: {{s: int}}, retries: 0, timeout: 500ms}}\n",
        free_port()
    );
    assert_eq!(call("POST", &base, Some(&token), Some(dead)).await.0, 201);
    let (s, v) = call(
        "PUT",
        &format!("{url}/v1/tenants/shop/pipelines/orders"),
        Some(&token),
        Some("name: orders\nsource: main\nsink: replica\ntables: [public.orders]\nenrichers: [tier, score]\n".into()),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    wait_workflow(&url, &token, "shop", v["workflow"].as_i64().unwrap(), Duration::from_secs(120)).await;
    wait_for("the unanswered rows reported", Duration::from_secs(90), || async {
        let v = report().await;
        v["failures"].as_array().unwrap().iter().any(|f| {
            f["enricher"] == "score"
                && f["table"] == "public.orders"
                && f["rows"].as_i64() >= Some(2000)
                && f["held_back"] == 0
                && f["last_reason"].as_str().unwrap_or("").contains("connection refused")
        })
    })
    .await;
    let marked = || async { count("SELECT count(*) FROM orders WHERE _enrichment_missing = 'score' AND cust_tier IS NOT NULL").await };
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while marked().await < 2000 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if seen.is_err() {
        let rows = dst.query("SELECT _enrichment_missing::text, count(*), count(cust_tier) FROM orders GROUP BY 1", &[]).await;
        let rows: Vec<String> = rows
            .map(|r| {
                r.iter().map(|r| format!("{:?}/{}/{}", r.get::<_, Option<String>>(0), r.get::<_, i64>(1), r.get::<_, i64>(2))).collect()
            })
            .unwrap_or_else(|e| vec![e.to_string()]);
        panic!("rows with the lookup's fields, marked as missing the service's: {rows:?}\n{}", server.proc.log());
    }
    let (s, v) = call("DELETE", &format!("{base}/svc"), Some(&token), None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call("GET", &format!("{url}/v1/tenants/shop"), Some(&token), None).await;
    assert_eq!((s, v["enrichers"].as_i64()), (200, Some(2)), "{v}");
}
