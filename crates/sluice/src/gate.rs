//! Tokens in front of the schema registry (`/registry`) and the search service
//! (`/search`) of `sluice server` when the control plane is on: the control plane's
//! tokens, sent as Bearer, Basic (Confluent's `basic.auth.user.info`, Elasticsearch
//! clients' user and password) or `ApiKey`. A platform admin sees everything. A tenant
//! token sees its own registry context (`:.<tenant>:`; plain subject names are put in
//! it, so a client needs no change) and its own indices (named `<tenant>.<name>`);
//! another tenant's context or index answers as missing. Viewers only read.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde_json::{Value, json};
use sluice_control::Control;
use sluice_control::api::{Principal, Role, authenticate};
use tower::ServiceExt as _;

/// What a path segment keeps unencoded (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// The largest body the gate reads to check it (a `_bulk` request): the search
/// service's own limit.
const MAX_BODY: usize = sluice_search::MAX_CONTENT_LENGTH;

/// The registry behind tokens.
pub fn registry(ctl: Arc<Control>, inner: Router) -> Router {
    Router::new().fallback(move |req: Request| {
        let (ctl, inner) = (ctl.clone(), inner.clone());
        async move {
            match authenticate(&ctl, req.headers()).await {
                Ok(who) => registry_request(&who, inner, req).await,
                Err(_) => registry_error(
                    StatusCode::UNAUTHORIZED,
                    40101,
                    "missing or unknown token: send the control plane's token (Bearer, or Basic user:token)",
                ),
            }
        }
    })
}

/// The search service behind tokens.
pub fn search(ctl: Arc<Control>, inner: Router) -> Router {
    Router::new().fallback(move |req: Request| {
        let (ctl, inner) = (ctl.clone(), inner.clone());
        async move {
            match authenticate(&ctl, req.headers()).await {
                Ok(who) => search_request(&who, inner, req).await,
                Err(_) => search_error(
                    StatusCode::UNAUTHORIZED,
                    "missing or unknown token: send the control plane's token (Bearer, Basic user:token, or ApiKey)",
                ),
            }
        }
    })
}

fn registry_error(status: StatusCode, code: u32, message: &str) -> Response {
    let mut r = (status, axum::Json(json!({ "error_code": code, "message": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sluice\""));
    }
    r
}

fn search_error(status: StatusCode, reason: &str) -> Response {
    let kind = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        "security_exception"
    } else {
        "index_not_found_exception"
    };
    let err = json!({ "type": kind, "reason": reason });
    let mut r = (
        status,
        axum::Json(json!({ "error": { "root_cause": [err.clone()], "type": kind, "reason": reason }, "status": status.as_u16() })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sluice\", ApiKey, Bearer"));
    }
    r
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// `req` with path `path` and query `query` (both already encoded).
fn with_uri(mut req: Request, path: &str, query: &[(String, String)]) -> Request {
    let mut uri = path.to_string();
    if !query.is_empty() {
        uri.push('?');
        uri.push_str(&query.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&"));
    }
    *req.uri_mut() = uri.parse::<Uri>().expect("an encoded path and query");
    req
}

fn query_of(req: &Request) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(&k.replace('+', " ")), decode(&v.replace('+', " ")))
        })
        .collect()
}

fn set(query: &mut Vec<(String, String)>, key: &str, value: String) {
    query.retain(|(k, _)| k != key);
    query.push((key.to_string(), value));
}

