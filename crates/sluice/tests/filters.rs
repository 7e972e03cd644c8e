//! Publication row filters and column lists: the sink holds exactly the filtered rows
//! and columns after the snapshot, streaming (rows moving in and out of the filter by
//! update), a kill -9 and a resync; bad filters are refused before anything is made.

use std::time::{Duration, Instant};

use crate::checks::{assert_untouched, expect_failure};
use crate::common::*;

const TABLES: &str = "
  tables:
    - {name: public.orders, where: \"region = 'eu'\"}
    - {name: public.people, where: \"id % 2 = 0\", columns: [id, name]}
";

/// The pipeline config for this test's database with `tables` as the `tables:` block.
fn filtered_config(env: &Env, tables: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(env.config(&["x"], "")).unwrap().replace("  tables: [x]\n", tables);
    env.write_config(&text)
}

async fn source_digest(c: &tokio_postgres::Client, select: &str) -> (i64, String) {
    let row = c
        .query_one(
            &format!("SELECT count(*), coalesce(md5(string_agg(digest_row_::text, E'\\n' ORDER BY id)), '') FROM ({select}) digest_row_"),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn wait_filtered_equal(env: &Env) {
    let (src, dst) = (env.src().await, env.dst().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let want = (
            source_digest(&src, "SELECT * FROM orders WHERE region = 'eu'").await,
            source_digest(&src, "SELECT id, name FROM people WHERE id % 2 = 0").await,
        );
        let got = (try_digest(&dst, "orders", "id").await, try_digest(&dst, "people", "id").await);
        if (Some(want.0.clone()), Some(want.1.clone())) == got {
            return;
        }
        assert!(Instant::now() < deadline, "sink {got:?} never held the filtered source {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sink_holds_exactly_the_filtered_rows_and_columns() {
    let env = Env::new("rowfilter").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE orders (id int8 PRIMARY KEY, region text NOT NULL, status text, amount int4);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         INSERT INTO orders SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'new', g FROM generate_series(1, 400) g;
         CREATE TABLE people (id int8 PRIMARY KEY, name text, secret text);
         INSERT INTO people SELECT g, 'p' || g, 'secret ' || g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let cfg = filtered_config(&env, TABLES);
    let mut p = env.spawn(&cfg);
    wait_filtered_equal(&env).await;
    let dst = env.dst().await;
    let cols: Vec<String> = dst
        .query("SELECT attname::text FROM pg_attribute WHERE attrelid = 'people'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cols, ["id", "name"], "the column list is the sink's shape");

    // Rows move out of the filter (eu → us: deleted from the sink) and into it (us → eu:
    // inserted), others change inside or outside it; kill -9 half way.
    for round in 0..6 {
        src.batch_execute(&format!(
            "UPDATE orders SET region = 'us' WHERE id % 10 = {round} AND region = 'eu';
             UPDATE orders SET region = 'eu', status = 'moved' WHERE id % 10 = {} AND region = 'us';
             UPDATE orders SET amount = amount + 1 WHERE id % 7 = {round};
             DELETE FROM orders WHERE id % 50 = {round};
             INSERT INTO orders SELECT 1000 * ({round} + 1) + g, CASE WHEN g % 3 = 0 THEN 'eu' ELSE 'us' END, 'new', g FROM generate_series(1, 20) g;
             UPDATE people SET name = name || '+', secret = 'changed' WHERE id % 5 = {round};
             INSERT INTO people VALUES (1000 + {round}, 'new {round}', 'hidden');",
            round + 5
        ))
        .await
        .unwrap();
        if round == 2 {
            p.kill9();
            p = env.spawn(&cfg);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_filtered_equal(&env).await;
    let moved_out: i64 = dst.query_one("SELECT count(*) FROM orders WHERE region <> 'eu'", &[]).await.unwrap().get(0);
    assert_eq!(moved_out, 0, "rows that left the filter are gone from the sink");

    // A resync reads what the filter publishes, and removes rows outside it.
    dst.batch_execute("INSERT INTO orders VALUES (999999, 'us', 'stray', 0)").await.unwrap();
    let (code, stderr) = run_to_exit(&["resync", "--config", cfg.to_str().unwrap(), "--table", "public.orders"], Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    wait_filtered_equal(&env).await;
    p.assert_running();
    assert_eq!(p.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_filters_and_column_lists_are_refused_before_anything_is_made() {
    let env = Env::new("rowfilter_bad").await;
    env.src()
        .await
        .batch_execute("CREATE TABLE orders (id int8 PRIMARY KEY, region text, secret text); CREATE TABLE people (id int8 PRIMARY KEY, name text, secret text);")
        .await
        .unwrap();
    let cases = [
        // A filter on a column outside the replica identity would make Postgres refuse
        // the table's updates.
        ("    - {name: public.orders, where: \"region = 'eu'\"}\n", "replica identity"),
        ("    - {name: public.people, columns: [name]}\n", "must include the key column \"id\""),
        ("    - {name: public.people, columns: [id, nmae]}\n", "column \"nmae\" in `columns` does not exist"),
        ("    - {name: public.people, where: \"id = \"}\n", "Postgres refuses this filter"),
        ("    - {name: public.people, wher: \"id = 1\"}\n", "unknown field `wher`"),
        ("    - {name: public.people, where: \"id = 1; DROP TABLE people\"}\n", "one SQL condition"),
    ];
    for (entry, want) in cases {
        expect_failure(&filtered_config(&env, &format!("  tables:\n{entry}")), want);
        assert_untouched(&env).await;
    }
}
