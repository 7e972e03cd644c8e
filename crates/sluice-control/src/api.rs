//! The control plane's HTTP API under `/v1`. Every tenant resource lives under
//! `/v1/tenants/{tenant}/...`; a token sees its own tenant only (another tenant
//! answers 404, exactly like a tenant that does not exist), viewers read only, and
//! platform admins see everything. Bodies are YAML or JSON; errors are
//! `{"error": {"type", "message", "field"}}`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_core::TableName;

use super::Control;
use super::crypto::{new_password, new_token, token_hash};
use super::model::{EnricherSpec, Invalid, PipelineSpec, ResyncSpec, SinkSpec, SourceSpec, check_name, object_name, run_config};
use sluice_engine::metrics::Metrics;
use sluice_engine::pipeline::{CheckPart, Pipeline};

type Ctl = State<Arc<Control>>;

pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), field: None }
    }
    fn not_found(what: &str, name: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} {name:?} not found"))
    }
    fn invalid(kind: &'static str, i: Invalid) -> Self {
        Self { status: StatusCode::UNPROCESSABLE_ENTITY, kind, message: i.message, field: i.field }
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut e = json!({ "type": self.kind, "message": self.message });
        if let Some(f) = self.field {
            e["field"] = json!(f);
        }
        (self.status, Json(json!({ "error": e }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        // Internal failures name no secrets (errors never carry passwords) but stay terse.
        tracing::error!(error = %format!("{e:#}"), "control API internal error");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "internal", format!("control plane unavailable: {e}"))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        anyhow::Error::from(e).into()
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}
fn created(v: Value) -> ApiResult {
    Ok((StatusCode::CREATED, Json(v)).into_response())
}
fn accepted(v: Value) -> ApiResult {
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    PlatformAdmin,
    TenantAdmin,
    TenantViewer,
}

/// The caller, from `Authorization: Bearer <token>`.
pub struct Caller {
    tenant_id: Option<i64>,
    role: Role,
}

impl FromRequestParts<Arc<Control>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctl: &Arc<Control>) -> Result<Self, ApiError> {
        let unauthorized =
            || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or unknown API token: send Authorization: Bearer <token>");
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(unauthorized)?;
        let row = ctl
            .db
            .get()
            .await?
            .query_opt("SELECT tenant_id, role FROM tokens WHERE hash = $1", &[&token_hash(token.trim())])
            .await?
            .ok_or_else(unauthorized)?;
        let role = match row.get::<_, &str>(1) {
            "platform_admin" => Role::PlatformAdmin,
            "tenant_admin" => Role::TenantAdmin,
            _ => Role::TenantViewer,
        };
        Ok(Caller { tenant_id: row.get(0), role })
    }
}

impl Caller {
    fn platform(&self) -> Result<(), ApiError> {
        if self.role == Role::PlatformAdmin {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this needs a platform admin token"))
        }
    }

    /// The tenant named in the path, if this caller may see it (404 otherwise, so
    /// other tenants' names do not leak); `write` also refuses viewers.
    async fn tenant(&self, ctl: &Control, name: &str, write: bool) -> Result<i64, ApiError> {
        let id: Option<i64> = ctl.db.get().await?.query_opt("SELECT id FROM tenants WHERE name = $1", &[&name]).await?.map(|r| r.get(0));
        let id = match id {
            Some(id) if self.role == Role::PlatformAdmin || self.tenant_id == Some(id) => id,
            _ => return Err(ApiError::not_found("tenant", name)),
        };
        if write && self.role == Role::TenantViewer {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this token is read-only (tenant_viewer)"));
        }
        Ok(id)
    }
}

// ---- tenants ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
}

async fn tenants_list(State(ctl): Ctl, caller: Caller) -> ApiResult {
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

async fn tenants_create(State(ctl): Ctl, caller: Caller, body: Bytes) -> ApiResult {
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

async fn tenants_get(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let c = ctl.db.get().await?;
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM sources WHERE tenant_id = $1), (SELECT count(*) FROM sinks WHERE tenant_id = $1),
                    (SELECT count(*) FROM pipelines WHERE tenant_id = $1), (SELECT count(*) FROM enrichers WHERE tenant_id = $1)",
            &[&id],
        )
        .await?;
    ok(json!({
        "name": tenant, "sources": r.get::<_, i64>(0), "sinks": r.get::<_, i64>(1), "pipelines": r.get::<_, i64>(2),
        "enrichers": r.get::<_, i64>(3),
    }))
}

