//! The checkpoint of a sink that keeps it with its data (`sluice.pipelines` in the same
//! database): read when the sink connects, moved inside the transaction that commits a
//! batch, so a batch and its position are durable together.

use sluice_core::Lsn;
use tokio_postgres::Client;

use crate::error::{PgError, Result};

/// What the sink has durably applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Commit LSN of the last applied transaction: anything at or below is a replay.
    pub commit_lsn: Lsn,
    /// End LSN of that transaction (or a later idle position): safe to confirm.
    pub end_lsn: Lsn,
}

impl Checkpoint {
    /// The pipeline's checkpoint, registering the pipeline (at 0/0) the first time.
    pub async fn register(client: &Client, pipeline: &str) -> Result<Self> {
        client
            .execute("INSERT INTO sluice.pipelines (pipeline) VALUES ($1) ON CONFLICT DO NOTHING", &[&pipeline])
            .await
            .map_err(|e| PgError::from_pg("registering the pipeline's checkpoint", e))?;
        let row = client
            .query_one("SELECT commit_lsn::text, end_lsn::text FROM sluice.pipelines WHERE pipeline = $1", &[&pipeline])
            .await
            .map_err(|e| PgError::from_pg("reading the checkpoint", e))?;
        let parse = |s: String| s.parse::<Lsn>().map_err(|e| PgError::permanent(e.to_string()));
        Ok(Self { commit_lsn: parse(row.get(0))?, end_lsn: parse(row.get(1))? })
    }

    /// Moves the checkpoint to `self` after `txns` more transactions; call it inside the
    /// transaction that commits them.
    pub async fn save(&self, client: &Client, pipeline: &str, txns: i64) -> Result<()> {
        client
            .execute(
                "UPDATE sluice.pipelines SET commit_lsn = $2::text::pg_lsn, end_lsn = $3::text::pg_lsn,
                 applied_txns = applied_txns + $4, updated_at = now() WHERE pipeline = $1",
                &[&pipeline, &self.commit_lsn.to_string(), &self.end_lsn.to_string(), &txns],
            )
            .await
            .map_err(|e| PgError::from_pg("moving the checkpoint", e))?;
        Ok(())
    }
}
