//! The state store against a real Postgres: migrations apply once, adopt tables made
//! before they were recorded, and a purge forgets a pipeline in every state table.

use sluice_postgres::cluster::{TempCluster, superuser_client};

#[tokio::test(flavor = "multi_thread")]
async fn migrations_apply_once_adopt_old_tables_and_forget_a_pipeline_everywhere() {
    let pg = tokio::task::spawn_blocking(|| TempCluster::start(&[])).await.unwrap().unwrap();
    let c = superuser_client(pg.port, "postgres").await.unwrap();
    // A state database from before migrations were recorded: some tables exist, and
    // `resyncs` lacks its later columns.
    c.batch_execute(
        "CREATE SCHEMA sluice;
         CREATE TABLE sluice.pipelines (pipeline text PRIMARY KEY, commit_lsn pg_lsn NOT NULL DEFAULT '0/0',
             end_lsn pg_lsn NOT NULL DEFAULT '0/0', applied_txns int8 NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE sluice.resyncs (pipeline text NOT NULL, id int8 NOT NULL, table_name text NOT NULL, last_key text[],
             chunks int4 NOT NULL DEFAULT 0, rows int8 NOT NULL DEFAULT 0, deleted int8 NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false,
             requested_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz, PRIMARY KEY (pipeline, id, table_name));
         INSERT INTO sluice.pipelines (pipeline) VALUES ('p1'), ('p2');",
    )
    .await
    .unwrap();
    // Two pipelines starting together on one database.
    let c2 = superuser_client(pg.port, "postgres").await.unwrap();
    let (a, b) = tokio::join!(sluice_engine::state::migrate(&c), sluice_engine::state::migrate(&c2));
    a.unwrap();
    b.unwrap();
    let versions: Vec<i32> =
        c.query("SELECT version FROM sluice.state_migrations ORDER BY 1", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=versions.len() as i32).collect::<Vec<_>>(), "each migration recorded once");
    assert!(versions.len() >= 6);
    let filter: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'sluice' AND table_name = 'resyncs' AND column_name = 'filter')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(filter, "the old resyncs table got its later columns");
    // Up to date: nothing runs again (no DDL a role without CREATE could not run).
    c.batch_execute("REVOKE CREATE ON SCHEMA sluice FROM PUBLIC; CREATE ROLE plain LOGIN PASSWORD 'x'; GRANT USAGE ON SCHEMA sluice TO plain; GRANT SELECT ON sluice.state_migrations TO plain")
        .await
        .unwrap();
    c.batch_execute("SET ROLE plain").await.unwrap();
    sluice_engine::state::migrate(&c).await.unwrap();
    c.batch_execute("RESET ROLE").await.unwrap();

    c.batch_execute(
        "INSERT INTO sluice.snapshot_chunks (pipeline, table_name, chunk) VALUES ('p1', 't', 0), ('p2', 't', 0);
         INSERT INTO sluice.webhook_dead_letters (pipeline, event_id, table_name, event_key, reason, event) VALUES ('p1', 'e', 't', 'k', 'r', '{}');
         INSERT INTO sluice.enrich_versions VALUES ('p1', 'e', 'f');",
    )
    .await
    .unwrap();
    sluice_engine::state::forget_pipeline(&c, "p1").await.unwrap();
    for table in ["pipelines", "snapshot_chunks", "webhook_dead_letters", "enrich_versions"] {
        let n: i64 = c.query_one(&format!("SELECT count(*) FROM sluice.{table} WHERE pipeline = 'p1'"), &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "p1 left rows in sluice.{table}");
    }
    let kept: i64 = c.query_one("SELECT count(*) FROM sluice.pipelines WHERE pipeline = 'p2'", &[]).await.unwrap().get(0);
    assert_eq!(kept, 1, "another pipeline's rows stay");
}
