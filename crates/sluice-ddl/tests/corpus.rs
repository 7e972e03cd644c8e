//! The migration corpus: each case is a migration (one or more statements) with the
//! verdict and rule ids it must produce, without and with catalog context from a real
//! Postgres.

use Verdict::*;
use sluice_ddl::{Model, Verdict};

/// (migration, expected file verdict, expected rule ids in order)
const WITHOUT_CONTEXT: &[(&str, Verdict, &[&str])] = &[
    // Safe changes.
    ("ALTER TABLE t ADD COLUMN note text", Allowed, &[]),
    ("ALTER TABLE t ADD COLUMN n int DEFAULT 0", Allowed, &[]),
    ("ALTER TABLE t ADD COLUMN n int NOT NULL DEFAULT 0", Allowed, &[]),
    ("ALTER TABLE t ADD COLUMN at timestamptz DEFAULT now()", Allowed, &[]),
    ("ALTER TABLE t ALTER COLUMN c DROP NOT NULL", Allowed, &[]),
    ("ALTER TABLE t ALTER COLUMN c SET DEFAULT 5", Allowed, &[]),
    ("CREATE TABLE IF NOT EXISTS audit (id bigint PRIMARY KEY, at timestamptz)", Allowed, &[]),
    ("CREATE INDEX CONCURRENTLY t_c ON t (c)", Allowed, &[]),
    ("ALTER TABLE t ADD CONSTRAINT c_pos CHECK (c > 0) NOT VALID", Allowed, &[]),
    ("ALTER TABLE t VALIDATE CONSTRAINT c_pos", Allowed, &[]),
    ("ALTER TYPE mood ADD VALUE 'meh'", Allowed, &[]),
    ("ALTER TABLE t REPLICA IDENTITY FULL", Allowed, &[]),
    ("COMMENT ON TABLE t IS 'orders'", Allowed, &[]),
    ("GRANT SELECT ON t TO reporting", Allowed, &[]),
    ("INSERT INTO t (id) VALUES (1)", Allowed, &[]),
    ("UPDATE t SET c = 1 WHERE id = 2", Allowed, &[]),
    ("CREATE VIEW v AS SELECT id FROM t", Allowed, &[]),
    ("DROP VIEW v", Allowed, &[]),
    ("CREATE SEQUENCE s", Allowed, &[]),
    ("ALTER TABLE t ADD CONSTRAINT u UNIQUE USING INDEX t_u", Allowed, &[]),
    ("BEGIN; ALTER TABLE t ADD COLUMN a int; COMMIT;", Allowed, &[]),
    // Blocked.
    ("ALTER TABLE t ALTER COLUMN c SET NOT NULL", Blocked, &["set-not-null"]),
    ("ALTER TABLE app.t ALTER c SET NOT NULL", Blocked, &["set-not-null"]),
    ("ALTER TABLE t ADD COLUMN c int NOT NULL", Blocked, &["add-column-not-null-no-default"]),
    ("ALTER TABLE t ADD c text NOT NULL, ADD d text", Blocked, &["add-column-not-null-no-default"]),
    ("ALTER TABLE t RENAME COLUMN a TO b", Blocked, &["rename-column"]),
    ("ALTER TABLE t RENAME a TO b", Blocked, &["rename-column"]),
    ("ALTER TABLE t RENAME TO t2", Blocked, &["rename-table"]),
    ("ALTER TABLE t SET SCHEMA archive", Blocked, &["set-schema"]),
    ("ALTER TABLE t REPLICA IDENTITY NOTHING", Blocked, &["replica-identity"]),
    ("ALTER TABLE t DROP CONSTRAINT t_pkey", Blocked, &["replica-identity"]),
    ("DROP INDEX t_pkey", Blocked, &["replica-identity"]),
    ("CREATE PUBLICATION p FOR ALL TABLES", Blocked, &["replication-objects"]),
    ("ALTER PUBLICATION p DROP TABLE t", Blocked, &["replication-objects"]),
    ("DROP PUBLICATION p", Blocked, &["replication-objects"]),
    ("SELECT pg_drop_replication_slot('sluice_orders')", Blocked, &["replication-objects"]),
    ("SELECT pg_create_logical_replication_slot('x', 'pgoutput')", Blocked, &["replication-objects"]),
    ("DROP TABLE sluice.pipelines", Blocked, &["drop-table", "replication-objects"]),
    ("ALTER TABLE t ALTER COLUMN c SET NOT NULL, ALTER COLUMN d SET NOT NULL", Blocked, &["set-not-null", "set-not-null"]),
    // Needs coordination.
    ("DROP TABLE t", NeedsCoordination, &["drop-table"]),
    ("DROP TABLE IF EXISTS a, b CASCADE", NeedsCoordination, &["drop-table", "drop-table"]),
    ("TRUNCATE t", NeedsCoordination, &["truncate"]),
    ("TRUNCATE TABLE a, b RESTART IDENTITY", NeedsCoordination, &["truncate", "truncate"]),
    ("ALTER TABLE t DROP COLUMN c", NeedsCoordination, &["drop-column"]),
    ("ALTER TABLE t ALTER COLUMN c TYPE bigint", NeedsCoordination, &["alter-column-type"]),
    ("ALTER TABLE t ALTER COLUMN c TYPE text USING c::text", NeedsCoordination, &["alter-column-type"]),
    // Warnings only.
    ("CREATE INDEX t_c ON t (c)", Warning, &["create-index-not-concurrently"]),
    ("CREATE UNIQUE INDEX t_u ON t (c)", Warning, &["create-index-not-concurrently"]),
    ("ALTER TABLE t ADD COLUMN u uuid DEFAULT gen_random_uuid()", Warning, &["add-column-volatile-default"]),
    ("ALTER TABLE t ADD COLUMN r float8 DEFAULT random()", Warning, &["add-column-volatile-default"]),
    ("ALTER TABLE t ADD CONSTRAINT c_pos CHECK (c > 0)", Warning, &["constraint-not-valid"]),
    ("ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u) REFERENCES users (id)", Warning, &["constraint-not-valid"]),
    ("ALTER TABLE t ADD CONSTRAINT u UNIQUE (c)", Warning, &["constraint-not-valid"]),
    ("ALTER TYPE mood RENAME VALUE 'sad' TO 'blue'", Warning, &["enum-rename-value"]),
    ("ALTER TABLE p ATTACH PARTITION p2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')", Warning, &["partition-attach-detach"]),
    ("ALTER TABLE p DETACH PARTITION p2024", Warning, &["partition-attach-detach"]),
    // Multi-statement files: the worst verdict wins; acknowledgements do not count.
    (
        "ALTER TABLE t ADD COLUMN n text;\nCREATE INDEX t_n ON t (n);\nALTER TABLE t ALTER COLUMN n SET NOT NULL;",
        Blocked,
        &["create-index-not-concurrently", "set-not-null"],
    ),
    ("-- sluice:allow rename-column all consumers moved to v2\nALTER TABLE t RENAME COLUMN a TO b;", Allowed, &["rename-column"]),
    (
        "-- sluice:allow drop-table decommissioned in PLAT-123\nDROP TABLE legacy;\nTRUNCATE other;",
        NeedsCoordination,
        &["drop-table", "truncate"],
    ),
    ("-- sluice:allow set-not-null wrong rule acknowledged\nALTER TABLE t RENAME TO u;", Blocked, &["rename-table"]),
    ("CREATE TABLE n (id int PRIMARY KEY);\nCREATE INDEX n_x ON n (id);", Warning, &["create-index-not-concurrently"]),
];

