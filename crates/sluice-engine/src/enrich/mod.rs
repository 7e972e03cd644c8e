//! Enrichment: fields added to each change from outside its row. A reference table
//! (`lookup`), a team's service (`http`), or expressions over the row (`expression`).
//!
//! Enrichers run before the transforms, on the source row, as one batched async step
//! per sink batch (the transforms stay pure and synchronous): each enricher fetches
//! the distinct keys of the whole batch at once, through a TTL cache. Their fields are
//! appended to the row, so the transforms, the target table, the Avro schema and the
//! search mapping all see them like source columns.
//!
//! After ingestion, existing rows are re-enriched by a resync limited to the rows
//! concerned (`sluice.resyncs.filter`): when a replicated reference row changes (its
//! change comes through the pipeline's own stream, invalidates the cache and asks for
//! the rows that point at it), when an enricher's definition changes, and when rows
//! failed or were deferred. Resync's watermarks keep these re-reads from overwriting
//! newer changes, and its progress (in the state database) survives a crash.
//!
//! Failures (the service down, the lookup database gone, after retries and the
//! circuit breaker) follow the enricher's `on_failure`: `dead_letter` holds the row
//! back, `mark_missing` delivers it with NULL fields and the enricher's name in
//! `_enrichment_missing`. Either way the row's key is recorded in
//! `sluice.enrich_failures` and replayed once the enricher answers again, so every
//! row ends up delivered with its fields; nothing is dropped silently.

mod cache;
mod config;
mod http;
mod lookup;
mod plan;
mod run;
mod state;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::future::BoxFuture;
use secrecy::SecretString;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_core::transform::{Chain, Step, TableTransform, spec::Compute};
use sluice_core::{ColumnSchema, Datum, Lsn, Op, PgType, Row, SourcePosition, TableName, TableSchema, Transaction};
use sluice_postgres::{PgConnConfig, PgError, RowEnrich};
use tokio_postgres::Client;

use crate::metrics::Metrics;
use crate::resync::KeySet;

pub use config::*;
use plan::*;
use run::*;
pub use state::report;

/// The column naming the enrichers whose fields a delivered row lacks (NULL when
/// none): present when an enricher may deliver rows without its fields.
pub const MISSING_FIELD: &str = "_enrichment_missing";

/// Failed or deferred keys handed to one replay (one filtered resync).
const REPLAY_KEYS: i64 = 4096;
/// Changed reference keys beyond which the whole table is re-enriched instead.
const MAX_FILTER_KEYS: usize = 10_000;
/// Reference-table transactions remembered for the lookups' visibility check.
const RECENT_REF_XIDS: usize = 256;

/// A lookup key as the cache and the queries see it: the column's text, or for a
/// composite key the JSON array of the columns' texts.
pub(crate) fn encode_key(parts: &[&[u8]]) -> String {
    match parts {
        [one] => String::from_utf8_lossy(one).into_owned(),
        many => serde_json::to_string(&many.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>()).expect("json"),
    }
}

/// What a row holds in a key's columns.
enum KeyRead {
    Key(String),
    /// A NULL in the key: nothing to look up (the fields are NULL).
    Null,
    /// A TOASTed column the update did not touch: the fields did not change either.
    Unchanged,
}

fn read_key(row: &Row, inputs: &[usize]) -> KeyRead {
    let mut parts = Vec::with_capacity(inputs.len());
    for &i in inputs {
        match row.get(i) {
            Some(Datum::Text(t)) => parts.push(&t[..]),
            Some(Datum::Unchanged) => return KeyRead::Unchanged,
            _ => return KeyRead::Null,
        }
    }
    KeyRead::Key(encode_key(&parts))
}

// One per configured enricher, built once: the sizes of its variants do not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Kind {
    Lookup(lookup::Lookup),
    Http(http::Http),
    Expression(Chain),
}

impl Kind {
    /// `source` carries the pipeline's egress policy, which every enricher's own
    /// connections take too.
    pub(super) fn build(c: &EnricherConfig, source: &PgConnConfig) -> Result<Self, String> {
        if let Some(l) = &c.lookup {
            return Ok(Kind::Lookup(lookup::Lookup::new(&c.name, l, source).map_err(|m| format!("lookup: {m}"))?));
        }
        if let Some(h) = &c.http {
            return Ok(Kind::Http(http::Http::new(&c.name, h, source.egress.as_ref()).map_err(|m| format!("http: {m}"))?));
        }
        let e = c.expression.as_ref().expect("one kind, checked");
        if e.fields.is_empty() {
            return Err("expression: fields: list at least one {name, expr, type}".into());
        }
        let steps = e
            .fields
            .iter()
            .map(|f| Step::Compute(Compute { name: f.name.clone(), expr: f.expr.clone(), ty: f.ty.clone(), when: None }))
            .collect();
        Ok(Kind::Expression(Chain::new(steps).map_err(|e| format!("expression: fields[{}]: {}", e.index, e.message))?))
    }

