//! Every supported type, NULLs, extremes and a 1 MB TOASTed value arrive equal, through
//! both the snapshot and the stream; streamed values decode into typed values.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use sluice_core::{Datum, PgType, TableName, Value};

const DDL: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE all_types (
    id int4 PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, n numeric, n2 numeric(12,2), f4 float4, f8 float8,
    t text, vc varchar(20), ch char(5), by bytea, u uuid, j json, jb jsonb,
    d date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval,
    ai int4[], at text[], a2 int8[][], af float8[], an numeric[], m mood, ma mood[],
    ip inet, net cidr, pt point, big text
);";

fn row(id: i32) -> String {
    match id % 4 {
        0 => format!(
            "({id}, true, 32767, -2147483648, 9223372036854775807, 12345678901234567890.123456789, 12.34, 1.5, -2.25e-300,
              'plain', 'vc', 'ab', '\\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"a\": [1, 2]}}', '{{\"b\": null}}',
              '2024-02-29', '23:59:59.999999', '10:00:00+05:30', '1999-12-31 23:59:59.5', '2024-06-01 12:00:00+02',
              '1 year 2 mons 3 days 04:05:06.789', '{{1,2,NULL}}', '{{\"a b\",\"c,d\",\"\\\"q\\\"\"}}', '{{{{1,2}},{{3,4}}}}',
              '{{NaN,Infinity,-Infinity}}', '{{1.5,NaN}}', 'happy', '{{sad,ok}}', '192.168.0.1/24', '10.0.0.0/8', '(1.5,2)', NULL)"
        ),
        1 => format!("({id}, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"),
        2 => format!(
            "({id}, false, -32768, 2147483647, -9223372036854775808, 'NaN', -9999999999.99, 'NaN', 'Infinity',
              E'tab\\there\\nnewline \\\\ backslash ünïcødé 🚀', '', '', '\\x', '00000000-0000-0000-0000-000000000000', '[]', '{{}}',
              'infinity', '00:00:00', '00:00:00-12', '-infinity', 'infinity', '-178000000 years', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', 'sad', '{{}}',
              '::1', '::/0', '(0,0)', NULL)"
        ),
        _ => format!(
            "({id}, true, 0, 0, 0, '-Infinity', 0, '-Infinity', -0.0, repeat('é', 1000), 'x', 'x', decode(repeat('ab', 5000), 'hex'),
              gen_random_uuid(), '1', '\"s\"', '0044-03-15 BC', '24:00:00', '23:59:59+14', '4713-01-01 00:00:00 BC',
              '1970-01-01 00:00:00+00', '-1 days +00:00:00.000001', '{{2147483647}}', '{{NULL}}', '{{{{NULL}}}}', '{{-0}}',
              '{{0.000000000000000000001}}', 'ok', '{{happy}}', '2001:db8::1/64', '2001:db8::/32', '(-1,-1)',
              (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 32768) g))"
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_round_trips_through_snapshot_and_stream() {
    let env = Env::new("types").await;
    let src = env.src().await;
    src.batch_execute(DDL).await.unwrap();
    // Rows 0-3 go through the snapshot, 4-7 through the stream.
    src.batch_execute(&format!("INSERT INTO all_types VALUES {}", (0..4).map(row).collect::<Vec<_>>().join(","))).await.unwrap();
    let big: i32 = src.query_one("SELECT length(big) FROM all_types WHERE id = 3", &[]).await.unwrap().get(0);
    assert!(big >= 1_000_000, "the big value should be 1 MB, is {big}");
    let mut p = env.spawn(&env.config(&["all_types"], ""));
    wait_equal(&env, "all_types", "id", Duration::from_secs(30)).await;
    src.batch_execute(&format!("INSERT INTO all_types VALUES {}", (4..8).map(row).collect::<Vec<_>>().join(","))).await.unwrap();
    // Leaves the 1 MB TOASTed value untouched: it must survive in the sink.
    src.batch_execute("UPDATE all_types SET i4 = i4 + 1 WHERE id IN (3, 7); UPDATE all_types SET big = upper(big) WHERE id = 7;")
        .await
        .unwrap();
    wait_equal(&env, "all_types", "id", Duration::from_secs(30)).await;
    let kept: i64 = env.dst().await.query_one("SELECT count(*) FROM all_types WHERE length(big) >= 1000000", &[]).await.unwrap().get(0);
    assert_eq!(kept, 2);
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

/// The typed decoder accepts everything pgoutput sends for these types.
#[tokio::test(flavor = "multi_thread")]
async fn streamed_values_decode_into_typed_values() {
    let env = Env::new("typed").await;
    let src = env.src().await;
    src.batch_execute(DDL).await.unwrap();
    src.batch_execute("CREATE PUBLICATION typed_pub FOR TABLE all_types").await.unwrap();
    src.batch_execute("SELECT pg_create_logical_replication_slot('typed_slot', 'pgoutput')").await.unwrap();
    src.batch_execute(&format!("INSERT INTO all_types VALUES {}", (0..8).map(row).collect::<Vec<_>>().join(","))).await.unwrap();
    let cfg = env.src_config();
    let catalog = sluice_postgres::connect(&cfg, "source").await.unwrap();
    let schema = Arc::new(sluice_postgres::load_table(&catalog, &TableName::new("public", "all_types"), "source").await.unwrap());
    let mut stream = sluice_postgres::ReplicationStream::start(&cfg, "typed_slot", "typed_pub", sluice_core::Lsn::ZERO, &[schema], catalog)
        .await
        .unwrap();
    let txn = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.next()).await.unwrap().unwrap() {
            Some(sluice_core::source::StreamItem::Txn(t)) => break t,
            Some(_) => continue,
            None => panic!("stream ended"),
        }
    };
    assert_eq!(txn.events.len(), 8);
    let mut typed = 0;
    for e in &txn.events {
        let row = e.after.as_ref().unwrap();
        for (col, d) in e.table.columns.iter().zip(row) {
            let Datum::Text(bytes) = d else { continue };
            let text = std::str::from_utf8(bytes).unwrap();
            let v = Value::parse(&col.pg_type, text).unwrap_or_else(|err| panic!("{}: {err}", col.name));
            if col.pg_type != PgType::Other {
                assert!(!matches!(v, Value::Other(_)), "{} fell back to text: {text}", col.name);
                typed += 1;
            }
            // Printing it back gives Postgres an equal value.
            if let Some(back) = v.to_pg_text() {
                let same: bool = src
                    .query_one(
                        &format!("SELECT $1::text::{0}::text IS NOT DISTINCT FROM $2::text::{0}::text", col.type_name),
                        &[&back, &text],
                    )
                    .await
                    .unwrap_or_else(|err| panic!("{}: {err:?}", col.name))
                    .get(0);
                assert!(same, "{}: {text} printed back as {back}", col.name);
            }
        }
    }
    assert!(typed > 150, "only {typed} typed values");
    stream.shutdown().await;
}

