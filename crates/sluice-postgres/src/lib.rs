//! The Postgres side of Sluice: logical-replication source, consistent snapshots and
//! the Postgres sink.

mod catalog;
pub mod cluster;
mod conn;
mod copy_text;
mod error;
mod pgoutput;
mod sink;
mod snapshot;
mod stream;

pub use catalog::{load_table, publication_tables, slot_info, verify_slot, wal_level, SlotInfo};
pub use conn::{connect, connect_listening, PgConnConfig};
pub use error::{PgError, Result};
pub use sink::{key_of, Checkpoint, PostgresSink, SnapshotFilter, STATE_DDL};
pub use copy_text::{decode_row, CopyRowDecoder};
pub use snapshot::{run_snapshot, CopyIntoState, RowEnrich, RowTarget, SnapshotOptions, SnapshotProgress, SnapshotTable};
pub use stream::{Acker, ReplicationStream, StreamItem, HEARTBEAT_PREFIX, RESYNC_PREFIX};
