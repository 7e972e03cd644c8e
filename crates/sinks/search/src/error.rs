//! The search sink's one error type, with whether retrying can help.

use sluice_core::ErrorKind;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SearchError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SearchError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Permanent, message: message.into(), source: None }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, message: message.into(), source: None }
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub(crate) fn pg(context: &str, e: tokio_postgres::Error) -> Self {
        let transient = e.is_closed()
            || e.code().is_none_or(|c| {
                let c = c.code();
                c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") || c == "40001" || c == "40P01"
            });
        Self {
            kind: if transient { ErrorKind::Transient } else { ErrorKind::Permanent },
            message: format!("{context}: {e}"),
            source: Some(Box::new(e)),
        }
    }
}
