//! The SQL catalog in Postgres: the tables of pyiceberg's `SqlCatalog` (and Iceberg
//! Java's `JdbcCatalog`), so those readers open the tables Sluice writes. A table is a
//! row pointing at its current metadata file; a commit is a compare-and-set of that
//! pointer, in the caller's transaction.

use sluice_postgres::PgError;
use tokio_postgres::Client;

/// Created by whichever of Sluice and the readers comes first; the same columns as
/// pyiceberg and Iceberg Java create (their "v1" layout, with `iceberg_type`, which
/// tells tables from views; a "v0" catalog made by an older reader has no such column).
const DDL: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(7290461);
CREATE TABLE IF NOT EXISTS iceberg_tables (
    catalog_name varchar(255) NOT NULL,
    table_namespace varchar(255) NOT NULL,
    table_name varchar(255) NOT NULL,
    metadata_location varchar(1000),
    previous_metadata_location varchar(1000),
    iceberg_type varchar(5),
    PRIMARY KEY (catalog_name, table_namespace, table_name)
);
CREATE TABLE IF NOT EXISTS iceberg_namespace_properties (
    catalog_name varchar(255) NOT NULL,
    namespace varchar(255) NOT NULL,
    property_key varchar(255) NOT NULL,
    property_value varchar(1000) NOT NULL,
    PRIMARY KEY (catalog_name, namespace, property_key)
);
COMMIT;";

/// The catalog that names the tables.
pub(crate) enum Catalog {
    Sql(SqlCatalog),
    Rest(crate::rest::RestCatalog),
}

pub(crate) struct SqlCatalog {
    pub name: String,
    /// The catalog has the v1 layout's `iceberg_type` column (known after `ensure`).
    pub typed: std::sync::atomic::AtomicBool,
}

fn pg(what: &str) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
    move |e| PgError::from_pg(what, e)
}

impl SqlCatalog {
    /// Creates the catalog's tables when missing.
    pub async fn ensure(&self, c: &Client) -> Result<(), PgError> {
        let exists: bool = c
            .query_one("SELECT to_regclass('iceberg_tables') IS NOT NULL AND to_regclass('iceberg_namespace_properties') IS NOT NULL", &[])
            .await
            .map_err(pg("reading the Iceberg catalog"))?
            .get(0);
        if !exists {
            c.batch_execute(DDL).await.map_err(pg("creating the Iceberg catalog's tables"))?;
        }
        let typed: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'iceberg_tables' AND column_name = 'iceberg_type'
                     AND table_schema = current_schema())",
                &[],
            )
            .await
            .map_err(pg("reading the Iceberg catalog"))?
            .get(0);
        self.typed.store(typed, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Records the namespace (as pyiceberg's `create_namespace` does) when missing.
    pub async fn ensure_namespace(&self, c: &Client, namespace: &str) -> Result<(), PgError> {
        c.execute(
            "INSERT INTO iceberg_namespace_properties VALUES ($1, $2, 'exists', 'true') ON CONFLICT DO NOTHING",
            &[&self.name, &namespace],
        )
        .await
        .map_err(pg("creating the Iceberg namespace"))?;
        Ok(())
    }

    /// The table's current metadata file, if the table exists.
    pub async fn load(&self, c: &Client, namespace: &str, table: &str) -> Result<Option<String>, PgError> {
        let row = c
            .query_opt(
                "SELECT metadata_location FROM iceberg_tables WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3",
                &[&self.name, &namespace, &table],
            )
            .await
            .map_err(pg("reading the Iceberg catalog"))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The table's current metadata file, locked until the caller's transaction ends:
    /// the sink's commits and maintenance commits take turns through this lock.
    pub async fn lock(&self, c: &Client, namespace: &str, table: &str) -> Result<String, PgError> {
        let row = c
            .query_opt(
                "SELECT metadata_location FROM iceberg_tables WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3
                 FOR UPDATE",
                &[&self.name, &namespace, &table],
            )
            .await
            .map_err(pg("locking the Iceberg table"))?;
        row.and_then(|r| r.get::<_, Option<String>>(0)).ok_or_else(|| {
            PgError::permanent(format!(
                "Iceberg table {namespace}.{table} is gone from catalog {}: it was dropped while the pipeline ran; \
                 restart the pipeline to create it again",
                self.name
            ))
        })
    }

    /// Registers a new table; false when another writer registered it first.
    pub async fn create(&self, c: &Client, namespace: &str, table: &str, metadata: &str) -> Result<bool, PgError> {
        let sql = if self.typed.load(std::sync::atomic::Ordering::Relaxed) {
            "INSERT INTO iceberg_tables (catalog_name, table_namespace, table_name, metadata_location, iceberg_type)
             VALUES ($1, $2, $3, $4, 'TABLE') ON CONFLICT DO NOTHING"
        } else {
            "INSERT INTO iceberg_tables (catalog_name, table_namespace, table_name, metadata_location)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
        };
        let n = c.execute(sql, &[&self.name, &namespace, &table, &metadata]).await.map_err(pg("registering the Iceberg table"))?;
        Ok(n == 1)
    }

    /// Moves the table's pointer from `old` to `new`, inside the caller's transaction;
    /// refuses when someone else committed since `old` was read.
    pub async fn swap(&self, c: &Client, namespace: &str, table: &str, old: &str, new: &str) -> Result<(), PgError> {
        let n = c
            .execute(
                "UPDATE iceberg_tables SET metadata_location = $5, previous_metadata_location = $4
                 WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3 AND metadata_location = $4",
                &[&self.name, &namespace, &table, &old, &new],
            )
            .await
            .map_err(pg("committing the Iceberg table"))?;
        if n != 1 {
            return Err(PgError::permanent(format!(
                "Iceberg table {namespace}.{table} in catalog {} was changed by another writer since Sluice last committed it: \
                 only this pipeline may write the tables it mirrors; stop the other writer and restart the pipeline",
                self.name
            )));
        }
        Ok(())
    }

    pub async fn drop(&self, c: &Client, namespace: &str, table: &str) -> Result<(), PgError> {
        c.execute(
            "DELETE FROM iceberg_tables WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3",
            &[&self.name, &namespace, &table],
        )
        .await
        .map_err(pg("dropping the Iceberg table"))?;
        Ok(())
    }
}
