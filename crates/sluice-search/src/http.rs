//! The Elasticsearch-compatible HTTP API.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use crate::error::{EsError, EsResult};
use crate::index::{Current, ItemResult, OpType, SearchIndex, VersionType, WriteOp};
use crate::mapping::Mapping;
use crate::service::SearchService;

type Svc = State<Arc<SearchService>>;
type Params = Query<HashMap<String, String>>;

/// Largest request body accepted (100 MiB, as Elasticsearch's default).
pub const MAX_CONTENT_LENGTH: usize = 100 * 1024 * 1024;

pub fn router(svc: Arc<SearchService>) -> Router {
    Router::new()
        .route("/", get(info).head(|| async { StatusCode::OK }))
        .route("/_cluster/health", get(health))
        .route("/_cat/indices", get(cat_indices))
        .route("/_bulk", post(bulk_any).put(bulk_any))
        .route("/_refresh", post(refresh_all).get(refresh_all))
        .route("/{index}", put(create_index).delete(delete_index).get(get_index).head(head_index))
        .route("/{index}/_bulk", post(bulk_index).put(bulk_index))
        .route("/{index}/_refresh", post(refresh_one).get(refresh_one))
        .route("/{index}/_mapping", get(get_mapping).put(put_mapping).post(put_mapping))
        .route("/{index}/_doc", post(index_auto_id))
        .route("/{index}/_doc/{id}", put(index_doc).post(index_doc).get(get_doc).head(head_doc).delete(delete_doc))
        .route("/{index}/_create/{id}", put(create_doc).post(create_doc))
        .route("/{index}/_update/{id}", post(update_doc))
        .route("/{index}/_search", get(search).post(search))
        .route("/{index}/_count", get(count).post(count))
        .fallback(|| async { EsError::bad_request("illegal_argument_exception", "no handler found for this request path and method") })
        // Elasticsearch's http.max_content_length.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_CONTENT_LENGTH))
        .with_state(svc)
}

fn parse_body(body: &Bytes) -> EsResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .map_err(|e| EsError::bad_request("x_content_parse_exception", format!("failed to parse the request body: {e}")))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> EsResult<T> + Send + 'static) -> EsResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(EsError::internal)?
}

/// `?refresh=true` refreshes now; `?refresh=wait_for` waits for the next periodic refresh.
async fn after_write(ix: &Arc<SearchIndex>, params: &HashMap<String, String>) -> EsResult<()> {
    match params.get("refresh").map(String::as_str) {
        None | Some("false") => Ok(()),
        Some("true") | Some("") => {
            let ix = ix.clone();
            blocking(move || ix.refresh()).await
        }
        Some("wait_for") => {
            let mut rx = ix.subscribe_refresh();
            rx.borrow_and_update();
            if ix.is_dirty() {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), rx.changed()).await;
            }
            Ok(())
        }
        Some(other) => Err(EsError::illegal(format!("Unknown value for refresh: [{other}]."))),
    }
}

async fn info() -> impl IntoResponse {
    axum::Json(json!({
        "name": "sluice",
        "cluster_name": "sluice",
        "cluster_uuid": "sluice",
        "version": {"number": "7.10.2", "distribution": "sluice", "build_flavor": "default", "lucene_version": "tantivy-0.27", "minimum_wire_compatibility_version": "6.8.0", "minimum_index_compatibility_version": "6.0.0-beta1"},
        "tagline": "You Know, for Search"
    }))
}

async fn health(State(svc): Svc) -> impl IntoResponse {
    axum::Json(
        json!({"cluster_name": "sluice", "status": "green", "timed_out": false, "number_of_nodes": 1, "number_of_data_nodes": 1, "active_primary_shards": svc.names().len(), "active_shards": svc.names().len(), "unassigned_shards": 0}),
    )
}

async fn cat_indices(State(svc): Svc) -> EsResult<Response> {
    let mut rows = Vec::new();
    for name in svc.names() {
        let ix = svc.get(&name)?;
        let n = blocking(move || ix.doc_count()).await?;
        rows.push(json!({"health": "green", "status": "open", "index": name, "pri": "1", "rep": "0", "docs.count": n.to_string()}));
    }
    Ok(axum::Json(Value::Array(rows)).into_response())
}

