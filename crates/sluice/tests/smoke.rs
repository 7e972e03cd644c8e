mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_stream_then_clean_stop() {
    let env = Env::new("smoke").await;
    let src = env.src().await;
    src.batch_execute(
        "CREATE TABLE items (id int8 PRIMARY KEY, name text, qty int4, big text);
         INSERT INTO items SELECT g, 'item ' || g, g % 7, NULL FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    let cfg = env.config(&["public.items"], "snapshot: {chunk_rows: 700}\n");
    let mut p = env.spawn(&cfg);
    wait_equal(&env, "items", "id", Duration::from_secs(30)).await;
    src.batch_execute(
        "INSERT INTO items VALUES (6000, 'new', 1, repeat('x', 300000));
         UPDATE items SET qty = qty + 1 WHERE id <= 100;
         DELETE FROM items WHERE id BETWEEN 200 AND 300;
         UPDATE items SET id = 7000 WHERE id = 5;
         UPDATE items SET qty = 99 WHERE id = 6000;",
    )
    .await
    .unwrap();
    wait_equal(&env, "items", "id", Duration::from_secs(30)).await;
    p.assert_running();
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}
