//! The store: one per name in the process, shared by every sink opened under it (a
//! pipeline reconnects its sink after an error, and a test reads it meanwhile).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use sluice_core::sink::{Sink, SinkResult, SnapshotChunk, SnapshotMethod};
use sluice_core::{ChangeEvent, Lsn, Op, Row, SourcePosition, TableName, TableSchema, Transaction};

/// What a store holds.
#[derive(Default, Clone)]
pub struct Received {
    /// Snapshot rows and streamed changes, in the order they were delivered.
    pub events: Vec<ChangeEvent>,
    /// Changes counted, kept or not.
    pub count: u64,
    /// Transactions applied.
    pub transactions: u64,
    /// Batches applied (calls of `apply`).
    pub batches: u64,
}

static STORES: LazyLock<Mutex<HashMap<String, Arc<Mutex<Received>>>>> = LazyLock::new(Default::default);

fn store(name: &str) -> Arc<Mutex<Received>> {
    STORES.lock().expect("stores").entry(name.to_string()).or_default().clone()
}

/// A copy of what the store `name` holds now.
pub fn received(name: &str) -> Received {
    store(name).lock().expect("store").clone()
}

pub struct MemorySink {
    store: Arc<Mutex<Received>>,
    keep: bool,
}

impl MemorySink {
    pub fn open(name: &str, keep: bool) -> Self {
        Self { store: store(name), keep }
    }

    fn take<'a>(&self, events: impl Iterator<Item = &'a ChangeEvent>) {
        let mut s = self.store.lock().expect("store");
        for e in events {
            s.count += 1;
            if self.keep {
                s.events.push(e.clone());
            }
        }
    }
}

impl Sink for MemorySink {
    fn snapshot_method(&self) -> SnapshotMethod {
        SnapshotMethod::Rows
    }

    async fn prepare(&mut self, _: &[Arc<TableSchema>]) -> SinkResult<()> {
        Ok(())
    }

    async fn has_progress(&self) -> SinkResult<bool> {
        Ok(false)
    }

    async fn snapshot_rows(&self, table: &Arc<TableSchema>, _: &SnapshotChunk, rows: Vec<Row>, snapshot_lsn: Lsn) -> SinkResult<()> {
        let position = SourcePosition { lsn: snapshot_lsn, commit_lsn: snapshot_lsn, ..Default::default() };
        let events: Vec<ChangeEvent> =
            rows.into_iter().map(|r| ChangeEvent { op: Op::Read, table: table.clone(), before: None, after: Some(r), position }).collect();
        self.take(events.iter());
        Ok(())
    }

    async fn apply(&mut self, batch: &[Transaction]) -> SinkResult<()> {
        self.take(batch.iter().flat_map(|t| &t.events));
        let mut s = self.store.lock().expect("store");
        s.transactions += batch.len() as u64;
        s.batches += 1;
        Ok(())
    }

    async fn teardown(&self, _: &[TableName], purge: bool) -> SinkResult<()> {
        if purge {
            *self.store.lock().expect("store") = Received::default();
        }
        Ok(())
    }
}