async fn tenants_delete(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    caller.platform()?;
    let c = ctl.db.get().await?;
    let busy: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM sources WHERE tenant_id = $1) + (SELECT count(*) FROM sinks WHERE tenant_id = $1)
                    + (SELECT count(*) FROM enrichers WHERE tenant_id = $1)",
            &[&id],
        )
        .await?
        .get(0);
    if busy > 0 {
        return Err(ApiError::conflict(format!(
            "tenant {tenant:?} still has sources, sinks or enrichers: delete its pipelines, sources, sinks and enrichers first"
        )));
    }
    c.execute("DELETE FROM workflow_steps WHERE workflow_id IN (SELECT id FROM workflows WHERE tenant_id = $1)", &[&id]).await?;
    c.execute("DELETE FROM workflows WHERE tenant_id = $1", &[&id]).await?;
    c.execute("DELETE FROM tenants WHERE id = $1", &[&id]).await?;
    ok(json!({ "deleted": tenant }))
}

// ---- tokens ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
}

async fn tokens_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows =
        ctl.db.get().await?.query("SELECT id, name, role, created_at::text FROM tokens WHERE tenant_id = $1 ORDER BY id", &[&id]).await?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| json!({"id": r.get::<_, i64>(0), "name": r.get::<_, String>(1), "role": r.get::<_, String>(2), "created_at": r.get::<_, String>(3)}))
        .collect();
    ok(json!({ "tokens": list }))
}

async fn tokens_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let t: NewToken = serde_yaml::from_slice(&body)
        .map_err(|e| ApiError::invalid("invalid_request", Invalid { field: None, message: format!("token: {e}").replace('\n', " ") }))?;
    if !matches!(t.role.as_str(), "tenant_admin" | "tenant_viewer") {
        return Err(ApiError::invalid(
            "invalid_request",
            Invalid::new("role", format!("{:?} must be tenant_admin or tenant_viewer", t.role)),
        ));
    }
    if t.name.trim().is_empty() {
        return Err(ApiError::invalid("invalid_request", Invalid::new("name", "must not be empty")));
    }
    let token = new_token();
    let tid: i64 = ctl
        .db
        .get()
        .await?
        .query_one(
            "INSERT INTO tokens (tenant_id, role, name, hash) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&id, &t.role, &t.name, &token_hash(&token)],
        )
        .await?
        .get(0);
    created(json!({ "id": tid, "name": t.name, "role": t.role, "token": token, "note": "shown once: only its hash is stored" }))
}

async fn tokens_delete(State(ctl): Ctl, caller: Caller, Path((tenant, token)): Path<(String, i64)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let n = ctl.db.get().await?.execute("DELETE FROM tokens WHERE id = $1 AND tenant_id = $2", &[&token, &id]).await?;
    if n == 0 {
        return Err(ApiError::not_found("token", &token.to_string()));
    }
    ok(json!({ "deleted": token }))
}

// ---- sources ----

async fn check_source_reachable(s: &SourceSpec) -> Result<(), ApiError> {
    sluice_postgres::connect(&s.admin(), "source").await.map(drop).map_err(|e| {
        ApiError::invalid(
            "source_unreachable",
            Invalid {
                field: Some("host".into()),
                message: format!("source {}: {e}; check host, port, database and admin credentials", s.name),
            },
        )
    })
}

async fn sources_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl.db.get().await?.query("SELECT spec FROM sources WHERE tenant_id = $1 ORDER BY name", &[&id]).await?;
    ok(json!({ "sources": rows.iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>() }))
}

async fn sources_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let s = SourceSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_source", i))?;
    check_source_reachable(&s).await?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO sources (tenant_id, name, spec, sealed) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&id, &s.name, &s.public(), &ctl.sealer.seal(&s.to_sealable())],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("source {:?} already exists in tenant {tenant:?}", s.name)));
    }
    created(s.public())
}

async fn sources_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl.db.get().await?.query_opt("SELECT spec FROM sources WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?;
    ok(r.ok_or_else(|| ApiError::not_found("source", &name))?.get(0))
}

async fn sources_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let s = SourceSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_source", i))?;
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
    check_source_reachable(&s).await?;
    c.execute(
        "UPDATE sources SET spec = $3, sealed = $4, updated_at = now() WHERE tenant_id = $1 AND name = $2",
        &[&id, &name, &s.public(), &ctl.sealer.seal(&s.to_sealable())],
    )
    .await?;
    ok(s.public())
}

async fn sources_delete(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    delete_unused(&ctl, &caller, &tenant, "source", &name).await
}

/// Deletes a source or sink that no pipeline uses.
async fn delete_unused(ctl: &Control, caller: &Caller, tenant: &str, what: &'static str, name: &str) -> ApiResult {
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

// ---- sinks ----

async fn sinks_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl.db.get().await?.query("SELECT spec FROM sinks WHERE tenant_id = $1 ORDER BY name", &[&id]).await?;
    ok(json!({ "sinks": rows.iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>() }))
}

