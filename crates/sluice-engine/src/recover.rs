//! Recovering from a lost replication slot.
//!
//! A source that keeps more WAL for a slot than `max_slot_wal_keep_size` invalidates
//! it (`wal_status = lost`): the changes since the sink's position are gone, and the
//! slot can never stream again. Dropping the sink and snapshotting from scratch would
//! empty it for as long as the reload takes. Instead the pipeline replaces the slot
//! (its stream starts now) and reads every table again with the watermark resync,
//! which applies the current rows in their place in the new stream and, in a sink
//! that mirrors the source's rows, removes the rows the source deleted meanwhile.
//! The sink keeps serving what it has the whole time.
//!
//! A request (`sluice recover`, the control plane's recover workflow, or the
//! pipeline itself under `on_slot_lost: resync`) is a row here plus the resync's rows,
//! written before the slot is replaced; the row is removed after. A crash anywhere in
//! between finds the request again and finishes it.

use anyhow::{Context as _, Result};
use sluice_core::TableName;
use tokio_postgres::Client;

/// Records a recovery of `pipeline` (named `id`, a workflow id or a timestamp) that
/// reads `tables` again. Returns the id in effect: an earlier request still pending
/// is kept.
pub async fn request(state: &Client, pipeline: &str, id: i64, tables: &[TableName]) -> Result<i64> {
    crate::state::migrate(state).await?;
    let row = state
        .query_one(
            "INSERT INTO sluice.slot_recoveries (pipeline, id) VALUES ($1, $2)
             ON CONFLICT (pipeline) DO UPDATE SET pipeline = EXCLUDED.pipeline RETURNING id",
            &[&pipeline, &id],
        )
        .await
        .context("recording the slot recovery")?;
    let id: i64 = row.get(0);
    crate::resync::request(state, pipeline, id, tables).await?;
    Ok(id)
}

/// The pending recovery of `pipeline`, if any.
pub async fn pending(state: &Client, pipeline: &str) -> Result<Option<i64>> {
    crate::state::migrate(state).await?;
    let row = state
        .query_opt("SELECT id FROM sluice.slot_recoveries WHERE pipeline = $1", &[&pipeline])
        .await
        .context("reading slot recoveries")?;
    Ok(row.map(|r| r.get(0)))
}

/// The slot is replaced: what is left is the resync, which the stream carries out.
pub async fn finish(state: &Client, pipeline: &str) -> Result<()> {
    state.execute("DELETE FROM sluice.slot_recoveries WHERE pipeline = $1", &[&pipeline]).await.context("finishing the slot recovery")?;
    Ok(())
}

/// The one line a halted pipeline shows when its slot is gone.
pub fn lost_message(slot: &str, since: sluice_core::Lsn, keep_size: &str, recover_cli: &str) -> String {
    format!(
        "replication slot {slot} was invalidated by the source (wal_status lost: it held more WAL than \
         max_slot_wal_keep_size = {keep_size}), so the changes after {since} are gone: run `{recover_cli}` to replace the slot \
         and read every table again without emptying the sink (or set source.on_slot_lost: resync)"
    )
}