async fn forward(inner: Router, req: Request) -> Response {
    match inner.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// Whether a request changes anything, for a caller that may only read;
/// `reading_post`: a POST that only reads (a registry lookup, a search).
fn writes(method: &Method, reading_post: bool) -> bool {
    !(method == Method::GET || method == Method::HEAD || reading_post)
}

// ---- registry ----

/// A subject of tenant `tenant`: a plain name is put in the tenant's context; another
/// context is refused (`None`).
fn scoped_subject(tenant: &str, raw: &str) -> Option<String> {
    match raw.strip_prefix(":.") {
        Some(rest) => {
            let (ctx, _) = rest.split_once(':')?;
            (ctx == tenant).then(|| raw.to_string())
        }
        None => Some(format!(":.{tenant}:{raw}")),
    }
}

async fn registry_request(who: &Principal, inner: Router, req: Request) -> Response {
    if who.role == Role::PlatformAdmin {
        return forward(inner, req).await;
    }
    let Some(tenant) = who.tenant.clone() else { return registry_error(StatusCode::FORBIDDEN, 40301, "this token has no tenant") };
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let read_only_post = req.method() == Method::POST && matches!(parts.as_slice(), ["subjects", _] | ["compatibility", ..]);
    if who.role == Role::TenantViewer && writes(req.method(), read_only_post) {
        return registry_error(StatusCode::FORBIDDEN, 40301, "this token is read-only (tenant_viewer)");
    }
    let mut query = query_of(&req);
    let not_found = || registry_error(StatusCode::NOT_FOUND, 40401, "Subject not found.");
    let subject_at = |i: usize| -> Option<Vec<String>> {
        let mut out: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
        out[i] = encode(&scoped_subject(&tenant, &decode(parts[i]))?);
        Some(out)
    };
    let rewritten = match parts.as_slice() {
        [""] | ["schemas", "types"] => None,
        ["subjects"] => {
            let prefix = query.iter().find(|(k, _)| k == "subjectPrefix").map(|(_, v)| v.clone()).unwrap_or_default();
            match scoped_subject(&tenant, &prefix) {
                Some(p) => set(&mut query, "subjectPrefix", p),
                None => return axum::Json(json!([])).into_response(),
            }
            None
        }
        ["subjects", _, ..] | ["config", _] | ["mode", _] => match subject_at(1) {
            Some(p) => Some(p),
            None => return not_found(),
        },
        ["compatibility", "subjects", _, ..] => match subject_at(2) {
            Some(p) => Some(p),
            None => return not_found(),
        },
        // The whole registry's settings: a tenant reads them, never sets them (READONLY
        // there would halt every tenant's pipelines).
        ["config"] | ["mode"] => {
            if req.method() != Method::GET {
                return registry_error(
                    StatusCode::FORBIDDEN,
                    40301,
                    "the registry-wide config and mode are a platform admin's: set them on your subjects",
                );
            }
            None
        }
        // Ids are numbered per context: look in the tenant's.
        ["schemas", "ids", _, ..] => {
            let subject = query.iter().find(|(k, _)| k == "subject").map(|(_, v)| v.clone()).unwrap_or_default();
            match scoped_subject(&tenant, &subject) {
                Some(s) => set(&mut query, "subject", s),
                None => return registry_error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
            }
            None
        }
        ["contexts"] => {
            let resp = forward(inner, req).await;
            let mine = format!(".{tenant}");
            return filter_json(resp, |v| v.as_str() == Some(mine.as_str()) || v.as_str() == Some(tenant.as_str())).await;
        }
        _ => return registry_error(StatusCode::NOT_FOUND, 40400, "no such registry route"),
    };
    let path = match rewritten {
        Some(p) => format!("/{}", p.join("/")),
        None => path,
    };
    forward(inner, with_uri(req, &path, &query)).await
}

/// Keeps the items of a JSON array response that `keep` accepts.
async fn filter_json(resp: Response, keep: impl Fn(&Value) -> bool) -> Response {
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else { return StatusCode::BAD_GATEWAY.into_response() };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Array(items)) => {
            let kept: Vec<Value> = items.into_iter().filter(|v| keep(v)).collect();
            let mut r = Response::from_parts(parts, Body::from(serde_json::to_vec(&kept).expect("json")));
            r.headers_mut().remove(header::CONTENT_LENGTH);
            r
        }
        _ => Response::from_parts(parts, Body::from(bytes)),
    }
}

// ---- search ----

/// Whether every index an expression names (comma-separated, wildcards allowed) is
/// the tenant's: named `<tenant>.<something>`.
fn own_indices(tenant: &str, expr: &str) -> bool {
    let prefix = format!("{tenant}.");
    !expr.is_empty() && expr.split(',').all(|i| i.len() > prefix.len() && i.starts_with(&prefix))
}

