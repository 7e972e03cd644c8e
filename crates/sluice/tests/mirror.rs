//! `sluice mirror`: two real Apache Kafka clusters (single-node KRaft each), records
//! written and read back with Confluent's Python client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_kafka::broker::TempBroker;

use crate::common::*;

/// The two clusters, shared by this module's tests (each uses its own topics, groups
/// and pipelines): two brokers per test would be eight JVMs on two cores.
fn clusters() -> &'static (TempBroker, TempBroker) {
    static C: OnceLock<(TempBroker, TempBroker)> = OnceLock::new();
    C.get_or_init(|| {
        let a = std::thread::spawn(|| TempBroker::start(&[]).expect("start cluster a"));
        let b = TempBroker::start(&[]).expect("start cluster b");
        (a.join().unwrap(), b)
    })
}

pub(crate) async fn brokers() -> (String, String) {
    tokio::task::spawn_blocking(|| {
        let (a, b) = clusters();
        (a.addr().to_string(), b.addr().to_string())
    })
    .await
    .unwrap()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn dir() -> PathBuf {
    tempfile::Builder::new().prefix("sluice-mirror-").tempdir().unwrap().keep()
}

/// Runs the test script (`tests/python/kafka_mirror.py`); its stdout lines as JSON.
fn py(args: &[&str]) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/kafka_mirror.py");
    let out = Command::new(python()).arg(script).args(args).stderr(Stdio::piped()).output().unwrap();
    assert!(out.status.success(), "kafka_mirror.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub(crate) async fn py_async(args: Vec<String>) -> Vec<Value> {
    tokio::task::spawn_blocking(move || py(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join(format!("mirror-{}.yaml", SEQ.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&p, text).unwrap();
    p
}

fn mirror_config(dir: &Path, name: &str, from: (&str, &str), to: (&str, &str), source: &str, sink: &str) -> PathBuf {
    write(
        dir,
        &format!(
            "pipeline: {name}\nsource:\n  kafka:\n    cluster: {}\n    brokers: \"{}\"\n    refresh_interval: 1s\n{source}\
             sink:\n  kafka:\n    cluster: {}\n    brokers: \"{}\"\n{sink}offsets:\n  interval: 500ms\n",
            from.0, from.1, to.0, to.1
        ),
    )
}

fn spawn_mirror(dir: &Path, cfg: &Path) -> Pipeline {
    spawn_mirror_with(dir, cfg, &[])
}

fn spawn_mirror_with(dir: &Path, cfg: &Path, args: &[&str]) -> Pipeline {
    let mut all = vec!["mirror".as_ref(), "run".as_ref(), "--config".as_ref(), cfg.as_os_str()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    spawn_sluice(dir, all, &[])
}

/// Records by partition, as (key, value, headers without the mirror's provenance
/// header, timestamp).
fn by_partition(recs: &[Value]) -> BTreeMap<i64, Vec<Value>> {
    let mut out: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for r in recs {
        let headers: Vec<&Value> = r["h"].as_array().unwrap().iter().filter(|h| h[0] != sluice_mirror::PROVENANCE_HEADER).collect();
        out.entry(r["p"].as_i64().unwrap()).or_default().push(serde_json::json!([r["k"], r["v"], headers, r["ts"]]));
    }
    out
}

fn count(recs: &BTreeMap<i64, Vec<Value>>) -> usize {
    recs.values().map(Vec::len).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_once_in_order_through_five_kill9s() {
    let (a, b) = brokers().await;
    let dir = dir();
    py_async(["create", &a, "orders1", "3", "retention.ms=86400000", "max.message.bytes=2000000"].map(String::from).to_vec()).await;
    let cfg = mirror_config(&dir, "m_kill", ("a", &a), ("b", &b), "    topics: [orders1]\n", "");
    let producer = tokio::spawn(py_async(["produce", &a, "orders1", "24000", "2000", "plain"].map(String::from).to_vec()));
    let mut m = spawn_mirror(&dir, &cfg);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_addr = format!("127.0.0.1:{port}");
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(1500 + 400 * i)).await;
        m.assert_running();
        m.kill9();
        m = if i == 4 { spawn_mirror_with(&dir, &cfg, &["--metrics-addr", &metrics_addr]) } else { spawn_mirror(&dir, &cfg) };
    }
    producer.await.unwrap();
    let source = by_partition(&py_async(["dump", &a, "orders1", "24000"].map(String::from).to_vec()).await);
    assert_eq!(count(&source), 24000);
    assert_eq!(source.len(), 3, "the producer's keys spread over the three partitions");
    let mut target = BTreeMap::new();
    for _ in 0..12 {
        m.assert_running();
        target = by_partition(&py_async(["dump", &b, "a.orders1", "24000", "10"].map(String::from).to_vec()).await);
        if count(&target) >= 24000 {
            break;
        }
    }
    for (p, recs) in &source {
        let got = target.get(p).map_or(&[][..], Vec::as_slice);
        assert_eq!(got.len(), recs.len(), "partition {p}: {} records on b, {} on a\n{}", got.len(), recs.len(), m.log());
        assert!(got == recs.as_slice(), "partition {p}: the records differ (order, key, value, headers or timestamp)");
    }
    let shape = &py_async(["describe", &b, "a.orders1"].map(String::from).to_vec()).await[0];
    assert_eq!(shape["partitions"], 3);
    assert_eq!(shape["configs"]["retention.ms"], "86400000", "{shape}");
    assert_eq!(shape["configs"]["max.message.bytes"], "2000000", "{shape}");

    // Operations: lag per partition (all copied: 0), heartbeats written on a and
    // copied through the link to b.
    let url = format!("http://{metrics_addr}/metrics");
    let text = tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().body_mut().read_to_string().unwrap()).await.unwrap();
    for p in 0..3 {
        let line = format!("sluice_mirror_lag_records{{pipeline=\"m_kill\",topic=\"orders1\",partition=\"{p}\"}} 0");
        assert!(text.contains(&line), "no {line} in\n{text}");
    }
    let beats: u64 =
        text.lines().find_map(|l| l.strip_prefix("sluice_mirror_heartbeats_total{pipeline=\"m_kill\"} ")).unwrap().parse().unwrap();
    assert!(beats > 0, "{text}");
    // Each pipeline copies its own heartbeats only (several share the topic).
    let hb = py_async(["dump", &b, "a.heartbeats", "1", "10"].map(String::from).to_vec()).await;
    let ours: Vec<&Value> = hb.iter().filter(|r| r["k"] == hex("m_kill")).collect();
    let mut seen = std::collections::HashSet::new();
    assert!(ours.iter().all(|r| seen.insert(r["v"].as_str().unwrap())), "a heartbeat copied twice");
    let v: Value = serde_json::from_slice(&hex_decode(ours.last().expect("heartbeats on b")["v"].as_str().unwrap())).unwrap();
    assert_eq!((v["source"].as_str(), v["target"].as_str()), (Some("a"), Some("b")), "{v}");
    assert_eq!(m.terminate(), Some(0), "{}", m.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_over_group_reads_exactly_what_it_had_not() {
    let (a, b) = brokers().await;
    let dir = dir();
    py_async(["create", &a, "orders2", "3"].map(String::from).to_vec()).await;
    // Transactions on the source, every fourth aborted: source offsets skip markers
    // and aborted records, target offsets skip the mirror's own markers; only an
    // exact map lines them up.
    py_async(["produce", &a, "orders2", "3000", "100000", "txn"].map(String::from).to_vec()).await;
    let cfg = mirror_config(&dir, "m_failover", ("a", &a), ("b", &b), "    topics_regex: \"orders2\"\n", "");
    let c = cfg.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || Command::new(BIN).args(["check", "-c", &c, "--output", "json"]).output().unwrap())
        .await
        .unwrap();
    let checked: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let orders = checked["topics"].as_array().and_then(|t| t.iter().find(|t| t["source"] == "orders2")).cloned().unwrap_or(Value::Null);
    assert_eq!(orders["target"], "a.orders2", "{checked} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((orders["partitions"].as_i64(), orders["exists"].as_bool()), (Some(3), Some(false)), "check writes nothing");
    let mut m = spawn_mirror(&dir, &cfg);
    let all = by_partition(&py_async(["dump", &a, "orders2", "2250"].map(String::from).to_vec()).await);
    assert_eq!(count(&all), 2250, "3000 produced, one transaction in four aborted");
    let read = py_async(["group-read", &a, "orders2", "g_failover", "1111"].map(String::from).to_vec()).await;
    let read = by_partition(&read);

    // The mirror translates the group's offsets and writes them to b.
    let cfg_s = cfg.to_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let shown = loop {
        let c = cfg_s.clone();
        let (code, out) = tokio::task::spawn_blocking(move || {
            let o = Command::new(BIN).args(["mirror", "offsets", "g_failover", "-c", &c, "--output", "json"]).output().unwrap();
            (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned())
        })
        .await
        .unwrap();
        let shown: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        if code == Some(0) && shown.as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|r| r["status"] == "exact")) {
            break shown;
        }
        assert!(Instant::now() < deadline, "no exact translation of every partition within 60 s: {out}\n{}", m.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let translated: BTreeMap<String, i64> =
        shown.as_array().unwrap().iter().map(|r| (r["partition"].to_string(), r["target"].as_i64().unwrap())).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = py_async(["committed", &b, "a.orders2", "g_failover"].map(String::from).to_vec()).await;
        let got: BTreeMap<String, i64> = serde_json::from_value(got[0].clone()).unwrap();
        if got == translated {
            break;
        }
        assert!(Instant::now() < deadline, "group offsets on b {got:?}, translated {translated:?}\n{}", m.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    m.assert_running();

    let rest = by_partition(&py_async(["group-rest", &b, "a.orders2", "g_failover"].map(String::from).to_vec()).await);
    for (p, recs) in &all {
        let before = read.get(p).map_or(0, Vec::len);
        let after = rest.get(p).map_or(&[][..], Vec::as_slice);
        assert!(
            after == &recs[before..],
            "partition {p}: the group read {before} records on a; on b it read {} records, not exactly the {} it had not read",
            after.len(),
            recs.len() - before
        );
    }
    assert_eq!(m.terminate(), Some(0), "{}", m.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn active_active_mirrors_never_loop() {
    let (a, b) = brokers().await;
    let dir = dir();
    for brokers in [&a, &b] {
        py_async(["create", brokers, "events3", "2"].map(String::from).to_vec()).await;
    }
    let ident = "    topic_naming: identity\n";
    let ab = mirror_config(&dir, "m_ab", ("a", &a), ("b", &b), "    topics: [events3]\n", ident);
    let ba = mirror_config(&dir, "m_ba", ("b", &b), ("a", &a), "    topics: [events3]\n", ident);
    let (mut m1, mut m2) = (spawn_mirror(&dir, &ab), spawn_mirror(&dir, &ba));
    py_async(["produce", &a, "events3", "300", "1000", "plain", "from-a"].map(String::from).to_vec()).await;
    py_async(["produce", &b, "events3", "200", "1000", "plain", "from-b"].map(String::from).to_vec()).await;
    for brokers in [&a, &b] {
        let mut recs = vec![];
        for _ in 0..6 {
            m1.assert_running();
            m2.assert_running();
            recs = py_async(["dump", brokers, "events3", "500", "10"].map(String::from).to_vec()).await;
            if recs.len() >= 500 {
                break;
            }
        }
        // A few more seconds of both mirrors running: a loop would keep adding.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let recs = py_async(["dump", brokers, "events3", "500"].map(String::from).to_vec()).await;
        let tag = |r: &Value| r["h"].as_array().unwrap().iter().find(|h| h[0] == "tag").unwrap()[1].as_str().unwrap().to_string();
        let from_a = recs.iter().filter(|r| tag(r) == hex("from-a")).count();
        let from_b = recs.iter().filter(|r| tag(r) == hex("from-b")).count();
        assert_eq!((from_a, from_b, recs.len()), (300, 200, 500), "cluster at {brokers}");
    }
    m1.assert_running();
    m2.assert_running();
    assert_eq!(m1.terminate(), Some(0));
    assert_eq!(m2.terminate(), Some(0));
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_fail_with_one_line() {
    let (a, b) = brokers().await;
    let dir = dir();
    py_async(["create", &a, "orders4", "3"].map(String::from).to_vec()).await;
    py_async(["create", &b, "a.orders4", "2"].map(String::from).to_vec()).await;
    let cases = [
        (
            mirror_config(&dir, "m_bad1", ("a", "127.0.0.1:1"), ("b", &b), "    topics: [orders4]\n", ""),
            "cluster a at 127.0.0.1:1 did not answer",
        ),
        (mirror_config(&dir, "m_bad2", ("a", &a), ("b", &b), "    topics_regex: \"nothing_.*\"\n", ""), "matches no topic on cluster a"),
        (mirror_config(&dir, "m_bad3", ("a", &a), ("b", &b), "    topics: [orders4]\n", ""), "partition-count mismatch"),
        (mirror_config(&dir, "m_bad4", ("a", &a), ("b", &b), "    topics: [orders4]\n    colour: red\n", ""), "unknown field `colour`"),
    ];
    // `sluice check` says the same, without writing anything.
    let c = cases[2].0.to_str().unwrap().to_string();
    let (code, err) = tokio::task::spawn_blocking(move || run_to_exit(&["check", "-c", &c], Duration::from_secs(60))).await.unwrap();
    assert!(code == Some(1) && err.contains("partition-count mismatch"), "{err}");
    for (cfg, want) in cases {
        let c = cfg.to_str().unwrap().to_string();
        let (code, err) =
            tokio::task::spawn_blocking(move || run_to_exit(&["mirror", "run", "-c", &c], Duration::from_secs(60))).await.unwrap();
        assert_eq!(code, Some(1), "{want}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(lines.len() == 1 && lines[0].contains(want), "want one line with {want:?}, got:\n{err}");
    }
    // Nothing was written for the refused pipelines: the mismatched topic is as it was.
    assert_eq!(py_async(["describe", &b, "a.orders4"].map(String::from).to_vec()).await[0]["partitions"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn avro_records_decode_against_the_targets_registry() {
    let (a, b) = brokers().await;
    let env = Env::new("mirror_avro").await;
    let (_ra, ra) = env.spawn_registry_on(env.src_port).await;
    let (_rb, rb) = env.spawn_registry_on(env.dst_port).await;
    // Other schemas first on b: the same schema gets another id there, so a record
    // copied with a's id would decode wrongly (or not at all) against b's registry.
    for i in 0..3 {
        let schema = format!("{{\"type\":\"record\",\"name\":\"Other{i}\",\"fields\":[{{\"name\":\"x{i}\",\"type\":\"string\"}}]}}");
        ureq::post(&format!("{rb}/subjects/other{i}-value/versions")).send_json(serde_json::json!({"schema": schema})).unwrap();
    }
    py_async(["create", &a, "avro5", "2"].map(String::from).to_vec()).await;
    ureq::put(&format!("{ra}/config/avro5-value")).send_json(serde_json::json!({"compatibility": "FULL"})).unwrap();
    py_async(vec!["avro-produce".into(), a.clone(), ra.clone(), "avro5".into(), "40".into()]).await;
    let sink = format!("    registry_url: {rb}\n");
    let cfg = mirror_config(&env.dir, "m_avro", ("a", &a), ("b", &b), &format!("    topics: [avro5]\n    registry_url: {ra}\n"), &sink);
    let mut m = spawn_mirror(&env.dir, &cfg);
    let got = py_async(vec!["avro-consume".into(), b.clone(), rb.clone(), "a.avro5".into(), "40".into()]).await;
    m.assert_running();
    assert_eq!(got.len(), 40, "{}", m.log());
    let mut ids: Vec<i64> = got.iter().map(|r| r["value"]["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (0..40).collect::<Vec<_>>());
    let r = got.iter().find(|r| r["value"]["id"] == 3).unwrap();
    assert_eq!(r["key"], "o3");
    assert_eq!(r["value"]["item"], "item 3");
    assert_eq!(r["value"]["qty"], 3);
    let cfg_b: Value = ureq::get(&format!("{rb}/config/a.avro5-value")).call().unwrap().body_mut().read_json().unwrap();
    assert_eq!(cfg_b["compatibilityLevel"], "FULL", "the subject's compatibility is mirrored under the target topic's name");
    assert_eq!(m.terminate(), Some(0));
}

/// A mirror as a tenant's resource on the control plane: created through the CLI
/// (bad clusters refused first, nothing created), run by a server under a lease,
/// `kill -9` of that server mid-copy, paused (nothing copied) and resumed, its
/// Kafka property values never shown, its group offsets translated through the API,
/// and torn down with `--purge` (its offsets topic and target topic gone).
#[tokio::test(flavor = "multi_thread")]
async fn mirrors_are_control_plane_resources_that_pause_resume_and_tear_down() {
    use crate::control::{Ctl, call, cli, free_port, kafka_topics};
    let (a, b) = brokers().await;
    let ctl = Ctl::new("ctl_mirror").await;
    let port = free_port();
    let mut server = ctl.server("s1", port, None).await;
    let url = server.url.clone();
    assert_eq!(cli(&url, &ctl.admin, "", &["tenants", "create", "shop"]).0, 0);
    let (_, out, _) = cli(&url, &ctl.admin, "shop", &["tokens", "create", "ci", "--role", "tenant_admin", "--output", "json"]);
    let token = serde_json::from_str::<Value>(&out).unwrap()["token"].as_str().unwrap().to_string();
    let dir = dir();
    py_async(["create", &a, "cm_orders", "3"].map(String::from).to_vec()).await;
    let spec = |brokers_a: &str, topics: &str| {
        format!(
            "name: orders-to-b\nsource:\n  kafka:\n    cluster: a\n    brokers: \"{brokers_a}\"\n    topics: {topics}\n    refresh_interval: 1s\n\
             \x20   properties: {{client.rack: rack-secret-1}}\nsink:\n  kafka:\n    cluster: b\n    brokers: \"{b}\"\noffsets:\n  interval: 500ms\n"
        )
    };

    // Bad input: one line naming the field, nothing created.
    let dead = format!("127.0.0.1:{}", free_port());
    for (file, want) in [(spec(&dead, "[cm_orders]"), "source.kafka.brokers"), (spec(&a, "[cm_nothing_here]"), "cm_nothing_here")] {
        let f = write(&dir, &file);
        let (code, out, err) = cli(&url, &token, "shop", &["mirrors", "create", "-f", f.to_str().unwrap()]);
        assert_ne!(code, 0, "{out}");
        assert!(err.trim().lines().count() == 1 && err.contains(want), "one line naming {want}: {err}");
    }
    let (_, v) = call("GET", &format!("{url}/v1/tenants/shop/mirrors"), Some(&token), None).await;
    assert_eq!(v["mirrors"], serde_json::json!([]), "nothing created by a refused request");

    let f = write(&dir, &spec(&a, "[cm_orders]"));
    let (code, out, err) = cli(&url, &token, "shop", &["mirrors", "create", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}\n{}", server.proc.log());
    let producer = tokio::spawn(py_async(["produce", &a, "cm_orders", "9000", "2000", "plain", "one"].map(String::from).to_vec()));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    server.proc.kill9();
    let mut server = ctl.server("s1", port, None).await;
    producer.await.unwrap();
    let show = |token: String, url: String| async move {
        let (s, v) = call("GET", &format!("{url}/v1/tenants/shop/mirrors/orders-to-b"), Some(&token), None).await;
        assert_eq!(s, 200, "{v}");
        v
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = show(token.clone(), url.clone()).await;
        if v["status"]["records"].as_u64().unwrap_or(0) > 0 && v["status"]["lag_records"] == 0 && v["server"] == "s1" {
            assert_eq!(v["status"]["state"], "running", "{v}");
            assert!(!v.to_string().contains("rack-secret-1"), "property values are hidden: {v}");
            break;
        }
        assert!(Instant::now() < deadline, "the mirror did not catch up: {v}\n{}", server.proc.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Pause: the mirror stops on its server; records written meanwhile stay on a.
    let (code, _, err) = cli(&url, &token, "shop", &["mirrors", "pause", "orders-to-b"]);
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while show(token.clone(), url.clone()).await["status"]["state"] != "paused" {
        assert!(Instant::now() < deadline, "not paused\n{}", server.proc.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    py_async(["produce", &a, "cm_orders", "3000", "100000", "plain", "two"].map(String::from).to_vec()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on_b = count(&by_partition(&py_async(["dump", &b, "a.cm_orders", "100000", "4"].map(String::from).to_vec()).await));
    assert_eq!(on_b, 9000, "a paused mirror copies nothing");

    // Resume: exactly the source, in order, nothing twice (the kill -9 included).
    let (code, _, err) = cli(&url, &token, "shop", &["mirrors", "resume", "orders-to-b"]);
    assert_eq!(code, 0, "{err}");
    let source = by_partition(&py_async(["dump", &a, "cm_orders", "12000"].map(String::from).to_vec()).await);
    assert_eq!(count(&source), 12000);
    let mut target = BTreeMap::new();
    for _ in 0..12 {
        target = by_partition(&py_async(["dump", &b, "a.cm_orders", "12000", "10"].map(String::from).to_vec()).await);
        if count(&target) >= 12000 {
            break;
        }
    }
    assert!(target == source, "b differs from a: {} records on b\n{}", count(&target), server.proc.log());

    // A group's offsets translate through the API.
    py_async(["group-read", &a, "cm_orders", "g_cm", "3000"].map(String::from).to_vec()).await;
    let (code, out, err) = cli(&url, &token, "shop", &["mirrors", "offsets", "orders-to-b", "g_cm", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    let rows = rows["offsets"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows.iter().all(|r| r["status"] == "exact" && r["target_topic"] == "a.cm_orders"), "{out}");

    // Teardown with purge: the row, the offsets topic and the copied topic are gone.
    let offsets_topic = show(token.clone(), url.clone()).await["objects"]["offsets_topic"].as_str().unwrap().to_string();
    assert!(kafka_topics(&b).contains(&offsets_topic));
    let (code, _, err) = cli(&url, &token, "shop", &["mirrors", "delete", "orders-to-b", "--purge"]);
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while call("GET", &format!("{url}/v1/tenants/shop/mirrors/orders-to-b"), Some(&token), None).await.0 != 404 {
        assert!(Instant::now() < deadline, "not torn down\n{}", server.proc.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let topics = kafka_topics(&b);
    assert!(!topics.contains(&offsets_topic) && !topics.contains(&"a.cm_orders".to_string()), "left on b: {topics:?}");
    assert_eq!(server.proc.terminate(), Some(0));
}
