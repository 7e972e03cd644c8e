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

/// `text` (a statement, a peer's error message) made fit for a one-line error: its
/// whitespace runs and line breaks become single spaces, and past 200 characters it is
/// cut with `...` (a registry's list of incompatibilities can run to pages).
pub fn one_line(text: &str) -> String {
    const MAX: usize = 200;
    let s = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn one_line_joins_lines_and_cuts_long_text() {
        assert_eq!(one_line("ALTER TABLE t\n  ADD COLUMN\tc int"), "ALTER TABLE t ADD COLUMN c int");
        assert_eq!(one_line(&"é".repeat(200)), "é".repeat(200));
        assert_eq!(one_line(&"é".repeat(201)), format!("{}...", "é".repeat(200)));
    }
}
