//! The Postgres side of Sluice: logical-replication source, consistent snapshots and
//! the Postgres sink.

mod catalog;
pub mod cluster;
mod conn;
mod copy_text;
mod error;
mod pgoutput;
pub mod replication;
mod sink;
mod snapshot;
mod stream;

pub use catalog::{SlotInfo, load_table, publication_tables, slot_info, verify_slot, wal_level};
pub use conn::{PgConnConfig, connect, connect_listening};
pub use copy_text::{CopyRowDecoder, decode_row};
pub use error::{PgError, Result};
pub use sink::{Checkpoint, PostgresSink, PostgresSinkConfig, STATE_DDL, SnapshotFilter, key_of};
pub use snapshot::{CopyIntoState, RowEnrich, RowTarget, SnapshotOptions, SnapshotProgress, SnapshotTable, run_snapshot};
pub use stream::{Acker, HEARTBEAT_PREFIX, RESYNC_PREFIX, ReplicationStream, StreamItem};
