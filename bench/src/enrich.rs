//! Lookup enrichment: streaming throughput into the Postgres sink with a lookup in a
//! reference table, with a warm cache and with no cache (every batch fetches its
//! keys), against the same pipeline without enrichment over the same WAL.

use std::time::Instant;

use anyhow::{Result, bail};
use sluice_postgres::cluster::{SUPERUSER, SUPERUSER_PASSWORD};
use std::sync::atomic::Ordering;

use crate::{connect, peak_rss_mb, servers, start_pipeline, wait_events};

fn yaml(name: &str, src: u16, dst: u16, enrich: Option<&str>) -> String {
    let mut y = format!(
        "pipeline: {name}\nsource: {{host: 127.0.0.1, port: {src}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, \
         database: bench, tables: [public.orders]}}\n\
         sink: {{postgres: {{host: 127.0.0.1, port: {dst}, user: {SUPERUSER}, password: {SUPERUSER_PASSWORD}, database: bench, schema: {name}}}}}\n\
         snapshot: {{enabled: false}}\n"
    );
    if let Some(ttl) = enrich {
        y.push_str(&format!(
            "enrich:\n  - name: customer\n    lookup: {{table: public.customers, key: id, on: customer_id, fields: [name, tier, region], \
             cache_ttl: {ttl}, cache_max_entries: 1000000}}\n"
        ));
    }
    y
}

/// Streams `rows` orders (after a first `rows` that warm the cache up) through each
/// pipeline; returns the measured phase's rows/s and the cache's hit ratio.
async fn run(name: &str, src: u16, dst: u16, enrich: Option<&str>, rows: u64) -> Result<(f64, f64)> {
    let (metrics, stop, handle) = start_pipeline(&yaml(name, src, dst, enrich))?;
    wait_events(&metrics, rows, &handle).await?;
    let (f0, c0) = (metrics.enrich_fetched.load(Ordering::Relaxed), metrics.enrich_cached.load(Ordering::Relaxed));
    let t = Instant::now();
    wait_events(&metrics, 2 * rows, &handle).await?;
    let secs = t.elapsed().as_secs_f64();
    let (f1, c1) = (metrics.enrich_fetched.load(Ordering::Relaxed), metrics.enrich_cached.load(Ordering::Relaxed));
    let _ = stop.send(true);
    handle.await??;
    let asked = (f1 - f0) + (c1 - c0);
    Ok((rows as f64 / secs, if asked == 0 { 0.0 } else { (c1 - c0) as f64 / asked as f64 }))
}

pub async fn enrich(rows: u64, customers: u64) -> Result<serde_json::Value> {
    let (src, dst) = servers().await?;
    let s = connect(src.port, "bench").await?;
    s.batch_execute(&format!(
        "CREATE TABLE customers (id int8 PRIMARY KEY, name text, tier text, region text);
         INSERT INTO customers SELECT g, 'customer ' || g, (ARRAY['basic','gold','platinum'])[g % 3 + 1], 'region-' || (g % 17)
         FROM generate_series(1, {customers}) g;
         CREATE TABLE orders (id int8 PRIMARY KEY, customer_id int8, payload text);"
    ))
    .await?;
    for p in ["base", "cold", "warm"] {
        // Separately: a slot cannot be created in a transaction that wrote.
        s.batch_execute(&format!("CREATE PUBLICATION sluice_{p} FOR TABLE orders, customers")).await?;
        s.batch_execute(&format!("SELECT pg_create_logical_replication_slot('sluice_{p}', 'pgoutput')")).await?;
    }
    eprintln!("writing 2 x {rows} orders over {customers} customers...");
    for start in (0..2 * rows).step_by(10_000) {
        let n = 10_000.min(2 * rows - start);
        s.batch_execute(&format!(
            "INSERT INTO orders SELECT g, (hashint8(g) & 2147483647) % {customers} + 1, md5(g::text) FROM generate_series({}, {}) g",
            start + 1,
            start + n
        ))
        .await?;
    }
    let (base, _) = run("base", src.port, dst.port, None, rows).await?;
    let (cold, cold_hits) = run("cold", src.port, dst.port, Some("0s"), rows).await?;
    let (warm, warm_hits) = run("warm", src.port, dst.port, Some("1h"), rows).await?;

    // The enriched targets must equal the join computed by the source.
    let expect: (i64, String) = {
        let r = s
            .query_one(
                "SELECT count(*), md5(string_agg(concat_ws('|', o.id, c.name, c.tier, c.region), ',' ORDER BY o.id))
                 FROM orders o LEFT JOIN customers c ON c.id = o.customer_id",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    let d = connect(dst.port, "bench").await?;
    for p in ["cold", "warm"] {
        let r = d
            .query_one(
                &format!(
                    "SELECT count(*), md5(string_agg(concat_ws('|', id, customer_name, customer_tier, customer_region), ',' ORDER BY id))
                     FROM {p}.orders"
                ),
                &[],
            )
            .await?;
        let got: (i64, String) = (r.get(0), r.get(1));
        if got != expect {
            bail!("{p}: enriched target {got:?} differs from the source's join {expect:?}");
        }
    }
    Ok(serde_json::json!({
        "bench": "enrich", "rows": rows, "customers": customers,
        "no_enrichment_rows_per_s": base,
        "lookup_cold_rows_per_s": cold, "lookup_cold_cache_hit_ratio": cold_hits,
        "lookup_warm_rows_per_s": warm, "lookup_warm_cache_hit_ratio": warm_hits,
        "cold_vs_no_enrichment": cold / base,
        "warm_vs_no_enrichment": warm / base,
        "peak_rss_mb": peak_rss_mb(),
    }))
}
