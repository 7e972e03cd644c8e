//! `sluice migrations check` as CI would run it: exit codes, output, bad input.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::common::*;

fn run(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(["migrations", "check"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn file(dir: &std::path::Path, name: &str, sql: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, sql).unwrap();
    p.display().to_string()
}

#[test]
fn exit_codes_follow_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let safe = file(dir.path(), "safe.sql", "ALTER TABLE t ADD COLUMN note text;\nCREATE INDEX i ON t (note);\n");
    let (code, out, _) = run(&[&safe], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("WARNING [create-index-not-concurrently]"), "{out}");

    let bad = file(dir.path(), "bad.sql", "ALTER TABLE t ADD COLUMN note text;\nALTER TABLE t ALTER COLUMN note SET NOT NULL;\n");
    let (code, out, _) = run(&[&bad], None);
    assert_eq!(code, 1);
    assert!(out.contains("bad.sql:2:1: BLOCKED [set-not-null]"), "{out}");
    assert!(out.contains("instead:"), "{out}");

    let (code, _, _) = run(&["-"], Some("TRUNCATE t;"));
    assert_eq!(code, 1, "needs coordination fails CI too");

    let (code, out, _) = run(&["-"], Some("-- sluice:allow truncate nightly reload, consumers know\nTRUNCATE t;"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(acknowledged: nightly reload, consumers know)"), "{out}");
}

#[test]
fn json_output_for_scripts() {
    let (code, out, _) = run(&["--format", "json", "-"], Some("ALTER TABLE t RENAME TO u;"));
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "blocked");
    assert_eq!(v["files"][0]["statements"][0]["findings"][0]["rule"], "rename-table");
    assert_eq!(v["files"][0]["statements"][0]["line"], 1);
    assert!(v["files"][0]["statements"][0]["findings"][0]["safe_alternative"].as_str().unwrap().len() > 10);
}

#[test]
fn bad_input_exits_2_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (vec![file(dir.path(), "syntax.sql", "SELECT 1;\nALTER TABLE t ADD COLUM x int;")], "syntax.sql:2:"),
        (vec![file(dir.path(), "empty.sql", "\n-- nothing here\n")], "no SQL statements"),
        (vec![dir.path().join("missing.sql").display().to_string()], "cannot read"),
        (
            vec!["--source".into(), "host=127.0.0.1 port=1 user=x dbname=y connect_timeout=2".into(), "-".into()],
            "cannot connect to --source",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = run(&args, Some("SELECT 1;"));
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(want), "{want}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn source_context_knows_what_is_replicated() {
    let env = Env::new("ddlctx").await;
    env.src()
        .await
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, note text); CREATE TABLE scratch (id int PRIMARY KEY, v text);
             CREATE PUBLICATION sluice_shop FOR TABLE orders;",
        )
        .await
        .unwrap();
    let dsn = env.dsn(env.src_port);
    let sql = "ALTER TABLE scratch ALTER COLUMN v SET NOT NULL;";
    assert_eq!(run(&["-"], Some(sql)).0, 1, "without context every table is replicated");
    assert_eq!(run(&["--source", &dsn, "-"], Some(sql)).0, 0, "scratch is not published");
    assert_eq!(run(&["--source", &dsn, "--pipeline", "shop", "-"], Some("ALTER TABLE orders DROP COLUMN note;")).0, 0);
    assert_eq!(run(&["--source", &dsn, "--pipeline", "other", "-"], Some("ALTER TABLE orders RENAME TO o2;")).0, 0);
    assert_eq!(run(&["--source", &dsn, "--pipeline", "shop", "-"], Some("ALTER TABLE orders RENAME TO o2;")).0, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_decides_by_the_subjects_compatibility_mode() {
    let env = Env::new("ddlreg").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, qty integer, note text);
         CREATE PUBLICATION sluice_shop FOR TABLE orders;",
    )
    .await
    .unwrap();
    let source = env.dsn(env.src_port);
    // The registry, with the table's current value schema registered as the pipeline would.
    let (_server, url) = env.spawn_registry().await;
    let model = sluice_ddl::Model::load(&src, None).await.unwrap();
    let table = model.table_schema(&("public".into(), "orders".into())).unwrap();
    let schema = sluice_kafka::envelope_schema("shop", &table);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let subject_url = format!("{url}/subjects/shop.public.orders-value");
    let resp = agent.post(&format!("{subject_url}/versions")).send_json(serde_json::json!({"schema": schema.to_string()})).unwrap();
    assert_eq!(resp.status(), 200);

    let widen = "ALTER TABLE orders ALTER COLUMN qty TYPE bigint;";
    let args = ["--source", &source, "--pipeline", "shop", "--registry", &url, "-"];
    assert_eq!(
        run(&["--source", &source, "--pipeline", "shop", "-"], Some(widen)).0,
        1,
        "without the registry a widening needs coordination"
    );
    let (code, out, err) = run(&args, Some(widen));
    assert_eq!(code, 0, "BACKWARD accepts int -> long: {out}{err}");
    assert!(out.contains("accepts it"), "{out}");

    let resp =
        agent.put(&format!("{url}/config/shop.public.orders-value")).send_json(serde_json::json!({"compatibility": "FORWARD"})).unwrap();
    assert_eq!(resp.status(), 200);
    let (code, out, _) = run(&args, Some(widen));
    assert_eq!(code, 1, "FORWARD refuses int -> long: {out}");
    assert!(out.contains("BLOCKED [registry-compatibility]"), "{out}");

    // Columns outside the key are optional in the schemas the Kafka sink registers (a
    // delete's before image carries only the key), so even a NOT NULL column is accepted.
    agent.delete(&format!("{url}/config/shop.public.orders-value")).call().unwrap();
    let (code, out, _) = run(&args, Some("ALTER TABLE orders ADD COLUMN region text NOT NULL DEFAULT 'eu';"));
    assert_eq!(code, 0, "{out}");
    // A refusal acknowledged in the file passes, and the report says so.
    let resp =
        agent.put(&format!("{url}/config/shop.public.orders-value")).send_json(serde_json::json!({"compatibility": "FORWARD"})).unwrap();
    assert_eq!(resp.status(), 200);
    let acked = "-- sluice:allow registry-compatibility new subject version agreed with consumers\n\
                 -- sluice:allow alter-column-type consumers upgraded first\nALTER TABLE orders ALTER COLUMN qty TYPE bigint;";
    let (code, out, _) = run(&args, Some(acked));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(acknowledged: new subject version agreed with consumers)"), "{out}");
}
