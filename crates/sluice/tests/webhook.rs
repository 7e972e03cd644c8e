//! The webhook sink against a real HTTP endpoint (Python's http.server): kill -9 while
//! streaming loses nothing and keeps each key's order; an endpoint that answers 500 is
//! retried, then its events are dead-lettered, and delivery resumes once it answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng as _;
use serde_json::Value;

use crate::common::*;
use sluice_postgres::pki::Pki;

const SECRET: &str = "test-webhook-secret";

/// The receiver process, killed with the test.
struct Receiver {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    async fn start(dir: &Path) -> Receiver {
        Self::start_with(dir, None).await
    }

    /// Over HTTPS with `pki`'s certificate for `localhost`.
    async fn start_tls(dir: &Path, pki: &Pki) -> Receiver {
        Self::start_with(dir, Some(pki)).await
    }

    async fn start_with(dir: &Path, pki: Option<&Pki>) -> Receiver {
        let dir = dir.join(format!("hook-{}", rand::rng().random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/webhook_receiver.py");
        let mut cmd = Command::new(python());
        cmd.args([script, &port.to_string(), dir.to_str().unwrap(), SECRET]);
        if let Some(pki) = pki {
            cmd.arg(pki.path("server.pem")).arg(pki.path("server.key"));
        }
        let child = cmd.stdin(Stdio::null()).spawn().expect("start the webhook receiver");
        wait_for("the receiver to listen", Duration::from_secs(20), || async { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() })
            .await;
        let url = match pki {
            Some(_) => format!("https://localhost:{port}/hook"),
            None => format!("http://127.0.0.1:{port}/hook"),
        };
        Receiver { child, dir, url }
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.join("mode"), mode).unwrap();
    }

    /// Every request received so far.
    fn requests(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.join("requests.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The events of the requests answered 200, in the order received.
    fn delivered(&self) -> Vec<Value> {
        self.requests().into_iter().filter(|r| r["status"] == 200).flat_map(|r| r["body"]["events"].as_array().unwrap().clone()).collect()
    }
}

fn config(env: &Env, tables: &[&str], url: &str, sink: &str) -> PathBuf {
    let pw = sluice_postgres::cluster::SUPERUSER_PASSWORD;
    let user = sluice_postgres::cluster::SUPERUSER;
    env.write_config(&format!(
        "pipeline: {db}\nsource:\n  host: 127.0.0.1\n  port: {sp}\n  user: {user}\n  password: {pw}\n  database: {db}\n  \
         heartbeat_interval: 500ms\n  tables: [{tables}]\nsink:\n  webhook:\n    url: {url}\n    secret: {SECRET}\n{sink}    state:\n      \
         host: 127.0.0.1\n      port: {dp}\n      user: {user}\n      password: {pw}\n      database: {db}\n",
        db = env.db,
        sp = env.src_port,
        dp = env.dst_port,
        tables = tables.join(", "),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_loses_nothing_and_keeps_per_key_order() {
    let env = Env::new("webhook_kill").await;
    // Over HTTPS, trusting the endpoint's private authority (ca_file).
    let pki = Pki::make().expect("make a test CA");
    let hook = Receiver::start_tls(&env.dir, &pki).await;
    let src = env.src().await;
    src.batch_execute(ACCT_DDL).await.unwrap();
    let extra = format!("    max_events: 50\n    ca_file: {}\n", pki.path("ca.pem").display());
    let cfg = config(&env, &["acct"], &hook.url, &extra);
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;

    // Every update bumps `ver`, so a lost change shows as a gap in a key's versions.
    let writer = spawn_acct_writer(&env, 15);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        p.kill9();
        p = env.spawn(&cfg);
    }
    let statements = writer.await.unwrap();
    wait_caught_up(&env, &format!("sluice_{}", env.db), Duration::from_secs(90)).await;
    p.assert_running();

    let requests = hook.requests();
    assert!(requests.iter().all(|r| r["sig_ok"] == true), "every request is signed with the secret");
    assert!(requests.iter().all(|r| r["content_type"] == "application/json" && r["idempotency_key"].is_string()));
    assert!(requests.iter().all(|r| r["body"]["events"].as_array().unwrap().len() <= 50), "max_events holds");
    let events = hook.delivered();
    // Duplicates are identified by the event id alone.
    let mut seen = HashSet::new();
    let mut unique = Vec::new();
    for e in &events {
        if seen.insert(e["id"].as_str().unwrap().to_string()) {
            unique.push(e);
        }
    }
    let dups = events.len() - unique.len();
    // Per key, streamed changes arrive in commit order with no version missing.
    let mut last: HashMap<i64, ((u64, u64), i64)> = HashMap::new();
    let mut state: BTreeMap<i64, i64> = BTreeMap::new();
    for e in &unique {
        let row = if e["op"] == "d" { &e["before"] } else { &e["after"] };
        let id = e["key"]["id"].as_i64().unwrap();
        let pos = (e["source"]["commit_lsn"].as_u64().unwrap_or(0), e["source"]["event_seq"].as_u64().unwrap_or(0));
        if let Some((at, ver)) = last.get(&id)
            && e["op"] != "r"
        {
            assert!(*at < pos, "key {id} out of order: {e}");
            if e["op"] == "u" {
                assert_eq!(row["ver"].as_i64().unwrap(), ver + 1, "key {id}: a version is missing before {e}");
            }
        }
        let ver = row["ver"].as_i64().unwrap_or(0);
        last.insert(id, (pos, ver));
        match e["op"].as_str().unwrap() {
            "d" => {
                state.remove(&id);
            }
            _ => {
                state.insert(id, ver);
            }
        }
    }
    let rows = src.query("SELECT id, ver FROM acct ORDER BY id", &[]).await.unwrap();
    let expect: BTreeMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(state, expect, "the events replayed differ from the source");
    eprintln!("{statements} statements, {} events, {dups} duplicates after 5 kill -9", events.len());
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_endpoint_is_retried_then_dead_lettered_and_refusals_too() {
    let env = Env::new("webhook_fail").await;
    let hook = Receiver::start(&env.dir).await;
    let src = env.src().await;
    src.batch_execute("CREATE TABLE ev (id int8 PRIMARY KEY, n int8)").await.unwrap();
    let cfg = config(
        &env,
        &["ev"],
        &hook.url,
        "    format: row\n    retries: 2\n    backoff: 50ms\n    breaker_failures: 2\n    breaker_open_for: 1s\n",
    );
    let mut p = env.spawn(&cfg);
    wait_for("streaming", Duration::from_secs(60), || async { p.log().contains("streaming") }).await;
    let dst = env.dst().await;
    let dead = |sql: &'static str| {
        let dst = &dst;
        async move { dst.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(0) }
    };

    // 500: the first try and 2 retries, then the events are dead-lettered.
    hook.set_mode("500");
    src.batch_execute("INSERT INTO ev VALUES (1, 1), (2, 2)").await.unwrap();
    wait_for("dead letters of the 500s", Duration::from_secs(30), || async {
        dead("SELECT count(*) FROM sluice.webhook_dead_letters WHERE reason = 'HTTP 500 after 3 attempts'").await >= 2
    })
    .await;
    let failed: Vec<Value> = hook.requests().into_iter().filter(|r| r["status"] == 500).collect();
    assert!(failed.len() >= 3, "{failed:?}");
    assert!(failed.iter().take(3).all(|r| r["idempotency_key"] == failed[0]["idempotency_key"]), "retries resend the same request");
    let row: (String, String, Option<i32>) = {
        let r = dst
            .query_one("SELECT event_key, event::json->>'op', status FROM sluice.webhook_dead_letters ORDER BY id LIMIT 1", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(row, (r#"{"id":1}"#.to_string(), "c".to_string(), Some(500)));

    // 400: refused for good, dead-lettered at once (no retry).
    hook.set_mode("400");
    let before = hook.requests().len();
    tokio::time::sleep(Duration::from_millis(1200)).await; // let the breaker half-open
    src.batch_execute("INSERT INTO ev VALUES (3, 3)").await.unwrap();
    wait_for("the refused event's dead letter", Duration::from_secs(30), || async {
        dead("SELECT count(*) FROM sluice.webhook_dead_letters WHERE reason = 'refused: HTTP 400'").await >= 1
    })
    .await;
    assert_eq!(hook.requests().len() - before, 1, "a refusal is not retried");

    // Back to 200: delivery goes on, nothing dead-lettered for it.
    hook.set_mode("ok");
    src.batch_execute("UPDATE ev SET n = 10 WHERE id = 1; DELETE FROM ev WHERE id = 2").await.unwrap();
    wait_for("the later changes", Duration::from_secs(30), || async { hook.delivered().len() >= 2 }).await;
    let got: Vec<(String, Value)> = hook.delivered().iter().map(|e| (e["op"].as_str().unwrap().to_string(), e["row"].clone())).collect();
    assert_eq!(got, vec![("u".into(), serde_json::json!({"id": 1, "n": 10})), ("d".into(), serde_json::json!({"id": 2, "n": null}))]);
    assert_eq!(dead("SELECT count(*) FROM sluice.webhook_dead_letters").await, 3);
    p.assert_running();
    assert_eq!(p.terminate(), Some(0));
}

/// Bad settings stop `sluice check` with one line naming the setting; nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_are_refused_in_one_line() {
    let env = Env::new("webhook_bad").await;
    env.src().await.batch_execute("CREATE TABLE ev (id int8 PRIMARY KEY)").await.unwrap();
    for (url, extra, want) in [
        ("ftp://127.0.0.1/x", "", "sink.webhook.url"),
        ("http://127.0.0.1:9/x", "    ca_file: /ca.pem\n", "sink.webhook.ca_file: only an https:// url"),
        ("https://127.0.0.1:9/x", "    ca_file: /nonexistent.pem\n", "sink.webhook.ca_file /nonexistent.pem"),
        ("https://127.0.0.1:9/x", "    ca_pem: not a certificate\n", "sink.webhook.ca_pem: not a PEM certificate"),
        ("https://127.0.0.1:9/x", "    ca_file: /ca.pem\n    ca_pem: x\n", "both name the trusted authority"),
        ("http://127.0.0.1:9/x", "    ca_pem: x\n", "sink.webhook.ca_pem: only an https:// url"),
        ("http://127.0.0.1:9/x", "    max_events: 0\n", "sink.webhook.max_events"),
        ("http://127.0.0.1:9/x", "    retries: many\n", "retries"),
        ("http://127.0.0.1:9/x", "    colour: blue\n", "unknown field `colour`"),
    ] {
        let cfg = config(&env, &["ev"], url, extra);
        let (code, stderr) = run_to_exit(&["check", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
        assert_eq!(code, Some(1), "{url} {extra}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(want), "{want}: {}", errors[0]);
        assert!(!stderr.contains(SECRET), "the secret leaked: {stderr}");
    }
    assert_eq!(slot_count(&env).await, 0);
}

/// An https endpoint whose certificate the pipeline does not trust halts it with one
/// line naming the cause and the setting; no event is dead-lettered for it (the fault
/// is the configuration's, not the events').
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_https_endpoint_halts_in_one_line() {
    let env = Env::new("webhook_ca").await;
    let pki = Pki::make().expect("make a test CA");
    let hook = Receiver::start_tls(&env.dir, &pki).await;
    env.src().await.batch_execute("CREATE TABLE ev (id int8 PRIMARY KEY); INSERT INTO ev VALUES (1), (2)").await.unwrap();
    for (extra, want) in [("", "unknown CA"), ("    ca_file: OTHER\n", "unknown CA")] {
        let extra = extra.replace("OTHER", pki.path("other-ca.pem").to_str().unwrap());
        let cfg = config(&env, &["ev"], &hook.url, &format!("    retries: 1\n    backoff: 10ms\n{extra}"));
        let (code, stderr) = run_to_exit(&["run", "--config", cfg.to_str().unwrap()], Duration::from_secs(60));
        assert_eq!(code, Some(1), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(want) && errors[0].contains("sink.webhook.ca_file") && errors[0].contains(&hook.url), "{}", errors[0]);
    }
    assert!(hook.requests().is_empty(), "nothing reached the endpoint");
    let dead: i64 = env.dst().await.query_one("SELECT count(*) FROM sluice.webhook_dead_letters", &[]).await.unwrap().get(0);
    assert_eq!(dead, 0, "a refused certificate dead-letters nothing");
}
