//! `/v1/tenants/{t}/enrichers`: enrichers registered once, named by pipelines.

use super::*;

pub(super) async fn enrichers_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl.db.get().await?.query("SELECT spec FROM enrichers WHERE tenant_id = $1 ORDER BY name", &[&id]).await?;
    ok(json!({ "enrichers": rows.iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>() }))
}

pub(super) async fn enrichers_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let e = EnricherSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_enricher", i))?;
    ctl.check_egress("", &e.settings).await?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO enrichers (tenant_id, name, spec, sealed) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&id, &e.name, &e.public(), &ctl.sealer.seal(Owner::new("enrichers", id, &e.name), &e.to_sealable())],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("enricher {:?} already exists in tenant {tenant:?}", e.name)));
    }
    created(e.public())
}

pub(super) async fn enrichers_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl.db.get().await?.query_opt("SELECT spec FROM enrichers WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?;
    ok(r.ok_or_else(|| ApiError::not_found("enricher", &name))?.get(0))
}

/// The pipelines of a tenant that use an enricher.
pub(super) async fn enricher_users(ctl: &Control, tenant: i64, name: &str) -> Result<Vec<(i64, String)>, ApiError> {
    let rows = ctl
        .db
        .get()
        .await?
        .query("SELECT id, name FROM pipelines WHERE tenant_id = $1 AND spec->'enrichers' ? $2 ORDER BY name", &[&tenant, &name])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Replaces an enricher; every pipeline using it is re-provisioned (its role may need
/// a new reference table) and restarted, and re-enriches the rows it already
/// delivered in the background.
pub(super) async fn enrichers_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let body = with_stored_secrets(&ctl, "enrichers", id, &name, body, EnricherSpec::from_sealed).await?;
    let e = EnricherSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_enricher", i))?;
    ctl.check_egress("", &e.settings).await?;
    if e.name != name {
        return Err(ApiError::invalid(
            "invalid_enricher",
            Invalid::new("name", format!("{:?} differs from the URL's {name:?}; resources cannot be renamed", e.name)),
        ));
    }
    let c = ctl.db.get().await?;
    let old: Option<Vec<u8>> =
        c.query_opt("SELECT sealed FROM enrichers WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?.map(|r| r.get(0));
    let Some(old) = old else { return Err(ApiError::not_found("enricher", &name)) };
    let users = enricher_users(&ctl, id, &name).await?;
    // Each pipeline must still check with the new definition before it is stored.
    for (pid, pname) in &users {
        let p = ctl.load_pipeline(*pid).await?.ok_or_else(|| ApiError::not_found("pipeline", pname))?;
        let at = p.spec.enrichers.iter().position(|n| *n == name).expect("user of the enricher");
        let mut enrichers = p.enrichers.clone();
        enrichers[at] = e.settings.clone();
        if let Err(err) = validate_with(&ctl, *pid, &p.spec, &p.source, &p.sink, &enrichers).await {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_enricher",
                format!("pipeline {pname:?}: {}", err.message),
            )
            .with_field("enricher"));
        }
    }
    c.execute(
        "UPDATE enrichers SET spec = $3, sealed = $4, updated_at = now() WHERE tenant_id = $1 AND name = $2",
        &[&id, &name, &e.public(), &ctl.sealer.seal(Owner::new("enrichers", id, &name), &e.to_sealable())],
    )
    .await?;
    let changed = ctl.sealer.open(Owner::new("enrichers", id, &name), &old).map_err(anyhow::Error::msg)? != e.to_sealable();
    let mut workflows = Vec::new();
    if changed {
        for (pid, pname) in &users {
            workflows.push(start_workflow(&ctl, id, *pid, pname, "update", json!({})).await?);
            c.execute("UPDATE pipelines SET generation = generation + 1, updated_at = now() WHERE id = $1", &[pid]).await?;
        }
    }
    let mut out = e.public();
    out["pipelines"] = json!(users.iter().map(|(_, n)| n).collect::<Vec<_>>());
    out["workflows"] = json!(workflows);
    ok(out)
}

pub(super) async fn enrichers_delete(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let users = enricher_users(&ctl, id, &name).await?;
    if !users.is_empty() {
        let names: Vec<&str> = users.iter().map(|(_, n)| n.as_str()).collect();
        return Err(ApiError::conflict(format!("enricher {name:?} is used by pipelines {}: remove it from them first", names.join(", "))));
    }
    let n = ctl.db.get().await?.execute("DELETE FROM enrichers WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?;
    if n == 0 {
        return Err(ApiError::not_found("enricher", &name));
    }
    ok(json!({ "deleted": name }))
}
