//! A random write workload against two replicated tables, and target-side audit
//! triggers that make a change applied twice fail loudly.
//!
//! Every insert or update gives the row a new, globally unique `ver` (from a source
//! sequence). In the target, a trigger records each applied row version in
//! `applied(ver PRIMARY KEY)`: applying any change a second time violates that key,
//! the sink's batch fails, and the pipeline stops with an error.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

pub const SOURCE_DDL: &str = "
CREATE SEQUENCE ver_seq;
CREATE TABLE accounts (id int8 PRIMARY KEY, ver int8 NOT NULL, balance numeric(20,4), label text, doc text);
CREATE TABLE tags (a int4, b text, ver int8 NOT NULL, note text, PRIMARY KEY (a, b));
CREATE TABLE unreplicated (id serial PRIMARY KEY, v text);";

pub const TARGET_DDL: &str = "
CREATE TABLE accounts (id int8 PRIMARY KEY, ver int8 NOT NULL, balance numeric(20,4), label text, doc text);
CREATE TABLE tags (a int4, b text, ver int8 NOT NULL, note text, PRIMARY KEY (a, b));
CREATE TABLE applied (ver int8 PRIMARY KEY, tbl text, op text);
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO applied VALUES (NEW.ver, TG_TABLE_NAME, TG_OP); RETURN NEW; END $$;
CREATE TRIGGER accounts_audit AFTER INSERT OR UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION audit();
CREATE TRIGGER tags_audit AFTER INSERT OR UPDATE ON tags FOR EACH ROW EXECUTE FUNCTION audit();";

/// A value big enough to be stored out of line (TOAST) even after compression.
pub const BIG: &str = "(SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 300) g)";

pub struct Workload {
    rng: StdRng,
    pub next_id: i64,
    pub txns: u64,
    pub big_txn_done: bool,
    pub truncate_done: bool,
}

impl Workload {
    pub fn new(seed: u64, next_id: i64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), next_id, txns: 0, big_txn_done: false, truncate_done: false }
    }

    fn random_id(&mut self) -> i64 {
        self.rng.random_range(1..self.next_id.max(2))
    }

    /// One random transaction of 1-4 statements.
    pub fn next_txn(&mut self, elapsed: Duration, total: Duration) -> String {
        let mut sql = String::from("BEGIN;");
        if !self.big_txn_done && elapsed > total / 3 {
            self.big_txn_done = true;
            let lo = self.next_id;
            self.next_id += 100_000;
            sql += &format!(
                "INSERT INTO accounts SELECT g, nextval('ver_seq'), g * 1.5, 'bulk', NULL FROM generate_series({lo}, {}) g;",
                self.next_id - 1
            );
        } else if !self.truncate_done && elapsed > total / 2 {
            self.truncate_done = true;
            sql += "TRUNCATE tags;";
        } else {
            for _ in 0..self.rng.random_range(1..=4) {
                let stmt = match self.rng.random_range(0..100) {
                    0..=29 => {
                        let id = self.next_id;
                        self.next_id += 1;
                        let doc = if self.rng.random_bool(0.15) { BIG.to_string() } else { "NULL".into() };
                        format!(
                            "INSERT INTO accounts VALUES ({id}, nextval('ver_seq'), {}, 'acct {id}', {doc})",
                            self.rng.random_range(0..1_000_000)
                        )
                    }
                    30..=49 => {
                        format!("UPDATE accounts SET balance = balance + 1.25, ver = nextval('ver_seq') WHERE id = {}", self.random_id())
                    }
                    50..=56 => format!("UPDATE accounts SET doc = {BIG}, ver = nextval('ver_seq') WHERE id = {}", self.random_id()),
                    57..=62 => {
                        let id = self.next_id;
                        self.next_id += 1;
                        format!("UPDATE accounts SET id = {id}, ver = nextval('ver_seq') WHERE id = {}", self.random_id())
                    }
                    63..=72 => format!("DELETE FROM accounts WHERE id = {}", self.random_id()),
                    73..=86 => format!(
                        "INSERT INTO tags VALUES ({}, 'k{}', nextval('ver_seq'), 'n') ON CONFLICT (a, b) DO UPDATE SET ver = EXCLUDED.ver, note = tags.note || '+'",
                        self.rng.random_range(0..50),
                        self.rng.random_range(0..20)
                    ),
                    87..=92 => format!("DELETE FROM tags WHERE a = {}", self.rng.random_range(0..50)),
                    _ => format!("INSERT INTO unreplicated (v) VALUES ('noise {}')", self.rng.random::<u32>()),
                };
                sql += &stmt;
                sql += ";";
            }
        }
        sql += "COMMIT;";
        self.txns += 1;
        sql
    }

    /// Writes random transactions for `total`.
    pub async fn run(&mut self, client: &Client, total: Duration) {
        let start = Instant::now();
        while start.elapsed() < total {
            let sql = self.next_txn(start.elapsed(), total);
            client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("workload: {e:?}"));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
