//! The egress policy where connections are made: a pipeline carrying a policy (as
//! `sluice server` gives every tenant's) resolves each host through it and connects
//! only to the addresses it checked. The control plane's own checks are not in play
//! here (the pipelines run in this process, from configs), so what refuses is the
//! connection itself, as it would be for a name that resolved elsewhere after those
//! checks (DNS rebinding). 127.0.0.2 stands for the address the name moved to: it is
//! loopback like the test servers, outside the policy that lets them be reached.

use std::sync::Arc;
use std::time::Duration;

use sluice_core::egress::Egress;
use sluice_engine::config::PipelineConfig;
use sluice_engine::metrics::Metrics;
use sluice_engine::pipeline::Pipeline;

use crate::common::*;

fn pipeline(text: &str, policy: &str) -> Pipeline {
    let mut cfg = PipelineConfig::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    cfg.egress = Some(Arc::new(Egress::parse(policy).unwrap()));
    let (_stop, rx) = tokio::sync::watch::channel(false);
    Pipeline::new(cfg, Arc::new(Metrics::default()), rx)
}

/// The check's error under `policy`, one line.
async fn refusal(text: &str, policy: &str) -> String {
    match pipeline(text, policy).check().await {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    }
}

/// The config of `env`'s orders pipeline with the source at `source_host` and `sink`
/// as the sink block (indented under `sink:`), plus `extra` top-level keys.
fn config(env: &Env, source_host: &str, sink: &str, extra: &str) -> String {
    let pw = sluice_postgres::cluster::SUPERUSER_PASSWORD;
    let user = sluice_postgres::cluster::SUPERUSER;
    format!(
        "pipeline: {db}\nsource:\n  host: {source_host}\n  port: {sp}\n  user: {user}\n  password: {pw}\n  database: {db}\n  \
         heartbeat_interval: 500ms\n  tables: [orders]\nsink:\n{sink}{extra}",
        db = env.db,
        sp = env.src_port,
    )
}

