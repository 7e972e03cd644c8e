//! The Iceberg sink's settings (`sink: iceberg:`): the catalog, the warehouse, the table
//! mode and the commit cadence.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use sluice_core::PgConnConfig;
use sluice_core::sink::{BoxFuture, DynSink, PipelineShape, SinkConfigure, SinkContext, SinkError, SinkResult};

use crate::catalog::{Catalog, SqlCatalog};
use crate::layout::{self, TableLayout};
use crate::rest::RestCatalog;
use crate::sink::IcebergSink;
use crate::storage::{Warehouse, bucket_of};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcebergSinkConfig {
    /// Where the sink may connect (its state database, a REST catalog), set from the
    /// pipeline's context when it connects; never read from a config.
    #[serde(skip)]
    pub(crate) egress: Option<std::sync::Arc<sluice_core::egress::Egress>>,
    pub catalog: CatalogConfig,
    /// Where table files go: an absolute directory, a `file://` URL, or
    /// `s3://bucket/prefix` (with `s3`).
    pub warehouse: String,
    /// S3-compatible object storage for an `s3://` warehouse.
    pub s3: Option<Box<S3StorageConfig>>,
    /// The namespace of every table; default: the source table's schema.
    pub namespace: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// How often staged changes become a snapshot readers see (Iceberg wants few,
    /// large commits).
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Commit earlier once this many changes are staged.
    #[serde(default = "default_commit_rows")]
    pub commit_rows: usize,
    /// A source column narrowed (bigint to int, double to real) is written into the
    /// table's wider field, where every value fits; otherwise the pipeline halts, since
    /// an Iceberg field can only widen.
    #[serde(default)]
    pub accept_narrowing: bool,
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    /// The Postgres database that keeps the pipeline's checkpoint and snapshot
    /// progress, with a REST catalog (a SQL catalog keeps them in its own database).
    pub state: Option<Box<PgConnConfig>>,
    /// Partition spec and sort order of the tables Sluice creates, by source table
    /// (`public.orders: {partition_by: [day(created_at)], sort_by: [id]}`). A table
    /// that exists keeps its layout.
    #[serde(default)]
    pub tables: BTreeMap<String, TableLayout>,
}

/// Table maintenance the sink runs beside streaming (also on demand: `sluice iceberg
/// compact|expire`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// How often each table is compacted (live rows rewritten with the equality deletes
    /// applied), its old snapshots expired and its orphan files removed; 0s turns it off.
    #[serde(default = "one_hour", with = "humantime_serde")]
    pub interval: Duration,
    /// Snapshots older than this are expired (the current one always stays): time
    /// travel reaches this far back. Every commit adds one, and each makes the metadata
    /// file larger.
    #[serde(default = "one_hour", with = "humantime_serde")]
    pub expire_snapshots_after: Duration,
    /// Files no snapshot references (a commit that died before its pointer moved) are
    /// removed once older than this; younger ones may belong to a commit in flight.
    #[serde(default = "one_hour", with = "humantime_serde")]
    pub orphan_files_after: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self { interval: one_hour(), expire_snapshots_after: one_hour(), orphan_files_after: one_hour() }
    }
}

fn one_hour() -> Duration {
    Duration::from_secs(3600)
}

/// Static credentials and the endpoint of S3-compatible object storage (AWS S3,
/// MinIO, Ceph, R2...). Readers of the tables need the same settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3StorageConfig {
    /// The service's URL (`http://127.0.0.1:9000`); default: AWS for the region.
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    /// Path-style URLs (`https://host/bucket/key`), which most S3-compatible servers
    /// want; AWS itself uses virtual-hosted style (`https://bucket.host/key`).
    #[serde(default)]
    pub path_style_access: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// The catalog that names the tables: one key naming its kind (a struct of options
