//! Resync: re-reads chosen tables from the source while streaming goes on, and brings
//! the sink back in line with them (a sink someone edited by hand, a reference table
//! that must be re-delivered, a consumer that lost its topic).
//!
//! The method is DBLog's watermarks, as in Debezium's incremental snapshots. For each
//! chunk of the table (by primary key, `ORDER BY key LIMIT n` after the last key
//! done), the pipeline writes a low watermark into the WAL (a logical message), reads
//! the chunk, then writes a high watermark. The stream meets both in commit order.
//! Changes to the table that arrive between the two are applied as usual, and their
//! keys are taken out of the chunk: the stream holds their newest state. At the high
//! watermark the rest of the chunk goes to the sink as `r` events, in its place in
//! the stream, so no newer change is ever overwritten by an older read. A Postgres
//! sink without transforms also loses the rows in the chunk's key range that the
//! source no longer has.
//!
//! One gap remains in the method as written: a transaction whose commit record comes
//! before the low watermark may become visible to other sessions a moment after it
//! (the backend takes it out of the running set after writing the record). The chunk
//! read keeps the snapshot it used; at the high watermark, a chunk whose snapshot
//! did not see one of the transactions that came before the low watermark is read
//! again.
//!
//! Requests and progress live in `sluice.resyncs` in the pipeline's state database; a
//! chunk's progress is recorded after the sink took it, so a crash re-reads at most
//! the chunk in flight (its rows are upserts: reading them twice changes nothing in
//! a Postgres or search sink, and is at-least-once in Kafka).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sluice_core::key_of;
use sluice_core::{ChangeEvent, Datum, Lsn, Op, Row, SourcePosition, TableName, TableSchema, Transaction, quote_ident};
use sluice_postgres::PgConnConfig;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::metrics::Metrics;
use sluice_core::quote_literal as literal;

/// Transactions remembered for the visibility check at a high watermark; the ones
/// that matter committed a moment before the low watermark.
const RECENT_XIDS: usize = 1024;
/// How often an idle pipeline looks for requests anyway. A request from outside (the
/// CLI, the API) notifies `NOTIFY_CHANNEL` with the pipeline's name, and the
/// pipeline's own requests (re-enrichment) wake it directly, so this is a safety net
/// (a notification sent while the pipeline was reconnecting).
const POLL: Duration = Duration::from_secs(30);
/// Where `request` announces a new request (payload: the pipeline's name).
const NOTIFY_CHANNEL: &str = "sluice_resync";
/// A chunk whose high watermark has not come back by then is read again.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(120);

/// Refuses tables without a key (primary key or replica-identity index): a resync
/// reads a table in key order and must find its rows again.
pub async fn check_keys(source: &Client, tables: &[TableName], describe: &str) -> Result<(), String> {
    for t in tables {
        let schema = sluice_postgres::load_table(source, t, describe).await.map_err(|e| e.to_string())?;
        if !schema.has_key() {
            return Err(format!(
                "table {t} has no primary key: a resync reads tables in key order; add a primary key \
                 (or a unique index, with REPLICA IDENTITY USING INDEX) to resync it"
            ));
        }
    }
    Ok(())
}

/// One table of a resync request (idempotent: a request may be recorded twice).
const INSERT_REQUEST: &str = "INSERT INTO sluice.resyncs (pipeline, id, table_name) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

/// Asks the running pipeline to resync `tables`; `id` names the request (a workflow id).
/// Idempotent.
pub async fn request(state: &Client, pipeline: &str, id: i64, tables: &[TableName]) -> Result<()> {
    crate::state::migrate(state).await?;
    for t in tables {
        state.execute(INSERT_REQUEST, &[&pipeline, &id, &t.to_string()]).await.context("recording the resync request")?;
    }
    state.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &pipeline]).await.context("announcing the resync request")?;
    Ok(())
}

/// One table of a resync request, as far as it went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableProgress {
    pub table: String,
    pub chunks: i32,
    pub rows: i64,
    pub deleted: i64,
    pub done: bool,
}

