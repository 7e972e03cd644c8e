//! The seam between the runner's stream phase and a source of changes.
//!
//! The runner streams from a [`ChangeSource`]: it opens a [`ChangeStream`] at the
//! sink's resume position, reads committed transactions in commit order, confirms
//! positions once the sink holds them (an [`Acker`], from the apply task), and keeps the
//! source's position moving while the tables are idle (`heartbeat`). Postgres logical
//! replication is the one implementation (`sluice_postgres::PostgresSource`); the checks
//! and the consistent snapshot are that source's own (an exported snapshot of its slot)
//! and stay outside this seam until a second source shows what they have in common.

use std::future::Future;
use std::sync::Arc;

use crate::{ErrorKind, Lsn, TableSchema, Transaction};

/// What a change stream yields, in commit order.
#[derive(Debug)]
pub enum StreamItem {
    Txn(Transaction),
    /// Everything before this position has been delivered: with nothing pending, it is
    /// safe to confirm (idle streams, heartbeats).
    Position(Lsn),
    /// A resync watermark (a logical message the resync wrote), in its place among the
    /// transactions.
    Mark(Lsn, String),
}

/// Confirms positions to the source, from another task than the one reading.
#[derive(Clone)]
pub struct Acker(Arc<dyn Fn(Lsn) + Send + Sync>);

impl Acker {
    pub fn new(confirm: impl Fn(Lsn) + Send + Sync + 'static) -> Self {
        Self(Arc::new(confirm))
    }

    /// Everything up to `lsn` is durable in the sink: the source may forget it.
    pub fn ack(&self, lsn: Lsn) {
        (self.0)(lsn)
    }
}

/// Where the log a source keeps for a pipeline stands (Postgres: its replication slot's
/// `wal_status`). `Lost` is final: the source removed log the pipeline had not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WalStatus {
    #[default]
    Unknown,
    /// Within `max_wal_size`.
    Reserved,
    /// Beyond `max_wal_size`, held by the slot.
    Extended,
    /// Past `max_slot_wal_keep_size`: removed at the next checkpoint unless read.
    Unreserved,
    Lost,
}

impl WalStatus {
    /// As Postgres spells it in `pg_replication_slots.wal_status`.
    pub fn parse(s: &str) -> Self {
        match s {
            "reserved" => Self::Reserved,
            "extended" => Self::Extended,
            "unreserved" => Self::Unreserved,
            "lost" => Self::Lost,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Reserved => "reserved",
            Self::Extended => "extended",
            Self::Unreserved => "unreserved",
            Self::Lost => "lost",
        }
    }

    /// The gauge value: rising with the danger, -1 when unknown.
    pub fn code(self) -> i64 {
        match self {
            Self::Unknown => -1,
            Self::Reserved => 0,
            Self::Extended => 1,
            Self::Unreserved => 2,
            Self::Lost => 3,
        }
    }
}

/// What a heartbeat learns about the log kept for the pipeline.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetentionHealth {
    pub status: WalStatus,
    /// Bytes of log held back (`None`: unknown, or nothing held).
    pub retained_bytes: Option<i64>,
    /// Bytes that can still be written before the log is at risk of removal (`None`:
    /// no limit configured, or unknown).
    pub safe_bytes: Option<i64>,
}

/// A source failure, with whether retrying can help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SourceError {
    /// `source`'s message becomes this error's; its kind is `kind`.
    pub fn wrap(kind: ErrorKind, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { kind, message: source.to_string(), source: Some(Box::new(source)) }
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

pub type SourceResult<T> = Result<T, SourceError>;

/// A source the runner streams changes from.
pub trait ChangeSource: Send + Sync + 'static {
    type Stream: ChangeStream;

    /// Opens the stream of `tables`' committed transactions after `from` (the sink's
    /// resume position; the source may resume later, from what it was last confirmed).
    fn open(&self, from: Lsn, tables: &[Arc<TableSchema>]) -> impl Future<Output = SourceResult<Self::Stream>> + Send;

    /// Writes a mark into the source's log, so that an idle stream still yields
    /// positions to confirm, and returns the state of the log the source keeps for
    /// this pipeline.
    fn heartbeat(&self) -> impl Future<Output = SourceResult<RetentionHealth>> + Send;
}

/// An open stream of changes.
pub trait ChangeStream: Send + 'static {
    /// The next item; `None` when the source ended the stream.
    fn next(&mut self) -> impl Future<Output = SourceResult<Option<StreamItem>>> + Send;

    /// Confirms positions from another task.
    fn acker(&self) -> Acker;

    /// Sends the last confirmed position and closes the stream.
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}
