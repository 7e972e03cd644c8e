//! Master-key rotation: every stored secret re-sealed under the current key, in one
//! transaction (all or nothing: a value that does not open stops the rotation before
//! anything is written). Run it after every server has the new key as
//! `SLUICE_MASTER_KEY` and the old one as `SLUICE_MASTER_KEY_PREVIOUS`; afterwards the
//! old key can be dropped.

use anyhow::{Result, anyhow};
use serde::Serialize;

use crate::crypto::{Owner, SEALED_COLUMNS, Sealer};
use crate::db::Db;

/// What a rotation did, per table.
#[derive(Debug, Default, Serialize)]
pub struct Rotation {
    /// The key every secret is now sealed under (its fingerprint).
    pub key_id: String,
    pub tables: Vec<TableRotation>,
}

#[derive(Debug, Serialize)]
pub struct TableRotation {
    pub table: &'static str,
    pub resealed: u64,
    pub already_current: u64,
}

pub async fn rotate(db: &Db, sealer: &Sealer) -> Result<Rotation> {
    let mut c = db.connect().await?;
    let tx = c.transaction().await?;
    let mut out = Rotation { key_id: sealer.key_id(), tables: Vec::new() };
    for &(table, column, name) in SEALED_COLUMNS {
        // Locked so a concurrent API write cannot be overwritten with an older value.
        let rows = tx.query(&format!("SELECT tenant_id, {name}, {column} FROM {table} FOR UPDATE"), &[]).await?;
        let mut t = TableRotation { table, resealed: 0, already_current: 0 };
        for r in rows {
            let (tenant, name_value, sealed): (i64, String, Vec<u8>) = (r.get(0), r.get(1), r.get(2));
            if sealer.is_current(&sealed) {
                t.already_current += 1;
                continue;
            }
            let owner = Owner::new(table, tenant, &name_value);
            let plain = sealer.open(owner, &sealed).map_err(|e| anyhow!("nothing was rotated: {e}"))?;
            tx.execute(
                &format!("UPDATE {table} SET {column} = $3 WHERE tenant_id = $1 AND {name} = $2"),
                &[&tenant, &name_value, &sealer.seal(owner, &plain)],
            )
            .await?;
            t.resealed += 1;
        }
        out.tables.push(t);
    }
    tx.commit().await?;
    Ok(out)
}
