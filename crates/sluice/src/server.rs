//! `sluice server`: the main HTTP server: the migration-check endpoint, the schema
//! registry under `/registry` (with a registry database), and the control plane under
//! `/v1/tenants` (with a control database).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::migrations::{CheckError, ModelCache, check_files};

#[derive(Clone, Default)]
pub struct ServerConfig {
    /// Catalog context for migration checks (read-only connection string), read through
    /// a cache. Callers choose a pipeline, never a database: the server never connects
    /// where a request says.
    models: Option<Arc<ModelCache>>,
    /// With the control plane on, migration checks take its tokens too.
    control: Option<Arc<sluice_control::Control>>,
}

/// How long a catalog read serves migration checks: a check seconds after a change
/// applied elsewhere may not see it yet.
const CATALOG_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl ServerConfig {
    pub fn new(source: Option<String>) -> Self {
        Self { models: source.map(|dsn| Arc::new(ModelCache::new(dsn, CATALOG_TTL))), control: None }
    }
}

/// The largest migration a check reads (a file of thousands of statements fits).
const MAX_SQL: usize = 4 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    sql: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    pipeline: Option<String>,
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (status, Json(json!({ "error": { "type": kind, "message": message } }))).into_response()
}

async fn migrations_check(State(cfg): State<Arc<ServerConfig>>, headers: axum::http::HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some(ctl) = &cfg.control
        && let Err(e) = sluice_control::api::authenticate(ctl, &headers).await
    {
        return e.into_response();
    }
    let kind = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !kind.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json") {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "send the request as application/json".into());
    }
    let req: CheckRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", format!("request body: {e}; expected {{\"sql\": \"...\"}}")),
    };
    if req.pipeline.as_ref().is_some_and(|p| p.len() > 63) {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "pipeline: a pipeline name has at most 63 characters".into());
    }
    let model = match &cfg.models {
        Some(cache) => match cache.get(req.pipeline.as_deref()).await {
            Ok(m) => m,
            Err(e) => return error(StatusCode::BAD_GATEWAY, "source_unavailable", e.to_string()),
        },
        None => Arc::new(sluice_ddl::Model::default()),
    };
    let name = req.file.unwrap_or_else(|| "request.sql".into());
    match check_files(vec![(name, req.sql)], &model, None).await {
        Ok((verdict, files)) => Json(json!({ "verdict": verdict, "context": cfg.models.is_some(), "files": files })).into_response(),
        Err(CheckError::Input(e)) => {
            let kind = if matches!(e, sluice_ddl::DdlError::Empty(_)) { "empty" } else { "parse_error" };
            error(StatusCode::BAD_REQUEST, kind, e.to_string())
        }
        Err(e @ CheckError::Context(_)) => error(StatusCode::BAD_GATEWAY, "context_unavailable", e.to_string()),
    }
}

fn openapi() -> serde_json::Value {
    json!({
        "openapi": "3.0.3",
        "info": { "title": "Sluice", "version": env!("CARGO_PKG_VERSION") },
        "paths": {
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "ok" } } } },
            "/v1/migrations/check": { "post": {
                "summary": "Vet migration SQL: a verdict per statement with reasons and safe alternatives",
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["sql"], "additionalProperties": false,
                    "properties": {
                        "sql": { "type": "string", "description": "One or more SQL statements" },
                        "file": { "type": "string", "description": "Name used in findings" },
                        "pipeline": { "type": "string", "description": "Only this pipeline's tables count as replicated" }
                    } } } } },
                "responses": {
                    "200": { "description": "Checked; `verdict` is allowed, warning, needs_coordination or blocked" },
                    "400": { "description": "Unparseable or empty SQL, or a bad request body" },
                    "502": { "description": "The catalog source could not be read" }
                }
            } },
            "/registry/{path}": { "get": {
                "summary": "Confluent Schema Registry API, when the server has a registry database",
                "parameters": [{ "name": "path", "in": "path", "required": true, "schema": { "type": "string" } }],
                "responses": { "200": { "description": "See Confluent's Schema Registry API" } }
            } }
        }
    })
}

/// The server's routes. With the control plane on, the registry and the search service
/// take its tokens and keep each tenant to its own context and indices (see `gate`);
/// without it there are no tokens, and they answer anyone who reaches the address.
pub fn router(
    cfg: ServerConfig,
    registry: Option<Arc<sluice_registry::Store>>,
    search: Option<Router>,
    control: Option<Arc<sluice_control::Control>>,
) -> Router {
    let mut doc = openapi();
    if control.is_some() {
        let paths = doc["paths"].as_object_mut().expect("paths");
        paths.extend(sluice_control::api::openapi_paths());
        doc["components"] = json!({ "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } } });
    }
    let doc = Arc::new(doc);
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(move || async move { Json((*doc).clone()) }))
        .route("/v1/migrations/check", post(migrations_check).layer(axum::extract::DefaultBodyLimit::max(MAX_SQL)))
        .with_state(Arc::new(ServerConfig { control: control.clone(), ..cfg }));
    let registry = registry.map(sluice_registry::router);
    match control {
        Some(ctl) => {
            app = app.merge(sluice_control::api::router(ctl.clone()));
            if let Some(r) = registry {
                app = app.nest_service("/registry", crate::gate::registry(ctl.clone(), r));
            }
            if let Some(s) = search {
                app = app.nest_service("/search", crate::gate::search(ctl, s));
            }
        }
        None => {
            if let Some(r) = registry {
                app = app.nest("/registry", r);
            }
            if let Some(s) = search {
                app = app.nest("/search", s);
            }
        }
    }
    app
}
