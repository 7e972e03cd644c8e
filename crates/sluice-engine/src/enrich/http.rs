//! HTTP enrichment: a team's own service, called with batched POSTs.
//!
//! Request: `POST <url>` with `{"keys": ["k1", "k2", ...]}` (the values of the event's
//! `key` column, as text). Answer: `200` with `{"results": {"k1": {"field": value,
//! ...}, "k2": null}}`; a key that is absent or null has no data (its fields are
//! NULL). Any other answer, a timeout or a refused connection is a failure: retried
//! with backoff, counted by the circuit breaker, then handled by the enricher's
//! failure policy.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use secrecy::ExposeSecret as _;
use sluice_core::{ColumnSchema, Datum, PgType};

use super::cache::{Breaker, Cache, Found};
use super::{FieldType, HttpConfig};

pub(crate) struct Http {
    url: String,
    pub(crate) key: String,
    fields: Vec<(String, FieldType)>,
    pub(crate) prefix: String,
    headers: Vec<(String, String)>,
    client: reqwest::Client,
    max_batch: usize,
    retries: u32,
    backoff: Duration,
    pub(crate) cache: Cache,
    pub(crate) breaker: Breaker,
}

impl FieldType {
    fn column(self, name: String) -> ColumnSchema {
        let (type_name, pg_type, oid) = match self {
            FieldType::String => ("text", PgType::Text, 25),
            FieldType::Int => ("bigint", PgType::Int8, 20),
            FieldType::Float => ("double precision", PgType::Float8, 701),
            FieldType::Bool => ("boolean", PgType::Bool, 16),
            FieldType::Json => ("jsonb", PgType::Jsonb, 3802),
        };
        ColumnSchema::added(name, type_name, pg_type, oid)
    }

    /// A JSON value as the column's text, or why it does not fit.
    fn text(self, v: &serde_json::Value) -> Result<Option<String>, String> {
        use serde_json::Value as J;
        Ok(Some(match (self, v) {
            (_, J::Null) => return Ok(None),
            (FieldType::Json, v) => v.to_string(),
            (FieldType::String, J::String(s)) => s.clone(),
            (FieldType::String, v) => v.to_string(),
            (FieldType::Int, J::Number(n)) if n.is_i64() => n.to_string(),
            (FieldType::Float, J::Number(n)) => n.to_string(),
            (FieldType::Bool, J::Bool(b)) => if *b { "t" } else { "f" }.to_string(),
            (t, v) => return Err(format!("{v} is not {}", t.name())),
        }))
    }

    fn name(self) -> &'static str {
        match self {
            FieldType::String => "a string",
            FieldType::Int => "an integer",
            FieldType::Float => "a number",
            FieldType::Bool => "a boolean",
            FieldType::Json => "json",
        }
    }
}

impl Http {
    pub(crate) fn new(name: &str, cfg: &HttpConfig, egress: Option<&std::sync::Arc<sluice_core::egress::Egress>>) -> Result<Self, String> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| format!("url {:?}: {e}", cfg.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url {:?}: use http:// or https://", cfg.url));
        }
        if cfg.fields.is_empty() {
            return Err("fields: name at least one field and its type".into());
        }
        sluice_core::https::check_private_ca(url.scheme() == "https", cfg.ca_file.as_deref(), cfg.ca_pem.as_deref(), "ca_file")?;
        let client = sluice_core::https::client(cfg.ca_file.as_deref(), cfg.ca_pem.as_deref(), "ca_file")?;
        let client = sluice_core::egress::guard_http(client, &cfg.url, egress)?
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self {
            url: cfg.url.clone(),
            key: cfg.key.clone(),
            fields: cfg.fields.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            prefix: cfg.prefix.clone().unwrap_or_else(|| format!("{name}_")),
            headers: cfg.headers.iter().map(|(k, v)| (k.clone(), v.expose_secret().to_string())).collect(),
            client,
            max_batch: cfg.max_batch.max(1),
            retries: cfg.retries,
            backoff: cfg.backoff,
            cache: Cache::new(cfg.cache_ttl, cfg.cache_max_entries),
            breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_open_for),
        })
    }

    pub(crate) fn columns(&self) -> Vec<ColumnSchema> {
        self.fields.iter().map(|(f, t)| t.column(format!("{}{f}", self.prefix))).collect()
    }

    /// Fields for `keys`, from the cache or the service, in requests of `max_batch`
    /// keys. Returns the answers and how many keys were fetched.
    pub(crate) async fn fetch(&self, keys: &[String]) -> Result<(HashMap<String, Found>, usize), String> {
        let (mut out, miss) = self.cache.get_many(keys);
        let fetched = miss.len();
        for part in miss.chunks(self.max_batch) {
            let found = self.breaker.call(&self.url, self.retries, self.backoff, || self.call(part)).await?;
            self.cache.put_many(&found);
            out.extend(found);
        }
        Ok((out, fetched))
    }

    async fn call(&self, keys: &[String]) -> Result<HashMap<String, Found>, String> {
        let mut req = self.client.post(&self.url).json(&serde_json::json!({ "keys": keys }));
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.map_err(|e| {
            sluice_core::https::certificate_refused(&self.url, &e, "the enricher's ca_file")
                .unwrap_or_else(|| format!("POST {}: {}", self.url, without_url(&e)))
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("POST {}: HTTP {status}", self.url));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            results: BTreeMap<String, Option<serde_json::Map<String, serde_json::Value>>>,
        }
        let answer: Answer = resp
            .json()
            .await
            .map_err(|e| format!("POST {}: the answer is not {{\"results\": {{key: {{field: value}}}}}}: {}", self.url, without_url(&e)))?;
        let mut found: HashMap<String, Found> = keys.iter().map(|k| (k.clone(), None)).collect();
        for (k, fields) in answer.results {
            let Some(fields) = fields else { continue };
            if !found.contains_key(&k) {
                continue; // a key nobody asked for
            }
            let mut vals = Vec::with_capacity(self.fields.len());
            for (f, t) in &self.fields {
                let v = fields
                    .get(f)
                    .map_or(Ok(None), |v| t.text(v))
                    .map_err(|m| format!("POST {}: field {f:?} of key {k:?}: {m}", self.url))?;
                vals.push(v.map_or(Datum::Null, |s| Datum::Text(s.into())));
            }
            found.insert(k, Some(vals));
        }
        Ok(found)
    }
}

/// reqwest's message without the URL it repeats (the caller names it once).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused or unreachable"
    } else if e.is_decode() {
        "bad body"
    } else {
        "request failed"
    };
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = src {
        detail = s.to_string();
        src = s.source();
    }
    if detail.is_empty() { kind.to_string() } else { format!("{kind} ({detail})") }
}
