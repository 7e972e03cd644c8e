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
mod http;
mod lookup;

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
use sluice_core::{ColumnSchema, Datum, Lsn, Op, PgType, Row, SourcePosition, TableName, TableSchema, Transaction, quote_ident};
use sluice_postgres::{PgConnConfig, PgError, RowEnrich};
use tokio_postgres::Client;

use crate::metrics::Metrics;
use sluice_core::quote_literal as literal;

/// The column naming the enrichers whose fields a delivered row lacks (NULL when
/// none): present when an enricher may deliver rows without its fields.
pub const MISSING_FIELD: &str = "_enrichment_missing";

/// Failed or deferred keys handed to one replay (one filtered resync).
const REPLAY_KEYS: i64 = 4096;
/// Changed reference keys beyond which the whole table is re-enriched instead.
const MAX_FILTER_KEYS: usize = 10_000;
/// Reference-table transactions remembered for the lookups' visibility check.
const RECENT_REF_XIDS: usize = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnricherConfig {
    /// Lowercase letters, digits and `_`; the default prefix of its fields.
    pub name: String,
    /// Source tables it applies to (`schema.table`, `*` and `?` allowed); all when empty.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Exactly one of `lookup`, `http`, `expression`.
    pub lookup: Option<LookupConfig>,
    pub http: Option<HttpConfig>,
    pub expression: Option<ExpressionConfig>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// `during_ingestion`: rows reach the sink with their fields. `after_ingestion`:
    /// rows are delivered at once, marked missing, and enriched in the background
    /// (for a slow service that must not add lag).
    #[serde(default)]
    pub apply: ApplyWhen,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Hold the row back until the enricher answers (recorded in
    /// `sluice.enrich_failures`, replayed automatically).
    #[default]
    DeadLetter,
    /// Deliver the row with NULL fields and the enricher named in `_enrichment_missing`;
    /// it is enriched again once the enricher answers.
    MarkMissing,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ApplyWhen {
    #[default]
    DuringIngestion,
    AfterIngestion,
}

fn d_ttl() -> Duration {
    Duration::from_secs(60)
}
fn d_cache() -> usize {
    100_000
}
fn d_retries() -> u32 {
    3
}
fn d_backoff() -> Duration {
    Duration::from_millis(100)
}
fn d_breaker() -> u32 {
    5
}
fn d_open() -> Duration {
    Duration::from_secs(10)
}
fn d_timeout() -> Duration {
    Duration::from_secs(2)
}
fn d_batch() -> usize {
    500
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// The database holding the reference table. Default: the source, whose changes
    /// to the table then invalidate the cache and re-enrich the rows that use them;
    /// elsewhere only `cache_ttl` bounds staleness.
    pub connection: Option<PgConnConfig>,
    /// The reference table, `schema.table`.
    pub table: String,
    /// Its key column(s), matched against the event's `on` column(s) in order:
    /// `key: id`, or `key: [tenant_id, id]` with `on: [tenant_id, customer_id]`.
    pub key: Columns,
    /// The event's column(s) holding the reference key.
    pub on: Columns,
    /// Reference columns to add (named `<prefix><column>`).
    pub fields: Vec<String>,
    /// Default: `<enricher name>_`.
    pub prefix: Option<String>,
    #[serde(default = "d_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
    #[serde(default = "d_cache")]
    pub cache_max_entries: usize,
    #[serde(default = "d_retries")]
    pub retries: u32,
    #[serde(default = "d_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(default = "d_breaker")]
    pub breaker_failures: u32,
    #[serde(default = "d_open", with = "humantime_serde")]
    pub breaker_open_for: Duration,
}

/// One column, or several in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Columns {
    One(String),
    Many(Vec<String>),
}

impl Columns {
    pub fn names(&self) -> Vec<String> {
        match self {
            Columns::One(c) => vec![c.clone()],
            Columns::Many(c) => c.clone(),
        }
    }
}

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

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Int,
    Float,
    Bool,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `http://` or `https://` endpoint taking `POST {"keys": [...]}`.
    pub url: String,
    /// The event's column whose value is sent as the key.
    pub key: String,
    /// Fields of the answer and their types (`string`, `int`, `float`, `bool`, `json`).
    pub fields: BTreeMap<String, FieldType>,
    /// Default: `<enricher name>_`.
    pub prefix: Option<String>,
    /// Sent with every call (e.g. `Authorization`); never logged or returned.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
    #[serde(default = "d_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Keys per request.
    #[serde(default = "d_batch")]
    pub max_batch: usize,
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// First retry delay; doubles up to 5 s.
    #[serde(default = "d_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Failed calls in a row that open the circuit breaker...
    #[serde(default = "d_breaker")]
    pub breaker_failures: u32,
    /// ...and how long it stays open (calls fail at once) before one call may try.
    #[serde(default = "d_open", with = "humantime_serde")]
    pub breaker_open_for: Duration,
    #[serde(default = "d_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
    #[serde(default = "d_cache")]
    pub cache_max_entries: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpressionConfig {
    /// Computed fields, in order (a later one may use an earlier one).
    pub fields: Vec<ExprField>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExprField {
    pub name: String,
    /// The `compute` transform's language: arithmetic, `+` on strings,
    /// `if(c, a, b)`, `sha256`, `year`/`month`/`day`/`hour`, evalexpr's built-ins.
    pub expr: String,
    /// `string`, `int`, `float`, `bool` or `decimal(p,s)`.
    #[serde(rename = "type")]
    pub ty: String,
}

/// The reference tables of the lookups in the source database: the pipeline streams
/// them to keep the lookups fresh (never delivering them).
pub fn reference_tables(cfgs: &[EnricherConfig]) -> Vec<TableName> {
    let mut out = Vec::new();
    for l in cfgs.iter().filter_map(|c| c.lookup.as_ref()).filter(|l| l.connection.is_none()) {
        if let Some(t) = TableName::parse(&l.table)
            && !out.contains(&t)
        {
            out.push(t);
        }
    }
    out
}

/// Checks what needs no database: names, exactly one kind, options. The message
/// names the enricher; `index` is its place in `enrich`.
pub fn validate(cfgs: &[EnricherConfig]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (i, c) in cfgs.iter().enumerate() {
        let err = |m: String| format!("enrich[{i}] ({}): {m}", c.name);
        if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_') {
            return Err(err("name: use lowercase letters, digits and _".into()));
        }
        if !seen.insert(&c.name) {
            return Err(err("name: two enrichers have this name; rename one".into()));
        }
        let kinds = [c.lookup.is_some(), c.http.is_some(), c.expression.is_some()].iter().filter(|b| **b).count();
        if kinds != 1 {
            return Err(err("give exactly one of lookup, http or expression".into()));
        }
        Kind::build(c, &dummy_conn()).map_err(err)?;
    }
    Ok(())
}

fn dummy_conn() -> PgConnConfig {
    PgConnConfig { host: String::new(), port: 5432, user: String::new(), password: SecretString::from(""), database: String::new() }
}

enum Kind {
    Lookup(lookup::Lookup),
    Http(http::Http),
    Expression(Chain),
}

impl Kind {
    fn build(c: &EnricherConfig, source: &PgConnConfig) -> Result<Self, String> {
        if let Some(l) = &c.lookup {
            return Ok(Kind::Lookup(lookup::Lookup::new(&c.name, l, source).map_err(|m| format!("lookup: {m}"))?));
        }
        if let Some(h) = &c.http {
            return Ok(Kind::Http(http::Http::new(&c.name, h).map_err(|m| format!("http: {m}"))?));
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

    fn replays(&self) -> bool {
        !matches!(self, Kind::Expression(_))
    }
}

struct Enricher {
    cfg: EnricherConfig,
    kind: Kind,
    fingerprint: String,
    next_replay: Mutex<(tokio::time::Instant, Duration)>,
}

impl Enricher {
    fn applies(&self, table: &TableName) -> bool {
        let name = table.to_string();
        self.cfg.tables.is_empty() || self.cfg.tables.iter().any(|p| sluice_core::transform::glob_match(p, &name))
    }

    fn breaker(&self) -> Option<&cache::Breaker> {
        match &self.kind {
            Kind::Lookup(l) => Some(&l.breaker),
            Kind::Http(h) => Some(&h.breaker),
            Kind::Expression(_) => None,
        }
    }
}

enum PlanStep {
    /// Appends `width` fields found by the key in columns `inputs`.
    Fetch {
        enricher: usize,
        inputs: Vec<usize>,
        width: usize,
    },
    Expr {
        enricher: usize,
        transform: TableTransform,
        width: usize,
    },
}

/// One source table shape's enrichment.
pub(crate) struct Plan {
    source: Arc<TableSchema>,
    output: Arc<TableSchema>,
    steps: Vec<PlanStep>,
    missing: bool,
    keys: Vec<usize>,
}

impl Plan {
    pub(crate) fn output(&self) -> &Arc<TableSchema> {
        &self.output
    }
}

struct Work {
    plan: Arc<Plan>,
    row: Row,
    /// Enrichers whose fields the row lacks.
    missing: Vec<usize>,
    /// The first failure under `dead_letter`: the row is held back.
    dead: Option<usize>,
    /// Read by a resync or the snapshot: enriched now even by `after_ingestion` ones.
    now: bool,
}

impl Work {
    /// The row's source key, as `sluice.enrich_failures` records it.
    fn source_key(&self) -> Vec<String> {
        self.plan.keys.iter().map(|&i| text(&self.row[i])).collect()
    }
}

/// A row's key recorded in `sluice.enrich_failures`.
struct Failed {
    enricher: usize,
    table: String,
    key: Vec<String>,
    delivered: bool,
    reason: String,
}

/// A table's plan, and the schema pointer it was last asked for.
type SeenPlan = (Arc<TableSchema>, Arc<Plan>);

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

    /// The enrichment of one source table shape (compiled once per shape).
    pub(crate) fn plan(&self, source: &Arc<TableSchema>) -> Result<Arc<Plan>, PgError> {
        let mut plans = self.plans.lock().expect("plans lock");
        if let Some((seen, p)) = plans.get_mut(&source.name) {
            if Arc::ptr_eq(seen, source) {
                return Ok(p.clone());
            }
            // The stream's copy of a shape the checks compiled: remember its pointer
            // so the next event is a pointer comparison, not a column-by-column one.
            if p.source.columns == source.columns {
                *seen = source.clone();
                return Ok(p.clone());
            }
        }
        let p = Arc::new(self.compile(source).map_err(PgError::permanent)?);
        plans.insert(source.name.clone(), (source.clone(), p.clone()));
        Ok(p)
    }

    fn compile(&self, source: &Arc<TableSchema>) -> Result<Plan, String> {
        let mut schema = (**source).clone();
        let mut steps = Vec::new();
        for (k, e) in self.enrichers.iter().enumerate() {
            if !e.applies(&source.name) {
                continue;
            }
            let err = |m: String| format!("enrich[{k}] ({}): {m}", e.cfg.name);
            let find = |schema: &TableSchema, col: &str| {
                schema.columns.iter().position(|c| c.name == col).ok_or_else(|| {
                    let names: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
                    err(format!("column {col:?} is not in {} (its columns here: {})", source.name, names.join(", ")))
                })
            };
            let add = |schema: &mut TableSchema, cols: Vec<ColumnSchema>| {
                for c in &cols {
                    if schema.columns.iter().any(|x| x.name == c.name) {
                        return Err(err(format!("field {:?} already exists in {}: set a prefix", c.name, source.name)));
                    }
                }
                let n = cols.len();
                schema.columns.extend(cols);
                Ok(n)
            };
            if e.kind.replays() && !source.has_key() {
                return Err(err(format!(
                    "{} has no primary key: rows must be found again to be re-enriched; add a primary key or leave the table out (tables:)",
                    source.name
                )));
            }
            match &e.kind {
                Kind::Lookup(l) => {
                    let inputs = l.on.iter().map(|c| find(&schema, c)).collect::<Result<Vec<_>, _>>()?;
                    let width = add(&mut schema, l.columns())?;
                    steps.push(PlanStep::Fetch { enricher: k, inputs, width });
                }
                Kind::Http(h) => {
                    let inputs = vec![find(&schema, &h.key)?];
                    let width = add(&mut schema, h.columns())?;
                    steps.push(PlanStep::Fetch { enricher: k, inputs, width });
                }
                Kind::Expression(chain) => {
                    let t = chain.compile(&schema).map_err(|e| err(format!("expression: fields[{}]: {}", e.index, e.message)))?;
                    let width = t.output.columns.len() - schema.columns.len();
                    schema = (*t.output).clone();
                    steps.push(PlanStep::Expr { enricher: k, transform: t, width });
                }
            }
        }
        let missing = self.missing_field && !steps.is_empty();
        if missing {
            if schema.columns.iter().any(|c| c.name == MISSING_FIELD) {
                return Err(format!("{} already has a column {MISSING_FIELD}, which enrichment adds", source.name));
            }
            schema.columns.push(ColumnSchema {
                name: MISSING_FIELD.into(),
                type_oid: 25,
                type_name: "text".into(),
                pg_type: PgType::Text,
                nullable: true,
                is_key: false,
                enum_labels: vec![],
            });
        }
        Ok(Plan { source: source.clone(), output: Arc::new(schema), steps, missing, keys: source.key_indexes().collect() })
    }

    /// The snapshot's hook for one table.
    pub(crate) fn for_snapshot(self: &Arc<Self>, source: &Arc<TableSchema>) -> Result<Option<Arc<dyn RowEnrich>>, PgError> {
        let plan = self.plan(source)?;
        if plan.steps.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(SnapshotEnrich { enrichment: self.clone(), plan })))
    }

    /// Enriches a sink batch in place: reference-table changes invalidate the cache
    /// and ask for re-enrichment (then leave the batch unless the table is also the
    /// pipeline's), rows gain their fields, held-back rows leave the batch, and
    /// failures are recorded before the batch goes on.
    pub(crate) async fn apply(&self, batch: &mut [Transaction]) -> Result<()> {
        self.references(batch).await?;
        let mut work = Vec::new();
        let mut at = Vec::new();
        for (ti, t) in batch.iter_mut().enumerate() {
            for (ei, e) in t.events.iter_mut().enumerate() {
                let plan = self.plan(&e.table)?;
                if plan.steps.is_empty() {
                    continue;
                }
                if let Some(b) = &mut e.before {
                    b.resize(plan.output.columns.len(), Datum::Null);
                }
                e.table = plan.output.clone();
                if let Some(row) = e.after.take() {
                    work.push(Work { plan, row, missing: Vec::new(), dead: None, now: t.xid == 0 });
                    at.push((ti, ei));
                }
            }
        }
        if work.is_empty() {
            return Ok(());
        }
        let failed = self.run(&mut work).await;
        self.record(&failed).await?;
        let mut dropped = Vec::new();
        for (w, (ti, ei)) in work.into_iter().zip(at) {
            if w.dead.is_some() {
                dropped.push((ti, ei));
            } else {
                batch[ti].events[ei].after = Some(w.row);
            }
        }
        for (ti, ei) in dropped.into_iter().rev() {
            batch[ti].events.remove(ei);
        }
        Ok(())
    }

    /// Reference-table changes in `batch`: cache invalidation and re-enrichment
    /// requests (durable before the batch is applied, so before its position is
    /// confirmed), then the changes leave the batch unless the pipeline replicates
    /// the table itself.
    async fn references(&self, batch: &mut [Transaction]) -> Result<()> {
        let refs = &self.refs;
        if refs.is_empty() {
            return Ok(());
        }
        let mut changed: BTreeMap<usize, HashSet<String>> = BTreeMap::new();
        let mut last = Lsn::ZERO;
        for t in batch.iter_mut() {
            let mut touched = false;
            for e in &t.events {
                if !refs.contains(&e.table.name) {
                    continue;
                }
                touched = true;
                for (k, en) in self.enrichers.iter().enumerate() {
                    let Kind::Lookup(l) = &en.kind else { continue };
                    if !l.replicated || l.table != e.table.name {
                        continue;
                    }
                    let set = changed.entry(k).or_default();
                    if e.op == Op::Truncate {
                        set.insert(String::new()); // everything
                    }
                    let Some(idx) = l.key.iter().map(|k| e.table.columns.iter().position(|c| c.name == *k)).collect::<Option<Vec<_>>>()
                    else {
                        continue;
                    };
                    for row in [&e.before, &e.after].into_iter().flatten() {
                        if let KeyRead::Key(k) = read_key(row, &idx) {
                            set.insert(k);
                        }
                    }
                }
            }
            if touched {
                last = t.commit_lsn;
                let mut x = self.ref_xids.lock().expect("xids lock");
                if x.len() == RECENT_REF_XIDS {
                    x.pop_front();
                }
                x.push_back(t.xid);
                t.events.retain(|e| !refs.contains(&e.table.name) || self.sink_tables.contains(&e.table.name));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        let mut requests = Vec::new();
        for (k, keys) in &changed {
            let en = &self.enrichers[*k];
            let Kind::Lookup(l) = &en.kind else { continue };
            let keys: Vec<String> = keys.iter().cloned().collect();
            l.cache.invalidate(&keys);
            let all = keys.iter().any(String::is_empty) || keys.len() > MAX_FILTER_KEYS;
            for t in self.sink_tables.iter().filter(|t| en.applies(t)) {
                // The rows pointing at a changed key; all rows when `on` is not a
                // source column (it comes from an earlier enricher).
                let on_source = self
                    .plans
                    .lock()
                    .expect("plans lock")
                    .get(t)
                    .is_some_and(|(_, p)| l.on.iter().all(|o| p.source.columns.iter().any(|c| c.name == *o)));
                let filter = (!all && on_source).then(|| {
                    let cols: Vec<String> = l.on.iter().map(|c| quote_ident(c)).collect();
                    let tuples: Vec<String> = keys
                        .iter()
                        .map(|k| {
                            let parts = if l.on.len() == 1 { vec![k.clone()] } else { serde_json::from_str(k).unwrap_or_default() };
                            format!("({})", parts.iter().map(|p| literal(p)).collect::<Vec<_>>().join(", "))
                        })
                        .collect();
                    format!("({}) IN ({})", cols.join(", "), tuples.join(", "))
                });
                requests.push((t.to_string(), filter, format!("enrich:{} reference change", en.cfg.name)));
            }
        }
        // One id per batch (its last reference commit): a replayed batch asks again
        // under the same id, which changes nothing.
        let id = last.0 as i64;
        let mut g = self.state().await?;
        let c = g.as_mut().expect("connected");
        for (table, filter, reason) in requests {
            c.execute(
                "INSERT INTO sluice.resyncs (pipeline, id, table_name, filter, reason) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
                &[&self.pipeline, &id, &table, &filter, &reason],
            )
            .await
            .context("recording a re-enrichment request")?;
        }
        self.requested.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Runs every enricher over `work`, in order; returns the rows to record.
    async fn run(&self, work: &mut [Work]) -> Vec<Failed> {
        let mut failed = Vec::new();
        let must_see: Vec<u32> = self.ref_xids.lock().expect("xids lock").iter().copied().collect();
        for (k, en) in self.enrichers.iter().enumerate() {
            let step = |w: &Work| {
                w.plan
                    .steps
                    .iter()
                    .position(|s| matches!(s, PlanStep::Fetch { enricher, .. } | PlanStep::Expr { enricher, .. } if *enricher == k))
            };
            let mut mine: Vec<(usize, usize)> = Vec::new(); // (work index, step index)
            for (i, w) in work.iter().enumerate() {
                if let Some(s) = step(w) {
                    mine.push((i, s));
                }
            }
            if mine.is_empty() {
                continue;
            }
            let fail = |w: &mut Work, width: usize, reason: &str, failed: &mut Vec<Failed>| {
                w.row.extend(std::iter::repeat_n(Datum::Null, width));
                let dead = en.cfg.on_failure == OnFailure::DeadLetter;
                if dead {
                    w.dead.get_or_insert(k);
                } else {
                    w.missing.push(k);
                }
                failed.push(Failed {
                    enricher: k,
                    table: w.plan.source.name.to_string(),
                    key: w.source_key(),
                    delivered: !dead,
                    reason: reason.to_string(),
                });
            };
            match &en.kind {
                Kind::Expression(_) => {
                    for (i, s) in mine {
                        let w = &mut work[i];
                        let plan = w.plan.clone();
                        let PlanStep::Expr { transform, width, .. } = &plan.steps[s] else { unreachable!() };
                        match transform.apply_read(w.row.clone(), SourcePosition::default()) {
                            Ok(Some(r)) => w.row = r,
                            Ok(None) => w.row.extend(std::iter::repeat_n(Datum::Null, *width)),
                            Err(e) => fail(w, *width, &e.to_string(), &mut failed),
                        }
                    }
                }
                Kind::Lookup(_) | Kind::Http(_) => {
                    let deferred = en.cfg.apply == ApplyWhen::AfterIngestion;
                    let mut keys: Vec<String> = Vec::new();
                    let mut seen = HashSet::new();
                    for &(i, s) in &mine {
                        let w = &work[i];
                        let PlanStep::Fetch { inputs, .. } = &w.plan.steps[s] else { unreachable!() };
                        if (!deferred || w.now)
                            && let KeyRead::Key(v) = read_key(&w.row, inputs)
                            && seen.insert(v.clone())
                        {
                            keys.push(v);
                        }
                    }
                    let answer = if keys.is_empty() {
                        Ok((HashMap::new(), 0))
                    } else {
                        match &en.kind {
                            Kind::Lookup(l) => l.fetch(&keys, &must_see).await,
                            Kind::Http(h) => h.fetch(&keys).await,
                            Kind::Expression(_) => unreachable!(),
                        }
                    };
                    let m = &self.metrics;
                    match &answer {
                        Ok((_, fetched)) => {
                            m.enrich_fetched.fetch_add(*fetched as u64, Ordering::Relaxed);
                            m.enrich_cached.fetch_add((keys.len() - fetched) as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            m.enrich_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(enricher = %en.cfg.name, error = %e, rows = mine.len(), policy = ?en.cfg.on_failure, "enrichment failed");
                        }
                    }
                    for (i, s) in mine {
                        let w = &mut work[i];
                        let plan = w.plan.clone();
                        let PlanStep::Fetch { inputs, width, .. } = &plan.steps[s] else { unreachable!() };
                        let width = *width;
                        if deferred && !w.now {
                            w.row.extend(std::iter::repeat_n(Datum::Null, width));
                            w.missing.push(k);
                            failed.push(Failed {
                                enricher: k,
                                table: w.plan.source.name.to_string(),
                                key: w.source_key(),
                                delivered: true,
                                reason: "deferred: enriched after ingestion".into(),
                            });
                            continue;
                        }
                        match (&answer, read_key(&w.row, inputs)) {
                            (_, KeyRead::Unchanged) => w.row.extend(std::iter::repeat_n(Datum::Unchanged, width)),
                            (_, KeyRead::Null) => w.row.extend(std::iter::repeat_n(Datum::Null, width)),
                            (Ok((found, _)), KeyRead::Key(k)) => match found.get(&k) {
                                Some(Some(vals)) => w.row.extend(vals.iter().cloned()),
                                _ => w.row.extend(std::iter::repeat_n(Datum::Null, width)),
                            },
                            (Err(reason), KeyRead::Key(_)) => fail(w, width, reason, &mut failed),
                        }
                    }
                }
            }
        }
        for w in work.iter_mut() {
            if w.plan.missing {
                let names: Vec<&str> = w.missing.iter().map(|&k| self.enrichers[k].cfg.name.as_str()).collect();
                w.row.push(if names.is_empty() { Datum::Null } else { Datum::Text(names.join(",").into()) });
            }
        }
        failed
    }

    async fn state(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut g = self.state_client.lock().await;
        if g.as_ref().is_none_or(Client::is_closed) {
            *g = Some(sluice_postgres::connect(&self.state, "state database").await?);
        }
        Ok(g)
    }

    /// Records failed and deferred rows (one statement; the same key twice in a
    /// batch is recorded once).
    async fn record(&self, failed: &[Failed]) -> Result<()> {
        if failed.is_empty() {
            return Ok(());
        }
        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        let mut dead = 0u64;
        for f in failed {
            if !seen.insert((f.enricher, f.table.as_str(), f.key.clone())) {
                continue;
            }
            dead += u64::from(!f.delivered);
            let en = &self.enrichers[f.enricher];
            rows.push(serde_json::json!({
                "e": en.cfg.name, "t": f.table, "k": f.key, "d": f.delivered, "p": en.kind.replays(), "r": f.reason,
            }));
        }
        self.metrics.enrich_failed_rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
        self.metrics.enrich_dead_letters.fetch_add(dead, Ordering::Relaxed);
        let g = self.state().await?;
        g.as_ref()
            .expect("connected")
            .execute(
                "INSERT INTO sluice.enrich_failures (pipeline, enricher, table_name, key, delivered, replay, reason)
                 SELECT $1, x.e, x.t, ARRAY(SELECT jsonb_array_elements_text(x.k)), x.d, x.p, x.r
                 FROM jsonb_to_recordset($2::text::jsonb) AS x(e text, t text, k jsonb, d bool, p bool, r text)
                 ON CONFLICT (pipeline, enricher, table_name, key) DO UPDATE SET
                    delivered = excluded.delivered, reason = excluded.reason,
                    attempts = sluice.enrich_failures.attempts + 1, last_failed_at = now()",
                &[&self.pipeline, &serde_json::Value::Array(rows).to_string()],
            )
            .await
            .context("recording enrichment failures")?;
        self.pending.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Turns recorded failures into re-enrichment requests once their enricher
    /// answers again (breaker closed or half-open), at most every second per
    /// enricher, backing off while it keeps failing.
    pub(crate) async fn replay(&self) -> Result<()> {
        if !self.pending.load(Ordering::Relaxed) {
            return Ok(());
        }
        {
            let mut looked = self.looked.lock().expect("looked lock");
            if looked.elapsed() < Duration::from_millis(500) {
                return Ok(());
            }
            *looked = tokio::time::Instant::now();
        }
        let mut g = self.state().await?;
        let c = g.as_mut().expect("connected");
        let groups = c
            .query(
                "SELECT enricher, table_name FROM sluice.enrich_failures WHERE pipeline = $1 AND replay GROUP BY 1, 2",
                &[&self.pipeline],
            )
            .await
            .context("reading enrichment failures")?;
        if groups.is_empty() {
            self.pending.store(false, Ordering::Relaxed);
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        for r in groups {
            let (name, table): (String, String) = (r.get(0), r.get(1));
            let Some(en) = self.enrichers.iter().find(|e| e.cfg.name == name) else { continue };
            let Some(plan) =
                self.plans.lock().expect("plans lock").values().find(|(_, p)| p.source.name.to_string() == table).map(|(_, p)| p.clone())
            else {
                continue;
            };
            {
                let mut next = en.next_replay.lock().expect("replay lock");
                if now < next.0 || en.breaker().is_some_and(|b| !b.allows()) {
                    continue;
                }
                let failing = en.breaker().is_some_and(cache::Breaker::failing);
                next.1 = if failing { (next.1 * 2).min(Duration::from_secs(30)) } else { Duration::from_secs(1) };
                next.0 = now + next.1;
            }
            let keys: Vec<String> = plan.keys.iter().map(|&i| quote_ident(&plan.source.columns[i].name)).collect();
            let tx = c.transaction().await.context("replaying enrichment failures")?;
            let rows = tx
                .query(
                    "DELETE FROM sluice.enrich_failures WHERE ctid IN (
                        SELECT ctid FROM sluice.enrich_failures WHERE pipeline = $1 AND enricher = $2 AND table_name = $3 AND replay
                        ORDER BY key LIMIT $4 FOR UPDATE)
                     RETURNING key",
                    &[&self.pipeline, &name, &table, &REPLAY_KEYS],
                )
                .await
                .context("taking enrichment failures for a replay")?;
            let tuples: Vec<String> = rows
                .iter()
                .map(|r| {
                    let k: Vec<String> = r.get(0);
                    format!("({})", k.iter().map(|v| literal(v)).collect::<Vec<_>>().join(", "))
                })
                .collect();
            if tuples.is_empty() {
                continue;
            }
            let filter = format!("({}) IN ({})", keys.join(", "), tuples.join(", "));
            let id = crate::resync::now_us();
            tx.execute(
                "INSERT INTO sluice.resyncs (pipeline, id, table_name, filter, reason) VALUES ($1, $2, $3, $4, $5)",
                &[&self.pipeline, &id, &table, &filter, &format!("enrich:{name} replay")],
            )
            .await
            .context("requesting a replay of enrichment failures")?;
            tx.commit().await.context("replaying enrichment failures")?;
            self.requested.store(true, Ordering::Relaxed);
            tracing::info!(enricher = %name, table = %table, rows = tuples.len(), "re-enriching failed or deferred rows");
        }
        Ok(())
    }

    /// Whether resync requests were written since the last call.
    pub(crate) fn take_requested(&self) -> bool {
        self.requested.swap(false, Ordering::Relaxed)
    }

    /// Asks for a re-enrichment of every row of the tables an enricher applies to
    /// when its definition changed, or when it is new to a pipeline whose sink already
    /// holds rows. Records the definitions seen.
    pub(crate) async fn check_versions(&self, had_progress: bool) -> Result<()> {
        let mut g = self.state().await?;
        let c = g.as_mut().expect("connected");
        let tx = c.transaction().await.context("checking enricher versions")?;
        for en in &self.enrichers {
            let stored: Option<String> = tx
                .query_opt(
                    "SELECT fingerprint FROM sluice.enrich_versions WHERE pipeline = $1 AND enricher = $2",
                    &[&self.pipeline, &en.cfg.name],
                )
                .await
                .context("reading enricher versions")?
                .map(|r| r.get(0));
            let changed = match &stored {
                Some(f) => *f != en.fingerprint,
                None => had_progress,
            };
            if changed {
                let id = crate::resync::now_us();
                let mut tables: Vec<&TableName> = self.sink_tables.iter().filter(|t| en.applies(t)).collect();
                tables.sort();
                for t in tables {
                    tx.execute(
                        "INSERT INTO sluice.resyncs (pipeline, id, table_name, reason) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        &[&self.pipeline, &id, &t.to_string(), &format!("enrich:{} changed", en.cfg.name)],
                    )
                    .await
                    .context("requesting a re-enrichment")?;
                }
                tracing::info!(enricher = %en.cfg.name, "enricher is new or changed: re-enriching the rows already delivered");
            }
            tx.execute(
                "INSERT INTO sluice.enrich_versions (pipeline, enricher, fingerprint) VALUES ($1, $2, $3)
                 ON CONFLICT (pipeline, enricher) DO UPDATE SET fingerprint = excluded.fingerprint",
                &[&self.pipeline, &en.cfg.name, &en.fingerprint],
            )
            .await
            .context("recording enricher versions")?;
        }
        tx.commit().await.context("recording enricher versions")?;
        Ok(())
    }
}

/// A pipeline's enrichment as its state database records it: failed or deferred rows
/// waiting for a replay (grouped by enricher and table), and the latest
/// re-enrichments with their progress.
pub async fn report(state: &Client, pipeline: &str) -> Result<serde_json::Value> {
    let exists: bool =
        state.query_one("SELECT to_regclass('sluice.enrich_failures') IS NOT NULL", &[]).await.context("reading enrichment state")?.get(0);
    if !exists {
        return Ok(serde_json::json!({ "failures": [], "re_enrichments": [] }));
    }
    let failures = state
        .query(
            "SELECT enricher, table_name, count(*)::int8, (count(*) FILTER (WHERE NOT delivered))::int8, max(attempts),
                    max(last_failed_at)::text, (array_agg(reason ORDER BY last_failed_at DESC))[1]
             FROM sluice.enrich_failures WHERE pipeline = $1 GROUP BY 1, 2 ORDER BY 1, 2",
            &[&pipeline],
        )
        .await
        .context("reading enrichment failures")?;
    let runs = state
        .query(
            "SELECT id, table_name, reason, rows, chunks, done, requested_at::text, finished_at::text FROM sluice.resyncs
             WHERE pipeline = $1 AND reason LIKE 'enrich:%' ORDER BY id DESC, table_name LIMIT 20",
            &[&pipeline],
        )
        .await
        .context("reading re-enrichments")?;
    Ok(serde_json::json!({
        "failures": failures.iter().map(|r| serde_json::json!({
            "enricher": r.get::<_, String>(0), "table": r.get::<_, String>(1), "rows": r.get::<_, i64>(2),
            "held_back": r.get::<_, i64>(3), "max_attempts": r.get::<_, i32>(4), "last_failed_at": r.get::<_, String>(5),
            "last_reason": r.get::<_, String>(6),
        })).collect::<Vec<_>>(),
        "re_enrichments": runs.iter().map(|r| serde_json::json!({
            "id": r.get::<_, i64>(0), "table": r.get::<_, String>(1), "reason": r.get::<_, Option<String>>(2),
            "rows": r.get::<_, i64>(3), "chunks": r.get::<_, i32>(4), "done": r.get::<_, bool>(5),
            "requested_at": r.get::<_, String>(6), "finished_at": r.get::<_, Option<String>>(7),
        })).collect::<Vec<_>>(),
    }))
}

fn text(d: &Datum) -> String {
    d.as_text().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default()
}

struct SnapshotEnrich {
    enrichment: Arc<Enrichment>,
    plan: Arc<Plan>,
}

impl RowEnrich for SnapshotEnrich {
    fn output(&self) -> &Arc<TableSchema> {
        &self.plan.output
    }

    fn enrich(&self, rows: Vec<Row>) -> BoxFuture<'_, Result<Vec<Row>, PgError>> {
        Box::pin(async move {
            let mut work: Vec<Work> =
                rows.into_iter().map(|row| Work { plan: self.plan.clone(), row, missing: Vec::new(), dead: None, now: true }).collect();
            let failed = self.enrichment.run(&mut work).await;
            self.enrichment
                .record(&failed)
                .await
                .map_err(|e| PgError::transient(format!("snapshot of {}: {e:#}", self.plan.source.name)))?;
            Ok(work.into_iter().filter(|w| w.dead.is_none()).map(|w| w.row).collect())
        })
    }
}