pub async fn progress(state: &Client, pipeline: &str, id: i64) -> Result<Vec<TableProgress>> {
    let rows = state
        .query(
            "SELECT table_name, chunks, rows, deleted, done FROM sluice.resyncs WHERE pipeline = $1 AND id = $2 ORDER BY table_name",
            &[&pipeline, &id],
        )
        .await
        .context("reading resync progress")?;
    Ok(rows
        .iter()
        .map(|r| TableProgress { table: r.get(0), chunks: r.get(1), rows: r.get(2), deleted: r.get(3), done: r.get(4) })
        .collect())
}

/// Drops unfinished requests (the pipeline's tables changed, or it is being removed).
pub async fn cancel(state: &Client, pipeline: &str, id: i64) -> Result<()> {
    state
        .execute("DELETE FROM sluice.resyncs WHERE pipeline = $1 AND id = $2 AND NOT done", &[&pipeline, &id])
        .await
        .context("cancelling the resync")?;
    Ok(())
}

struct Request {
    id: i64,
    table: TableName,
    last_key: Option<Vec<String>>,
    /// Only these rows (a re-enrichment); stale rows are then not looked for.
    keys: Option<KeySet>,
}

/// Rows named by the values of some columns: what a limited resync reads again. Stored
/// as data and bound as parameters of the read, never pasted into SQL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct KeySet {
    pub columns: Vec<String>,
    /// One value per column, as Postgres prints it.
    pub rows: Vec<Vec<String>>,
}

impl KeySet {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a key set is JSON")
    }
}

/// What one chunk read found.
struct Fetched {
    schema: Arc<TableSchema>,
    rows: Vec<Row>,
    /// The snapshot the chunk was read in.
    snapshot: sluice_postgres::SnapshotXids,
}

struct Active {
    req: Request,
    mark: String,
    started: Instant,
    /// Transactions the stream delivered before the low watermark (`None` until it came).
    before_lo: Option<Vec<u32>>,
    /// Keys of the table's changes between the watermarks.
    window: HashSet<Vec<u8>>,
    task: Option<JoinHandle<Result<Fetched>>>,
    fetched: Option<Fetched>,
}

impl Active {
    /// The read's outcome, waiting for it if needed.
    async fn result(&mut self) -> Result<Fetched> {
        if let Some(f) = self.fetched.take() {
            return Ok(f);
        }
        match self.task.take() {
            Some(t) => t.await.map_err(|e| anyhow::anyhow!("resync reader task failed: {e}"))?,
            None => bail!("resync chunk read already taken"),
        }
    }
}

/// A chunk handed to the sink in the current batch, recorded once the batch is applied.
struct Applied {
    id: i64,
    table: String,
    last_key: Option<Vec<String>>,
    rows: i64,
    deleted: i64,
    done: bool,
}

pub(crate) struct Resync {
    pipeline: String,
    source: PgConnConfig,
    state: Client,
    /// Notifications on `NOTIFY_CHANNEL` (pipeline names).
    notified: tokio::sync::mpsc::UnboundedReceiver<String>,
    reader: Option<Arc<Client>>,
    tables: HashMap<TableName, Arc<TableSchema>>,
    /// Postgres sinks without transforms: where a table's rows are, to remove the ones
    /// the source no longer has.
    targets: HashMap<TableName, TableName>,
    /// Publication row filters of the tables that have one.
    row_filters: HashMap<TableName, String>,
    chunk_rows: i64,
    nonce: u64,
    seq: u64,
    recent: VecDeque<u32>,
    active: Option<Active>,
    applied: Vec<Applied>,
    next_poll: Instant,
    metrics: Arc<Metrics>,
}

