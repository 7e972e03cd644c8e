use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Confluent's media type, on every answer (errors too).
pub(crate) const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// An error in Confluent's shape: HTTP status plus `{"error_code", "message"}`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub code: u32,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: u32, message: String) -> Self {
        Self { status, code, message }
    }

    pub fn invalid_schema(why: String) -> Self {
        Self::new(422, 42201, format!("Invalid schema: {why}"))
    }

    /// `subject` as the client named it (with its context, if any).
    pub fn subject_not_found(subject: &str) -> Self {
        Self::new(404, 40401, format!("Subject '{subject}' not found."))
    }

    pub fn store(why: String) -> Self {
        // The detail is logged; clients get no internals.
        let _ = why;
        Self::new(500, 50001, "Error in the backend data store".to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({ "error_code": self.code, "message": self.message });
        (status, [("content-type", CONTENT_TYPE)], body.to_string()).into_response()
    }
}
