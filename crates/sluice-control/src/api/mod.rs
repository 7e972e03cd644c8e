//! The control plane's HTTP API under `/v1`. Every tenant resource lives under
//! `/v1/tenants/{tenant}/...`; a token sees its own tenant only (another tenant
//! answers 404, exactly like a tenant that does not exist), viewers read only, and
//! platform admins see everything. Bodies are YAML or JSON; errors are
//! `{"error": {"type", "message", "field"}}`.

mod alerts;
mod auth;
mod enrichers;
mod error;
mod metrics;
mod mirrors;
mod pipelines;
mod quota;
mod routes;
mod sinks;
mod sources;
mod tenants;
mod tokens;
mod workflows;

use alerts::*;
use enrichers::*;
use metrics::*;
use mirrors::*;
use pipelines::*;
use sinks::*;
use sources::*;
use tenants::*;
use tokens::*;
use workflows::*;

pub use auth::{Caller, Principal, Role, authenticate};
pub use error::ApiError;
pub(crate) use mirrors::load_mirror;
pub use quota::Quotas;
pub use routes::{openapi_paths, router};

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
use super::crypto::{Owner, new_password, new_token, token_hash};
use super::model::{
    EnricherSpec, Invalid, PipelineSpec, ResyncSpec, SinkSpec, SourceSpec, check_name, object_name, parse_alerts, run_config,
};
use sluice_engine::metrics::Metrics;
use sluice_engine::pipeline::{CheckPart, Pipeline};

pub(super) type Ctl = State<Arc<Control>>;

pub(super) type ApiResult = Result<Response, ApiError>;

pub(super) fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}
pub(super) fn created(v: Value) -> ApiResult {
    Ok((StatusCode::CREATED, Json(v)).into_response())
}
pub(super) fn accepted(v: Value) -> ApiResult {
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

/// `body`, a PUT of resource `name` (table `table`), with the API's secret placeholders
/// replaced by the stored secrets ([`restore_secrets`]); `stored` rebuilds the stored
/// resource, opened, as a request body. A body that does not parse is passed on as it
/// is (the handler says what is wrong with it).
pub(super) async fn with_stored_secrets(
    ctl: &Control,
    table: &'static str,
    tenant: i64,
    name: &str,
    body: Bytes,
    stored: impl Fn(&[u8]) -> anyhow::Result<Value>,
) -> Result<Bytes, ApiError> {
    if !body.windows(5).any(|w| w == b"(set)") {
        return Ok(body);
    }
    let Ok(mut new) = super::model::parse::<Value>(&body, table) else { return Ok(body) };
    let row =
        ctl.db.get().await?.query_opt(&format!("SELECT sealed FROM {table} WHERE tenant_id = $1 AND name = $2"), &[&tenant, &name]).await?;
    let Some(row) = row else { return Ok(body) };
    let plain = ctl.sealer.open(Owner::new(table, tenant, name), row.get::<_, &[u8]>(0)).map_err(anyhow::Error::msg)?;
    super::model::restore_secrets(&mut new, &stored(&plain)?);
    Ok(Bytes::from(serde_json::to_vec(&new).expect("json")))
}
