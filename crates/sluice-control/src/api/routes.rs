//! Every route in one table: the router, the OpenAPI paths and the isolation test read it.

use super::*;

/// Every route: (method, path, summary, who). The router and the OpenAPI document are
/// both built from it, and the tenant-isolation test walks it.
pub const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("get", "/v1/tenants", "List the tenants this token sees", "any"),
    ("post", "/v1/tenants", "Create a tenant {name}", "platform_admin"),
    ("get", "/v1/tenants/{tenant}", "Show a tenant and its resource counts", "viewer"),
    ("delete", "/v1/tenants/{tenant}", "Delete an empty tenant", "platform_admin"),
    ("get", "/v1/tokens", "List every token of every tenant (never their values)", "platform_admin"),
    ("delete", "/v1/tokens/{id}", "Revoke any token (not the last platform admin token)", "platform_admin"),
    ("get", "/v1/tenants/{tenant}/tokens", "List API tokens (never their values)", "viewer"),
    (
        "post",
        "/v1/tenants/{tenant}/tokens",
        "Create a token {name, role: tenant_admin|tenant_viewer, expires_in: 90d}; its value is shown once",
        "admin",
    ),
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
    (
        "post",
        "/v1/tenants/{tenant}/pipelines/{name}/recover",
        "Replace a pipeline's lost replication slot and read every table again, without emptying the sink",
        "admin",
    ),
    ("get", "/v1/tenants/{tenant}/mirrors", "List Kafka-to-Kafka mirrors with status and lag", "viewer"),
    (
        "post",
        "/v1/tenants/{tenant}/mirrors",
        "Create a mirror {name, source: {kafka: {...}}, sink: {kafka: {...}}, batch, offsets}; both clusters are checked, then it runs",
        "admin",
    ),
    ("get", "/v1/tenants/{tenant}/mirrors/{name}", "Show a mirror with live status and lag (Kafka property values hidden)", "viewer"),
    ("put", "/v1/tenants/{tenant}/mirrors/{name}", "Replace a mirror's spec; it restarts from its last committed batch", "admin"),
    (
        "delete",
        "/v1/tenants/{tenant}/mirrors/{name}",
        "Tear a mirror down (its offsets topic on the target; ?purge=true also the topics it copied into)",
        "admin",
    ),
    ("post", "/v1/tenants/{tenant}/mirrors/{name}/pause", "Pause a mirror (it resumes after its last committed batch)", "admin"),
    ("post", "/v1/tenants/{tenant}/mirrors/{name}/resume", "Resume a paused mirror", "admin"),
    (
        "get",
        "/v1/tenants/{tenant}/mirrors/{name}/offsets/{group}",
        "How a source consumer group's committed offsets translate to the target, per partition",
        "viewer",
    ),
    ("get", "/v1/tenants/{tenant}/alerts", "The tenant's alert settings (the webhook URL hidden)", "viewer"),
    (
        "put",
        "/v1/tenants/{tenant}/alerts",
        "Set alert settings {webhook_url, lag_ms, lag_for, retained_bytes, window} for every pipeline of the tenant",
        "admin",
    ),
    ("delete", "/v1/tenants/{tenant}/alerts", "Remove the alert settings (no more alerts)", "admin"),
    ("get", "/v1/tenants/{tenant}/workflows", "List workflows (?pipeline=NAME)", "viewer"),
    ("get", "/v1/tenants/{tenant}/workflows/{id}", "Show a workflow and its step history", "viewer"),
    ("post", "/v1/tenants/{tenant}/workflows/{id}/cancel", "Cancel a workflow", "admin"),
    ("post", "/v1/tenants/{tenant}/workflows/{id}/retry", "Retry a failed or cancelled workflow from its failed step", "admin"),
    (
        "get",
        "/metrics",
        "Prometheus metrics (text) of the pipelines this server runs, labelled pipeline, tenant and sink; a tenant token sees its own",
        "any",
    ),
];