/// rather than an enum, so YAML and JSON spell it alike).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// A SQL catalog whose tables live in Postgres, in the layout of pyiceberg's
    /// `SqlCatalog` and Iceberg Java's `JdbcCatalog` (`iceberg_tables`,
    /// `iceberg_namespace_properties`), so other engines find the tables. The
    /// pipeline's checkpoint is kept in the same database and moves in the same
    /// transaction as the table pointers: exactly once.
    pub sql: Option<SqlCatalogConfig>,
    /// An Iceberg REST catalog. It cannot share a transaction with the checkpoint:
    /// each snapshot records the commit LSN it holds, and a restart skips what a table
    /// holds already. The pipeline's state lives in `state:`.
    pub rest: Option<Box<RestCatalogConfig>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestCatalogConfig {
    /// The catalog's base URL, without `/v1` (`http://127.0.0.1:8181`).
    pub uri: String,
    /// The warehouse the catalog serves, when it serves several (`?warehouse=`).
    pub warehouse: Option<String>,
    /// A bearer token, when the catalog wants one.
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlCatalogConfig {
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
    /// The catalog's name (`catalog_name` in its tables); readers open it by this name.
    #[serde(default = "default_catalog_name")]
    pub name: String,
}

/// What an Iceberg table holds.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The table mirrors the source table: each commit writes the last image per key
    /// as data files plus equality deletes on the key.
    #[default]
    Upsert,
    /// Append only: one row per change, with `_op`, `_lsn`, `_commit_ts` and `_seq`.
    Changelog,
}

