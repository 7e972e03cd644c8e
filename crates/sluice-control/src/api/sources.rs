//! `/v1/tenants/{t}/sources`: Postgres databases to capture from (admin credentials sealed).

use super::*;

pub(super) async fn check_source_reachable(ctl: &Control, s: &SourceSpec) -> Result<(), ApiError> {
    sluice_postgres::connect(&s.admin().guarded(Some(&ctl.egress_policy())), "source").await.map(drop).map_err(|e| {
        ApiError::invalid(
            "source_unreachable",
            Invalid {
                field: Some("host".into()),
                message: format!("source {}: {e}; check host, port, database and admin credentials", s.name),
            },
        )
    })
}

pub(super) async fn sources_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl.db.get().await?.query("SELECT spec FROM sources WHERE tenant_id = $1 ORDER BY name", &[&id]).await?;
    ok(json!({ "sources": rows.iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>() }))
}

pub(super) async fn sources_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let s = SourceSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_source", i))?;
    ctl.check_egress("", &json!({ "host": s.host })).await?;
    check_source_reachable(&ctl, &s).await?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO sources (tenant_id, name, spec, sealed) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&id, &s.name, &s.public(), &ctl.sealer.seal(Owner::new("sources", id, &s.name), &s.to_sealable())],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("source {:?} already exists in tenant {tenant:?}", s.name)));
    }
    created(s.public())
}

pub(super) async fn sources_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl.db.get().await?.query_opt("SELECT spec FROM sources WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?;
    ok(r.ok_or_else(|| ApiError::not_found("source", &name))?.get(0))
}

pub(super) async fn sources_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let s = SourceSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_source", i))?;
    ctl.check_egress("", &json!({ "host": s.host })).await?;
    if s.name != name {
        return Err(ApiError::invalid(
            "invalid_source",
            Invalid::new("name", format!("{:?} differs from the URL's {name:?}; resources cannot be renamed", s.name)),
        ));
    }
    let c = ctl.db.get().await?;
    if c.query_opt("SELECT 1 FROM sources WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?.is_none() {
        return Err(ApiError::not_found("source", &name));
    }
    check_source_reachable(&ctl, &s).await?;
    c.execute(
        "UPDATE sources SET spec = $3, sealed = $4, updated_at = now() WHERE tenant_id = $1 AND name = $2",
        &[&id, &name, &s.public(), &ctl.sealer.seal(Owner::new("sources", id, &name), &s.to_sealable())],
    )
    .await?;
    ok(s.public())
}

pub(super) async fn sources_delete(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    delete_unused(&ctl, &caller, &tenant, "source", &name).await
}

/// Deletes a source or sink that no pipeline uses.
pub(super) async fn delete_unused(ctl: &Control, caller: &Caller, tenant: &str, what: &'static str, name: &str) -> ApiResult {
    let id = caller.tenant(ctl, tenant, true).await?;
    let (table, col) = if what == "source" { ("sources", "source_id") } else { ("sinks", "sink_id") };
    let c = ctl.db.get().await?;
    let Some(row) = c.query_opt(&format!("SELECT id FROM {table} WHERE tenant_id = $1 AND name = $2"), &[&id, &name]).await? else {
        return Err(ApiError::not_found(what, name));
    };
    let rid: i64 = row.get(0);
    let users: Vec<String> =
        c.query(&format!("SELECT name FROM pipelines WHERE {col} = $1"), &[&rid]).await?.iter().map(|r| r.get(0)).collect();
    if !users.is_empty() {
        return Err(ApiError::conflict(format!("{what} {name:?} is used by pipelines {}: delete them first", users.join(", "))));
    }
    c.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&rid]).await?;
    ok(json!({ "deleted": name }))
}
