//! The cost of DDL capture on the source: a 1,000-statement migration on published
//! tables, each statement in its own transaction (as migration tools run them), with
//! the event trigger installed against without it, in alternating rounds of one run.

use std::time::Instant;

use anyhow::Result;
use tokio_postgres::Client;

use crate::{connect, servers};

async fn wal(c: &Client) -> Result<i64> {
    Ok(c.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await?.get(0))
}

/// One round: `statements` ALTER TABLEs over ten published tables (add, rename,
/// retype, drop a column, in turn). Returns seconds and WAL bytes written.
async fn migration(c: &Client, round: u32, statements: u32) -> Result<(f64, i64)> {
    let start_wal = wal(c).await?;
    let t = Instant::now();
    for i in 0..statements {
        let (table, col) = (i / 4 % 10, format!("r{round}_{}", i / 4));
        let sql = match i % 4 {
            0 => format!("ALTER TABLE t{table} ADD COLUMN {col} int4"),
            1 => format!("ALTER TABLE t{table} RENAME COLUMN {col} TO {col}_x"),
            2 => format!("ALTER TABLE t{table} ALTER COLUMN {col}_x TYPE int8"),
            _ => format!("ALTER TABLE t{table} DROP COLUMN {col}_x"),
        };
        c.batch_execute(&sql).await?;
    }
    Ok((t.elapsed().as_secs_f64(), wal(c).await? - start_wal))
}

pub async fn ddl_trigger(statements: u32, rounds: u32) -> Result<serde_json::Value> {
    let (src, _dst) = servers().await?;
    let c = connect(src.port, "bench").await?;
    for t in 0..10 {
        c.batch_execute(&format!(
            "CREATE TABLE t{t} (id int8 PRIMARY KEY, v text); INSERT INTO t{t} SELECT g, 'x' FROM generate_series(1, 1000) g"
        ))
        .await?;
    }
    let list: Vec<String> = (0..10).map(|t| format!("t{t}")).collect();
    c.batch_execute(&format!("CREATE PUBLICATION ddlbench FOR TABLE {}", list.join(", "))).await?;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let (mut wal_without, mut wal_with) = (0i64, 0i64);
    for round in 0..rounds * 2 {
        let capture = round % 2 == 1;
        if capture {
            sluice_postgres::ddl_capture::install(&c, "bench").await?;
        } else {
            sluice_postgres::ddl_capture::remove(&c, "bench").await?;
        }
        let (s, wal) = migration(&c, round, statements).await?;
        if capture {
            with.push(s);
            wal_with += wal;
        } else {
            without.push(s);
            wal_without += wal;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut without), median(&mut with));
    Ok(serde_json::json!({
        "bench": "ddl-trigger", "statements": statements, "rounds": rounds,
        "without_trigger_s": a, "with_trigger_s": b, "with_vs_without": b / a,
        "per_statement_ms_without": a * 1e3 / f64::from(statements), "per_statement_ms_with": b * 1e3 / f64::from(statements),
        "wal_bytes_per_statement_without": wal_without / i64::from(rounds * statements),
        "wal_bytes_per_statement_with": wal_with / i64::from(rounds * statements),
    }))
}
