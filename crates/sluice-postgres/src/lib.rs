//! The Postgres side of Sluice: logical-replication source, consistent snapshots, the
//! slot, publication, heartbeat and watermark SQL, and the COPY codec (the Postgres
//! sink is in `crates/sinks/postgres`).

mod catalog;
mod checkpoint;
mod chunks;
pub mod cluster;
mod conn;
mod copy_binary;
mod copy_text;
pub mod ddl_capture;
mod error;
mod pgoutput;
pub mod pki;
pub mod replication;
mod snapshot;
mod source;
mod stream;

pub use catalog::{SlotInfo, load_table, publication_tables, recover_refusal, slot_info, verify_slot, wal_level};
pub use checkpoint::Checkpoint;
pub use chunks::{SnapshotFilter, TruncateScope, int_key};
pub use conn::{PgConnConfig, connect, connect_as, connect_listening, in_transaction, parse_dsn};
pub use copy_binary::{BinaryField, BinaryRows, put_rows as put_binary_rows};
pub use copy_text::{CopyRowDecoder, decode_row, put_field, put_row};
pub use error::{PgError, Result};
pub use sluice_core::SslMode;
pub use snapshot::{CopyIntoState, RowEnrich, RowTarget, SnapshotOptions, SnapshotProgress, SnapshotTable, SnapshotXids, run_snapshot};
pub use source::PostgresSource;
pub use stream::{DEFAULT_MAX_TRANSACTION_MEMORY, HEARTBEAT_PREFIX, RESYNC_PREFIX, ReplicationStream};
