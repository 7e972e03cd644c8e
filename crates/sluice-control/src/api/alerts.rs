//! `/v1/tenants/{t}/alerts`: the tenant's alert settings (webhook and thresholds),
//! evaluated by the servers for every pipeline of the tenant (`supervisor`).

use super::*;

pub(super) async fn alerts_get(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl.db.get().await?.query_opt("SELECT spec FROM alert_settings WHERE tenant_id = $1", &[&id]).await?;
    // None set is an answer, not a missing resource: the tenant exists.
    ok(r.map_or_else(|| json!({ "configured": false }), |r| r.get(0)))
}

pub(super) async fn alerts_put(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let (_, raw, public) = parse_alerts(&body).map_err(|i| ApiError::invalid("invalid_alerts", i))?;
    ctl.check_egress("", &raw).await?;
    let sealed = ctl.sealer.seal(Owner::new("alert_settings", id, ""), &serde_json::to_vec(&raw).map_err(anyhow::Error::from)?);
    ctl.db
        .get()
        .await?
        .execute(
            "INSERT INTO alert_settings (tenant_id, spec, sealed) VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id) DO UPDATE SET spec = EXCLUDED.spec, sealed = EXCLUDED.sealed, updated_at = now()",
            &[&id, &public, &sealed],
        )
        .await?;
    ok(public)
}

pub(super) async fn alerts_delete(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let n = ctl.db.get().await?.execute("DELETE FROM alert_settings WHERE tenant_id = $1", &[&id]).await?;
    if n == 0 {
        return Err(ApiError::not_found("alert settings", &tenant));
    }
    ok(json!({ "deleted": true }))
}