pub fn router(ctl: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/tenants", get(tenants_list).post(tenants_create))
        .route("/v1/tenants/{tenant}", get(tenants_get).delete(tenants_delete))
        .route("/v1/tokens", get(all_tokens_list))
        .route("/v1/tokens/{id}", axum::routing::delete(all_tokens_delete))
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
        .route("/v1/tenants/{tenant}/pipelines/{name}/recover", post(pipelines_recover))
        .route("/v1/tenants/{tenant}/pipelines/{name}/enrichment", get(pipelines_enrichment))
        .route("/v1/tenants/{tenant}/mirrors", get(mirrors_list).post(mirrors_create))
        .route("/v1/tenants/{tenant}/mirrors/{name}", get(mirrors_get).put(mirrors_put).delete(mirrors_delete))
        .route("/v1/tenants/{tenant}/mirrors/{name}/pause", post(mirrors_pause))
        .route("/v1/tenants/{tenant}/mirrors/{name}/resume", post(mirrors_resume))
        .route("/v1/tenants/{tenant}/mirrors/{name}/offsets/{group}", get(mirrors_offsets))
        .route("/v1/tenants/{tenant}/alerts", get(alerts_get).put(alerts_put).delete(alerts_delete))
        .route("/v1/tenants/{tenant}/workflows", get(workflows_list))
        .route("/v1/tenants/{tenant}/workflows/{id}", get(workflows_get))
        .route("/v1/tenants/{tenant}/workflows/{id}/cancel", post(workflows_cancel))
        .route("/v1/tenants/{tenant}/workflows/{id}/retry", post(workflows_retry))
        .route("/metrics", get(metrics_get))
        .layer(axum::middleware::from_fn(body_guard))
        .with_state(ctl)
}

/// The largest request body the API reads (resource specs are a few KB).
const MAX_BODY: usize = 1 << 20;

/// Every request, before any handler: a path without control characters; a body in
/// YAML or JSON by its content type (so a
/// browser's cross-site form or `text/plain` post is refused), at most 1 MiB, and no
/// YAML aliases (a few KB of nested aliases expand to gigabytes: the "billion laughs").
async fn body_guard(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    // No name holds a control character (Postgres cannot even store NUL in text): such a
    // path names nothing, and must not reach a query.
    let path = percent_encoding::percent_decode_str(req.uri().path()).collect::<Vec<u8>>();
    if std::str::from_utf8(&path).is_err() || path.iter().any(|b| *b < 0x20 || *b == 0x7f) {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource: names hold letters, digits, _ and -").into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "the request body is larger than 1 MiB").into_response();
        }
    };
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        let kind = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let essence = kind.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        let structured =
            matches!(essence.as_str(), "application/json" | "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml")
                || essence.ends_with("+json")
                || essence.ends_with("+yaml");
        if !structured {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "send the body as application/json or application/yaml (got {:?})",
                    if kind.is_empty() { "no content type" } else { kind }
                ),
            )
            .into_response();
        }
        if has_yaml_alias(&bytes) {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "yaml_alias",
                "YAML anchors and aliases (*name) are not accepted in request bodies: write the values out",
            )
            .into_response();
        }
    }
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Whether YAML text holds an alias: a node starting with `*` outside quotes and
/// comments. A plain scalar cannot start with `*`, so this finds every alias; it may
/// also refuse a rare legitimate text (a `*` opening a line inside a multi-line quoted
/// string), which the caller can quote differently.
fn has_alias(text: &str) -> bool {
    for line in text.lines() {
        // The last significant character outside quotes; a node starts after these.
        let mut prev: Option<char> = None;
        let (mut single, mut double, mut escaped) = (false, false, false);
        let starts_node = |p: Option<char>| matches!(p, None | Some(':' | '-' | '[' | '{' | ',' | '?' | '|' | '>'));
        for (i, c) in line.char_indices() {
            if double {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        double = false;
                        prev = Some('"');
                    }
                    _ => {}
                }
                continue;
            }
            if single {
                if c == '\'' {
                    single = false;
                    prev = Some('\'');
                }
                continue;
            }
            match c {
                '"' if starts_node(prev) => double = true,
                '\'' if starts_node(prev) => single = true,
                '#' if i == 0 || line[..i].ends_with([' ', '\t']) => break,
                '*' if starts_node(prev) => return true,
                c if !c.is_whitespace() => prev = Some(c),
                _ => {}
            }
        }
    }
    false
}

fn has_yaml_alias(body: &[u8]) -> bool {
    std::str::from_utf8(body).is_ok_and(has_alias)
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
                "401": { "description": "no or unknown token" }, "403": { "description": "role not allowed, or the tenant's quota reached (quota_exceeded)" },
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

#[cfg(test)]
mod tests {
    use super::has_alias;

    #[test]
    fn aliases_are_found_and_quoted_stars_are_not() {
        assert!(has_alias("a: &x [1, 2]\nb: *x\n"));
        assert!(has_alias("b: [*x, *x]\n"));
        assert!(has_alias("- *x\n"));
        assert!(has_alias("{a: 1, b: *x}"));
        assert!(!has_alias("where: \"a * b > 1\"\nexpr: 'x * 2'\n"));
        assert!(!has_alias("expr: id * 2\n"));
        assert!(!has_alias("{\"name\": \"x\", \"expr\": \"*\"}"));
        assert!(!has_alias("a: 1 # *not an alias\n"));
        assert!(!has_alias("glob: 'a*'\n"));
    }
}
