//! Errors in Elasticsearch's shape: a status code, an `error.type` and a reason.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
#[error("{kind}: {reason}")]
pub struct EsError {
    pub status: StatusCode,
    /// Elasticsearch's exception name, e.g. `index_not_found_exception`.
    pub kind: &'static str,
    pub reason: String,
    pub index: Option<String>,
}

impl EsError {
    pub fn new(status: StatusCode, kind: &'static str, reason: impl Into<String>) -> Self {
        Self { status, kind, reason: reason.into(), index: None }
    }
    pub fn bad_request(kind: &'static str, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, reason)
    }
    pub fn parsing(reason: impl Into<String>) -> Self {
        Self::bad_request("parsing_exception", reason)
    }
    pub fn illegal(reason: impl Into<String>) -> Self {
        Self::bad_request("illegal_argument_exception", reason)
    }
    pub fn mapper(reason: impl Into<String>) -> Self {
        Self::bad_request("mapper_parsing_exception", reason)
    }
    pub fn index_not_found(index: &str) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, "index_not_found_exception", format!("no such index [{index}]"));
        e.index = Some(index.to_owned());
        e
    }
    pub fn internal(reason: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", reason.to_string())
    }
    pub fn conflict(index: &str, id: &str, reason: String) -> Self {
        let mut e = Self::new(StatusCode::CONFLICT, "version_conflict_engine_exception", format!("[{id}]: {reason}"));
        e.index = Some(index.to_owned());
        e
    }
    pub fn with_index(mut self, index: &str) -> Self {
        self.index = Some(index.to_owned());
        self
    }

    /// The `error` object of a response or of a bulk item.
    pub fn body(&self) -> serde_json::Value {
        let mut cause = json!({"type": self.kind, "reason": self.reason});
        if let Some(index) = &self.index {
            cause["index"] = json!(index);
        }
        let mut error = cause.clone();
        error["root_cause"] = json!([cause]);
        error
    }
}

impl From<tantivy::TantivyError> for EsError {
    fn from(e: tantivy::TantivyError) -> Self {
        Self::internal(e)
    }
}

impl From<std::io::Error> for EsError {
    fn from(e: std::io::Error) -> Self {
        Self::internal(e)
    }
}

impl IntoResponse for EsError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.body(), "status": self.status.as_u16()});
        (self.status, axum::Json(body)).into_response()
    }
}

pub type EsResult<T> = Result<T, EsError>;
