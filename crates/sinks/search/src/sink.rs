//! The search sink: documents built from the source (root row + related rows) and sent
//! with `_bulk` to Elasticsearch, OpenSearch or Sluice's own search service.
//!
//! A change never carries a whole document, so documents are rebuilt: each batch of
//! transactions names the root ids it affects (reverse dependencies), those documents are
//! read from the source in one statement (`= ANY($1)`), and indexed with
//! `version_type=external` and the batch's commit LSN as version. Reads see the current
//! source state (never older than the change), and versions only grow, so replays and
//! retries never regress a document: a 409 means a newer version is already there.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sluice_core::{Op, Transaction};
use tokio_postgres::Client;

use crate::document::DocumentPlan;
use crate::error::SearchError;
use sluice_core::ddl::SchemaChangeKind;
use sluice_core::sink::{LoadProgress, Sink, SinkError, SinkResult, SnapshotMethod};
use sluice_core::{TableName, TableSchema};

type Result<T, E = SearchError> = std::result::Result<T, E>;

/// Where documents go and how they are sent.
#[derive(Clone, Debug)]
pub struct SearchSinkOptions {
    /// Base URL of the search service (`http://host:9200`).
    pub url: String,
    pub index: String,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub api_key: Option<SecretString>,
    /// The authority of an https service's certificate (PEM), when not a public one.
    pub ca_file: Option<std::path::PathBuf>,
    pub ca_pem: Option<String>,
    /// Documents per `_bulk` request.
    pub bulk_max_docs: usize,
    /// Bytes per `_bulk` request body (a request is cut before it grows past this).
    pub bulk_max_bytes: usize,
    /// `_bulk` requests of a full load sent before the first is answered.
    pub max_in_flight_requests: usize,
    /// Names this pipeline's rows in the state tables.
    pub pipeline: String,
}

/// How many of the 32-bit transaction ids `$1` the current snapshot does not show yet
/// (each widened to its 64-bit form with the epoch of the snapshot's xmax).
const UNSEEN_XIDS: &str = "
WITH s AS (SELECT pg_current_snapshot() AS snap, pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS xmax)
SELECT count(*) FROM s, unnest($1::int8[]) AS x
WHERE NOT pg_visible_in_snapshot(
    ((((s.xmax >> 32) - CASE WHEN x > (s.xmax & 4294967295) THEN 1 ELSE 0 END) << 32) | x)::text::xid8, s.snap)";

enum BulkOp {
    Index { id: String, version: u64, doc: String },
    Delete { id: String, version: u64 },
}

impl BulkOp {
    fn id(&self) -> &str {
        match self {
            BulkOp::Index { id, .. } | BulkOp::Delete { id, .. } => id,
        }
    }
}

pub struct SearchSink {
    opts: SearchSinkOptions,
    plan: Arc<DocumentPlan>,
    http: reqwest::Client,
    source: Client,
    state: Client,
}

const RETRY_ATTEMPTS: u32 = 8;