async fn sinks_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let s = SinkSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_sink", i))?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO sinks (tenant_id, name, kind, spec, sealed) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&id, &s.name, &s.kind, &s.public(), &ctl.sealer.seal(&s.to_sealable())],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("sink {:?} already exists in tenant {tenant:?}", s.name)));
    }
    created(s.public())
}

async fn sinks_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl.db.get().await?.query_opt("SELECT spec FROM sinks WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?;
    ok(r.ok_or_else(|| ApiError::not_found("sink", &name))?.get(0))
}

async fn sinks_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let s = SinkSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_sink", i))?;
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
            &[&id, &name, &s.public(), &ctl.sealer.seal(&s.to_sealable()), &s.kind],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("sink", &name));
    }
    ok(s.public())
}

async fn sinks_delete(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    delete_unused(&ctl, &caller, &tenant, "sink", &name).await
}

// ---- enrichers ----

async fn enrichers_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl.db.get().await?.query("SELECT spec FROM enrichers WHERE tenant_id = $1 ORDER BY name", &[&id]).await?;
    ok(json!({ "enrichers": rows.iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>() }))
}

async fn enrichers_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let e = EnricherSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_enricher", i))?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "INSERT INTO enrichers (tenant_id, name, spec, sealed) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[&id, &e.name, &e.public(), &ctl.sealer.seal(&e.to_sealable())],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("enricher {:?} already exists in tenant {tenant:?}", e.name)));
    }
    created(e.public())
}

async fn enrichers_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl.db.get().await?.query_opt("SELECT spec FROM enrichers WHERE tenant_id = $1 AND name = $2", &[&id, &name]).await?;
    ok(r.ok_or_else(|| ApiError::not_found("enricher", &name))?.get(0))
}

/// The pipelines of a tenant that use an enricher.
async fn enricher_users(ctl: &Control, tenant: i64, name: &str) -> Result<Vec<(i64, String)>, ApiError> {
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
async fn enrichers_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let e = EnricherSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_enricher", i))?;
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
        &[&id, &name, &e.public(), &ctl.sealer.seal(&e.to_sealable())],
    )
    .await?;
    let changed = ctl.sealer.open(&old).map_err(anyhow::Error::msg)? != e.to_sealable();
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

