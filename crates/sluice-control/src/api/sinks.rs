//! `/v1/tenants/{t}/sinks`: destinations, checked as a pipeline file's `sink:` block.

use super::*;

pub(super) async fn sinks_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl.db.get().await?.query("SELECT spec FROM sinks WHERE tenant_id = $1 ORDER BY name", &[&id]).await?;
    ok(json!({ "sinks": rows.iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>() }))
}

pub(super) async fn sinks_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let mut s = SinkSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_sink", i))?;
    s.scope_to_tenant(&tenant).map_err(|i| ApiError::invalid("invalid_sink", i))?;
    ctl.check_egress(&s.kind, &s.settings).await?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO sinks (tenant_id, name, kind, spec, sealed) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&id, &s.name, &s.kind, &s.public(), &ctl.sealer.seal(Owner::new("sinks", id, &s.name), &s.to_sealable())],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("sink {:?} already exists in tenant {tenant:?}", s.name)));
    }
    created(s.public())
}

pub(super) async fn sinks_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl.db.get().await?.query_opt("SELECT spec FROM sinks WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?;
    ok(r.ok_or_else(|| ApiError::not_found("sink", &name))?.get(0))
}

pub(super) async fn sinks_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let body = with_stored_secrets(&ctl, "sinks", id, &name, body, |plain| {
        let old = SinkSpec::from_sealed(plain)?;
        Ok(json!({ "name": old.name, old.kind: old.settings }))
    })
    .await?;
    let mut s = SinkSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_sink", i))?;
    s.scope_to_tenant(&tenant).map_err(|i| ApiError::invalid("invalid_sink", i))?;
    ctl.check_egress(&s.kind, &s.settings).await?;
    if s.name != name {
        return Err(ApiError::invalid(
            "invalid_sink",
            Invalid::new("name", format!("{:?} differs from the URL's {name:?}; resources cannot be renamed", s.name)),
        ));
    }
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "UPDATE sinks SET spec = $3, sealed = $4, kind = $5, updated_at = now() WHERE tenant_id = $1 AND name = $2",
            &[&id, &name, &s.public(), &ctl.sealer.seal(Owner::new("sinks", id, &name), &s.to_sealable()), &s.kind],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("sink", &name));
    }
    ok(s.public())
}

pub(super) async fn sinks_delete(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    delete_unused(&ctl, &caller, &tenant, "sink", &name).await
}
