use sluice_core::ErrorKind;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error from the Postgres source or sink. The message is one line meant for the
/// person running the pipeline: what went wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl PgError {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Permanent, message: message.into(), source: None }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, message: message.into(), source: None }
    }

    /// A state a person must resolve; the pipeline waits, retrying slowly.
    pub fn halted(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Halted, message: message.into(), source: None }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Self::permanent(message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Wraps a driver error, classifying it by SQLSTATE: connection and shutdown
    /// errors are transient, the rest need a person.
    pub fn from_pg(context: &str, e: tokio_postgres::Error) -> Self {
        let (kind, detail) = match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                let kind =
                    if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") || code == "40001" || code == "40P01" {
                        ErrorKind::Transient
                    } else {
                        ErrorKind::Permanent
                    };
                let hint = match code {
                    // pg_hba.conf has only `hostssl` lines for this client.
                    "28000" if db.message().contains("no encryption") => {
                        ": the server accepts only TLS connections here: set sslmode to verify-full (or require)"
                    }
                    "28P01" | "28000" => ": check the user and password in the config",
                    "3D000" => ": check the database name in the config",
                    "42501" => ": grant the role the privilege, or use a role that has it",
                    _ => "",
                };
                (kind, format!("{} (SQLSTATE {code}){hint}", db.message()))
            }
            None => {
                use std::error::Error as _;
                let io = e.source().is_some_and(|s| s.is::<std::io::Error>());
                let kind = if e.is_closed() || io { ErrorKind::Transient } else { ErrorKind::Permanent };
                (kind, e.source().map_or_else(|| e.to_string(), |s| format!("{e}: {s}")))
            }
        };
        Self { kind, message: format!("{context}: {detail}"), source: Some(Box::new(e)) }
    }

    pub(crate) fn from_wire(context: &str, e: pgwire_replication::PgWireError) -> Self {
        use pgwire_replication::PgWireError as W;
        let kind = match &e {
            W::Io(_) | W::Task(_) => ErrorKind::Transient,
            // The walsender reports a lost primary or a shutdown as a server error.
            W::Server(m) if m.contains("57P") || m.contains("terminating connection") || m.contains("shutdown") => ErrorKind::Transient,
            // An invalidated slot: the retry's checks find it lost and say what to do.
            W::Server(m) if m.contains("can no longer get changes") || m.contains("cannot read from logical replication slot") => {
                ErrorKind::Transient
            }
            _ => ErrorKind::Permanent,
        };
        let hint = if matches!(e, W::Auth(_)) { ": check the user and password in the config" } else { "" };
        Self { kind, message: format!("{context}: {e}{hint}"), source: Some(Box::new(e)) }
    }

    /// Wraps another component's error (a sink's) with its retry classification.
    pub fn wrap(kind: ErrorKind, message: impl Into<String>, source: BoxError) -> Self {
        Self { kind, message: message.into(), source: Some(source) }
    }

    pub fn with_context(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

pub type Result<T, E = PgError> = std::result::Result<T, E>;