/// A Postgres connection block at `host` (the destination cluster), indented by `pad`.
fn pg(env: &Env, host: &str, pad: &str) -> String {
    format!(
        "{pad}host: {host}\n{pad}port: {}\n{pad}user: {}\n{pad}password: {}\n{pad}database: {}\n",
        env.dst_port,
        sluice_postgres::cluster::SUPERUSER,
        sluice_postgres::cluster::SUPERUSER_PASSWORD,
        env.db
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_connects_only_to_addresses_its_policy_allows() {
    let env = Env::new("egress_connect").await;
    env.src()
        .await
        .batch_execute(
            "CREATE TABLE orders (id int8 PRIMARY KEY, note text); INSERT INTO orders SELECT g, 'n' FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    let postgres_sink = format!("  postgres:\n{}", pg(&env, "127.0.0.1", "    "));
    let only_local = "127.0.0.1/32";

    // Allowed: the source by name (resolved and pinned, the replication connection
    // too) and the sink by address; the pipeline snapshots and streams.
    let text = config(&env, "localhost", &postgres_sink, "");
    let mut cfg = PipelineConfig::parse(&text).unwrap();
    cfg.egress = Some(Arc::new(Egress::parse(only_local).unwrap()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut running = Pipeline::new(cfg, Arc::new(Metrics::default()), rx);
    let task = tokio::spawn(async move { running.run().await });
    wait_equal(&env, "orders", "id", Duration::from_secs(60)).await;
    env.src().await.batch_execute("INSERT INTO orders SELECT g, 'later' FROM generate_series(51, 80) g").await.unwrap();
    wait_equal(&env, "orders", "id", Duration::from_secs(60)).await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task).await.expect("the pipeline stops").unwrap().unwrap();

    // The source by a name that resolves to a refused address.
    let e = refusal(&text, "").await;
    assert!(e.contains("egress refused: localhost is a loopback address (127.0.0.1)") && e.contains("--allow-egress"), "{e}");

    // Each kind of connection a pipeline opens, pointed at 127.0.0.2: refused by the
    // policy, naming the address; under a policy that allows it, the same config
    // fails for another reason (nothing listens there), or not at all.
    let dir = env.dir.display().to_string();
    let state = format!("    state:\n{}", pg(&env, "127.0.0.1", "      "));
    let moved = [
        ("the Postgres sink", format!("  postgres:\n{}", pg(&env, "127.0.0.2", "    "))),
        ("the webhook sink", format!("  webhook:\n    url: http://127.0.0.2:9/hook\n{state}")),
        (
            "the search sink",
            format!("  search:\n    url: http://127.0.0.2:9\n    index: orders\n    document: {{table: public.orders}}\n{state}"),
        ),
        (
            "the schema registry",
            format!("  kafka:\n    brokers: 127.0.0.1:9\n    encoding: avro\n    registry_url: http://127.0.0.2:9\n{state}"),
        ),
        (
            "the Iceberg REST catalog",
            format!("  iceberg:\n    warehouse: {dir}/warehouse\n    catalog: {{rest: {{uri: 'http://127.0.0.2:9'}}}}\n{state}"),
        ),
        (
            "the Iceberg object store",
            format!(
                "  iceberg:\n    warehouse: s3://lake/w\n    s3: {{endpoint: 'http://127.0.0.2:9', access_key_id: a, secret_access_key: b, \
                 path_style_access: true}}\n    catalog:\n      sql:\n{}",
                pg(&env, "127.0.0.1", "        ")
            ),
        ),
        (
            "a sink's state database",
            format!("  webhook:\n    url: http://127.0.0.1:9/hook\n    state:\n{}", pg(&env, "127.0.0.2", "      ")),
        ),
    ];
    let enrichers = [
        (
            "a lookup's database",
            format!(
                "enrich:\n  - name: c\n    lookup: {{table: public.orders, key: id, on: id, fields: [note], connection: {{host: 127.0.0.2, port: {}, \
                 user: u, password: p, database: d}}}}\n",
                env.dst_port
            ),
        ),
        ("an HTTP enricher", "enrich:\n  - name: h\n    http: {url: 'http://127.0.0.2:9/x', key: id, fields: {x: string}}\n".to_string()),
    ];
    let cases = moved
        .iter()
        .map(|(what, sink)| (*what, config(&env, "127.0.0.1", sink, "")))
        .chain(enrichers.iter().map(|(what, extra)| (*what, config(&env, "127.0.0.1", &postgres_sink, extra))));
    for (what, text) in cases {
        let e = refusal(&text, only_local).await;
        assert!(e.contains("127.0.0.2 is a loopback address (127.0.0.2)") && e.contains("--allow-egress"), "{what}: {e}");
        assert_eq!(e.lines().count(), 1, "{what}: {e}");
        let e = refusal(&text, "loopback").await;
        assert!(!e.contains("egress refused") && !e.contains("--allow-egress"), "{what}, allowed: {e}");
    }
}

/// Kafka clients resolve broker names themselves and connect to whatever brokers the
/// cluster advertises, so the policy is checked in librdkafka's connect hook, on the
/// address it is about to connect to: nothing before the hook checks the bootstrap
/// broker here (as if its name had moved to a refused address after the control
/// plane's check), so what refuses is the connection itself.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_clients_connect_only_where_the_policy_allows() {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
    use sluice_kafka::probe::Guarded;

    let dir = tempfile::tempdir().unwrap();
    let (_broker, brokers) = spawn_broker(dir.path()).await;
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &brokers);
    let refused = format!("egress refused: Kafka broker {brokers} is a loopback address (127.0.0.1)");

    // The sink's probe: refused at the connection, one line.
    let probe = |policy: &str| {
        let policy = Arc::new(Egress::parse(policy).unwrap());
        let config = config.clone();
        let brokers = brokers.clone();
        async move { sluice_kafka::probe::brokers_answer(config, &brokers, "sink.kafka", Some(&policy)).await }
    };
    let e = probe("").await.unwrap_err().to_string();
    assert!(e.starts_with(&format!("sink.kafka.brokers {brokers}: {refused}")) && e.contains("--allow-egress"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    probe("127.0.0.1/32").await.unwrap();

    // The sink's producer (librdkafka's future producer wraps the context): a record
    // under a policy that refuses the broker is never delivered; allowed, it is.
    let send = |policy: &str| {
        let policy = Arc::new(Egress::parse(policy).unwrap());
        let mut config = config.clone();
        config.set("message.timeout.ms", "3000");
        async move {
            let guard = Guarded::new(Some(&policy));
            let producer: FutureProducer<Guarded> = config.create_with_context(guard.clone()).unwrap();
            let sent = producer.send(FutureRecord::<(), _>::to("egress_pinned").payload("x"), Duration::from_secs(5)).await;
            producer.flush(Duration::from_secs(1)).ok();
            (sent.map(|_| ()).map_err(|(e, _)| e.to_string()), guard.refusal())
        }
    };
    let (sent, refusal) = send("").await;
    assert!(sent.is_err(), "delivered to a refused broker");
    assert!(refusal.as_deref().is_some_and(|r| r.starts_with(&refused)), "{refusal:?}");
    let (sent, refusal) = send("127.0.0.1/32").await;
    assert_eq!((sent, refusal), (Ok(()), None));

    // A cluster whose broker advertises an address the policy refuses (127.0.0.2)
    // while its bootstrap address is allowed: the probe refuses it, in one line,
    // before a producer exists; a client's connections to it are refused at the hook
    // (without the hook, librdkafka would try it and find nothing listening).
    let advertising =
        tokio::task::spawn_blocking(|| sluice_kafka::broker::TempBroker::start(&["advertised.listeners=PLAINTEXT://127.0.0.2:{port}"]))
            .await
            .unwrap()
            .unwrap();
    let boot = advertising.addr().to_string();
    let port = boot.rsplit_once(':').unwrap().1;
    let mut other = config.clone();
    other.set("bootstrap.servers", &boot);
    let policy = Arc::new(Egress::parse("127.0.0.1/32").unwrap());
    // (Refused by name once the metadata names it, or at the hook when librdkafka
    // already moved its metadata request to that broker: either way one line.)
    let e = sluice_kafka::probe::brokers_answer(other.clone(), &boot, "sink.kafka", Some(&policy)).await.unwrap_err().to_string();
    assert!(e.contains(&format!("127.0.0.2:{port}")) && e.contains("is a loopback address (127.0.0.2)"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    other.set("message.timeout.ms", "3000");
    let guard = Guarded::new(Some(&policy));
    let producer: FutureProducer<Guarded> = other.create_with_context(guard.clone()).unwrap();
    let sent = producer.send(FutureRecord::<(), _>::to("egress_pinned").payload("x"), Duration::from_secs(5)).await;
    assert!(sent.is_err(), "delivered through a refused broker");
    let refusal = guard.refusal().unwrap_or_default();
    assert!(refusal.starts_with(&format!("egress refused: Kafka broker 127.0.0.2:{port} is a loopback address (127.0.0.2)")), "{refusal}");

    // A mirror's clusters, as the supervisor checks them before a mirror starts: its
    // clients go through the same hook.
    let mirror = sluice_mirror::MirrorConfig::parse(&format!(
        "pipeline: m_egress\nsource:\n  kafka:\n    cluster: a\n    brokers: \"{brokers}\"\n    topics_regex: \"orders.*\"\n\
         sink:\n  kafka:\n    cluster: b\n    brokers: \"{brokers}\"\n"
    ))
    .unwrap();
    let e = sluice_control::egress::check_mirror_brokers(&Egress::default(), &mirror).await.unwrap_err();
    assert!(e.starts_with(&format!("source.kafka.brokers: cluster a at {brokers}: {refused}")), "{e}");
    sluice_control::egress::check_mirror_brokers(&Egress::parse("127.0.0.1/32").unwrap(), &mirror).await.unwrap();
}
