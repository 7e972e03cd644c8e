//! API errors: Elasticsearch-like `{"error": {"type", "message", "field"}}` bodies with a status.

use super::*;

pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) message: String,
    pub(super) field: Option<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), field: None }
    }
    pub(super) fn not_found(what: &str, name: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} {name:?} not found"))
    }
    pub(crate) fn invalid(kind: &'static str, i: Invalid) -> Self {
        Self { status: StatusCode::UNPROCESSABLE_ENTITY, kind, message: i.message, field: i.field }
    }
    pub(super) fn conflict(message: impl Into<String>) -> Self {
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
