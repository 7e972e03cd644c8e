//! The Confluent Schema Registry REST API.
//!
//! Bodies are parsed whatever their content type: Confluent clients send
//! `application/vnd.schemaregistry.v1+json`, others plain JSON.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::compat::Compatibility;
use crate::error::{ApiError, CONTENT_TYPE};
use crate::store::{Qualified, Store};

type Params = Query<HashMap<String, String>>;
type Result<T = Response> = std::result::Result<T, ApiError>;

fn ok(v: Value) -> Result {
    Ok(([("content-type", CONTENT_TYPE)], v.to_string()).into_response())
}

fn flag(p: &Params, name: &str) -> bool {
    p.get(name).is_some_and(|v| v == "true")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
}

fn schema_body(body: &Bytes) -> Result<SchemaBody> {
    let b: SchemaBody = serde_json::from_slice(body).map_err(|e| ApiError::new(422, 42201, format!("Invalid schema request: {e}")))?;
    if !b.references.is_empty() {
        return Err(ApiError::new(422, 42201, "Invalid schema: schema references are not supported yet".into()));
    }
    Ok(b)
}

fn version_json(v: &crate::store::Version) -> Value {
    json!({ "subject": v.subject, "version": v.version, "id": v.id, "schema": v.schema })
}

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/", get(|| async { ok(json!({})) }))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", post(register).get(versions))
        .route("/subjects/{subject}/versions/{version}", get(version).delete(delete_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(version_schema))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/subjects", get(id_subjects))
        .route("/schemas/ids/{id}/versions", get(id_versions))
        .route("/schemas/types", get(|| async { ok(json!(["AVRO"])) }))
        .route("/config", get(get_config).put(put_config).delete(delete_config))
        .route("/config/{subject}", get(get_config).put(put_config).delete(delete_config))
        .route("/mode", get(get_mode).put(put_mode))
        .route("/mode/{subject}", get(get_mode).put(put_mode))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(test_compat))
        .route("/contexts", get(contexts))
        .with_state(store)
}

async fn subjects(State(s): State<Arc<Store>>, p: Params) -> Result {
    let mut all = s.subjects(None, flag(&p, "deleted")).await?;
    if let Some(prefix) = p.get("subjectPrefix") {
        all.retain(|x| x.starts_with(prefix.as_str()));
    }
    ok(json!(all))
}

async fn register(State(s): State<Arc<Store>>, Path(subject): Path<String>, body: Bytes) -> Result {
    let b = schema_body(&body)?;
    let q = Qualified::parse(&subject);
    let id = s.register(&q, b.schema_type.as_deref().unwrap_or("AVRO"), &b.schema).await?;
    ok(json!({ "id": id }))
}

async fn versions(State(s): State<Arc<Store>>, Path(subject): Path<String>, p: Params) -> Result {
    let v = s.versions(&Qualified::parse(&subject), flag(&p, "deleted")).await?;
    ok(json!(v.iter().map(|v| v.version).collect::<Vec<_>>()))
}

async fn version(State(s): State<Arc<Store>>, Path((subject, version)): Path<(String, String)>, p: Params) -> Result {
    ok(version_json(&s.version(&Qualified::parse(&subject), &version, flag(&p, "deleted")).await?))
}

async fn version_schema(State(s): State<Arc<Store>>, Path((subject, version)): Path<(String, String)>) -> Result {
    Ok(([("content-type", CONTENT_TYPE)], s.version(&Qualified::parse(&subject), &version, false).await?.schema).into_response())
}

async fn lookup(State(s): State<Arc<Store>>, Path(subject): Path<String>, body: Bytes) -> Result {
    let b = schema_body(&body)?;
    ok(version_json(&s.lookup(&Qualified::parse(&subject), &b.schema).await?))
}

async fn delete_subject(State(s): State<Arc<Store>>, Path(subject): Path<String>, p: Params) -> Result {
    ok(json!(s.delete(&Qualified::parse(&subject), None, flag(&p, "permanent")).await?))
}

async fn delete_version(State(s): State<Arc<Store>>, Path((subject, version)): Path<(String, String)>, p: Params) -> Result {
    let v = s.delete(&Qualified::parse(&subject), Some(&version), flag(&p, "permanent")).await?;
    ok(json!(v.first()))
}

fn parse_id(id: &str) -> Result<i32> {
    id.parse().map_err(|_| ApiError::new(404, 40403, "Schema not found".into()))
}

/// Ids are per context; the context comes from the `subject` parameter.
fn ctx_of(p: &Params) -> String {
    p.get("subject").map(|s| Qualified::parse(s).ctx).unwrap_or_default()
}

