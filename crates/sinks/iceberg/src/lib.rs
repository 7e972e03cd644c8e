//! The Iceberg sink: each source table kept as an Apache Iceberg table (format v2,
//! Parquet files) that engines already read (pyiceberg, Spark, Trino, DuckDB).
//!
//! - `config`: the settings (`sink: iceberg:`), checked, and how they connect.
//! - `catalog`: the SQL catalog in Postgres (pyiceberg's `SqlCatalog` layout).
//! - `rest`: an Iceberg REST catalog.
//! - `table`: a table's metadata, and the files of one commit (data files, equality
//!   deletes, manifests, manifest list, metadata) written with the `iceberg` crate's
//!   writers; the row-delta commit is assembled here, since the crate has no action
//!   that commits deletes.
//! - `storage`: the warehouse: a local directory or S3-compatible object storage.
//! - `layout`: partition specs and sort orders from the config.
//! - `encoding`: Postgres columns as Iceberg types, rows as Arrow record batches.
//! - `maintenance`: compaction, snapshot expiry, orphan-file removal (scheduled by the
//!   sink, and `sluice iceberg compact|expire`).
//! - `sink`: staging, the commit cadence, the `Sink` lifecycle.
//!
//! Exactly once: a commit swaps the catalog pointer of every table it changed and
//! moves the pipeline's checkpoint in the same Postgres transaction. Changes wait in
//! memory for the next commit (`commit_interval`, `commit_rows`), and the source is told
//! only what is committed, so a crash loses nothing: the source sends again what the
//! last commit did not hold, and what it did hold is skipped by its commit LSN.
//!
//! Modes: `upsert` mirrors the source table (each commit writes the last image per key
//! plus equality deletes on the key, which remove the rows of earlier commits);
//! `changelog` appends one row per change with `_op`, `_lsn`, `_commit_ts`, `_seq`.

mod catalog;
mod config;
mod encoding;
mod error;
mod layout;
mod maintenance;
mod rest;
mod sink;
mod storage;
mod table;

pub use config::{CatalogConfig, IcebergSinkConfig, MaintenanceConfig, Mode, RestCatalogConfig, S3StorageConfig, SqlCatalogConfig};
pub use error::IcebergError;
pub use layout::TableLayout;
pub use maintenance::{Maintenance, MaintenanceReport, maintain};
pub use sink::IcebergSink;