/// Changes to a table whose every column has a binary COPY form are copied into the
/// target in binary (new rows straight in, updates, moves and deletes through the
/// staging table): every value, extremes included, arrives equal.
#[tokio::test(flavor = "multi_thread")]
async fn changes_copied_in_binary_arrive_equal() {
    let env = Env::new("binary").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TYPE colour AS ENUM ('red', 'green');
         CREATE TABLE bin_types (
            id int8 PRIMARY KEY, b bool, i2 int2, i4 int4, n numeric, n2 numeric(12,2), f4 float4, f8 float8,
            tx text, vc varchar(20), ch char(5), by bytea, u uuid, j json, jb jsonb,
            d date, ts timestamp, ts3 timestamp(3), tstz timestamptz, c colour
         );
         ALTER TABLE bin_types ALTER COLUMN vc SET STORAGE PLAIN, ALTER COLUMN by SET STORAGE EXTERNAL,
             ALTER COLUMN jb SET COMPRESSION lz4;",
    )
    .await
    .unwrap();
    let mut p = env.spawn(&env.config(&["bin_types"], ""));
    wait_equal(&env, "bin_types", "id", Duration::from_secs(30)).await;
    let rows = [
        "(1, true, 32767, -2147483648, 12345678901234567890.123456789, 12.34, 1.5, -2.25e-300, 'plain', 'vc', 'ab',
          '\\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1,  2]}', '{\"b\": null}', '2024-02-29',
          '1999-12-31 23:59:59.5', '2024-01-01 12:00:00.1239', '2024-06-01 12:00:00+02', 'red')",
        "(2, false, -32768, 2147483647, 'NaN', -9999999999.99, 'NaN', 'Infinity', E'tab\\there\\nnewline \\\\ ünïcødé 🚀', '', '',
          '\\x', '00000000-0000-0000-0000-000000000000', '[]', '{}', 'infinity', '-infinity', 'infinity', '-infinity', 'green')",
        "(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        "(4, true, 0, 0, '-Infinity', 0, '-Infinity', -0.0, repeat('é', 3000), 'x', 'xxxxx', decode(repeat('ab', 5000), 'hex'),
          gen_random_uuid(), '1', '\"s\"', '0044-03-15 BC', '4713-01-01 00:00:00 BC', '0001-01-01 00:00:00.001 BC',
          '0044-03-15 12:00:00+01 BC', NULL)",
        "(5, true, 1, 1, '0.000000000000000000001', '-0.5', '3.4028235e38', '5e-324', 'a', 'b', 'c', '\\x01', gen_random_uuid(),
          'null', '[1.50, 2e3]', '5874897-12-31', '294276-12-31 23:59:59.999999', '1970-01-01 00:00:00', '1970-01-01 00:00:00+00', 'red')",
        "(6, false, -1, -1, '-0.0001', 0.5, '1.4e-45', '0.1', 'x', 'y', 'z', '\\x', gen_random_uuid(), '{}', '{\"k\": \"v\"}',
          '2000-01-01', '2000-01-01 00:00:00', '1999-12-31 23:59:59.999', '1999-12-31 23:59:59.999999-12', 'green')",
        "(7, true, 7, 7, '100000000', '-100000000', '-0.1', '-1.7976931348623157e308', 'q', 'r', 's', '\\xdeadbeef', gen_random_uuid(),
          '3', '-3.25', '1582-10-10', '1066-10-14 09:00:00', '2038-01-19 03:14:07.5', '2038-01-19 03:14:07.5+14', 'red')",
        "(8, true, 8, 8, '9999.9999', '0.01', '0', '0', 's', 's', 's', '\\x00', gen_random_uuid(), 'true', 'false',
          '1999-12-31', '1999-12-31 23:59:59.999999', '2000-01-01 00:00:00.001', '2000-01-01 00:00:00.000001+00', 'green')",
    ];
    src.batch_execute(&format!("INSERT INTO bin_types VALUES {}", rows.join(","))).await.unwrap();
    wait_equal(&env, "bin_types", "id", Duration::from_secs(30)).await;
    // Updates, a key move and a delete go through the merge, staged in binary; `by` of
    // row 4 is stored out of line, so leaving it alone sends it as unchanged.
    src.batch_execute(
        "UPDATE bin_types SET i4 = i4 + 1 WHERE id = 4;
         UPDATE bin_types SET n = n * 2, n2 = -n2, ts = ts + interval '1 day', d = d - 1, tx = tx || '!' WHERE id IN (1, 6, 7, 8);
         UPDATE bin_types SET id = 40 WHERE id = 4;
         DELETE FROM bin_types WHERE id = 2;",
    )
    .await
    .unwrap();
    wait_equal(&env, "bin_types", "id", Duration::from_secs(30)).await;
    let toasted: i32 = env.dst().await.query_one("SELECT length(by) FROM bin_types WHERE id = 40", &[]).await.unwrap().get(0);
    assert_eq!(toasted, 5000);
    // The table Sluice created stores its columns as the source does.
    let storage: Vec<(String, String, String)> = env
        .dst()
        .await
        .query(
            "SELECT attname::text, attstorage::text, attcompression::text FROM pg_attribute
             WHERE attrelid = 'bin_types'::regclass AND attname IN ('vc', 'by', 'jb', 'tx') ORDER BY attname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want = [("by", "e", ""), ("jb", "x", "l"), ("tx", "x", ""), ("vc", "p", "")];
    assert_eq!(storage, want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())));
    let log = p.log();
    assert!(log.contains("bin_types") && log.contains("binary"), "the rows should have been copied in binary: {log}");
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}
