//! The Postgres sink's settings (`sink: postgres:`): the target database, and a schema
//! that every table may be put in.

use secrecy::SecretString;
use serde::Deserialize;
use sluice_core::PgConnConfig;
use sluice_core::sink::{BoxFuture, DynSink, PipelineShape, SinkConfigure, SinkContext, SinkError, SinkResult};

use crate::sink::PostgresSink;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub database: String,
    /// libpq's `sslmode` (default `prefer`), `sslrootcert`, `sslcert` and `sslkey`.
    #[serde(default)]
    pub sslmode: sluice_core::SslMode,
    #[serde(default)]
    pub sslrootcert: Option<std::path::PathBuf>,
    /// The authorities as PEM text, in place of `sslrootcert`.
    #[serde(default)]
    pub sslrootcert_pem: Option<String>,
    #[serde(default)]
    pub sslcert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub sslkey: Option<std::path::PathBuf>,
    /// Put every table in this schema instead of the source table's schema.
    pub schema: Option<String>,
}

fn default_port() -> u16 {
    5432
}

impl PostgresSinkConfig {
    pub fn connection(&self) -> PgConnConfig {
        let tls = sluice_core::PgTls {
            sslmode: self.sslmode,
            sslrootcert: self.sslrootcert.clone(),
            sslrootcert_pem: self.sslrootcert_pem.clone(),
            sslcert: self.sslcert.clone(),
            sslkey: self.sslkey.clone(),
        };
        PgConnConfig::with_tls(&self.host, self.port, &self.user, self.password.clone(), &self.database, tls)
    }
}

impl SinkConfigure for PostgresSinkConfig {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn validate(&self, shape: &PipelineShape<'_>) -> Result<(), String> {
        shape.rows_only("postgres")
    }

    fn state(&self) -> PgConnConfig {
        self.connection()
    }

    fn state_is_sink(&self) -> bool {
        true
    }

    /// The engine reached the database already (it is the state database); connecting
    /// here would create the state tables.
    fn check<'a>(&'a self, _: &'a SinkContext) -> BoxFuture<'a, SinkResult<()>> {
        Box::pin(async { Ok(()) })
    }

    fn connect<'a>(&'a self, ctx: &'a SinkContext) -> BoxFuture<'a, SinkResult<Box<dyn DynSink>>> {
        Box::pin(async move {
            let sink = PostgresSink::connect(&self.connection().guarded(ctx.egress.as_ref()), &ctx.pipeline, self.schema.clone())
                .await
                .map_err(|e| SinkError::wrap(e.kind(), e))?;
            Ok(Box::new(sink) as Box<dyn DynSink>)
        })
    }
}
