//! The Postgres sink: committed source transactions applied to tables of another
//! Postgres, exactly once.
//!
//! - `config`: the settings (`sink: postgres:`), checked, and how they connect.
//! - `sink`: the `Sink` lifecycle: target tables created from the source's shape,
//!   batches merged through COPY into staging tables, the checkpoint moved in the same
//!   transaction. The initial snapshot is COPY from the source straight into the
//!   target (`SnapshotMethod::CopyInTarget`, run by `sluice-postgres`), its chunk marks
//!   committed with the rows.
//!
//! The row encoding is COPY's text format (`sluice_postgres::put_row`), shared with the
//! snapshot.

mod config;
mod sink;

pub use config::PostgresSinkConfig;
pub use sink::PostgresSink;
