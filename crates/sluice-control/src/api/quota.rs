//! Per-tenant quotas: how many pipelines and mirrors one tenant may hold
//! (`sluice server --max-pipelines-per-tenant`, `--max-mirrors-per-tenant`). Each
//! holds a replication slot or consumer group and a share of the servers' cores, so
//! one team cannot take the platform's capacity by creating them in a loop.

use super::*;

/// What a quota counts.
#[derive(Clone, Copy)]
pub(super) enum Counted {
    Pipelines,
    Mirrors,
}

impl Counted {
    fn table(self) -> &'static str {
        match self {
            Counted::Pipelines => "pipelines",
            Counted::Mirrors => "mirrors",
        }
    }
}

/// The limits a server applies; `sluice server` sets them from its flags.
#[derive(Debug, Clone, Copy)]
pub struct Quotas {
    pub pipelines: usize,
    pub mirrors: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self { pipelines: 100, mirrors: 100 }
    }
}

impl Quotas {
    fn of(&self, what: Counted) -> usize {
        match what {
            Counted::Pipelines => self.pipelines,
            Counted::Mirrors => self.mirrors,
        }
    }
}

/// A transaction on `conn` in which tenant `tid` holds fewer `what` than its quota:
/// the caller inserts the new one in it and commits. The count is taken under the
/// tenant row's lock, so two creations at once cannot both take the last place.
/// `conn` is a connection of the caller's own: the API's shared client cannot hold a
/// transaction.
pub(super) async fn reserve<'a>(
    ctl: &Control,
    conn: &'a mut tokio_postgres::Client,
    tid: i64,
    tenant: &str,
    what: Counted,
) -> Result<tokio_postgres::Transaction<'a>, ApiError> {
    let cap = ctl.quotas().of(what);
    let tx = conn.transaction().await?;
    tx.query_opt("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", &[&tid]).await?;
    let table = what.table();
    let held: i64 = tx.query_one(&format!("SELECT count(*) FROM {table} WHERE tenant_id = $1"), &[&tid]).await?.get(0);
    if usize::try_from(held).unwrap_or(usize::MAX) >= cap {
        let flag = format!("--max-{table}-per-tenant");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "quota_exceeded",
            format!(
                "tenant {tenant:?} holds {held} of its {cap} {table}: delete one it no longer needs, or ask the operator to raise sluice server {flag}"
            ),
        ));
    }
    Ok(tx)
}