async fn enrichers_delete(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
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

// ---- pipelines ----

async fn sealed_of(ctl: &Control, table: &str, tenant: i64, name: &str, field: &str) -> Result<(i64, Vec<u8>), ApiError> {
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(&format!("SELECT id, sealed FROM {table} WHERE tenant_id = $1 AND name = $2"), &[&tenant, &name])
        .await?
        .ok_or_else(|| ApiError::invalid("invalid_pipeline", Invalid::new(field, format!("no {field} named {name:?} in this tenant"))))?;
    let plain = ctl.sealer.open(r.get::<_, &[u8]>(1)).map_err(anyhow::Error::msg)?;
    Ok((r.get(0), plain))
}

/// Everything that can be known before provisioning: the config, the tables and
/// transforms against the source's catalog, the sink, the admin's privileges.
async fn validate_pipeline(ctl: &Control, tenant: i64, id: i64, p: &PipelineSpec) -> Result<(i64, i64, Vec<TableName>), ApiError> {
    let (source_id, s) = sealed_of(ctl, "sources", tenant, &p.source, "source").await?;
    let (sink_id, k) = sealed_of(ctl, "sinks", tenant, &p.sink, "sink").await?;
    let source = SourceSpec::from_sealed(&s)?;
    let sink = SinkSpec::from_sealed(&k)?;
    let mut enrichers = Vec::with_capacity(p.enrichers.len());
    for (i, name) in p.enrichers.iter().enumerate() {
        if p.enrichers[..i].contains(name) {
            return Err(ApiError::invalid("invalid_pipeline", Invalid::new("enrichers", format!("{name:?} is listed twice"))));
        }
        let (_, e) = sealed_of(ctl, "enrichers", tenant, name, "enrichers").await?;
        enrichers.push(EnricherSpec::from_sealed(&e)?);
    }
    let tables = validate_with(ctl, id, p, &source, &sink, &enrichers).await?;
    Ok((source_id, sink_id, tables))
}

/// [`validate_pipeline`] with the pieces loaded: the runner's own checks, as the
/// source's admin.
async fn validate_with(
    ctl: &Control,
    id: i64,
    p: &PipelineSpec,
    source: &SourceSpec,
    sink: &SinkSpec,
    enrichers: &[Value],
) -> Result<Vec<TableName>, ApiError> {
    let admin = source.admin();
    let cfg = run_config(&ctl.install, id, p, source, sink, enrichers, &admin.user, secrecy::ExposeSecret::expose_secret(&admin.password))
        .map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    let tables = cfg.source_tables();
    let own_tables = cfg.tables();
    let c = sluice_postgres::connect(&admin, &format!("source {}", source.name)).await.map_err(|e| {
        ApiError::invalid(
            "source_unreachable",
            Invalid { field: Some("source".into()), message: format!("{e}; check source {}", source.name) },
        )
    })?;
    super::check_privileges(&c, source, &tables).await.map_err(|m| {
        if m.starts_with("tables:") {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pipeline", m).with_field("tables")
        } else {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_privileges", m).with_field("source")
        }
    })?;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mut pipeline = Pipeline::new(cfg, Arc::new(Metrics::default()), rx);
    pipeline.require_logical_wal = false;
    // A changed pipeline (or enricher) is checked while the pipeline runs on its slot.
    pipeline.slot_may_be_in_use = true;
    if let Err((part, e)) = pipeline.check_parts().await {
        let field = match part {
            CheckPart::Source => "source",
            CheckPart::Tables => "tables",
            CheckPart::Enrich => "enrichers",
            CheckPart::Transforms => "transforms",
            CheckPart::Sink => "sink",
        };
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pipeline", format!("{e:#}")).with_field(field));
    }
    Ok(own_tables)
}

impl ApiError {
    fn with_field(mut self, f: &str) -> Self {
        self.field = Some(f.into());
        self
    }
}

async fn pipeline_row(ctl: &Control, tenant: i64, name: &str) -> Result<i64, ApiError> {
    ctl.db
        .get()
        .await?
        .query_opt("SELECT id FROM pipelines WHERE tenant_id = $1 AND name = $2", &[&tenant, &name])
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| ApiError::not_found("pipeline", name))
}

/// Starts a workflow unless the pipeline has one running (409 then).
async fn start_workflow(ctl: &Control, tenant: i64, pipeline: i64, name: &str, kind: &str, params: Value) -> Result<i64, ApiError> {
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(
            "INSERT INTO workflows (tenant_id, pipeline_id, pipeline_name, kind, params) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (pipeline_id) WHERE state IN ('pending', 'running', 'retrying') DO NOTHING RETURNING id",
            &[&tenant, &pipeline, &name, &kind, &params],
        )
        .await?;
    match r {
        Some(r) => {
            ctl.wake.notify_one();
            Ok(r.get(0))
        }
        None => Err(ApiError::conflict(format!(
            "pipeline {name:?} has a workflow in progress: wait for it, or cancel it (sluice workflows list --pipeline {name})"
        ))),
    }
}

async fn pipelines_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl.db.get().await?.query(&format!("{PIPELINE_SELECT} WHERE p.tenant_id = $1 ORDER BY p.name"), &[&id]).await?;
    ok(json!({ "pipelines": rows.iter().map(|r| pipeline_json(&ctl.install, r)).collect::<Vec<_>>() }))
}

const PIPELINE_SELECT: &str = "SELECT p.id, p.name, p.spec, p.desired, p.owner, p.status, p.created_at::text,
        (SELECT json_build_object('id', w.id, 'kind', w.kind, 'state', w.state, 'error', w.error)
         FROM workflows w WHERE w.pipeline_id = p.id ORDER BY w.id DESC LIMIT 1)
     FROM pipelines p";

/// The pipeline's objects in its source (one name for all three).
fn objects(install: &str, id: i64) -> Value {
    let name = object_name(install, id);
    json!({ "slot": name, "publication": name, "role": name })
}

fn pipeline_json(install: &str, r: &tokio_postgres::Row) -> Value {
    let id: i64 = r.get(0);
    let desired: String = r.get(3);
    let owner: Option<String> = r.get(4);
    let mut status: Value = r.get(5);
    if owner.is_none() && desired != "running" {
        status = json!({ "state": if desired == "provisioning" { "provisioning" } else { "paused" } });
    }
    json!({
        "name": r.get::<_, String>(1),
        "spec": r.get::<_, Value>(2),
        "desired": desired,
        "server": owner,
        "status": status,
        "objects": objects(install, id),
        "created_at": r.get::<_, String>(6),
        "last_workflow": r.get::<_, Option<Value>>(7),
    })
}

