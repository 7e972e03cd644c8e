//! Rows encoded by Sluice's Avro encoder decode with Confluent's own deserializer,
//! using the schema registered in Sluice's registry.

use std::process::Command;

use crate::common::*;
use serde_json::{Value, json};
use sluice_core::{Datum, TableName};

#[tokio::test(flavor = "multi_thread")]
async fn confluent_deserializer_reads_sluice_avro() {
    let env = Env::new("avro").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE kinds (id int8 PRIMARY KEY, ok bool NOT NULL, n int4, price numeric(10,2), big numeric, f float8,
                             t text, b bytea, u uuid, d date, tm time, ts timestamptz, j jsonb, tags text[]);
         INSERT INTO kinds VALUES
           (1, true, 42, -1234.5, 12345678901234567890.5, 1.5, 'hé', '\\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '2024-02-29', '12:34:56.5', '2024-06-01 12:00:00+00', '{\"a\": 1}', '{x,NULL,\"y z\"}'),
           (2, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);",
    )
    .await
    .unwrap();
    let cfg = env.src_config();
    // Rows as the pipeline sees them: the source's text encoding under Sluice's session settings.
    let client = sluice_postgres::connect(&cfg, "source").await.unwrap();
    let table = sluice_postgres::load_table(&client, &TableName::new("public", "kinds"), "source").await.unwrap();
    let rows: Vec<Vec<Datum>> = client
        .simple_query("SELECT * FROM kinds ORDER BY id")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map_or(Datum::Null, |s| Datum::Text(s.to_string().into_bytes().into()))).collect())
            }
            _ => None,
        })
        .collect();

    let (_registry, url) = env.spawn_registry().await;
    let schema = sluice_core::avro::value_schema("shop", &table);
    let mut r =
        ureq::post(&format!("{url}/subjects/shop.public.kinds-value/versions")).send_json(json!({"schema": schema.to_string()})).unwrap();
    let id = r.body_mut().read_json::<Value>().unwrap()["id"].as_u64().unwrap() as u32;

    let encoder = sluice_kafka::AvroEncoder::value(&table, "shop", id).unwrap();
    let mut lines = String::new();
    for row in &rows {
        let mut buf = Vec::new();
        encoder.encode(row, &mut buf).unwrap();
        lines += &buf.iter().map(|b| format!("{b:02x}")).collect::<String>();
        lines.push('\n');
    }
    let file = env.dir.join("records.hex");
    std::fs::write(&file, lines).unwrap();
    let venv = std::env::var("SLUICE_VENV").unwrap_or_else(|_| "/var/cache/sluice/venv".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/avro_decode.py");
    let out = Command::new(format!("{venv}/bin/python")).arg(script).arg(&url).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let decoded: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(decoded.len(), 2);
    let first = &decoded[0];
    assert_eq!(first["id"], 1);
    assert_eq!(first["ok"], true);
    assert_eq!(first["n"], 42);
    assert_eq!(first["price"], "-1234.50");
    assert_eq!(first["big"], "12345678901234567890.5");
    assert_eq!(first["f"], 1.5);
    assert_eq!(first["t"], "hé");
    assert_eq!(first["u"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(first["d"], "2024-02-29");
    assert_eq!(first["tm"], "12:34:56.500000");
    assert!(first["ts"].as_str().unwrap().starts_with("2024-06-01 12:00:00"), "{first}");
    assert_eq!(first["j"], "{\"a\": 1}");
    assert_eq!(first["tags"], json!(["x", null, "y z"]));
    let second = &decoded[1];
    assert_eq!(second["id"], 2);
    assert_eq!(second["ok"], false);
    for col in ["n", "price", "big", "f", "t", "b", "u", "d", "tm", "ts", "j", "tags"] {
        assert_eq!(second[col], Value::Null, "{col}");
    }
}