fn default_port() -> u16 {
    5432
}
fn default_catalog_name() -> String {
    "sluice".into()
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_commit_rows() -> usize {
    500_000
}

impl IcebergSinkConfig {
    /// The database of the checkpoint: the SQL catalog's, or `state:` beside a REST
    /// catalog (both validated).
    pub(crate) fn state_connection(&self) -> PgConnConfig {
        match (&self.catalog.sql, &self.state) {
            (Some(c), _) => {
                let tls = sluice_core::PgTls {
                    sslmode: c.sslmode,
                    sslrootcert: c.sslrootcert.clone(),
                    sslrootcert_pem: c.sslrootcert_pem.clone(),
                    sslcert: c.sslcert.clone(),
                    sslkey: c.sslkey.clone(),
                };
                PgConnConfig::with_tls(&c.host, c.port, &c.user, c.password.clone(), &c.database, tls)
            }
            (None, Some(s)) => s.as_ref().clone(),
            (None, None) => unreachable!("validated: a REST catalog comes with state"),
        }
        .guarded(self.egress.as_ref())
    }

    /// The catalog: a SQL catalog is reached through the state database's client (its
    /// tables live there); a REST catalog's configuration is read here.
    pub(crate) async fn catalog(&self) -> Result<Catalog, crate::error::IcebergError> {
        Ok(match (&self.catalog.sql, &self.catalog.rest) {
            (Some(c), _) => Catalog::Sql(SqlCatalog { name: c.name.clone(), typed: Default::default() }),
            (None, Some(r)) => {
                Catalog::Rest(RestCatalog::connect(&r.uri, r.warehouse.as_deref(), r.token.clone(), self.egress.as_ref()).await?)
            }
            (None, None) => unreachable!("validated: a catalog is named"),
        })
    }

    /// The Iceberg namespace and table name of a source table.
    pub(crate) fn target(&self, table: &sluice_core::TableName) -> (String, String) {
        (self.namespace.clone().unwrap_or_else(|| table.schema.clone()), table.name.clone())
    }

    /// The warehouse's storage (the settings are validated).
    pub(crate) fn warehouse(&self) -> SinkResult<Warehouse> {
        Warehouse::new(&self.warehouse, self.s3.as_deref(), self.egress.as_ref()).map_err(SinkError::permanent)
    }

    /// The layouts against the captured tables' columns, then the warehouse: a bad
    /// setting fails in one line before any table, namespace or slot is created.
    async fn preflight(&self, ctx: &SinkContext) -> SinkResult<()> {
        let names: Vec<_> = ctx.source_tables.iter().map(|t| t.name.clone()).collect();
        if let Some(e) = layout::unknown_tables(&self.tables, &names) {
            return Err(SinkError::permanent(e));
        }
        for t in &ctx.source_tables {
            self.layout_of(t).map_err(SinkError::permanent)?;
        }
        let egress = ctx.egress.as_ref().or(self.egress.as_ref());
        let warehouse = Warehouse::new(&self.warehouse, self.s3.as_deref(), egress).map_err(SinkError::permanent)?;
        warehouse.probe().await.map_err(SinkError::permanent)
    }

    /// The partition spec and sort order configured for a source table, bound to the
    /// schema Sluice creates for it.
    pub(crate) fn layout_of(
        &self,
        source: &sluice_core::TableSchema,
    ) -> Result<(Option<iceberg::spec::UnboundPartitionSpec>, Option<iceberg::spec::SortOrder>), String> {
        let Some((key, layout)) = layout::for_table(&self.tables, &source.name) else { return Ok((None, None)) };
        let schema = crate::table::schema_for(source, self.mode).map_err(|e| format!("sink.iceberg.tables.{key}: {e}"))?;
        layout.bind(key, &schema)
    }
}

impl SinkConfigure for IcebergSinkConfig {
    fn kind(&self) -> &'static str {
        "iceberg"
    }

    fn validate(&self, shape: &PipelineShape<'_>) -> Result<(), String> {
        match (&self.catalog.sql, &self.catalog.rest, &self.state) {
            (None, None, _) | (Some(_), Some(_), _) => {
                return Err("sink.iceberg.catalog: name one catalog: sql: {host, user, password, database} (a Postgres database) \
                            or rest: {uri}"
                    .into());
            }
            (None, Some(_), None) => {
                return Err("sink.iceberg.state: a REST catalog needs a Postgres database for the pipeline's checkpoint: \
                            state: {host, user, password, database}"
                    .into());
            }
            (Some(_), None, Some(_)) => {
                return Err("sink.iceberg.state: a SQL catalog keeps the checkpoint in its own database; remove state".into());
            }
            (None, Some(r), Some(_)) if !(r.uri.starts_with("http://") || r.uri.starts_with("https://")) => {
                return Err(format!("sink.iceberg.catalog.rest.uri: {:?} must be an http:// or https:// URL", r.uri));
            }
            _ => {}
        }
        if self.warehouse.starts_with("s3://") || self.warehouse.starts_with("s3a://") {
            if bucket_of(&self.warehouse).is_none() {
                return Err(format!("sink.iceberg.warehouse: {:?} names no bucket; write s3://bucket/prefix", self.warehouse));
            }
            if self.s3.is_none() {
                return Err("sink.iceberg.s3: an s3:// warehouse needs its settings: s3: {endpoint, region, access_key_id, \
                            secret_access_key, path_style_access}"
                    .into());
            }
        } else {
            let path = self.warehouse.strip_prefix("file://").unwrap_or(&self.warehouse);
            if !path.starts_with('/') {
                return Err(format!(
                    "sink.iceberg.warehouse: {:?} is not an absolute directory, a file:// URL or an s3://bucket/prefix URL; \
                     write /path/to/warehouse",
                    self.warehouse
                ));
            }
            if self.s3.is_some() {
                return Err("sink.iceberg.s3: set only with an s3:// warehouse".into());
            }
        }
        if let Some(e) = self.s3.as_ref().and_then(|s| s.endpoint.as_deref())
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(format!("sink.iceberg.s3.endpoint: {e:?} must be an http:// or https:// URL"));
        }
        if self.commit_interval > Duration::from_secs(3600) {
            return Err("sink.iceberg.commit_interval: at most 1h (the slot keeps WAL until each commit)".into());
        }
        if !self.maintenance.interval.is_zero() && self.maintenance.orphan_files_after < self.commit_interval * 3 {
            return Err(format!(
                "sink.iceberg.maintenance.orphan_files_after: at least three commit intervals ({:?}), or files of a commit in \
                 flight could be removed",
                self.commit_interval * 3
            ));
        }
        if self.commit_rows == 0 {
            return Err("sink.iceberg.commit_rows: must be at least 1".into());
        }
        if let Some(ns) = &self.namespace
            && (ns.is_empty() || ns.contains('.') || ns.contains('/'))
        {
            return Err(format!("sink.iceberg.namespace: {ns:?} must be one non-empty name without '.' or '/'"));
        }
        layout::validate(&self.tables)?;
        shape.rows_only("iceberg")
    }

    fn state(&self) -> PgConnConfig {
        self.state_connection()
    }

    fn state_is_sink(&self) -> bool {
        self.catalog.sql.is_some()
    }

    /// The engine reached the catalog database already (it is the state database), and
    /// connecting would create the catalog's tables: only the layouts, the warehouse and
    /// a REST catalog's answer are checked, so a bad one fails before anything is
    /// created.
    fn check<'a>(&'a self, ctx: &'a SinkContext) -> BoxFuture<'a, SinkResult<()>> {
        Box::pin(async move {
            self.preflight(ctx).await?;
            // A REST catalog is asked for its configuration (read only), so a wrong
            // uri or a refused host fails the check, not the first commit.
            if self.catalog.rest.is_some() {
                let cfg = Self { egress: ctx.egress.clone(), ..self.clone() };
                cfg.catalog().await.map_err(|e| SinkError::wrap(e.kind(), e))?;
            }
            Ok(())
        })
    }

    fn connect<'a>(&'a self, ctx: &'a SinkContext) -> BoxFuture<'a, SinkResult<Box<dyn DynSink>>> {
        Box::pin(async move {
            self.preflight(ctx).await?;
            let cfg = Self { egress: ctx.egress.clone(), ..self.clone() };
            let sink = IcebergSink::connect(&cfg, &ctx.pipeline).await.map_err(|e| SinkError::wrap(e.kind(), e))?;
            Ok(Box::new(sink) as Box<dyn DynSink>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<IcebergSinkConfig, String> {
        let c: IcebergSinkConfig = serde_yaml::from_str(y).map_err(|e| e.to_string())?;
        c.validate(&PipelineShape { transforms: &[], enriched: false })?;
        Ok(c)
    }

    #[test]
    fn defaults_and_bad_settings_name_the_key() {
        let c = parse("{catalog: {sql: {host: h, user: u, password: p, database: d}}, warehouse: /w/}").unwrap();
        assert_eq!((c.mode, c.commit_interval, c.warehouse().unwrap().url.as_str()), (Mode::Upsert, Duration::from_secs(10), "file:///w"));
        let s3 = "{access_key_id: k, secret_access_key: s, endpoint: 'http://127.0.0.1:9000', path_style_access: true}";
        let c =
            parse(&format!("{{catalog: {{sql: {{host: h, user: u, password: p, database: d}}}}, warehouse: 's3://lake/w/', s3: {s3}}}"))
                .unwrap();
        assert_eq!(c.warehouse().unwrap().url, "s3://lake/w");
        let e = parse("{catalog: {sql: {host: h, user: u, password: p, database: d}}, warehouse: 's3://lake/w'}").unwrap_err();
        assert!(e.starts_with("sink.iceberg.s3:"), "{e}");
        let e =
            parse(&format!("{{catalog: {{sql: {{host: h, user: u, password: p, database: d}}}}, warehouse: /w, s3: {s3}}}")).unwrap_err();
        assert!(e.starts_with("sink.iceberg.s3:"), "{e}");
        let e = parse("{catalog: {sql: {host: h, user: u, password: p, database: d}}, warehouse: 's3://lake', s3: {access_key_id: k, secret_access_key: s, endpoint: 'x:9000'}}").unwrap_err();
        assert!(e.starts_with("sink.iceberg.s3.endpoint:"), "{e}");
        let e = parse("{catalog: {sql: {host: h, user: u, password: p, database: d}}, warehouse: w}").unwrap_err();
        assert!(e.starts_with("sink.iceberg.warehouse:"), "{e}");
        let e = parse("{catalog: {hive: {}}, warehouse: /w}").unwrap_err();
        assert!(e.contains("unknown field `hive`"), "{e}");
        let e = parse("{catalog: {rest: {uri: 'http://c:8181'}}, warehouse: /w}").unwrap_err();
        assert!(e.starts_with("sink.iceberg.state:"), "{e}");
        let e =
            parse("{catalog: {rest: {uri: 'c:8181'}}, state: {host: h, user: u, password: p, database: d}, warehouse: /w}").unwrap_err();
        assert!(e.starts_with("sink.iceberg.catalog.rest.uri:"), "{e}");
        let c =
            parse("{catalog: {rest: {uri: 'http://c:8181'}}, state: {host: h, user: u, password: p, database: s}, warehouse: /w}").unwrap();
        assert_eq!(c.state_connection().database, "s");
        let e = parse("{catalog: {}, warehouse: /w}").unwrap_err();
        assert!(e.starts_with("sink.iceberg.catalog:"), "{e}");
        let e = parse("{catalog: {sql: {host: h, user: u, password: p, database: d}}, warehouse: /w, mode: merge}").unwrap_err();
        assert!(e.contains("unknown variant `merge`"), "{e}");
        let e = parse("{catalog: {sql: {host: h, user: u, password: p, database: d}}, warehouse: /w, namespace: a.b}").unwrap_err();
        assert!(e.starts_with("sink.iceberg.namespace:"), "{e}");
    }
}