async fn search_request(who: &Principal, inner: Router, req: Request) -> Response {
    if who.role == Role::PlatformAdmin {
        return forward(inner, req).await;
    }
    let Some(tenant) = who.tenant.clone() else { return search_error(StatusCode::FORBIDDEN, "this token has no tenant") };
    let path = req.uri().path().to_string();
    let parts: Vec<String> = path.trim_start_matches('/').split('/').map(decode).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    // _search and _count are POSTs that read.
    let reads = req.method() == Method::POST && matches!(parts.as_slice(), [_, "_search" | "_count" | "_refresh"]);
    if who.role == Role::TenantViewer && writes(req.method(), reads) {
        return search_error(StatusCode::FORBIDDEN, "this token is read-only (tenant_viewer)");
    }
    let denied = |what: &str| {
        search_error(StatusCode::FORBIDDEN, &format!("{what} is not an index of tenant {tenant}: its indices are named {tenant}.<name>"))
    };
    match parts.as_slice() {
        [""] | ["_cluster", "health"] => forward(inner, req).await,
        ["_cat", "indices"] => {
            let prefix = format!("{tenant}.");
            let resp = forward(inner, req).await;
            filter_cat(resp, &prefix).await
        }
        ["_bulk"] => bulk(&tenant, None, inner, req).await,
        [index, "_bulk"] if own_indices(&tenant, index) => {
            let index = index.to_string();
            bulk(&tenant, Some(&index), inner, req).await
        }
        [index, ..] if !index.starts_with('_') => {
            if own_indices(&tenant, index) {
                forward(inner, req).await
            } else {
                denied(&format!("index {index:?}"))
            }
        }
        _ => search_error(StatusCode::FORBIDDEN, "this route spans every tenant's indices: name your indices in the path"),
    }
}

/// `_cat/indices` with only the tenant's rows (JSON or text).
async fn filter_cat(resp: Response, prefix: &str) -> Response {
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else { return StatusCode::BAD_GATEWAY.into_response() };
    let filtered: Bytes = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Array(rows)) => {
            let kept: Vec<Value> = rows.into_iter().filter(|r| r["index"].as_str().is_some_and(|i| i.starts_with(prefix))).collect();
            serde_json::to_vec(&kept).expect("json").into()
        }
        _ => {
            let text = String::from_utf8_lossy(&bytes);
            let kept: Vec<&str> = text
                .lines()
                .enumerate()
                .filter(|(n, l)| (*n == 0 && l.starts_with("health")) || l.split_whitespace().any(|w| w.starts_with(prefix)))
                .map(|(_, l)| l)
                .collect();
            let mut out = kept.join("\n");
            if !out.is_empty() {
                out.push('\n');
            }
            out.into()
        }
    };
    let mut r = Response::from_parts(parts, Body::from(filtered));
    r.headers_mut().remove(header::CONTENT_LENGTH);
    r
}

/// A `_bulk` request whose every action names (or defaults to) the tenant's index.
async fn bulk(tenant: &str, default: Option<&str>, inner: Router, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return search_error(StatusCode::PAYLOAD_TOO_LARGE, "the _bulk body is larger than the server takes"),
    };
    let mut lines = bytes.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace));
    while let Some(line) = lines.next() {
        let Ok(Value::Object(action)) = serde_json::from_slice::<Value>(line) else {
            return search_error(StatusCode::BAD_REQUEST, "_bulk: an action line is not a JSON object");
        };
        let Some((op, meta)) = action.iter().next() else { return search_error(StatusCode::BAD_REQUEST, "_bulk: an empty action line") };
        match meta.get("_index").and_then(Value::as_str).or(default) {
            Some(i) if own_indices(tenant, i) => {}
            Some(i) => {
                return search_error(
                    StatusCode::FORBIDDEN,
                    &format!("index {i:?} is not an index of tenant {tenant}: its indices are named {tenant}.<name>"),
                );
            }
            None => return search_error(StatusCode::BAD_REQUEST, "_bulk: an action without _index"),
        }
        if op != "delete" {
            lines.next(); // the document
        }
    }
    forward(inner, Request::from_parts(parts, Body::from(bytes))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_indices_stay_in_the_tenant() {
        assert_eq!(scoped_subject("acme", "orders-value").as_deref(), Some(":.acme:orders-value"));
        assert_eq!(scoped_subject("acme", ":.acme:orders-value").as_deref(), Some(":.acme:orders-value"));
        assert_eq!(scoped_subject("acme", ":.globex:orders-value"), None);
        assert_eq!(scoped_subject("acme", ":.acme").as_deref(), None);
        assert_eq!(scoped_subject("acme", "").as_deref(), Some(":.acme:"));
        assert!(own_indices("acme", "acme.orders"));
        assert!(own_indices("acme", "acme.orders,acme.items"));
        assert!(own_indices("acme", "acme.*"));
        assert!(!own_indices("acme", "acme."));
        assert!(!own_indices("acme", "acme.orders,globex.orders"));
        assert!(!own_indices("acme", "*"));
        assert!(!own_indices("acme", "_all"));
        assert!(!own_indices("acme", "acmeorders"));
        assert!(!own_indices("acme", "acme-x.orders"));
    }
}