async fn pipelines_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let p = PipelineSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    let c = ctl.db.get().await?;
    if c.query_opt("SELECT 1 FROM pipelines WHERE tenant_id = $1 AND name = $2", &[&tid, &p.name]).await?.is_some() {
        return Err(ApiError::conflict(format!("pipeline {:?} already exists in tenant {tenant:?}", p.name)));
    }
    let id: i64 = c.query_one("SELECT nextval('pipelines_id_seq')", &[]).await?.get(0);
    let (source_id, sink_id, _) = validate_pipeline(&ctl, tid, id, &p).await?;
    let pw = ctl.sealer.seal(new_password().as_bytes());
    // The pipeline and its provisioning workflow appear together or not at all.
    let r = c
        .query_opt(
            "WITH p AS (INSERT INTO pipelines (id, tenant_id, name, source_id, sink_id, spec, role_password)
                        VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING id)
             INSERT INTO workflows (tenant_id, pipeline_id, pipeline_name, kind) SELECT $2, id, $3, 'provision' FROM p RETURNING id",
            &[&id, &tid, &p.name, &source_id, &sink_id, &p.public(), &pw],
        )
        .await?;
    let Some(r) = r else {
        return Err(ApiError::conflict(format!("pipeline {:?} already exists in tenant {tenant:?}", p.name)));
    };
    ctl.wake.notify_one();
    let wf: i64 = r.get(0);
    tracing::info!(tenant = %tenant, pipeline = %p.name, workflow = wf, "pipeline created; provisioning");
    Ok((StatusCode::CREATED, Json(json!({ "name": p.name, "workflow": wf, "objects": objects(&ctl.install, id) }))).into_response())
}

async fn pipelines_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(&format!("{PIPELINE_SELECT} WHERE p.tenant_id = $1 AND p.name = $2"), &[&tid, &name])
        .await?
        .ok_or_else(|| ApiError::not_found("pipeline", &name))?;
    ok(pipeline_json(&ctl.install, &r))
}

/// Rows waiting for an enricher, and the re-enrichments running or done, read from
/// the pipeline's state database.
async fn pipelines_enrichment(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let p = ctl.load_pipeline(id).await?.ok_or_else(|| ApiError::not_found("pipeline", &name))?;
    let cfg = p.run_config().map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    let state = sluice_postgres::connect(&cfg.state_connection(), "state database").await.map_err(anyhow::Error::from)?;
    let mut out = sluice_engine::enrich::report(&state, &cfg.pipeline).await?;
    out["name"] = json!(name);
    ok(out)
}

async fn pipelines_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let p = PipelineSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    if p.name != name {
        return Err(ApiError::invalid(
            "invalid_pipeline",
            Invalid::new("name", format!("{:?} differs from the URL's {name:?}; resources cannot be renamed", p.name)),
        ));
    }
    let (source_id, sink_id, _) = validate_pipeline(&ctl, tid, id, &p).await?;
    let old: (i64, i64) = {
        let r = ctl.db.get().await?.query_one("SELECT source_id, sink_id FROM pipelines WHERE id = $1", &[&id]).await?;
        (r.get(0), r.get(1))
    };
    if old != (source_id, sink_id) {
        return Err(ApiError::invalid(
            "invalid_pipeline",
            Invalid::new("source", "a pipeline's source and sink cannot change: create a new pipeline"),
        ));
    }
    // Re-provisioning is idempotent: it grants and publishes new tables, snapshots them,
    // and restarts the pipeline with the new spec.
    let wf = start_workflow(&ctl, tid, id, &name, "update", json!({})).await?;
    ctl.db
        .get()
        .await?
        .execute("UPDATE pipelines SET spec = $2, generation = generation + 1, updated_at = now() WHERE id = $1", &[&id, &p.public()])
        .await?;
    accepted(json!({ "name": name, "workflow": wf }))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    purge: bool,
}

async fn pipelines_delete(
    State(ctl): Ctl,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let wf = start_workflow(&ctl, tid, id, &name, "teardown", json!({ "purge": q.purge })).await?;
    accepted(json!({ "name": name, "workflow": wf }))
}

async fn pipeline_action(ctl: Arc<Control>, caller: Caller, tenant: String, name: String, kind: &str) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let wf = start_workflow(&ctl, tid, id, &name, kind, json!({})).await?;
    accepted(json!({ "name": name, "workflow": wf }))
}

async fn pipelines_pause(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    pipeline_action(ctl, caller, tenant, name, "pause").await
}

async fn pipelines_resume(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    pipeline_action(ctl, caller, tenant, name, "resume").await
}