fn check(sql: &str, model: &Model) -> sluice_ddl::FileReport {
    sluice_ddl::check("case.sql", sql, &mut model.clone()).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[test]
fn corpus_without_context() {
    assert!(WITHOUT_CONTEXT.len() >= 55);
    for (sql, verdict, rules) in WITHOUT_CONTEXT {
        let r = check(sql, &Model::default());
        assert_eq!((r.verdict, r.rule_ids().as_slice()), (*verdict, *rules), "{sql}");
    }
}

const FIXTURE: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, email text NOT NULL, note text, qty integer, code varchar(10),
                     price numeric(10,2), status text NOT NULL DEFAULT 'new');
CREATE TABLE items (order_id bigint, sku text, n int, PRIMARY KEY (order_id, sku));
CREATE UNIQUE INDEX items_natural ON items (order_id, sku, n);
CREATE TABLE scratch (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE other (id int PRIMARY KEY);
CREATE PUBLICATION sluice_shop FOR TABLE orders, items;
CREATE PUBLICATION elsewhere FOR TABLE other;";

/// (migration, expected verdict, rule ids) with the fixture's catalog as context.
const WITH_CONTEXT: &[(&str, Verdict, &[&str])] = &[
    // Not replicated: nothing to protect.
    ("ALTER TABLE scratch ALTER COLUMN v SET NOT NULL", Allowed, &[]),
    ("ALTER TABLE scratch RENAME COLUMN v TO w", Allowed, &[]),
    ("DROP TABLE scratch", Allowed, &[]),
    ("CREATE INDEX s_v ON scratch (v)", Allowed, &[]),
    // Replicated.
    ("ALTER TABLE orders ALTER COLUMN note SET NOT NULL", Blocked, &["set-not-null"]),
    ("ALTER TABLE orders DROP COLUMN note", Allowed, &["drop-column"]),
    ("ALTER TABLE orders DROP COLUMN email", Blocked, &["drop-column"]),
    ("ALTER TABLE orders ALTER COLUMN qty TYPE bigint", NeedsCoordination, &["alter-column-type"]),
    ("ALTER TABLE orders ALTER COLUMN qty TYPE smallint", Blocked, &["alter-column-type"]),
    ("ALTER TABLE orders ALTER COLUMN qty TYPE integer", Allowed, &[]),
    ("ALTER TABLE orders ALTER COLUMN code TYPE varchar(20)", NeedsCoordination, &["alter-column-type"]),
    ("ALTER TABLE orders ALTER COLUMN code TYPE varchar(5)", Blocked, &["alter-column-type"]),
    ("ALTER TABLE orders ALTER COLUMN price TYPE numeric(8,2)", Blocked, &["alter-column-type"]),
    ("ALTER TABLE orders ALTER COLUMN qty TYPE text", Blocked, &["alter-column-type"]),
    ("ALTER TABLE orders DROP CONSTRAINT orders_pkey", Blocked, &["replica-identity"]),
    ("DROP INDEX orders_pkey", Blocked, &["replica-identity"]),
    ("ALTER TABLE items REPLICA IDENTITY USING INDEX items_natural", Allowed, &[]),
    ("CREATE INDEX o_note ON orders (note)", Warning, &["create-index-not-concurrently"]),
    // Statement by statement: the model follows the migration.
    ("ALTER TABLE orders ALTER COLUMN note SET NOT NULL;\nALTER TABLE orders DROP COLUMN note;", Blocked, &["set-not-null", "drop-column"]),
    ("ALTER TABLE orders ALTER COLUMN email DROP NOT NULL;\nALTER TABLE orders DROP COLUMN email;", Allowed, &["drop-column"]),
    (
        "ALTER TABLE orders ADD COLUMN extra int;\nALTER TABLE orders ALTER COLUMN extra TYPE bigint;",
        NeedsCoordination,
        &["alter-column-type"],
    ),
    ("ALTER TABLE scratch RENAME TO orders_v2;\nALTER TABLE orders_v2 RENAME COLUMN v TO w;", Allowed, &[]),
];

#[tokio::test(flavor = "multi_thread")]
async fn corpus_with_catalog_context_from_a_real_postgres() {
    let cluster = sluice_postgres::cluster::TempCluster::start(&[]).unwrap();
    let client = sluice_postgres::cluster::superuser_client(cluster.port, "postgres").await.unwrap();
    client.batch_execute(FIXTURE).await.unwrap();
    let model = Model::load(&client, None).await.unwrap();
    for (sql, verdict, rules) in WITH_CONTEXT {
        let r = check(sql, &model);
        assert_eq!((r.verdict, r.rule_ids().as_slice()), (*verdict, *rules), "{sql}");
    }
    // Scoped to one pipeline's publication, the other publication's table is not protected.
    let scoped = Model::load(&client, Some(&["sluice_shop".to_string()])).await.unwrap();
    assert_eq!(check("TRUNCATE other", &scoped).verdict, Allowed);
    assert_eq!(check("TRUNCATE other", &model).verdict, NeedsCoordination);
    assert!(WITHOUT_CONTEXT.len() + WITH_CONTEXT.len() >= 60);
}

#[test]
fn unparseable_sql_names_line_and_column() {
    let err =
        sluice_ddl::check("m.sql", "ALTER TABLE t ADD COLUMN a int;\n\nALTER TABLE t ADD COLUMN b intt4 NOT NUL;", &mut Model::default())
            .unwrap_err()
            .to_string();
    assert!(err.starts_with("m.sql:3:"), "{err}");
    assert!(err.contains("syntax error"), "{err}");
}