fn key_text(row: &Row, keys: &[usize]) -> Vec<String> {
    keys.iter()
        .map(|&i| match &row[i] {
            Datum::Text(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        })
        .collect()
}

/// `(k1, k2) > ('a', 'b')`: the literals take the key columns' types.
fn key_cmp(keys: &[String], op: &str, values: &[String]) -> String {
    let vals: Vec<String> = values.iter().map(|v| literal(v)).collect();
    format!("({}) {op} ({})", keys.join(", "), vals.join(", "))
}

impl Resync {
    pub(crate) async fn new(
        pipeline: &str,
        source: PgConnConfig,
        state: &PgConnConfig,
        tables: &[Arc<TableSchema>],
        targets: HashMap<TableName, TableName>,
        chunk_rows: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let (state, notified) = sluice_postgres::connect_listening(state, "state database", NOTIFY_CHANNEL).await?;
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Ok(Self {
            pipeline: pipeline.to_string(),
            source,
            state,
            notified,
            reader: None,
            tables: tables.iter().map(|t| (t.name.clone(), t.clone())).collect(),
            targets,
            row_filters: HashMap::new(),
            chunk_rows: chunk_rows.clamp(1, 100_000) as i64,
            nonce,
            seq: 0,
            recent: VecDeque::with_capacity(RECENT_XIDS),
            active: None,
            applied: Vec::new(),
            next_poll: Instant::now(),
            metrics,
        })
    }

    pub(crate) fn with_row_filters(mut self, filters: HashMap<TableName, String>) -> Self {
        self.row_filters = filters;
        self
    }

    /// Sees every transaction, in stream order, before it joins a batch.
    pub(crate) fn observe(&mut self, t: &Transaction) {
        // The pieces of a large transaction are one transaction.
        if self.recent.back() != Some(&t.xid) {
            if self.recent.len() == RECENT_XIDS {
                self.recent.pop_front();
            }
            self.recent.push_back(t.xid);
        }
        let Some(a) = &mut self.active else { return };
        for e in &t.events {
            if e.table.name != a.req.table {
                continue;
            }
            if !Arc::ptr_eq(&e.table, &self.tables[&a.req.table]) {
                self.tables.insert(e.table.name.clone(), e.table.clone());
            }
            if a.before_lo.is_none() {
                continue;
            }
            let keys: Vec<usize> = e.table.key_indexes().collect();
            if e.op == Op::Truncate {
                // Everything read so far may be gone: read the chunk again.
                a.window.insert(Vec::new());
            }
            for row in [&e.before, &e.after].into_iter().flatten() {
                a.window.insert(key_of(row, &keys));
            }
        }
    }

    /// A watermark from the stream. At a chunk's high watermark, returns the
    /// transaction that carries the chunk to the sink.
    pub(crate) async fn on_mark(&mut self, lsn: Lsn, text: &str) -> Result<Option<Transaction>> {
        let Some((edge, mark)) = text.split_once(':') else { return Ok(None) };
        let Some(a) = &mut self.active else { return Ok(None) };
        if mark != a.mark {
            return Ok(None); // another pipeline's, or a chunk from before a restart
        }
        if edge == "lo" {
            a.before_lo = Some(self.recent.iter().copied().collect());
            return Ok(None);
        }
        let mut a = self.active.take().expect("active");
        let fetched = match a.result().await {
            Ok(f) => f,
            Err(e) => {
                self.failed(&a.req, &e);
                return Ok(None);
            }
        };
        let Some(before_lo) = a.before_lo else {
            self.next_poll = Instant::now();
            return Ok(None); // the low watermark was missed (a reconnect): read again
        };
        if a.window.contains(&Vec::new()) || before_lo.iter().any(|&x| !fetched.snapshot.sees(x)) {
            tracing::debug!(table = %a.req.table, "resync chunk read before an earlier transaction was visible, or truncated; reading it again");
            self.next_poll = Instant::now();
            return Ok(None);
        }
        let schema = fetched.schema;
        let keys: Vec<usize> = schema.key_indexes().collect();
        let full = fetched.rows.len() as i64 >= self.chunk_rows;
        let last_key = fetched.rows.last().map(|r| key_text(r, &keys)).or_else(|| a.req.last_key.clone());
        let position = SourcePosition { lsn, commit_lsn: lsn, xid: 0, commit_time_us: now_us(), seq: 0 };
        let read_keys: HashSet<Vec<u8>> = fetched.rows.iter().map(|r| key_of(r, &keys)).collect();
        let mut events = Vec::with_capacity(fetched.rows.len());
        let total = fetched.rows.len() as i64;
        for row in fetched.rows {
            if a.window.contains(&key_of(&row, &keys)) {
                continue;
            }
            events.push(ChangeEvent { op: Op::Read, table: schema.clone(), before: None, after: Some(row), position });
        }
        let mut deleted = 0;
        if let Some(target) = self.targets.get(&a.req.table).filter(|_| a.req.keys.is_none()) {
            let stale = self.stale_keys(target, &schema, a.req.last_key.as_deref(), full.then_some(last_key.as_deref()).flatten()).await?;
            for key in stale {
                let mut before: Row = vec![Datum::Null; schema.columns.len()];
                for (&i, v) in keys.iter().zip(key) {
                    before[i] = Datum::Text(v.into());
                }
                let k = key_of(&before, &keys);
                if read_keys.contains(&k) || a.window.contains(&k) {
                    continue;
                }
                deleted += 1;
                events.push(ChangeEvent { op: Op::Delete, table: schema.clone(), before: Some(before), after: None, position });
            }
        }
        self.metrics.resync_rows.fetch_add(total as u64, Ordering::Relaxed);
        self.applied.push(Applied {
            id: a.req.id,
            table: a.req.table.to_string(),
            last_key: last_key.clone(),
            rows: total,
            deleted,
            done: !full,
        });
        // The next chunk is read while the sink takes this one; its progress is
        // recorded after this one's, in stream order.
        if full {
            self.start(Request { id: a.req.id, table: a.req.table, last_key, keys: a.req.keys }).await?;
        }
        Ok(Some(Transaction {
            xid: 0,
            commit_lsn: lsn,
            end_lsn: lsn,
            commit_time_us: position.commit_time_us,
            events,
            ddl: Vec::new(),
            continues: false,
        }))
    }

    /// Keys of the sink's rows in the chunk's key range.
    async fn stale_keys(
        &self,
        target: &TableName,
        schema: &TableSchema,
        after: Option<&[String]>,
        upto: Option<&[String]>,
    ) -> Result<Vec<Vec<String>>> {
        let keys: Vec<String> = schema.key_indexes().map(|i| quote_ident(&schema.columns[i].name)).collect();
        let mut conds = vec!["true".to_string()];
        if let Some(v) = after {
            conds.push(key_cmp(&keys, ">", v));
        }
        if let Some(v) = upto {
            conds.push(key_cmp(&keys, "<=", v));
        }
        let cols: Vec<String> = keys.iter().map(|k| format!("{k}::text")).collect();
        let sql = format!("SELECT {} FROM {} WHERE {}", cols.join(", "), target.quoted(), conds.join(" AND "));
        let rows = self.state.query(&sql, &[]).await.with_context(|| format!("reading the keys of {target} in the sink"))?;
        Ok(rows.iter().map(|r| (0..keys.len()).map(|i| r.get::<_, Option<String>>(i).unwrap_or_default()).collect()).collect())
    }

    /// Records the chunks the sink has just taken, then starts the next one.
    pub(crate) async fn after_apply(&mut self) -> Result<()> {
        for a in std::mem::take(&mut self.applied) {
            self.state
                .execute(
                    "UPDATE sluice.resyncs SET last_key = $4, chunks = chunks + 1, rows = rows + $5, deleted = deleted + $6,
                            done = $7, finished_at = CASE WHEN $7 THEN now() END
                     WHERE pipeline = $1 AND id = $2 AND table_name = $3",
                    &[&self.pipeline, &a.id, &a.table, &a.last_key, &a.rows, &a.deleted, &a.done],
                )
                .await
                .context("recording resync progress")?;
            self.metrics.resync_chunks.fetch_add(1, Ordering::Relaxed);
            if a.done {
                tracing::info!(table = %a.table, "resync of table complete");
            }
            self.next_poll = Instant::now();
        }
        self.tick().await
    }

    /// Reads `schema`'s table again (a table that joined the publication, or whose
    /// existing rows changed without a trace in the log); `id` names the request, so a
    /// replayed schema change asks again under the same one.
    ///
    /// A table new to the pipeline (`added_at`: the commit of the statement that
    /// published it) is also recorded as snapshotted there, so no restart copies it
    /// again: the resync is its snapshot, and every change from then on is streamed.
    pub(crate) async fn request_table(
        &mut self,
        id: i64,
        schema: &Arc<TableSchema>,
        target: Option<TableName>,
        added_at: Option<Lsn>,
    ) -> Result<()> {
        let name = schema.name.to_string();
        // One transaction: after a crash either a snapshot copies the table (nothing
        // recorded) or the resync reads it (both recorded), never neither or both.
        let lsn = added_at.map(|l| l.to_string());
        let (state, pipeline) = (&self.state, &self.pipeline);
        sluice_postgres::in_transaction(state, async {
            if let Some(lsn) = &lsn {
                state
                    .execute(
                        "INSERT INTO sluice.snapshot_chunks (pipeline, table_name, chunk, done, snapshot_lsn, rows)
                         VALUES ($1, $2, 0, true, $3::text::pg_lsn, 0) ON CONFLICT DO NOTHING",
                        &[pipeline, &name, lsn],
                    )
                    .await?;
            }
            state.execute(INSERT_REQUEST, &[pipeline, &id, &name]).await
        })
        .await
        .context("recording a resync request")?;
        self.tables.insert(schema.name.clone(), schema.clone());
        if let Some(t) = target {
            self.targets.insert(schema.name.clone(), t);
        }
        self.wake();
        Ok(())
    }

    /// Looks for requests at the next tick instead of the next poll.
    pub(crate) fn wake(&mut self) {
        self.next_poll = Instant::now();
    }

    /// Starts a chunk when none is in flight and a request waits.
    pub(crate) async fn tick(&mut self) -> Result<()> {
        loop {
            match self.notified.try_recv() {
                Ok(p) if p == self.pipeline => self.next_poll = Instant::now(),
                Ok(_) => {}
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                // The state connection is gone: the next query fails and the
                // pipeline reconnects (with a new listener).
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    self.next_poll = Instant::now();
                    break;
                }
            }
        }
        if let Some(a) = &mut self.active {
            // A read that failed writes no high watermark: notice it here.
            if a.task.as_ref().is_some_and(JoinHandle::is_finished) {
                match a.result().await {
                    Ok(f) => a.fetched = Some(f),
                    Err(e) => {
                        let a = self.active.take().expect("active");
                        self.failed(&a.req, &e);
                        return Ok(());
                    }
                }
            }
            if a.started.elapsed() > CHUNK_TIMEOUT {
                tracing::warn!(table = %a.req.table, "resync chunk watermark never came back; reading it again");
                self.active = None;
            }
            return Ok(());
        }
        if !self.applied.is_empty() || Instant::now() < self.next_poll {
            return Ok(());
        }
        self.next_poll = Instant::now() + POLL;
        let row = self
            .state
            .query_opt(
                "SELECT id, table_name, last_key, keys FROM sluice.resyncs WHERE pipeline = $1 AND NOT done ORDER BY id, table_name LIMIT 1",
                &[&self.pipeline],
            )
            .await
            .context("reading resync requests")?;
        let Some(row) = row else { return Ok(()) };
        let (id, name): (i64, String) = (row.get(0), row.get(1));
        let table = self.tables.keys().find(|t| t.to_string() == name).cloned();
        let keyless = table.as_ref().is_some_and(|t| !self.tables[t].has_key());
        if keyless {
            tracing::error!(table = %name, "resync of a table without a primary key (it is read in key order): request dropped");
        }
        let Some(table) = table.filter(|_| !keyless) else {
            if !keyless {
                tracing::warn!(table = %name, "resync of a table this pipeline does not replicate: request dropped");
            }
            self.state
                .execute("DELETE FROM sluice.resyncs WHERE pipeline = $1 AND id = $2 AND table_name = $3", &[&self.pipeline, &id, &name])
                .await
                .context("dropping a resync request")?;
            return Ok(());
        };
        // Unreadable keys (written by hand, say) read the whole table: a superset.
        let keys = row.get::<_, Option<serde_json::Value>>(3).and_then(|v| serde_json::from_value(v).ok());
        self.start(Request { id, table, last_key: row.get(2), keys }).await
    }

    async fn start(&mut self, req: Request) -> Result<()> {
        if self.reader.as_ref().is_none_or(|c| c.is_closed()) {
            self.reader = Some(Arc::new(sluice_postgres::connect(&self.source, "source").await?));
        }
        self.seq += 1;
        let mark = format!("{}/{:x}/{}", self.pipeline, self.nonce, self.seq);
        let schema = self.tables[&req.table].clone();
        // The publication's row filter too (SQL from the source's own catalog): rows
        // outside it are not the sink's, and the chunk's key range then removes any the
        // sink still holds.
        let read = ChunkRead {
            after: req.last_key.clone(),
            keys: req.keys.clone(),
            row_filter: self.row_filters.get(&req.table).cloned(),
            limit: self.chunk_rows,
        };
        let task = tokio::spawn(read_chunk(self.reader.clone().expect("connected"), schema, read, mark.clone()));
        self.active =
            Some(Active { req, mark, started: Instant::now(), before_lo: None, window: HashSet::new(), task: Some(task), fetched: None });
        Ok(())
    }

    fn failed(&mut self, req: &Request, e: &anyhow::Error) {
        tracing::warn!(table = %req.table, error = %format!("{e:#}"), "resync chunk read failed; trying again in 5 s");
        self.next_poll = Instant::now() + Duration::from_secs(5);
        self.reader = None;
    }
}

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Which rows one chunk reads.
struct ChunkRead {
    /// Rows after this key (the last chunk's last row).
    after: Option<Vec<String>>,
    keys: Option<KeySet>,
    row_filter: Option<String>,
    limit: i64,
}