/// Re-reads tables of a running pipeline while it streams (see `sluice_engine::resync`).
async fn pipelines_resync(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let spec = ResyncSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_resync", i))?;
    let p = ctl.load_pipeline(id).await?.ok_or_else(|| ApiError::not_found("pipeline", &name))?;
    let cfg = p.run_config().map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    let tables = sluice_engine::resync::pick_tables(&cfg, &spec.tables)
        .map_err(|m| ApiError::invalid("invalid_resync", Invalid::new("tables", m)))?;
    let desired: String = ctl.db.get().await?.query_one("SELECT desired FROM pipelines WHERE id = $1", &[&id]).await?.get(0);
    if desired != "running" {
        return Err(ApiError::conflict(format!(
            "pipeline {name:?} is {desired}: a resync is read by the running pipeline; resume it first (sluice pipelines resume {name})"
        )));
    }
    let admin = p.source.admin();
    let src = sluice_postgres::connect(&admin, &format!("source {}", p.source.name))
        .await
        .map_err(|e| ApiError::invalid("source_unreachable", Invalid { field: Some("source".into()), message: e.to_string() }))?;
    sluice_engine::resync::check_keys(&src, &tables, &admin.describe())
        .await
        .map_err(|m| ApiError::invalid("invalid_resync", Invalid { field: Some("tables".into()), message: m }))?;
    let tables: Vec<String> = tables.iter().map(ToString::to_string).collect();
    let wf = start_workflow(&ctl, tid, id, &name, "resync", json!({ "tables": tables })).await?;
    accepted(json!({ "name": name, "workflow": wf, "tables": tables }))
}

// ---- workflows ----

#[derive(Deserialize)]
struct WorkflowQuery {
    pipeline: Option<String>,
}

const WORKFLOW_SELECT: &str =
    "SELECT id, pipeline_name, kind, state, step, attempt, error, params, created_at::text, updated_at::text, owner FROM workflows";

fn workflow_json(r: &tokio_postgres::Row) -> Value {
    let kind: String = r.get(2);
    let params: Value = r.get(7);
    let steps = super::workflow::steps(&kind, &params);
    let step: i32 = r.get(4);
    json!({
        "id": r.get::<_, i64>(0), "pipeline": r.get::<_, String>(1), "kind": kind, "state": r.get::<_, String>(3),
        "step": steps.get(step as usize), "steps_done": step, "steps_total": steps.len(), "attempt": r.get::<_, i32>(5),
        "error": r.get::<_, Option<String>>(6), "params": params, "created_at": r.get::<_, String>(8),
        "updated_at": r.get::<_, String>(9), "server": r.get::<_, Option<String>>(10),
    })
}

async fn workflows_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, Query(q): Query<WorkflowQuery>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl
        .db
        .get()
        .await?
        .query(
            &format!("{WORKFLOW_SELECT} WHERE tenant_id = $1 AND ($2::text IS NULL OR pipeline_name = $2) ORDER BY id DESC LIMIT 200"),
            &[&tid, &q.pipeline],
        )
        .await?;
    ok(json!({ "workflows": rows.iter().map(workflow_json).collect::<Vec<_>>() }))
}

async fn workflow_of(ctl: &Control, tid: i64, id: i64) -> Result<tokio_postgres::Row, ApiError> {
    ctl.db
        .get()
        .await?
        .query_opt(&format!("{WORKFLOW_SELECT} WHERE tenant_id = $1 AND id = $2"), &[&tid, &id])
        .await?
        .ok_or_else(|| ApiError::not_found("workflow", &id.to_string()))
}

async fn workflows_get(State(ctl): Ctl, caller: Caller, Path((tenant, id)): Path<(String, i64)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let mut w = workflow_json(&workflow_of(&ctl, tid, id).await?);
    let steps = ctl
        .db
        .get()
        .await?
        .query(
            "SELECT name, attempt, started_at::text, ended_at::text, outcome, error, owner FROM workflow_steps WHERE workflow_id = $1 ORDER BY id",
            &[&id],
        )
        .await?;
    w["history"] = steps
        .iter()
        .map(|r| {
            json!({"step": r.get::<_, String>(0), "attempt": r.get::<_, i32>(1), "started_at": r.get::<_, String>(2),
                   "ended_at": r.get::<_, Option<String>>(3), "outcome": r.get::<_, Option<String>>(4).unwrap_or_else(|| "running".into()),
                   "error": r.get::<_, Option<String>>(5), "server": r.get::<_, String>(6)})
        })
        .collect();
    ok(w)
}