async fn create_index(State(svc): Svc, Path(index): Path<String>, body: Bytes) -> EsResult<Response> {
    let body = parse_body(&body)?;
    let name = index.clone();
    blocking(move || svc.create(&name, &body).map(|_| ())).await?;
    Ok(axum::Json(json!({"acknowledged": true, "shards_acknowledged": true, "index": index})).into_response())
}

async fn delete_index(State(svc): Svc, Path(index): Path<String>) -> EsResult<Response> {
    blocking(move || svc.delete(&index)).await?;
    Ok(axum::Json(json!({"acknowledged": true})).into_response())
}

async fn head_index(State(svc): Svc, Path(index): Path<String>) -> StatusCode {
    if svc.get(&index).is_ok() { StatusCode::OK } else { StatusCode::NOT_FOUND }
}

async fn get_index(State(svc): Svc, Path(index): Path<String>) -> EsResult<Response> {
    let ix = svc.get(&index)?;
    let meta = ix.meta();
    Ok(axum::Json(json!({index: {"aliases": {}, "mappings": ix.mapping_json(), "settings": meta.settings}})).into_response())
}

async fn get_mapping(State(svc): Svc, Path(index): Path<String>) -> EsResult<Response> {
    let ix = svc.get(&index)?;
    Ok(axum::Json(json!({index: {"mappings": ix.mapping_json()}})).into_response())
}

async fn put_mapping(State(svc): Svc, Path(index): Path<String>, body: Bytes) -> EsResult<Response> {
    let ix = svc.get(&index)?;
    let update = Mapping::parse(&parse_body(&body)?)?;
    blocking(move || ix.put_mapping(&update)).await?;
    Ok(axum::Json(json!({"acknowledged": true})).into_response())
}

async fn refresh_all(State(svc): Svc) -> EsResult<Response> {
    let names = svc.names();
    for name in &names {
        let ix = svc.get(name)?;
        blocking(move || ix.refresh()).await?;
    }
    Ok(axum::Json(json!({"_shards": {"total": names.len(), "successful": names.len(), "failed": 0}})).into_response())
}

async fn refresh_one(State(svc): Svc, Path(index): Path<String>) -> EsResult<Response> {
    let ix = svc.get(&index)?;
    blocking(move || ix.refresh()).await?;
    Ok(axum::Json(json!({"_shards": {"total": 1, "successful": 1, "failed": 0}})).into_response())
}

fn version_params(params: &HashMap<String, String>) -> EsResult<(Option<u64>, VersionType)> {
    let version = match params.get("version") {
        Some(v) => Some(v.parse::<u64>().map_err(|_| EsError::illegal(format!("failed to parse [version] value [{v}]")))?),
        None => None,
    };
    let vt = match params.get("version_type") {
        Some(t) => VersionType::parse(t)?,
        None if version.is_some() => VersionType::External,
        None => VersionType::Internal,
    };
    Ok((version, vt))
}

fn item_json(index: &str, r: &ItemResult) -> (Value, u16) {
    match &r.outcome {
        Ok(o) => (
            json!({
                "_index": index, "_id": r.id, "_version": o.version, "result": o.result,
                "_shards": {"total": 1, "successful": 1, "failed": 0}, "_seq_no": o.seq, "_primary_term": 1, "status": o.status
            }),
            o.status,
        ),
        Err(e) => (json!({"_index": index, "_id": r.id, "status": e.status.as_u16(), "error": e.body()}), e.status.as_u16()),
    }
}

async fn single_write(svc: Arc<SearchService>, index: String, op: WriteOp, params: HashMap<String, String>) -> EsResult<Response> {
    let ix = if op.op == OpType::Update || op.op == OpType::Delete {
        svc.get(&index)?
    } else {
        let name = index.clone();
        let s = svc.clone();
        blocking(move || s.get_or_create(&name)).await?
    };
    let ix2 = ix.clone();
    let mut results = blocking(move || ix2.write(vec![op])).await?;
    let mut r = results.pop().expect("one result");
    // A refused write answers with its error; an accepted one keeps its outcome for
    // the body below.
    r.outcome = Ok(r.outcome?);
    after_write(&ix, &params).await?;
    let (mut body, status) = item_json(&index, &r);
    body.as_object_mut().expect("object").remove("status");
    Ok((StatusCode::from_u16(status).unwrap_or(StatusCode::OK), axum::Json(body)).into_response())
}

