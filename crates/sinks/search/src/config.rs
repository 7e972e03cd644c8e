//! The search sink's settings (`sink: search:`): the service, the index, and the
//! document definition; checked on their own and against the pipeline.

use std::sync::Arc;

use secrecy::SecretString;
use serde::Deserialize;
use sluice_core::sink::{BoxFuture, DynSink, PipelineShape, SinkConfigure, SinkContext, SinkError, SinkResult};
use sluice_core::{PgConnConfig, TableName};

use crate::document::{DocumentPlan, DocumentSpec};
use crate::sink::{SearchSink, SearchSinkOptions};

/// Documents built from a root table and its related tables, indexed with `_bulk` into
/// Elasticsearch, OpenSearch or `sluice search serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSinkConfig {
    /// Base URL of the search service, e.g. http://127.0.0.1:9200.
    pub url: String,
    pub index: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    /// An Elasticsearch API key (`Authorization: ApiKey <key>`), instead of a user.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// PEM file of the authority that signed an https service's certificate (without
    /// it, the system's trusted authorities).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The same authority as PEM text, in place of `ca_file` (tenants give it so).
    #[serde(default)]
    pub ca_pem: Option<String>,
    pub document: DocumentSpec,
    /// Documents per `_bulk` request (and root rows per page of the initial load).
    #[serde(default = "default_bulk_docs")]
    pub bulk_max_docs: usize,
    /// Largest `_bulk` request body, in bytes (Elasticsearch advises 5-15 MB).
    #[serde(default = "default_bulk_bytes")]
    pub bulk_max_bytes: usize,
    /// `_bulk` requests of the initial load sent before the first is answered (Kafka
    /// Connect's Elasticsearch sink: `max.in.flight.requests`); pages are built in the
    /// source meanwhile.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_requests: usize,
    /// Where the initial load's progress and refused documents (dead letters) are kept.
    pub state: PgConnConfig,
}

fn default_bulk_docs() -> usize {
    1000
}

fn default_bulk_bytes() -> usize {
    8 * 1024 * 1024
}

fn default_max_in_flight() -> usize {
    3
}

impl SearchSinkConfig {
    pub fn options(&self, pipeline: &str) -> SearchSinkOptions {
        SearchSinkOptions {
            url: self.url.clone(),
            index: self.index.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            api_key: self.api_key.clone(),
            ca_file: self.ca_file.clone(),
            ca_pem: self.ca_pem.clone(),
            bulk_max_docs: self.bulk_max_docs,
            bulk_max_bytes: self.bulk_max_bytes,
            max_in_flight_requests: self.max_in_flight_requests,
            pipeline: pipeline.to_string(),
        }
    }
}

impl SinkConfigure for SearchSinkConfig {
    fn kind(&self) -> &'static str {
        "search"
    }

    fn validate(&self, shape: &PipelineShape<'_>) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("sink.search.url: {:?} must start with https:// (or http://)", self.url));
        }
        if self.api_key.is_some() && self.username.is_some() {
            return Err("sink.search: give username/password or api_key, not both".into());
        }
        let https = self.url.starts_with("https://");
        sluice_core::https::check_private_ca(https, self.ca_file.as_deref(), self.ca_pem.as_deref(), "sink.search.ca_file")?;
        let i = &self.index;
        if i.is_empty() || i.starts_with(['_', '-', '+']) || i.chars().any(|c| c.is_uppercase() || "\\/*?\"<>| ,#:".contains(c)) {
            return Err(format!(
                "sink.search.index: {i:?} is not a valid index name (lowercase, no spaces or \\/*?\"<>|,#:, not starting with _ - +)"
            ));
        }
        if TableName::parse(&self.document.table).is_none() {
            return Err(format!("sink.search.document.table: {:?} is not a table name; write schema.table", self.document.table));
        }
        if self.bulk_max_docs == 0 || self.bulk_max_docs > 100_000 {
            return Err("sink.search.bulk_max_docs: must be between 1 and 100000".into());
        }
        if self.bulk_max_bytes < 64 * 1024 || self.bulk_max_bytes > 100 * 1024 * 1024 {
            return Err("sink.search.bulk_max_bytes: must be between 65536 and 104857600 (64 KiB to 100 MiB)".into());
        }
        if self.max_in_flight_requests == 0 || self.max_in_flight_requests > 64 {
            return Err("sink.search.max_in_flight_requests: must be between 1 and 64".into());
        }
        if self.password.is_some() && self.username.is_none() {
            return Err("sink.search.password: set username too (basic authentication)".into());
        }
        if !shape.transforms.is_empty() {
            return Err("transforms: the search sink builds documents from the source tables (sink.search.document); transforms are not applied to it yet: remove them".into());
        }
        if shape.enriched {
            return Err("enrich: the search sink builds documents from the source tables; join reference data as a `one` relation of sink.search.document (its changes re-index the documents that use it) and remove enrich".into());
        }
        Ok(())
    }

    fn state(&self) -> PgConnConfig {
        self.state.clone()
    }

    /// A document's related tables must be captured for their changes to reach it.
    fn required_tables(&self) -> Vec<TableName> {
        let d = &self.document;
        let named = std::iter::once(&d.table).chain(d.relations.iter().flat_map(|r| std::iter::once(&r.table).chain(r.through.as_ref())));
        let mut out: Vec<TableName> = Vec::new();
        for n in named.filter_map(|n| TableName::parse(n)) {
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    }

    fn connect<'a>(&'a self, ctx: &'a SinkContext) -> BoxFuture<'a, SinkResult<Box<dyn DynSink>>> {
        Box::pin(async move {
            let by_name = ctx.source_tables.iter().map(|t| (t.name.clone(), t.clone())).collect();
            let plan = Arc::new(DocumentPlan::new(&self.document, &by_name).map_err(|e| SinkError::wrap(e.kind(), e))?);
            let pg = |e: sluice_postgres::PgError| SinkError::wrap(e.kind(), e);
            let source = sluice_postgres::connect(&ctx.source, "source").await.map_err(pg)?;
            let state = sluice_postgres::connect(&self.state.clone().guarded(ctx.egress.as_ref()), "state database").await.map_err(pg)?;
            let sink = SearchSink::connect(self.options(&ctx.pipeline), ctx.egress.as_ref(), plan, source, state)
                .await
                .map_err(|e| SinkError::wrap(e.kind(), e))?;
            Ok(Box::new(sink) as Box<dyn DynSink>)
        })
    }
}
