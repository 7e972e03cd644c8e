//! The control plane's HTTP API under `/v1`. Every tenant resource lives under
//! `/v1/tenants/{tenant}/...`; a token sees its own tenant only (another tenant
//! answers 404, exactly like a tenant that does not exist), viewers read only, and
//! platform admins see everything. Bodies are YAML or JSON; errors are
//! `{"error": {"type", "message", "field"}}`.

mod alerts;
mod auth;
mod enrichers;
mod error;
mod mirrors;
mod pipelines;
mod routes;
mod sinks;
mod sources;
mod tenants;
mod tokens;
mod workflows;

use alerts::*;
use enrichers::*;
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
use super::crypto::{new_password, new_token, token_hash};
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