async fn index_doc(State(svc): Svc, Path((index, id)): Path<(String, String)>, Query(params): Params, body: Bytes) -> EsResult<Response> {
    let (version, version_type) = version_params(&params)?;
    let op = match params.get("op_type").map(String::as_str) {
        Some("create") => OpType::Create,
        None | Some("index") => OpType::Index,
        Some(o) => return Err(EsError::illegal(format!("opType must be 'create' or 'index', found: [{o}]"))),
    };
    let doc = parse_body(&body)?;
    single_write(svc, index, WriteOp { op, id: Some(id), body: Some(doc), version, version_type }, params).await
}

async fn index_auto_id(State(svc): Svc, Path(index): Path<String>, Query(params): Params, body: Bytes) -> EsResult<Response> {
    let doc = parse_body(&body)?;
    single_write(
        svc,
        index,
        WriteOp { op: OpType::Create, id: None, body: Some(doc), version: None, version_type: VersionType::Internal },
        params,
    )
    .await
}

async fn create_doc(State(svc): Svc, Path((index, id)): Path<(String, String)>, Query(params): Params, body: Bytes) -> EsResult<Response> {
    let (version, version_type) = version_params(&params)?;
    let doc = parse_body(&body)?;
    single_write(svc, index, WriteOp { op: OpType::Create, id: Some(id), body: Some(doc), version, version_type }, params).await
}

async fn update_doc(State(svc): Svc, Path((index, id)): Path<(String, String)>, Query(params): Params, body: Bytes) -> EsResult<Response> {
    let doc = parse_body(&body)?;
    single_write(
        svc,
        index,
        WriteOp { op: OpType::Update, id: Some(id), body: Some(doc), version: None, version_type: VersionType::Internal },
        params,
    )
    .await
}

async fn delete_doc(State(svc): Svc, Path((index, id)): Path<(String, String)>, Query(params): Params) -> EsResult<Response> {
    let (version, version_type) = version_params(&params)?;
    let ix = svc.get(&index)?;
    let ix2 = ix.clone();
    let op = WriteOp { op: OpType::Delete, id: Some(id), body: None, version, version_type };
    let mut results = blocking(move || ix2.write(vec![op])).await?;
    let mut r = results.pop().expect("one result");
    // A refused write answers with its error; an accepted one keeps its outcome for
    // the body below.
    r.outcome = Ok(r.outcome?);
    after_write(&ix, &params).await?;
    let (mut body, status) = item_json(&index, &r);
    body.as_object_mut().expect("object").remove("status");
    Ok((StatusCode::from_u16(status).unwrap_or(StatusCode::OK), axum::Json(body)).into_response())
}

async fn get_doc(State(svc): Svc, Path((index, id)): Path<(String, String)>) -> EsResult<Response> {
    let ix = svc.get(&index)?;
    let id2 = id.clone();
    let cur = blocking(move || ix.get(&id2)).await?;
    Ok(match cur {
        Current::Doc { version, seq, source } => axum::Json(json!({
            "_index": index, "_id": id, "_version": version, "_seq_no": seq, "_primary_term": 1, "found": true, "_source": *source
        }))
        .into_response(),
        _ => (StatusCode::NOT_FOUND, axum::Json(json!({"_index": index, "_id": id, "found": false}))).into_response(),
    })
}

async fn head_doc(State(svc): Svc, Path((index, id)): Path<(String, String)>) -> StatusCode {
    let Ok(ix) = svc.get(&index) else { return StatusCode::NOT_FOUND };
    match blocking(move || ix.get(&id)).await {
        Ok(Current::Doc { .. }) => StatusCode::OK,
        _ => StatusCode::NOT_FOUND,
    }
}

