use std::sync::Arc;

use bytes::Bytes;

use crate::{Lsn, TableSchema};

/// One column of a row image, in the source's text encoding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Datum {
    #[default]
    Null,
    /// A TOASTed value the update did not touch: Postgres does not resend it, so the
    /// sink must keep the value it already has. Never written as a value.
    Unchanged,
    Text(Bytes),
}

impl Datum {
    pub fn as_text(&self) -> Option<&[u8]> {
        match self {
            Datum::Text(b) => Some(b),
            _ => None,
        }
    }
}

pub type Row = Vec<Datum>;

/// A row's key columns as one byte string (each value length-prefixed, so `("ab", "c")`
/// and `("a", "bc")` differ), for maps and sets keyed by row.
pub fn key_of(row: &Row, keys: &[usize]) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    for &i in keys {
        match &row[i] {
            Datum::Text(b) => {
                k.extend((b.len() as u32).to_be_bytes());
                k.extend_from_slice(b);
            }
            _ => k.extend(u32::MAX.to_be_bytes()),
        }
    }
    k
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A row read by the initial snapshot.
    Read,
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    /// The Debezium envelope's `op` letter.
    pub fn code(self) -> char {
        match self {
            Op::Read => 'r',
            Op::Insert => 'c',
            Op::Update => 'u',
            Op::Delete => 'd',
            Op::Truncate => 't',
        }
    }
}

/// Where a change sits in the source's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourcePosition {
    /// LSN of the change's own WAL record (0 when the protocol does not carry it).
    pub lsn: Lsn,
    /// LSN of the commit record of the change's transaction.
    pub commit_lsn: Lsn,
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// Order of the change within its transaction, from 0.
    pub seq: u32,
}

#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub op: Op,
    pub table: Arc<TableSchema>,
    /// The old key (replica identity default/index) or the whole old row (full).
    pub before: Option<Row>,
    pub after: Option<Row>,
    pub position: SourcePosition,
}

impl ChangeEvent {
    /// Size of the row images' payload in bytes, for throughput metrics.
    pub fn payload_bytes(&self) -> usize {
        let len = |r: &Option<Row>| r.as_ref().map_or(0, |r| r.iter().map(|d| d.as_text().map_or(0, <[u8]>::len)).sum());
        len(&self.before) + len(&self.after)
    }

    /// What the event holds in memory, as allocated: its row images' bytes and the
    /// structures around them (the event, each image's vector of values, each value's
    /// slice of the message). Every memory bound counts events by it (a transaction
    /// held by the source, the pipeline's buffer and batches), so each bound is near
    /// what is resident.
    pub fn resident_bytes(&self) -> usize {
        let values = self.before.as_ref().map_or(0, Vec::len) + self.after.as_ref().map_or(0, Vec::len);
        self.payload_bytes() + 48 * values + 160
    }
}

/// A committed source transaction, in commit order; or a piece of one.
///
/// A transaction larger than the stream holds in memory (`batch.max_transaction_memory`)
/// arrives in consecutive pieces sharing its `xid` and `commit_lsn`: every piece but the
/// last `continues`, and only the last carries `end_lsn`. A piece is a batch of its own
/// for every piece but the last, so nothing past a piece is confirmed before the last
/// one is applied; a sink that commits transactions whole keeps its write open across
/// the pieces (Postgres) or does not commit while one is open (Iceberg).
#[derive(Debug, Clone)]
pub struct Transaction {
    pub xid: u32,
    /// LSN of the commit record: orders transactions and identifies them for replay.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: what the source is told is flushed.
    pub end_lsn: Lsn,
    /// Microseconds since the Unix epoch.
    pub commit_time_us: i64,
    pub events: Vec<ChangeEvent>,
    /// The schema changes the source recorded in this transaction (DDL capture), each
    /// placed among the events by its `seq`.
    pub ddl: Vec<crate::ddl::SchemaChange>,
    /// More of this transaction follows in the next item (then `end_lsn` is zero).
    pub continues: bool,
}
