#[derive(Debug, thiserror::Error)]
pub enum DdlError {
    #[error("{file}:{line}:{column}: cannot parse SQL: {message}")]
    Parse { file: String, line: usize, column: usize, message: String },
    #[error("{0}: no SQL statements found: pass a migration file with at least one statement")]
    Empty(String),
    #[error("cannot read the source catalog: {0}")]
    Catalog(String),
}