fn merged_search_body(body: &Bytes, params: &HashMap<String, String>) -> EsResult<Value> {
    let mut body = parse_body(body)?;
    if body.is_null() {
        body = json!({});
    }
    for key in ["size", "from"] {
        if let Some(v) = params.get(key) {
            let n: u64 = v.parse().map_err(|_| EsError::illegal(format!("Failed to parse int parameter [{key}] with value [{v}]")))?;
            body[key] = json!(n);
        }
    }
    if let Some(v) = params.get("track_total_hits") {
        body["track_total_hits"] = match v.as_str() {
            "true" => json!(true),
            "false" => json!(false),
            n => json!(n.parse::<u64>().map_err(|_| EsError::illegal(format!("Failed to parse [track_total_hits] value [{n}]")))?),
        };
    }
    Ok(body)
}

async fn search(State(svc): Svc, Path(index): Path<String>, Query(params): Params, body: Bytes) -> EsResult<Response> {
    let ix = svc.get(&index)?;
    let body = merged_search_body(&body, &params)?;
    let out = blocking(move || crate::search::search(&ix, &body)).await?;
    Ok(axum::Json(out).into_response())
}

async fn count(State(svc): Svc, Path(index): Path<String>, body: Bytes) -> EsResult<Response> {
    let ix = svc.get(&index)?;
    let body = parse_body(&body)?;
    let out = blocking(move || crate::search::count(&ix, &body)).await?;
    Ok(axum::Json(out).into_response())
}

/// One parsed bulk item: where it goes and what it does.
struct BulkItem {
    index: String,
    op: Result<WriteOp, (OpType, Option<String>, EsError)>,
}

fn parse_bulk(body: &[u8], default_index: Option<&str>) -> EsResult<Vec<BulkItem>> {
    let text = std::str::from_utf8(body).map_err(|_| EsError::illegal("The bulk request must be UTF-8"))?;
    let mut lines = text.split('\n').enumerate().filter(|(_, l)| !l.trim().is_empty());
    let mut items = Vec::new();
    while let Some((n, line)) = lines.next() {
        let action: Value = serde_json::from_str(line).map_err(|e| {
            EsError::illegal(format!("Malformed action/metadata line [{}], expected START_OBJECT or the action: {e}", n + 1))
        })?;
        let Value::Object(a) = &action else {
            return Err(EsError::illegal(format!(
                "Malformed action/metadata line [{}], expected START_OBJECT but found [{}]",
                n + 1,
                action
            )));
        };
        let (verb, meta) = match a.iter().next() {
            Some((k, v)) if a.len() == 1 => (k.as_str(), v),
            _ => return Err(EsError::illegal(format!("Malformed action/metadata line [{}], expected one action", n + 1))),
        };
        let op = match verb {
            "index" => OpType::Index,
            "create" => OpType::Create,
            "update" => OpType::Update,
            "delete" => OpType::Delete,
            other => {
                return Err(EsError::illegal(format!(
                    "Malformed action/metadata line [{}], expected field [create], [delete], [index] or [update] but found [{other}]",
                    n + 1
                )));
            }
        };
        let Value::Object(meta) = meta else {
            return Err(EsError::illegal(format!("Malformed action/metadata line [{}], expected START_OBJECT", n + 1)));
        };
        for k in meta.keys() {
            if ![
                "_index",
                "_id",
                "version",
                "version_type",
                "routing",
                "_type",
                "op_type",
                "retry_on_conflict",
                "require_alias",
                "pipeline",
                "if_seq_no",
                "if_primary_term",
            ]
            .contains(&k.as_str())
            {
                return Err(EsError::illegal(format!("Action/metadata line [{}] contains an unknown parameter [{k}]", n + 1)));
            }
        }
        let index = match meta.get("_index").and_then(Value::as_str).or(default_index) {
            Some(i) => i.to_owned(),
            None => {
                return Err(EsError::bad_request(
                    "action_request_validation_exception",
                    format!("Validation Failed: 1: index is missing (line [{}]);", n + 1),
                ));
            }
        };
        let id = meta.get("_id").map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        let version = meta.get("version").and_then(Value::as_u64);
        let vt = match meta.get("version_type").and_then(Value::as_str) {
            Some(t) => VersionType::parse(t),
            None if version.is_some() => Ok(VersionType::External),
            None => Ok(VersionType::Internal),
        };
        let body = if op == OpType::Delete {
            None
        } else {
            let Some((_, src)) = lines.next() else {
                return Err(EsError::illegal(format!(
                    "The bulk request must be terminated by a newline [\\n]; the [{verb}] action on line [{}] has no source",
                    n + 1
                )));
            };
            Some(serde_json::from_str::<Value>(src).map_err(|e| EsError::mapper(format!("failed to parse: {e}"))))
        };
        let op = match (vt, body) {
            (Err(e), _) => Err((op, id, e)),
            (Ok(_), Some(Err(e))) => Err((op, id, e)),
            (Ok(_), _) if op == OpType::Update && id.is_none() => {
                Err((op, None, EsError::illegal("Validation Failed: 1: an id is required for an update")))
            }
            (Ok(_), _) if op == OpType::Delete && id.is_none() => {
                Err((op, None, EsError::illegal("Validation Failed: 1: an id is required for a delete")))
            }
            (Ok(version_type), body) => Ok(WriteOp { op, id, body: body.map(|b| b.expect("checked")), version, version_type }),
        };
        items.push(BulkItem { index, op });
    }
    Ok(items)
}