impl SearchSink {
    /// Connects and checks that the search service answers; writes nothing (so
    /// `sluice check` can call it).
    /// `egress`: where the HTTP client may connect (none: anywhere).
    pub async fn connect(
        opts: SearchSinkOptions,
        egress: Option<&Arc<sluice_core::egress::Egress>>,
        plan: Arc<DocumentPlan>,
        source: Client,
        state: Client,
    ) -> Result<SearchSink> {
        let http = sluice_core::https::client(opts.ca_file.as_deref(), opts.ca_pem.as_deref(), "sink.search.ca_file")
            .and_then(|b| sluice_core::egress::guard_http(b, &opts.url, egress))
            .map_err(SearchError::permanent)?
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| SearchError::permanent(format!("search sink: HTTP client: {e}")))?;
        let sink = SearchSink { opts, plan, http, source, state };
        let resp = sink.request(reqwest::Method::GET, "/").send().await.map_err(|e| {
            match sluice_core::https::certificate_refused(&sink.opts.url, &e, "sink.search.ca_file") {
                Some(line) => SearchError::permanent(line),
                None => SearchError::transient(format!(
                    "search service at {} does not answer: {e}: check sink.search.url and that the service runs",
                    sink.opts.url
                )),
            }
        })?;
        match resp.status().as_u16() {
            200..=299 => Ok(sink),
            401 | 403 => Err(SearchError::permanent(format!(
                "search service at {} refused the credentials ({}): check sink.search.username/password",
                sink.opts.url,
                resp.status()
            ))),
            s => Err(SearchError::transient(format!("search service at {} answered {s} to GET /", sink.opts.url))),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{}", self.opts.url.trim_end_matches('/'), path);
        let mut r = self.http.request(method, url);
        if let Some(user) = &self.opts.username {
            r = r.basic_auth(user, self.opts.password.as_ref().map(|p| p.expose_secret().to_owned()));
        }
        if let Some(key) = &self.opts.api_key {
            r = r.header(reqwest::header::AUTHORIZATION, format!("ApiKey {}", key.expose_secret()));
        }
        r
    }

    /// Creates the index, with the mapping derived from the document, when it is missing.
    pub async fn prepare_index(&self) -> Result<()> {
        let index = &self.opts.index;
        let head = self
            .request(reqwest::Method::HEAD, &format!("/{index}"))
            .send()
            .await
            .map_err(|e| SearchError::transient(format!("search service: HEAD /{index}: {e}")))?;
        if head.status().is_success() {
            return Ok(());
        }
        let body = json!({"mappings": self.plan.mapping()});
        let resp = self
            .request(reqwest::Method::PUT, &format!("/{index}"))
            .json(&body)
            .send()
            .await
            .map_err(|e| SearchError::transient(format!("search service: creating index {index}: {e}")))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() || text.contains("resource_already_exists_exception") {
            tracing::info!(index = %index, "search index ready");
            return Ok(());
        }
        let err = if status.is_server_error() { SearchError::transient } else { SearchError::permanent };
        Err(err(format!("search service refused to create index {index} ({status}): {text}")))
    }

    /// Whether the initial load ran (at least partly) before.
    pub async fn has_progress(&self) -> Result<bool> {
        let row = self
            .state
            .query_opt(
                "SELECT 1 FROM sluice.search_loads WHERE pipeline = $1 AND index_name = $2",
                &[&self.opts.pipeline, &self.opts.index],
            )
            .await
            .map_err(|e| SearchError::pg("reading the search load state", e))?;
        Ok(row.is_some())
    }

    /// Builds and indexes every document, page by page of root keys, resuming after the
    /// last page indexed; `progress` gets the number of documents of each page.
    pub async fn initial_load(&self, version: u64, progress: impl Fn(u64)) -> Result<()> {
        let (p, ix) = (&self.opts.pipeline, &self.opts.index);
        let row = self
            .state
            .query_opt("SELECT last_key, done FROM sluice.search_loads WHERE pipeline = $1 AND index_name = $2", &[p, ix])
            .await
            .map_err(|e| SearchError::pg("reading the search load state", e))?;
        let last: Option<String> = match row {
            Some(r) if r.get::<_, bool>(1) => return Ok(()),
            Some(r) => r.get(0),
            None => None,
        };
        let progress = &progress;
        let last = self
            .load_pages(last, version, |key, n| async move {
                self.state
                    .execute(
                        "INSERT INTO sluice.search_loads (pipeline, index_name, last_key) VALUES ($1, $2, $3)
                         ON CONFLICT (pipeline, index_name) DO UPDATE SET last_key = EXCLUDED.last_key",
                        &[p, ix, &key],
                    )
                    .await
                    .map_err(|e| SearchError::pg("saving the search load state", e))?;
                progress(n);
                Ok(())
            })
            .await?;
        self.state
            .execute(
                "INSERT INTO sluice.search_loads (pipeline, index_name, last_key, done) VALUES ($1, $2, $3, true)
                 ON CONFLICT (pipeline, index_name) DO UPDATE SET done = true",
                &[p, ix, &last],
            )
            .await
            .map_err(|e| SearchError::pg("saving the search load state", e))?;
        Ok(())
    }