async fn workflows_cancel(State(ctl): Ctl, caller: Caller, Path((tenant, id)): Path<(String, i64)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    workflow_of(&ctl, tid, id).await?;
    // A waiting workflow is cancelled at once; a running one at its next step boundary
    // (or sooner: the snapshot step stops when asked).
    let c = ctl.db.get().await?;
    let n = c
        .execute(
            "UPDATE workflows SET state = CASE WHEN state IN ('pending', 'retrying') THEN 'cancelled' ELSE state END,
                    cancel_requested = true, updated_at = now()
             WHERE id = $1 AND state IN ('pending', 'running', 'retrying')",
            &[&id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("workflow {id} has already ended")));
    }
    accepted(workflow_json(&workflow_of(&ctl, tid, id).await?))
}

async fn workflows_retry(State(ctl): Ctl, caller: Caller, Path((tenant, id)): Path<(String, i64)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    workflow_of(&ctl, tid, id).await?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "UPDATE workflows SET state = 'pending', attempt = 0, cancel_requested = false, next_run_at = now(), error = NULL, updated_at = now()
             WHERE id = $1 AND state IN ('failed', 'cancelled')
               AND NOT EXISTS (SELECT FROM workflows o WHERE o.pipeline_id = workflows.pipeline_id AND o.state IN ('pending', 'running', 'retrying'))",
            &[&id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!(
            "workflow {id} is not failed or cancelled, or its pipeline has another workflow in progress"
        )));
    }
    ctl.wake.notify_one();
    accepted(workflow_json(&workflow_of(&ctl, tid, id).await?))
}

/// Every route: (method, path, summary, who). The router and the OpenAPI document are
/// both built from it, and the tenant-isolation test walks it.
pub const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("get", "/v1/tenants", "List the tenants this token sees", "any"),
    ("post", "/v1/tenants", "Create a tenant {name}", "platform_admin"),
    ("get", "/v1/tenants/{tenant}", "Show a tenant and its resource counts", "viewer"),
    ("delete", "/v1/tenants/{tenant}", "Delete an empty tenant", "platform_admin"),
    ("get", "/v1/tenants/{tenant}/tokens", "List API tokens (never their values)", "viewer"),
    ("post", "/v1/tenants/{tenant}/tokens", "Create a token {name, role: tenant_admin|tenant_viewer}; its value is shown once", "admin"),
    ("delete", "/v1/tenants/{tenant}/tokens/{id}", "Revoke a token", "admin"),
    ("get", "/v1/tenants/{tenant}/sources", "List sources", "viewer"),
    (
        "post",
        "/v1/tenants/{tenant}/sources",
        "Create a source {name, host, port, database, admin_user, admin_password, heartbeat_interval}",
        "admin",
    ),
    ("get", "/v1/tenants/{tenant}/sources/{name}", "Show a source (never its password)", "viewer"),
    ("put", "/v1/tenants/{tenant}/sources/{name}", "Replace a source", "admin"),
    ("delete", "/v1/tenants/{tenant}/sources/{name}", "Delete an unused source", "admin"),
    ("get", "/v1/tenants/{tenant}/sinks", "List sinks", "viewer"),
    ("post", "/v1/tenants/{tenant}/sinks", "Create a sink {name, postgres|kafka|search: {...}}", "admin"),
    ("get", "/v1/tenants/{tenant}/sinks/{name}", "Show a sink (passwords redacted)", "viewer"),
    ("put", "/v1/tenants/{tenant}/sinks/{name}", "Replace a sink", "admin"),
    ("delete", "/v1/tenants/{tenant}/sinks/{name}", "Delete an unused sink", "admin"),
    ("get", "/v1/tenants/{tenant}/enrichers", "List enrichers", "viewer"),
    (
        "post",
        "/v1/tenants/{tenant}/enrichers",
        "Create an enricher {name, tables, lookup|http|expression: {...}, on_failure, apply}",
        "admin",
    ),
    ("get", "/v1/tenants/{tenant}/enrichers/{name}", "Show an enricher (passwords and header values redacted)", "viewer"),
    (
        "put",
        "/v1/tenants/{tenant}/enrichers/{name}",
        "Replace an enricher; its pipelines are re-provisioned and re-enrich what they delivered",
        "admin",
    ),
    ("delete", "/v1/tenants/{tenant}/enrichers/{name}", "Delete an enricher no pipeline uses", "admin"),
    ("get", "/v1/tenants/{tenant}/pipelines", "List pipelines with status and lag", "viewer"),
    (
        "post",
        "/v1/tenants/{tenant}/pipelines",
        "Create a pipeline {name, source, sink, tables, transforms, enrichers, snapshot, batch}; starts provisioning",
        "admin",
    ),
    ("get", "/v1/tenants/{tenant}/pipelines/{name}", "Show a pipeline with live status and lag", "viewer"),
    ("put", "/v1/tenants/{tenant}/pipelines/{name}", "Change a pipeline's tables, transforms or options; re-provisions", "admin"),
    (
        "delete",
        "/v1/tenants/{tenant}/pipelines/{name}",
        "Tear a pipeline down (slot, publication, role; ?purge=true also its sink objects)",
        "admin",
    ),
    ("post", "/v1/tenants/{tenant}/pipelines/{name}/pause", "Pause (stop streaming; the slot keeps the position)", "admin"),
    ("post", "/v1/tenants/{tenant}/pipelines/{name}/resume", "Resume a paused pipeline", "admin"),
    (
        "get",
        "/v1/tenants/{tenant}/pipelines/{name}/enrichment",
        "Rows waiting for an enricher (failed or deferred, by enricher and table) and the latest re-enrichments with progress",
        "viewer",
    ),
    (
        "post",
        "/v1/tenants/{tenant}/pipelines/{name}/resync",
        "Read tables {tables: [schema.table]} (default all) again from the source while streaming continues",
        "admin",
    ),
    ("get", "/v1/tenants/{tenant}/workflows", "List workflows (?pipeline=NAME)", "viewer"),
    ("get", "/v1/tenants/{tenant}/workflows/{id}", "Show a workflow and its step history", "viewer"),
    ("post", "/v1/tenants/{tenant}/workflows/{id}/cancel", "Cancel a workflow", "admin"),
    ("post", "/v1/tenants/{tenant}/workflows/{id}/retry", "Retry a failed or cancelled workflow from its failed step", "admin"),
];

