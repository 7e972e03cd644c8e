//! The SQL of Sluice's replication objects in a source, written once: the slot, the
//! publication, the heartbeat and the resync watermarks (logical messages). Both the
//! runner and the control plane's workflows go through these.

use std::collections::HashMap;

use sluice_core::source::{RetentionHealth, WalStatus};
use sluice_core::{TableName, quote_ident};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::error::{PgError, Result};
use crate::stream::{HEARTBEAT_PREFIX, RESYNC_PREFIX};

/// Creates the logical replication slot `slot` (pgoutput) unless it exists.
pub async fn create_slot(c: &Client, slot: &str) -> Result<()> {
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')
         WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1)",
        &[&slot],
    )
    .await
    .map_err(|e| PgError::from_pg(&format!("creating replication slot {slot}"), e))?;
    Ok(())
}

/// Drops `slot` if nobody reads it; returns the backend reading it, if any.
pub async fn drop_slot_if_idle(c: &Client, slot: &str) -> Result<Option<i32>> {
    let row = c
        .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(|e| PgError::from_pg(&format!("reading replication slot {slot}"), e))?;
    match row.map(|r| r.get::<_, Option<i32>>(0)) {
        None => Ok(None),
        Some(None) => match c.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await {
            Ok(_) => Ok(None),
            // Gone meanwhile is fine; taken meanwhile (object in use) the caller sees
            // when it looks again.
            Err(e) if matches!(e.code(), Some(&SqlState::UNDEFINED_OBJECT) | Some(&SqlState::OBJECT_IN_USE)) => Ok(None),
            // Anything else (no privilege to drop it, say) is the answer, not a retry.
            Err(e) => Err(PgError::from_pg(&format!("dropping replication slot {slot}"), e)),
        },
        Some(Some(pid)) => Ok(Some(pid)),
    }
}

/// Whether `slot` exists.
pub async fn slot_exists(c: &Client, slot: &str) -> Result<bool> {
    let row = c
        .query_one("SELECT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1)", &[&slot])
        .await
        .map_err(|e| PgError::from_pg(&format!("reading replication slot {slot}"), e))?;
    Ok(row.get(0))
}

/// How the publication's table list changes when it exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationTables {
    /// `ADD TABLE`: keep what it publishes, add these.
    Add,
    /// `SET TABLE`: publish exactly these.
    Set,
}

/// A table's publication row filter (`WHERE`) and column list, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableFilter {
    pub row_filter: Option<String>,
    pub columns: Option<Vec<String>>,
}