async fn schema_by_id(State(s): State<Arc<Store>>, Path(id): Path<String>, p: Params) -> Result {
    ok(json!({ "schema": s.schema_by_id(&ctx_of(&p), parse_id(&id)?).await? }))
}

async fn raw_schema_by_id(State(s): State<Arc<Store>>, Path(id): Path<String>, p: Params) -> Result {
    Ok(([("content-type", CONTENT_TYPE)], s.schema_by_id(&ctx_of(&p), parse_id(&id)?).await?).into_response())
}

async fn id_subjects(State(s): State<Arc<Store>>, Path(id): Path<String>, p: Params) -> Result {
    let mut subjects: Vec<String> = s.id_usage(&ctx_of(&p), parse_id(&id)?).await?.into_iter().map(|(s, _)| s).collect();
    subjects.dedup();
    ok(json!(subjects))
}

async fn id_versions(State(s): State<Arc<Store>>, Path(id): Path<String>, p: Params) -> Result {
    let v = s.id_usage(&ctx_of(&p), parse_id(&id)?).await?;
    ok(json!(v.into_iter().map(|(subject, version)| json!({"subject": subject, "version": version})).collect::<Vec<_>>()))
}

fn subject_of(subject: Option<Path<String>>) -> (Qualified, bool) {
    match subject {
        Some(Path(s)) => (Qualified::parse(&s), true),
        None => (Qualified { ctx: String::new(), subject: String::new() }, false),
    }
}

async fn get_config(State(s): State<Arc<Store>>, subject: Option<Path<String>>, p: Params) -> Result {
    let (q, subject_level) = subject_of(subject);
    let value = match s.get_setting("config", &q, subject_level).await? {
        Some(v) => v,
        None if subject_level && !flag(&p, "defaultToGlobal") => {
            return Err(ApiError::new(
                404,
                40408,
                format!("Subject '{}' does not have subject-level compatibility configured", q.display()),
            ));
        }
        None => s.compatibility(&q).await?.as_str().to_string(),
    };
    ok(json!({ "compatibilityLevel": value }))
}

async fn put_config(State(s): State<Arc<Store>>, subject: Option<Path<String>>, body: Bytes) -> Result {
    let (q, subject_level) = subject_of(subject);
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::new(422, 42203, format!("Invalid compatibility level: {e}")))?;
    let level = v.get("compatibility").or_else(|| v.get("compatibilityLevel")).and_then(Value::as_str).unwrap_or_default();
    let c = Compatibility::parse(level).ok_or_else(|| {
        ApiError::new(422, 42203, format!("Invalid compatibility level {level:?}. Valid values are NONE, BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE"))
    })?;
    s.put_setting("config", &q, subject_level, Some(c.as_str())).await?;
    ok(json!({ "compatibility": c.as_str() }))
}

async fn delete_config(State(s): State<Arc<Store>>, subject: Option<Path<String>>) -> Result {
    let (q, subject_level) = subject_of(subject);
    let before = s.compatibility(&q).await?;
    s.put_setting("config", &q, subject_level, None).await?;
    ok(json!({ "compatibilityLevel": before.as_str() }))
}

async fn get_mode(State(s): State<Arc<Store>>, subject: Option<Path<String>>) -> Result {
    let (q, subject_level) = subject_of(subject);
    let mode = s.get_setting("mode", &q, subject_level).await?.unwrap_or_else(|| "READWRITE".into());
    ok(json!({ "mode": mode }))
}

async fn put_mode(State(s): State<Arc<Store>>, subject: Option<Path<String>>, body: Bytes) -> Result {
    let (q, subject_level) = subject_of(subject);
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::new(422, 42204, format!("Invalid mode: {e}")))?;
    let mode = v.get("mode").and_then(Value::as_str).unwrap_or_default().to_string();
    if !["READWRITE", "READONLY", "IMPORT"].contains(&mode.as_str()) {
        return Err(ApiError::new(422, 42204, format!("Invalid mode {mode:?}. Valid values are READWRITE, READONLY, IMPORT")));
    }
    s.put_setting("mode", &q, subject_level, Some(&mode)).await?;
    ok(json!({ "mode": mode }))
}

async fn test_compat(State(s): State<Arc<Store>>, Path((subject, version)): Path<(String, String)>, p: Params, body: Bytes) -> Result {
    let b = schema_body(&body)?;
    let reasons = s.test_compat(&Qualified::parse(&subject), &version, &b.schema).await?;
    let mut out = json!({ "is_compatible": reasons.is_empty() });
    if flag(&p, "verbose") {
        out["messages"] = json!(reasons);
    }
    ok(out)
}

async fn contexts(State(s): State<Arc<Store>>) -> Result {
    ok(json!(s.contexts().await?))
}