    pub(super) fn replays(&self) -> bool {
        !matches!(self, Kind::Expression(_))
    }
}

pub(super) struct Enricher {
    pub(super) cfg: EnricherConfig,
    pub(super) kind: Kind,
    pub(super) fingerprint: String,
    pub(super) next_replay: Mutex<(tokio::time::Instant, Duration)>,
}

impl Enricher {
    pub(super) fn applies(&self, table: &TableName) -> bool {
        let name = table.to_string();
        self.cfg.tables.is_empty() || self.cfg.tables.iter().any(|p| sluice_core::transform::glob_match(p, &name))
    }

    pub(super) fn breaker(&self) -> Option<&cache::Breaker> {
        match &self.kind {
            Kind::Lookup(l) => Some(&l.breaker),
            Kind::Http(h) => Some(&h.breaker),
            Kind::Expression(_) => None,
        }
    }
}

pub(crate) struct Enrichment {
    pipeline: String,
    enrichers: Vec<Enricher>,
    missing_field: bool,
    state: PgConnConfig,
    state_client: tokio::sync::Mutex<Option<Client>>,
    /// Per table: the last schema pointer seen, and its plan.
    plans: Mutex<HashMap<TableName, SeenPlan>>,
    /// The pipeline's own tables (reference tables' changes are not delivered).
    sink_tables: HashSet<TableName>,
    /// See [`reference_tables`].
    refs: Vec<TableName>,
    ref_xids: Mutex<VecDeque<u32>>,
    /// Failures may be waiting for a replay.
    pending: AtomicBool,
    /// A resync request was written since the pipeline last looked.
    requested: AtomicBool,
    /// When `replay` last looked (it runs after every batch, and looks twice a second).
    looked: Mutex<tokio::time::Instant>,
    metrics: Arc<Metrics>,
}

fn fingerprint(c: &EnricherConfig) -> String {
    // Debug prints secrets redacted, so a rotated header value is no change.
    hex::encode(Sha256::digest(format!("{c:?}").as_bytes()))
}

impl Enrichment {
    /// Builds and checks the enrichers against their databases; `None` without any.
    pub(crate) async fn new(
        pipeline: &str,
        cfgs: &[EnricherConfig],
        source: &PgConnConfig,
        state: &PgConnConfig,
        sink_tables: &[TableName],
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Self>>> {
        if cfgs.is_empty() {
            return Ok(None);
        }
        validate(cfgs).map_err(PgError::permanent)?;
        let mut enrichers = Vec::new();
        for (i, c) in cfgs.iter().enumerate() {
            let mut kind = Kind::build(c, source).map_err(|m| PgError::permanent(format!("enrich[{i}] ({}): {m}", c.name)))?;
            if let Kind::Lookup(l) = &mut kind {
                l.prepare().await.map_err(|m| PgError::permanent(format!("enrich[{i}] ({}): lookup: {m}", c.name)))?;
            }
            let next = Mutex::new((tokio::time::Instant::now(), Duration::from_secs(1)));
            enrichers.push(Enricher { fingerprint: fingerprint(c), cfg: c.clone(), kind, next_replay: next });
        }
        let missing_field = cfgs.iter().any(|c| c.on_failure == OnFailure::MarkMissing || c.apply == ApplyWhen::AfterIngestion);
        Ok(Some(Arc::new(Self {
            pipeline: pipeline.to_string(),
            enrichers,
            missing_field,
            state: state.clone(),
            state_client: tokio::sync::Mutex::new(None),
            plans: Mutex::new(HashMap::new()),
            sink_tables: sink_tables.iter().cloned().collect(),
            refs: reference_tables(cfgs),
            ref_xids: Mutex::new(VecDeque::new()),
            pending: AtomicBool::new(true),
            requested: AtomicBool::new(false),
            looked: Mutex::new(tokio::time::Instant::now()),
            metrics,
        })))
    }

    /// Reference tables whose changes the pipeline must stream (lookups in the source).
    pub(crate) fn reference_tables(&self) -> &[TableName] {
        &self.refs
    }
}

fn text(d: &Datum) -> String {
    d.as_text().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default()
}