    fn finish(&self, doc: String) -> Result<String> {
        let v: Value =
            serde_json::from_str(&doc).map_err(|e| SearchError::permanent(format!("document from the source is not JSON: {e}")))?;
        Ok(self.plan.finish(v).to_string())
    }

    /// Rebuilds the documents a batch of transactions affects; returns once the search
    /// service acknowledged them (or dead-lettered the ones it refuses).
    pub async fn apply(&mut self, batch: &[Transaction]) -> Result<()> {
        let Some(last) = batch.last() else { return Ok(()) };
        let version = last.commit_lsn.0;
        let mut direct = Vec::new();
        let mut queries: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut everything = false;
        for t in batch {
            // A column of a table documents are built from was added, dropped, renamed
            // or retyped: every document changes shape, also those no row change will
            // touch, so all are built again (a change that breaks the document's SQL
            // fails here, and the pipeline halts naming the statement).
            everything |= t.ddl.iter().any(|c| matches!(c.kind, SchemaChangeKind::Columns { .. }) && self.plan.involves(&c.table));
            for e in &t.events {
                if e.op == Op::Truncate {
                    if self.plan.is_root(&e.table.name) {
                        return Err(SearchError::permanent(format!(
                            "TRUNCATE of the document root {}: the search sink cannot tell which documents to delete; delete index {} and the row of sluice.search_loads for pipeline {}, then restart to rebuild it",
                            e.table.name, self.opts.index, self.opts.pipeline
                        )));
                    }
                    everything = true;
                    continue;
                }
                self.plan.affected(e, &mut direct, &mut queries);
            }
        }
        if !everything && direct.is_empty() && queries.is_empty() {
            return Ok(());
        }
        // Read the source in a snapshot that sees every transaction of the batch: see
        // `begin_read`. Documents are built first and sent after the snapshot is released
        // (a full rebuild after a TRUNCATE sends page by page inside it).
        // A resync's chunk (xid 0) is no source transaction: nothing to wait for.
        let xids: Vec<i64> = batch.iter().filter(|t| t.xid != 0).map(|t| i64::from(t.xid)).collect();
        self.begin_read(&xids).await?;
        let built = async {
            if everything {
                return self.rebuild_all(version).await.map(|()| Vec::new());
            }
            for (sql, keys) in queries {
                let rows =
                    self.source.query(&sql, &[&keys]).await.map_err(|e| SearchError::pg("finding the documents a change affects", e))?;
                direct.extend(rows.iter().map(|r| r.get::<_, String>(0)));
            }
            let mut seen = HashSet::with_capacity(direct.len());
            direct.retain(|id| seen.insert(id.clone()));
            let mut ops = Vec::with_capacity(direct.len());
            for chunk in direct.chunks(self.opts.bulk_max_docs.max(1)) {
                ops.extend(self.build(chunk, version).await?);
            }
            Ok(ops)
        }
        .await;
        let ended = self.source.batch_execute(if built.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
        let ops = built?;
        ended.map_err(|e| SearchError::pg("ending the read of the source", e))?;
        self.bulk(ops).await
    }

    /// Opens a read-only repeatable-read transaction on the source whose snapshot sees
    /// every transaction in `xids`. A transaction's commit record reaches logical
    /// decoding once it is flushed, a moment before the committing backend makes it
    /// visible to other sessions; a document read in that moment would miss the change
    /// and still carry the change's LSN as its version, and no replay could fix it.
    async fn begin_read(&self, xids: &[i64]) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            self.source
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|e| SearchError::pg("reading the source", e))?;
            let unseen: i64 = self
                .source
                .query_one(UNSEEN_XIDS, &[&xids])
                .await
                .map_err(|e| SearchError::pg("checking that the source shows the batch", e))?
                .get(0);
            if unseen == 0 {
                return Ok(());
            }
            self.source.batch_execute("ROLLBACK").await.map_err(|e| SearchError::pg("reading the source", e))?;
            if std::time::Instant::now() > deadline {
                return Err(SearchError::transient(format!("{unseen} committed source transactions are still not visible after 30 s")));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The documents of root `ids`, built from the source; a root id that names no row
    /// any more becomes a delete.
    async fn build(&self, ids: &[String], version: u64) -> Result<Vec<BulkOp>> {
        let rows = self
            .source
            .query(self.plan.build_sql(), &[&ids])
            .await
            .map_err(|e| SearchError::pg(&format!("building documents from {}", self.plan.root), e))?;
        let mut built: std::collections::HashMap<String, String> = std::collections::HashMap::with_capacity(rows.len());
        for r in rows {
            built.insert(r.get(0), r.get(1));
        }
        let mut ops = Vec::with_capacity(ids.len());
        for id in ids {
            ops.push(match built.remove(id) {
                Some(doc) => BulkOp::Index { id: id.clone(), version, doc: self.finish(doc)? },
                None => BulkOp::Delete { id: id.clone(), version },
            });
        }
        Ok(ops)
    }

    /// After a TRUNCATE of a related table: every document again, with the new version.
    async fn rebuild_all(&self, version: u64) -> Result<()> {
        self.load_pages(None, version, |_, _| async { Ok(()) }).await?;
        Ok(())
    }

    /// Every document after root key `after`, page by page: the next page is built in
    /// the source while up to `max_in_flight_requests` pages are being indexed. `acked`
    /// gets each page's last key and size once it and every page before it are
    /// acknowledged, so a saved key never runs ahead of a page still in flight. Returns
    /// the last key.
    async fn load_pages<F, Fut>(&self, mut after: Option<String>, version: u64, mut acked: F) -> Result<Option<String>>
    where
        F: FnMut(String, u64) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        use futures::StreamExt as _;
        let mut in_flight = futures::stream::FuturesOrdered::new();
        loop {
            let page = {
                let next = self.page(&after, version);
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        page = &mut next => break page?,
                        Some(done) = in_flight.next() => {
                            let (key, n) = done?;
                            acked(key, n).await?;
                        }
                    }
                }
            };
            let Some((ops, key)) = page else { break };
            after = Some(key.clone());
            let n = ops.len() as u64;
            in_flight.push_back(async move { self.bulk(ops).await.map(|()| (key, n)) });
            while in_flight.len() >= self.opts.max_in_flight_requests {
                let (key, n) = in_flight.next().await.expect("not empty")?;
                acked(key, n).await?;
            }
        }
        while let Some(done) = in_flight.next().await {
            let (key, n) = done?;
            acked(key, n).await?;
        }
        Ok(after)
    }

    /// The documents of the next `bulk_max_docs` root keys after `after`, with the last
    /// key; `None` past the last root row.
    async fn page(&self, after: &Option<String>, version: u64) -> Result<Option<(Vec<BulkOp>, String)>> {
        let rows = self
            .source
            .query(self.plan.page_sql(), &[after, &(self.opts.bulk_max_docs as i64)])
            .await
            .map_err(|e| SearchError::pg(&format!("building documents from {}", self.plan.root), e))?;
        let Some(last) = rows.last().map(|r| r.get::<_, String>(0)) else { return Ok(None) };
        let mut ops = Vec::with_capacity(rows.len());
        for r in &rows {
            ops.push(BulkOp::Index { id: r.get(0), version, doc: self.finish(r.get(1))? });
        }
        Ok(Some((ops, last)))
    }

    /// Sends `ops` in `_bulk` requests of at most `bulk_max_docs` documents and
    /// `bulk_max_bytes` bytes each.
    async fn bulk(&self, ops: Vec<BulkOp>) -> Result<()> {
        let mut part = Vec::new();
        let mut bytes = 0usize;
        for op in ops {
            let size = 128 + op.id().len() + if let BulkOp::Index { doc, .. } = &op { doc.len() } else { 0 };
            if !part.is_empty() && (bytes + size > self.opts.bulk_max_bytes || part.len() >= self.opts.bulk_max_docs) {
                self.bulk_request(std::mem::take(&mut part)).await?;
                bytes = 0;
            }
            bytes += size;
            part.push(op);
        }
        if part.is_empty() { Ok(()) } else { self.bulk_request(part).await }
    }

    /// One `_bulk` request; retries the whole request or the items that failed with
    /// 429/5xx (backoff, capped); refused items go to the dead-letter table.
    async fn bulk_request(&self, mut ops: Vec<BulkOp>) -> Result<()> {
        let index = &self.opts.index;
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=RETRY_ATTEMPTS {
            let mut body = String::with_capacity(ops.len() * 512);
            for op in &ops {
                let (action, doc) = match op {
                    BulkOp::Index { id, version, doc } => ("index", Some((id, version, doc))),
                    BulkOp::Delete { .. } => ("delete", None),
                };
                let (id, version) = match op {
                    BulkOp::Index { id, version, .. } | BulkOp::Delete { id, version } => (id, version),
                };
                body.push_str(&json!({action: {"_index": index, "_id": id, "version": version, "version_type": "external"}}).to_string());
                body.push('\n');
                if let Some((_, _, doc)) = doc {
                    body.push_str(doc);
                    body.push('\n');
                }
            }
            let sent = self.request(reqwest::Method::POST, "/_bulk").header("content-type", "application/x-ndjson").body(body).send().await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "search bulk request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let status = resp.status();
            if status.as_u16() == 429 || status.is_server_error() {
                tracing::warn!(attempt, %status, "search service busy or failing; retrying the bulk request");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            let text = resp.text().await.map_err(|e| SearchError::transient(format!("search bulk response: {e}")))?;
            if status.as_u16() == 413 {
                return Err(SearchError::permanent(format!(
                    "search service refused a {} byte bulk request as too large (413): lower sink.search.bulk_max_bytes",
                    ops.iter().map(|o| if let BulkOp::Index { doc, .. } = o { doc.len() } else { 0 }).sum::<usize>()
                )));
            }
            if !status.is_success() {
                return Err(SearchError::permanent(format!("search service refused the bulk request ({status}): {text}")));
            }
            let v: Value =
                serde_json::from_str(&text).map_err(|e| SearchError::transient(format!("search bulk response is not JSON: {e}")))?;
            let items =
                v.get("items").and_then(Value::as_array).ok_or_else(|| SearchError::transient("search bulk response has no items"))?;
            if items.len() != ops.len() {
                return Err(SearchError::transient(format!("search bulk response has {} items for {} operations", items.len(), ops.len())));
            }
            let mut retry = Vec::new();
            let mut dead = Vec::new();
            for (op, item) in ops.into_iter().zip(items) {
                let result = item.as_object().and_then(|o| o.values().next()).cloned().unwrap_or(Value::Null);
                let code = result.get("status").and_then(Value::as_u64).unwrap_or(500);
                match code {
                    200..=299 => {}
                    // Deleting a document that is not there, or a newer version already indexed.
                    404 if matches!(op, BulkOp::Delete { .. }) => {}
                    409 => {}
                    429 | 500..=599 => retry.push(op),
                    _ => {
                        let err = result.get("error").cloned().unwrap_or(Value::Null);
                        let reason = format!(
                            "{}: {}",
                            err.get("type").and_then(Value::as_str).unwrap_or("error"),
                            err.get("reason").and_then(Value::as_str).unwrap_or("")
                        );
                        dead.push((op, code, reason));
                    }
                }
            }
            if !dead.is_empty() {
                self.dead_letter(dead).await?;
            }
            if retry.is_empty() {
                return Ok(());
            }
            tracing::warn!(attempt, items = retry.len(), "search service rejected items for now; retrying them");
            ops = retry;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        Err(SearchError::transient(format!(
            "search service at {} did not accept the bulk request after {RETRY_ATTEMPTS} attempts",
            self.opts.url
        )))
    }

    async fn dead_letter(&self, dead: Vec<(BulkOp, u64, String)>) -> Result<()> {
        let n = dead.len();
        let (mut ids, mut versions, mut statuses, mut reasons, mut docs) = (vec![], vec![], vec![], vec![], vec![]);
        for (op, status, reason) in dead {
            ids.push(op.id().to_owned());
            statuses.push(status as i32);
            reasons.push(reason);
            match op {
                BulkOp::Index { version, doc, .. } => {
                    versions.push(version as i64);
                    docs.push(Some(doc));
                }
                BulkOp::Delete { version, .. } => {
                    versions.push(version as i64);
                    docs.push(None);
                }
            }
        }
        self.state
            .execute(
                "INSERT INTO sluice.search_dead_letters (pipeline, index_name, doc_id, version, status, reason, document)
                 SELECT $1, $2, * FROM unnest($3::text[], $4::int8[], $5::int4[], $6::text[], $7::text[])",
                &[&self.opts.pipeline, &self.opts.index, &ids, &versions, &statuses, &reasons, &docs],
            )
            .await
            .map_err(|e| SearchError::pg("writing to sluice.search_dead_letters", e))?;
        // Ids and documents are row data: they stay in the table, out of the logs.
        tracing::error!(documents = n, index = %self.opts.index, "search service refused documents; they are in sluice.search_dead_letters with the reason");
        Ok(())
    }
}

/// At least once, idempotent by versions: the slot's confirmed position is the only
/// checkpoint; the initial load is the sink's own (documents built by SQL).
impl Sink for SearchSink {
    /// An index holds one document per key.
    fn keeps_rows_by_key(&self) -> bool {
        true
    }

    fn snapshot_method(&self) -> SnapshotMethod {
        SnapshotMethod::Load
    }

    async fn prepare(&mut self, _tables: &[Arc<TableSchema>]) -> SinkResult<()> {
        self.prepare_index().await.map_err(to_sink)
    }

    async fn has_progress(&self) -> SinkResult<bool> {
        SearchSink::has_progress(self).await.map_err(to_sink)
    }

    async fn load<'a>(&'a self, version: u64, progress: &'a dyn LoadProgress) -> SinkResult<()> {
        let root = &self.plan.root;
        if let Ok(r) = self
            .source
            .query_one("SELECT GREATEST(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::text::regclass", &[&root.quoted()])
            .await
        {
            progress.estimated(r.get::<_, i64>(0) as u64);
        }
        self.initial_load(version, |n| progress.loaded(n))
            .await
            .map_err(|e| SinkError::new(e.kind(), format!("initial load into the search index: {e}")))
    }

    async fn apply(&mut self, batch: &[sluice_core::Transaction]) -> SinkResult<()> {
        SearchSink::apply(self, batch).await.map_err(to_sink)
    }

    async fn teardown(&self, _tables: &[TableName], purge: bool) -> SinkResult<()> {
        if !purge {
            return Ok(());
        }
        let index = &self.opts.index;
        let resp = self
            .request(reqwest::Method::DELETE, &format!("/{index}"))
            .send()
            .await
            .map_err(|e| SinkError::transient(format!("deleting index {index}: {e}")))?;
        if !(resp.status().is_success() || resp.status() == reqwest::StatusCode::NOT_FOUND) {
            return Err(SinkError::transient(format!("deleting index {index}: HTTP {}", resp.status())));
        }
        Ok(())
    }

    async fn health(&self) -> SinkResult<()> {
        let resp = self
            .request(reqwest::Method::GET, "/")
            .send()
            .await
            .map_err(|e| SinkError::transient(format!("search service at {} does not answer: {e}", self.opts.url)))?;
        if resp.status().is_success() { Ok(()) } else { Err(SinkError::transient(format!("search service answered {}", resp.status()))) }
    }
}

fn to_sink(e: SearchError) -> SinkError {
    SinkError::wrap(e.kind(), e)
}