pub fn router(ctl: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/tenants", get(tenants_list).post(tenants_create))
        .route("/v1/tenants/{tenant}", get(tenants_get).delete(tenants_delete))
        .route("/v1/tenants/{tenant}/tokens", get(tokens_list).post(tokens_create))
        .route("/v1/tenants/{tenant}/tokens/{id}", axum::routing::delete(tokens_delete))
        .route("/v1/tenants/{tenant}/sources", get(sources_list).post(sources_create))
        .route("/v1/tenants/{tenant}/sources/{name}", get(sources_get).put(sources_put).delete(sources_delete))
        .route("/v1/tenants/{tenant}/sinks", get(sinks_list).post(sinks_create))
        .route("/v1/tenants/{tenant}/sinks/{name}", get(sinks_get).put(sinks_put).delete(sinks_delete))
        .route("/v1/tenants/{tenant}/enrichers", get(enrichers_list).post(enrichers_create))
        .route("/v1/tenants/{tenant}/enrichers/{name}", get(enrichers_get).put(enrichers_put).delete(enrichers_delete))
        .route("/v1/tenants/{tenant}/pipelines", get(pipelines_list).post(pipelines_create))
        .route("/v1/tenants/{tenant}/pipelines/{name}", get(pipelines_get).put(pipelines_put).delete(pipelines_delete))
        .route("/v1/tenants/{tenant}/pipelines/{name}/pause", post(pipelines_pause))
        .route("/v1/tenants/{tenant}/pipelines/{name}/resume", post(pipelines_resume))
        .route("/v1/tenants/{tenant}/pipelines/{name}/resync", post(pipelines_resync))
        .route("/v1/tenants/{tenant}/pipelines/{name}/enrichment", get(pipelines_enrichment))
        .route("/v1/tenants/{tenant}/workflows", get(workflows_list))
        .route("/v1/tenants/{tenant}/workflows/{id}", get(workflows_get))
        .route("/v1/tenants/{tenant}/workflows/{id}/cancel", post(workflows_cancel))
        .route("/v1/tenants/{tenant}/workflows/{id}/retry", post(workflows_retry))
        .with_state(ctl)
}

/// The control routes' OpenAPI path items.
pub fn openapi_paths() -> serde_json::Map<String, Value> {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, who) in ROUTES {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}').map(str::to_string))
            .map(|p| json!({ "name": p, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut op = json!({
            "summary": summary,
            "description": format!("Allowed for: {who}. Body: YAML or JSON."),
            "security": [{ "bearer": [] }],
            "parameters": params,
            "responses": {
                "200": { "description": "ok" }, "201": { "description": "created" }, "202": { "description": "workflow started" },
                "401": { "description": "no or unknown token" }, "403": { "description": "role not allowed" },
                "404": { "description": "not found (or another tenant's)" }, "409": { "description": "conflict" },
                "422": { "description": "invalid: {error: {type, message, field}}" }
            }
        });
        if matches!(*method, "post" | "put") {
            op["requestBody"] = json!({ "content": { "application/json": { "schema": { "type": "object" } }, "application/yaml": { "schema": { "type": "object" } } } });
        }
        paths.entry(path.to_string()).or_insert_with(|| json!({}))[*method] = op;
    }
    paths
}