impl ChunkRead {
    /// The chunk's query and its parameters: every value bound (as text, cast on the
    /// source to its column's type), every name quoted.
    fn query(&self, schema: &TableSchema) -> Result<(String, Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>)> {
        // Aliased: an output column named like a key column would be what ORDER BY
        // sorts by, and the text sorts differently ('10' before '9').
        let cols: Vec<String> = schema.columns.iter().enumerate().map(|(i, c)| format!("{}::text AS v{i}", quote_ident(&c.name))).collect();
        let keys: Vec<&sluice_core::ColumnSchema> = schema.key_indexes().map(|i| &schema.columns[i]).collect();
        if keys.is_empty() {
            bail!("table {} has no primary key: resync reads tables in key order", schema.name);
        }
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        let mut cond = vec!["true".to_string()];
        if let Some(after) = &self.after {
            if after.len() != keys.len() {
                bail!("resync of {}: the stored position has {} values for {} key columns", schema.name, after.len(), keys.len());
            }
            let mut bound = Vec::new();
            for (k, v) in keys.iter().zip(after) {
                params.push(Box::new(v.clone()));
                bound.push(format!("${}::text::{}", params.len(), k.type_name));
            }
            let names: Vec<String> = keys.iter().map(|k| quote_ident(&k.name)).collect();
            cond.push(format!("({}) > ({})", names.join(", "), bound.join(", ")));
        }
        if let Some(set) = &self.keys {
            let (mut names, mut casts, mut arrays, mut aliases) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (n, col) in set.columns.iter().enumerate() {
                let c = schema
                    .columns
                    .iter()
                    .find(|c| c.name == *col)
                    .with_context(|| format!("resync of {}: no column {col:?}", schema.name))?;
                let values: Vec<String> = set.rows.iter().map(|r| r.get(n).cloned().unwrap_or_default()).collect();
                params.push(Box::new(values));
                arrays.push(format!("${}::text[]", params.len()));
                aliases.push(format!("c{n}"));
                names.push(quote_ident(&c.name));
                casts.push(format!("u.c{n}::{}", c.type_name));
            }
            cond.push(format!(
                "({}) IN (SELECT {} FROM unnest({}) AS u({}))",
                names.join(", "),
                casts.join(", "),
                arrays.join(", "),
                aliases.join(", ")
            ));
        }
        if let Some(f) = &self.row_filter {
            cond.push(format!("({f})"));
        }
        let order: Vec<String> = keys.iter().map(|k| quote_ident(&k.name)).collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT {}",
            cols.join(", "),
            schema.name.quoted(),
            cond.join(" AND "),
            order.join(", "),
            self.limit
        );
        Ok((sql, params))
    }
}