async fn bulk(svc: Arc<SearchService>, default_index: Option<String>, params: HashMap<String, String>, body: Bytes) -> EsResult<Response> {
    let started = std::time::Instant::now();
    let items = parse_bulk(&body, default_index.as_deref())?;
    let n = items.len();
    // Items are applied per index, in order; results go back in the request's order.
    let mut by_index: Vec<(String, Vec<(usize, WriteOp)>)> = Vec::new();
    let mut results: Vec<Option<(OpType, Value, u16)>> = (0..n).map(|_| None).collect();
    for (i, item) in items.into_iter().enumerate() {
        match item.op {
            Ok(op) => match by_index.iter_mut().find(|(name, _)| *name == item.index) {
                Some((_, v)) => v.push((i, op)),
                None => by_index.push((item.index, vec![(i, op)])),
            },
            Err((op, id, e)) => {
                let e = e.with_index(&item.index);
                results[i] =
                    Some((op, json!({"_index": item.index, "_id": id, "status": e.status.as_u16(), "error": e.body()}), e.status.as_u16()));
            }
        }
    }
    let mut touched = Vec::new();
    for (name, ops) in by_index {
        let (positions, ops): (Vec<usize>, Vec<WriteOp>) = ops.into_iter().unzip();
        let s = svc.clone();
        let name2 = name.clone();
        let ix = match blocking(move || s.get_or_create(&name2)).await {
            Ok(ix) => ix,
            Err(e) => {
                for (p, op) in positions.iter().zip(ops) {
                    results[*p] = Some((
                        op.op,
                        json!({"_index": name, "_id": op.id, "status": e.status.as_u16(), "error": e.body()}),
                        e.status.as_u16(),
                    ));
                }
                continue;
            }
        };
        let ix2 = ix.clone();
        let out = blocking(move || ix2.write(ops)).await?;
        for (p, r) in positions.into_iter().zip(out) {
            let (v, status) = item_json(&name, &r);
            results[p] = Some((r.op, v, status));
        }
        touched.push(ix);
    }
    for ix in &touched {
        after_write(ix, &params).await?;
    }
    let errors = results.iter().flatten().any(|(_, _, s)| *s >= 400);
    let items: Vec<Value> = results.into_iter().flatten().map(|(op, v, _)| json!({ op.name(): v })).collect();
    Ok(axum::Json(json!({"took": started.elapsed().as_millis() as u64, "errors": errors, "items": items})).into_response())
}

async fn bulk_any(State(svc): Svc, Query(params): Params, body: Bytes) -> EsResult<Response> {
    bulk(svc, None, params, body).await
}

async fn bulk_index(State(svc): Svc, Path(index): Path<String>, Query(params): Params, body: Bytes) -> EsResult<Response> {
    bulk(svc, Some(index), params, body).await
}
