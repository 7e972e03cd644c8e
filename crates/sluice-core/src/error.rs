/// Whether an operation that failed is worth trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A connection dropped, a server restarted: retry with backoff.
    Transient,
    /// Bad configuration or data: retrying cannot help, a person must act.
    Permanent,
    /// The destination refused a change that a person must resolve (a schema it finds
    /// incompatible): the pipeline pauses without writing, keeps its position, and
    /// retries slowly, resuming by itself once the cause is gone.
    Halted,
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("invalid {type_name} value: {reason}")]
    InvalidValue { type_name: &'static str, reason: String },
    #[error("invalid LSN {0:?}: expected the form X/Y with hexadecimal X and Y")]
    InvalidLsn(String),
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Permanent
    }
}
