//! The Iceberg sink's one error type, with whether retrying can help.

use sluice_core::ErrorKind;
use sluice_postgres::PgError;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct IcebergError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl IcebergError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Permanent, message: message.into(), source: None }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, message: message.into(), source: None }
    }
    /// A source change the table cannot take (a type Iceberg cannot change to): the
    /// pipeline pauses and retries until a person resolves it.
    pub fn halted(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Halted, message: message.into(), source: None }
    }
    /// Object storage or the file system failed where retrying may help.
    pub(crate) fn storage(context: &str, e: opendal::Error) -> Self {
        let kind = if e.is_temporary() { ErrorKind::Transient } else { ErrorKind::Permanent };
        Self { kind, message: format!("{context}: {e}"), source: Some(Box::new(e)) }
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// A file or metadata operation that failed, with what was being done.
    pub(crate) fn files(context: &str, e: iceberg::Error) -> Self {
        // Bad data or an unsupported shape will fail again; the file system may recover.
        let kind = match e.kind() {
            iceberg::ErrorKind::DataInvalid | iceberg::ErrorKind::FeatureUnsupported => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        };
        Self { kind, message: format!("{context}: {e}"), source: Some(Box::new(e)) }
    }
}

impl From<PgError> for IcebergError {
    fn from(e: PgError) -> Self {
        Self { kind: e.kind(), message: e.to_string(), source: Some(Box::new(e)) }
    }
}
