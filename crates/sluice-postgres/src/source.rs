//! Postgres as the runner's change source: its pipeline's slot and publication, set up
//! once, streamed with pgoutput, kept moving with heartbeats.

use std::collections::HashMap;
use std::sync::Arc;

use sluice_core::source::{Acker, ChangeSource, ChangeStream, RetentionHealth, SourceError, SourceResult, StreamItem};
use sluice_core::{Lsn, TableName, TableSchema};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::conn::{PgConnConfig, connect};
use crate::error::PgError;
use crate::replication::{self, PublicationTables};
use crate::stream::ReplicationStream;

/// A pipeline's view of its source database: where to connect, and the names of its
/// slot and publication.
pub struct PostgresSource {
    conn: PgConnConfig,
    pipeline: String,
    slot: String,
    publication: String,
    /// Row filters and column lists of the tables that have them.
    filters: HashMap<TableName, replication::TableFilter>,
    /// The heartbeat's connection, opened again after it drops.
    heartbeat: Mutex<Option<Client>>,
    max_transaction_memory: usize,
}

impl PostgresSource {
    pub fn new(conn: PgConnConfig, pipeline: &str, slot: &str, publication: &str) -> Self {
        Self {
            conn,
            pipeline: pipeline.to_string(),
            slot: slot.to_string(),
            publication: publication.to_string(),
            filters: HashMap::new(),
            heartbeat: Mutex::new(None),
            max_transaction_memory: crate::stream::DEFAULT_MAX_TRANSACTION_MEMORY,
        }
    }

    /// How much of one transaction the stream holds before handing it on in pieces.
    pub fn with_max_transaction_memory(mut self, bytes: usize) -> Self {
        self.max_transaction_memory = bytes;
        self
    }

    /// The row filters and column lists the publication gives its tables.
    pub fn with_filters(mut self, filters: HashMap<TableName, replication::TableFilter>) -> Self {
        self.filters = filters;
        self
    }

    /// Adds `missing` tables to the publication (creating it), installs DDL capture
    /// (when the role may), and creates the slot unless it exists.
    pub async fn prepare(&self, missing: &[TableName], slot_exists: bool) -> Result<(), PgError> {
        let c = connect(&self.conn, "source").await?;
        if !missing.is_empty() {
            replication::ensure_publication(&c, &self.publication, missing, &self.filters, PublicationTables::Add).await?;
            tracing::info!(publication = %self.publication, tables = missing.len(), "publication ready");
        }
        if !crate::ddl_capture::install(&c, &self.pipeline).await? {
            tracing::warn!(
                "DDL capture is not installed in the source (creating an event trigger needs a superuser): column drops, renames and \
                 type changes reach the sink as new shapes only; have a superuser run `sluice run` once, or provision through the control plane"
            );
        }
        if !slot_exists {
            replication::create_slot(&c, &self.slot).await?;
            tracing::info!(slot = %self.slot, "created replication slot");
        }
        Ok(())
    }
}

impl PostgresSource {
    /// Replaces the pipeline's lost slot with a new one; returns where its stream starts.
    pub async fn replace_lost_slot(&self) -> Result<Lsn, PgError> {
        let c = connect(&self.conn, "source").await?;
        replication::replace_slot(&c, &self.slot).await
    }

    /// The source's `max_slot_wal_keep_size`, for messages.
    pub async fn wal_keep_limit(&self) -> Result<String, PgError> {
        let c = connect(&self.conn, "source").await?;
        let row =
            c.query_one("SHOW max_slot_wal_keep_size", &[]).await.map_err(|e| PgError::from_pg("reading max_slot_wal_keep_size", e))?;
        Ok(row.get(0))
    }
}

fn source_error(e: PgError) -> SourceError {
    SourceError::wrap(e.kind(), e)
}

impl ChangeSource for PostgresSource {
    type Stream = ReplicationStream;

    async fn open(&self, from: Lsn, tables: &[Arc<TableSchema>]) -> SourceResult<ReplicationStream> {
        // Relations the stream meets mid-flight are looked up in the catalog.
        let catalog = connect(&self.conn, "source").await.map_err(source_error)?;
        let mut stream = ReplicationStream::start(&self.conn, &self.slot, &self.publication, from, tables, catalog)
            .await
            .map_err(source_error)?
            .with_max_transaction_memory(self.max_transaction_memory);
        stream.column_lists = self.filters.iter().filter_map(|(t, f)| Some((t.clone(), f.columns.clone()?))).collect();
        tracing::info!(slot = %self.slot, from = %from, "streaming");
        Ok(stream)
    }

    async fn heartbeat(&self) -> SourceResult<RetentionHealth> {
        let mut client = self.heartbeat.lock().await;
        if client.as_ref().is_none_or(Client::is_closed) {
            *client = Some(connect(&self.conn, "source").await.map_err(source_error)?);
        }
        let c = client.as_ref().expect("connected above");
        replication::emit_heartbeat(c, &self.pipeline).await.map_err(source_error)?;
        replication::slot_health(c, &self.slot).await.map_err(source_error)
    }
}

impl ChangeStream for ReplicationStream {
    async fn next(&mut self) -> SourceResult<Option<StreamItem>> {
        ReplicationStream::next(self).await.map_err(source_error)
    }

    fn acker(&self) -> Acker {
        ReplicationStream::acker(self)
    }

    async fn shutdown(self) {
        ReplicationStream::shutdown(self).await
    }
}