/// Low watermark, the chunk read in one snapshot, high watermark.
async fn read_chunk(c: Arc<Client>, schema: Arc<TableSchema>, read: ChunkRead, mark: String) -> Result<Fetched> {
    let (sql, params) = read.query(&schema)?;
    sluice_postgres::replication::emit_watermark(&c, &format!("lo:{mark}")).await.context("writing the resync low watermark")?;
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.context("reading a resync chunk")?;
    let read = async {
        let snap: String = c.query_one("SELECT pg_current_snapshot()::text", &[]).await?.get(0);
        let bound: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        // Each value as its type's text output: what COPY's text format would carry.
        let mut rows = Vec::new();
        for r in c.query(&sql, &bound).await? {
            let mut row = Vec::with_capacity(schema.columns.len());
            for i in 0..schema.columns.len() {
                row.push(r.try_get::<_, Option<&str>>(i)?.map_or(Datum::Null, |v| Datum::Text(v.as_bytes().to_vec().into())));
            }
            rows.push(row);
        }
        anyhow::Ok((snap, rows))
    }
    .await;
    let end = c.batch_execute(if read.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
    let (snap, rows) = read.with_context(|| format!("reading a resync chunk of {}", schema.name))?;
    end?;
    // Test hook: widens the moment between the read and the high watermark, where a
    // change the read missed must win over the chunk. Nothing else sets it.
    if let Some(ms) = std::env::var("SLUICE_TEST_RESYNC_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    sluice_postgres::replication::emit_watermark(&c, &format!("hi:{mark}")).await.context("writing the resync high watermark")?;
    Ok(Fetched { schema, rows, snapshot: sluice_postgres::SnapshotXids::parse(&snap) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison_quotes_values() {
        let keys = vec!["\"a\"".to_string(), "\"b\"".to_string()];
        assert_eq!(key_cmp(&keys, ">", &["1".into(), "it's".into()]), "(\"a\", \"b\") > ('1', 'it''s')");
    }

    #[test]
    fn chunk_reads_bind_every_value() {
        let col = |name: &str, type_name: &str, key: bool| sluice_core::ColumnSchema {
            name: name.into(),
            type_oid: 25,
            type_name: type_name.into(),
            pg_type: sluice_core::PgType::from_oid(25),
            nullable: !key,
            is_key: key,
            enum_labels: vec![],
            storage: Default::default(),
        };
        let schema = TableSchema {
            name: TableName::new("public", "Orders"),
            relid: 1,
            columns: vec![col("id", "bigint", true), col("customer", "text", false)],
            replica_identity: sluice_core::ReplicaIdentity::Default,
        };
        let hostile = "1') OR true; DROP TABLE orders; --".to_string();
        let read = ChunkRead {
            after: Some(vec!["7".into()]),
            keys: Some(KeySet { columns: vec!["customer".into()], rows: vec![vec![hostile.clone()], vec!["c2".into()]] }),
            row_filter: None,
            limit: 100,
        };
        let (sql, params) = read.query(&schema).unwrap();
        assert_eq!(
            sql,
            "SELECT \"id\"::text AS v0, \"customer\"::text AS v1 FROM \"public\".\"Orders\" WHERE true AND (\"id\") > ($1::text::bigint) \
             AND (\"customer\") IN (SELECT u.c0::text FROM unnest($2::text[]) AS u(c0)) ORDER BY \"id\" LIMIT 100"
        );
        assert!(!sql.contains("DROP"), "values are parameters, never SQL");
        assert_eq!(params.len(), 2);
        let bad = ChunkRead { keys: Some(KeySet { columns: vec!["nope".into()], rows: vec![] }), ..read };
        assert!(bad.query(&schema).unwrap_err().to_string().contains("no column \"nope\""));
    }

    #[test]
    fn key_bytes_separate_columns() {
        let r1: Row = vec![Datum::Text("ab".into()), Datum::Text("c".into())];
        let r2: Row = vec![Datum::Text("a".into()), Datum::Text("bc".into())];
        assert_ne!(key_of(&r1, &[0, 1]), key_of(&r2, &[0, 1]));
        assert_eq!(key_text(&r1, &[1]), vec!["c".to_string()]);
    }
}
