//! The state store: the `sluice` schema in a pipeline's state database (the sink itself
//! when the sink is Postgres), defined by the files in `migrations/`, one per feature,
//! each naming the feature that owns its tables.
//!
//! Every file is idempotent (`IF NOT EXISTS`, guarded `ALTER`s), so a database whose
//! tables were created before the migrations were recorded is brought up to date
//! without error. A new feature's tables are a new file and a line in [`MIGRATIONS`];
//! a file once released is never edited (a change is a new file).

use sluice_postgres::PgError;
use tokio_postgres::Client;

/// One file of `migrations/`.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

macro_rules! migrations {
    ($($version:literal $name:literal,)*) => {
        &[$(Migration { version: $version, name: $name, sql: include_str!(concat!("../migrations/", $name, ".sql")) },)*]
    };
}

/// In the order they apply.
static MIGRATIONS: &[Migration] = migrations! {
    1 "0001_checkpoints",
    2 "0002_snapshot_chunks",
    3 "0003_resyncs",
    4 "0004_enrichment",
    5 "0005_search_sink",
    6 "0006_webhook_sink",
    7 "0007_slot_recovery",
    8 "0008_resync_keys",
    9 "0009_snapshot_key_bounds",
};

/// Serializes migrations of one database: pipelines starting together would otherwise
/// race on `CREATE SCHEMA IF NOT EXISTS` (a unique violation).
const LOCK: i64 = 7290452;

/// Brings the state schema up to date. Cheap when it is (two reads, no lock, no DDL:
/// pipelines may run as roles that cannot create tables once they exist).
pub async fn migrate(state: &Client) -> Result<(), PgError> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    if applied_version(state).await? >= latest {
        return Ok(());
    }
    let fail = |what: &str| {
        let what = what.to_string();
        move |e| PgError::from_pg(&what, e)
    };
    state.batch_execute("BEGIN").await.map_err(fail("starting the state migration"))?;
    let r = async {
        state
            .batch_execute(&format!(
                "SELECT pg_advisory_xact_lock({LOCK});
                 CREATE SCHEMA IF NOT EXISTS sluice;
                 CREATE TABLE IF NOT EXISTS sluice.state_migrations (
                     version int4 PRIMARY KEY,
                     name text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 );"
            ))
            .await
            .map_err(fail("creating the state schema"))?;
        // Read again under the lock: another pipeline may have just migrated.
        let applied = applied_version(state).await?;
        for m in MIGRATIONS.iter().filter(|m| m.version > applied) {
            state.batch_execute(m.sql).await.map_err(fail(&format!("applying state migration {}", m.name)))?;
            state
                .execute("INSERT INTO sluice.state_migrations (version, name) VALUES ($1, $2)", &[&m.version, &m.name])
                .await
                .map_err(fail("recording a state migration"))?;
            tracing::info!(migration = m.name, "applied state migration");
        }
        state.batch_execute("COMMIT").await.map_err(fail("committing the state migration"))
    }
    .await;
    if r.is_err() {
        let _ = state.batch_execute("ROLLBACK").await;
    }
    r
}

async fn applied_version(state: &Client) -> Result<i32, PgError> {
    let err = |e| PgError::from_pg("reading the state schema's version", e);
    let exists: bool = state.query_one("SELECT to_regclass('sluice.state_migrations') IS NOT NULL", &[]).await.map_err(err)?.get(0);
    if !exists {
        return Ok(0);
    }
    Ok(state.query_one("SELECT coalesce(max(version), 0) FROM sluice.state_migrations", &[]).await.map_err(err)?.get(0))
}

/// Removes a pipeline's rows from every state table (each has a `pipeline` column), so a
/// pipeline of the same name later starts from nothing.
pub async fn forget_pipeline(state: &Client, pipeline: &str) -> Result<(), PgError> {
    let tables = state
        .query(
            "SELECT c.table_name::text FROM information_schema.columns c
             WHERE c.table_schema = 'sluice' AND c.column_name = 'pipeline' ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| PgError::from_pg("listing the state tables", e))?;
    for t in tables {
        let table: String = t.get(0);
        state
            .execute(&format!("DELETE FROM sluice.{} WHERE pipeline = $1", sluice_core::quote_ident(&table)), &[&pipeline])
            .await
            .map_err(|e| PgError::from_pg(&format!("removing the pipeline's rows from sluice.{table}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in `migrations/` that the table does not list would never run.
    #[test]
    fn every_file_is_listed_once_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter_map(|f| f.strip_suffix(".sql").map(str::to_string))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, listed);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}: versions count up from 1", m.name);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)), "{}: the file name starts with its version", m.name);
            assert!(m.sql.trim_start().starts_with("-- Owner:"), "{}: the file names the feature that owns its tables", m.name);
        }
    }
}
