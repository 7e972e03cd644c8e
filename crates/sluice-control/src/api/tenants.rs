//! `/v1/tenants`: platform admins create and remove tenants.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewTenant {
    pub(super) name: String,
}

pub(super) async fn tenants_list(State(ctl): Ctl, caller: Caller) -> ApiResult {
    let rows = ctl
        .db
        .get()
        .await?
        .query("SELECT name, created_at::text FROM tenants WHERE $1::int8 IS NULL OR id = $1 ORDER BY name", &[&caller.tenant_id])
        .await?;
    ok(
        json!({ "tenants": rows.iter().map(|r| json!({"name": r.get::<_, String>(0), "created_at": r.get::<_, String>(1)})).collect::<Vec<_>>() }),
    )
}

pub(super) async fn tenants_create(State(ctl): Ctl, caller: Caller, body: Bytes) -> ApiResult {
    caller.platform()?;
    let t: NewTenant = serde_yaml::from_slice(&body)
        .map_err(|e| ApiError::invalid("invalid_request", Invalid { field: None, message: format!("tenant: {e}").replace('\n', " ") }))?;
    check_name("name", &t.name).map_err(|i| ApiError::invalid("invalid_request", i))?;
    let n = ctl.db.get().await?.execute("INSERT INTO tenants (name) VALUES ($1) ON CONFLICT DO NOTHING", &[&t.name]).await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("tenant {:?} already exists", t.name)));
    }
    created(json!({ "name": t.name }))
}

pub(super) async fn tenants_get(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let c = ctl.db.get().await?;
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM sources WHERE tenant_id = $1), (SELECT count(*) FROM sinks WHERE tenant_id = $1),
                    (SELECT count(*) FROM pipelines WHERE tenant_id = $1), (SELECT count(*) FROM enrichers WHERE tenant_id = $1),
                    (SELECT count(*) FROM mirrors WHERE tenant_id = $1)",
            &[&id],
        )
        .await?;
    ok(json!({
        "name": tenant, "sources": r.get::<_, i64>(0), "sinks": r.get::<_, i64>(1), "pipelines": r.get::<_, i64>(2),
        "enrichers": r.get::<_, i64>(3), "mirrors": r.get::<_, i64>(4),
    }))
}

pub(super) async fn tenants_delete(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    caller.platform()?;
    let c = ctl.db.get().await?;
    let busy: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM sources WHERE tenant_id = $1) + (SELECT count(*) FROM sinks WHERE tenant_id = $1)
                    + (SELECT count(*) FROM enrichers WHERE tenant_id = $1) + (SELECT count(*) FROM mirrors WHERE tenant_id = $1)",
            &[&id],
        )
        .await?
        .get(0);
    if busy > 0 {
        return Err(ApiError::conflict(format!(
            "tenant {tenant:?} still has sources, sinks, enrichers or mirrors: delete its pipelines, mirrors, sources, sinks and enrichers first"
        )));
    }
    c.execute("DELETE FROM workflow_steps WHERE workflow_id IN (SELECT id FROM workflows WHERE tenant_id = $1)", &[&id]).await?;
    c.execute("DELETE FROM workflows WHERE tenant_id = $1", &[&id]).await?;
    c.execute("DELETE FROM tenants WHERE id = $1", &[&id]).await?;
    ok(json!({ "deleted": tenant }))
}
