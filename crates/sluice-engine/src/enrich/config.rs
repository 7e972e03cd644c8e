//! Enrichers as a pipeline file lists them (`enrich:`), checked without I/O.

use super::*;

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

pub(super) fn d_ttl() -> Duration {
    Duration::from_secs(60)
}
pub(super) fn d_cache() -> usize {
    100_000
}
pub(super) fn d_retries() -> u32 {
    3
}
pub(super) fn d_backoff() -> Duration {
    Duration::from_millis(100)
}
pub(super) fn d_breaker() -> u32 {
    5
}
pub(super) fn d_open() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn d_timeout() -> Duration {
    Duration::from_secs(2)
}
pub(super) fn d_batch() -> usize {
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
    /// PEM file of the authority that signed an https endpoint's certificate (without
    /// it, the system's trusted authorities).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The same authority as PEM text, in place of `ca_file` (tenants give it so).
    #[serde(default)]
    pub ca_pem: Option<String>,
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

pub(super) fn dummy_conn() -> PgConnConfig {
    PgConnConfig::new("", 5432, "", SecretString::from(""), "")
}