impl TableFilter {
    /// `t (c1, c2) WHERE (expr)`: the table as a publication lists it.
    pub fn publish(&self, t: &TableName) -> String {
        let mut out = t.quoted();
        if let Some(cols) = &self.columns {
            out.push_str(&format!(" ({})", cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")));
        }
        if let Some(w) = &self.row_filter {
            out.push_str(&format!(" WHERE ({w})"));
        }
        out
    }
}

/// Creates publication `name` for `tables` (changes to a partitioned table published
/// under its own name, which is the one the pipeline knows), or changes an existing
/// one's table list. `filters` gives a table its row filter and column list.
pub async fn ensure_publication(
    c: &Client,
    name: &str,
    tables: &[TableName],
    filters: &HashMap<TableName, TableFilter>,
    mode: PublicationTables,
) -> Result<()> {
    let exists: bool = c
        .query_one("SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)", &[&name])
        .await
        .map_err(|e| PgError::from_pg(&format!("reading publication {name}"), e))?
        .get(0);
    let list: Vec<String> = tables.iter().map(|t| filters.get(t).cloned().unwrap_or_default().publish(t)).collect();
    let sql = match (exists, mode) {
        (true, PublicationTables::Add) => format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(name), list.join(", ")),
        (true, PublicationTables::Set) => format!("ALTER PUBLICATION {} SET TABLE {}", quote_ident(name), list.join(", ")),
        (false, _) => {
            format!("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)", quote_ident(name), list.join(", "))
        }
    };
    c.batch_execute(&sql).await.map_err(|e| PgError::from_pg(&format!("setting up publication {name}"), e))?;
    Ok(())
}

/// Refuses a row filter or column list that would make Postgres reject the table's
/// updates or deletes (a filter on columns outside the replica identity, a column list
/// without it), or that is not valid SQL: tried on a publication created and rolled
/// back in one transaction, so the source's writes are never the ones that fail.
pub async fn check_filter(c: &Client, table: &TableName, filter: &TableFilter) -> std::result::Result<(), String> {
    let key: Option<String> = c
        .query_one(
            "SELECT (SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum LIMIT 1)",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| format!("{table}: {}", PgError::from_pg("reading the table", e)))?
        .get(0);
    let Some(col) = key else { return Err(format!("{table} has no columns")) };
    let col = quote_ident(&col);
    let t = table.quoted();
    let sql = format!(
        "BEGIN; CREATE PUBLICATION sluice_filter_check FOR TABLE {}; UPDATE {t} SET {col} = {col} WHERE false; DELETE FROM {t} WHERE false",
        filter.publish(table)
    );
    let r = c.batch_execute(&sql).await;
    let _ = c.batch_execute("ROLLBACK").await;
    // A role that may not publish or update the table cannot try it: whoever creates
    // the publication gets Postgres's own answer then.
    if r.as_ref().err().and_then(|e| e.code()).is_some_and(|c| *c == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        return Ok(());
    }
    r.map_err(|e| {
        let msg = e.as_db_error().map_or_else(
            || e.to_string(),
            |d| format!("{}{}", d.message(), d.detail().map(|x| format!(" ({x})")).unwrap_or_default()),
        );
        let hint = if msg.contains("replica identity") {
            format!(
                ": a row filter may only name replica-identity columns and a column list must include them; run ALTER TABLE {t} REPLICA IDENTITY FULL (then list every column, or none)"
            )
        } else {
            String::new()
        };
        format!("{table}: Postgres refuses this filter: {msg}{hint}")
    })
}

pub async fn drop_publication(c: &Client, name: &str) -> Result<()> {
    c.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
        .map_err(|e| PgError::from_pg(&format!("dropping publication {name}"), e))
}

/// The function a pipeline's role must be allowed to run for heartbeats and watermarks.
pub const EMIT_MESSAGE_FUNCTION: &str = "pg_logical_emit_message(boolean, text, text)";

/// Writes a heartbeat for `pipeline` into the WAL (a logical message outside any
/// transaction), so the slot advances when the replicated tables are idle.
pub async fn emit_heartbeat(c: &Client, pipeline: &str) -> Result<()> {
    c.execute("SELECT pg_logical_emit_message(false, $1, $2)", &[&HEARTBEAT_PREFIX, &pipeline])
        .await
        .map_err(|e| PgError::from_pg("writing a heartbeat", e))?;
    Ok(())
}

/// Writes a resync watermark (`lo:<mark>` / `hi:<mark>`) into the WAL, flushed.
///
/// A non-transactional message is not flushed by itself (Postgres 15 has no `flush`
/// argument), and the walsender only sends flushed WAL: on an idle source each
/// watermark would wait for the WAL writer (`wal_writer_delay`, 200 ms). The message
/// goes out in a transaction given an xid, whose commit flushes the WAL through it;
/// the transaction changes nothing, so pgoutput skips it.
pub async fn emit_watermark(c: &Client, text: &str) -> Result<()> {
    let err = |e| PgError::from_pg("writing a resync watermark", e);
    crate::in_transaction(c, async {
        c.execute("SELECT pg_logical_emit_message(false, $1, $2)", &[&RESYNC_PREFIX, &text]).await?;
        c.batch_execute("SELECT pg_current_xact_id()").await
    })
    .await
    .map_err(err)
}

/// `slot`'s `wal_status`, the WAL it holds back and how much more may be written
/// before it is at risk (a missing slot reads as lost: its changes are gone too).
pub async fn slot_health(c: &Client, slot: &str) -> Result<RetentionHealth> {
    let row = c
        .query_opt(
            "SELECT wal_status, (pg_current_wal_lsn() - restart_lsn)::int8, safe_wal_size
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| PgError::from_pg("reading the slot's WAL status", e))?;
    Ok(match row {
        None => RetentionHealth { status: WalStatus::Lost, ..Default::default() },
        Some(r) => RetentionHealth {
            status: r.get::<_, Option<String>>(0).as_deref().map_or(WalStatus::Unknown, WalStatus::parse),
            retained_bytes: r.get(1),
            safe_bytes: r.get(2),
        },
    })
}

/// Replaces a lost `slot` with a new one, whose stream starts now. Returns the new
/// slot's start position. What happened in between must be read again (a resync).
pub async fn replace_slot(c: &Client, slot: &str) -> Result<sluice_core::Lsn> {
    c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(|e| PgError::from_pg(&format!("dropping the lost replication slot {slot}"), e))?;
    let row = c
        .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
        .await
        .map_err(|e| PgError::from_pg(&format!("creating replication slot {slot}"), e))?;
    row.get::<_, String>(0).parse().map_err(|_| PgError::permanent("slot position is not an LSN"))
}

/// The slot's confirmed position.
pub async fn slot_confirmed_lsn(c: &Client, slot: &str) -> Result<sluice_core::Lsn> {
    let row = c
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(|e| PgError::from_pg("reading the slot position", e))?;
    row.get::<_, String>(0).parse().map_err(|_| PgError::permanent("slot position is not an LSN"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot that cannot be dropped says why at once (the teardown step used to spin
    /// on it); a slot that is gone is fine.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_slot_that_cannot_be_dropped_is_an_error_not_a_loop() {
        let pg = tokio::task::spawn_blocking(|| crate::cluster::TempCluster::start(&[])).await.unwrap().unwrap();
        let admin = crate::cluster::superuser_client(pg.port, "postgres").await.unwrap();
        admin
            .batch_execute(
                "SELECT pg_create_logical_replication_slot('held', 'pgoutput');
                 CREATE ROLE weak LOGIN PASSWORD 'weak-pw';",
            )
            .await
            .unwrap();
        let weak = crate::PgConnConfig::new("127.0.0.1", pg.port, "weak", "weak-pw".to_string().into(), "postgres");
        let weak = crate::connect(&weak, "test").await.unwrap();
        let err = drop_slot_if_idle(&weak, "held").await.unwrap_err().to_string();
        assert!(err.contains("dropping replication slot held") && err.contains("must be superuser or replication role"), "{err}");
        assert!(slot_exists(&admin, "held").await.unwrap());
        assert_eq!(drop_slot_if_idle(&admin, "held").await.unwrap(), None);
        assert!(!slot_exists(&admin, "held").await.unwrap());
        assert_eq!(drop_slot_if_idle(&admin, "held").await.unwrap(), None, "gone is fine");
    }
}
