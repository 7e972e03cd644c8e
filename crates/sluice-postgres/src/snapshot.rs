//! Consistent initial snapshot, copied in parallel chunks and resumable per chunk.
//!
//! The pipeline's slot already exists when this runs. A temporary slot is created with
//! an exported snapshot; every chunk is copied inside that snapshot, and the chunk's
//! rows commit in the sink together with the row that marks it done and records the
//! snapshot's consistent point. Streaming then starts from the pipeline slot, and the
//! sink skips, per chunk, the transactions that committed before that chunk's
//! snapshot (see `SnapshotFilter`). After a crash, the chunks not done are copied
//! under a fresh snapshot the same way: nothing is copied twice and no change is
//! applied on top of a snapshot that already holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{SinkExt, StreamExt};
use sluice_core::sink::SnapshotChunk;
use sluice_core::transform::TableTransform;
use sluice_core::{Lsn, PgType, Row, SourcePosition, TableName, TableSchema, quote_ident};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::chunks::{Chunk, load_chunks};
use crate::conn::{PgConnConfig, connect};
use crate::copy_text::CopyRowDecoder;
use crate::error::{PgError, Result};

const COPY_BATCH_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub pipeline: String,
    pub slot: String,
    pub publication: String,
    /// Chunks copied at once, each on its own pair of connections.
    pub parallelism: usize,
    /// Target rows per chunk (tables with a single integer key are split by key range).
    pub chunk_rows: u64,
}

/// Progress counters, read by the CLI's progress bar and the metrics endpoint.
#[derive(Debug, Default)]
pub struct SnapshotProgress {
    pub rows_estimated: AtomicU64,
    pub rows_copied: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub chunks_total: AtomicU64,
    pub chunks_done: AtomicU64,
}

/// Where snapshot rows go when the sink is not the Postgres database holding the
/// snapshot state (which takes them by COPY, in the same transaction as the chunk's
/// done mark). Rows are delivered in batches; a chunk is marked done in the state
/// database only after every batch of it was delivered, so a crash re-delivers at
/// most the chunks in flight (at least once), unless the target records the chunk
/// done with its rows itself (exactly once).
pub trait RowTarget: Clone + Send + Sync + 'static {
    /// Returns once `rows` are durable in the sink (or staged for `chunk_done`).
    fn deliver(
        &self,
        table: &Arc<TableSchema>,
        chunk: &SnapshotChunk,
        rows: Vec<Row>,
        snapshot_lsn: Lsn,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Every row of `chunk` was delivered: true when the target committed them with
    /// the chunk's done mark; false leaves the mark to the snapshot.
    fn chunk_done(
        &self,
        table: &Arc<TableSchema>,
        chunk: &SnapshotChunk,
        rows: u64,
        snapshot_lsn: Lsn,
    ) -> impl Future<Output = Result<bool>> + Send;
}

/// The `RowTarget` of a Postgres sink, which never decodes rows.
#[derive(Clone)]
pub struct CopyIntoState;

impl RowTarget for CopyIntoState {
    async fn deliver(&self, _: &Arc<TableSchema>, _: &SnapshotChunk, _: Vec<Row>, _: Lsn) -> Result<()> {
        Err(PgError::permanent("internal: a Postgres sink takes snapshot rows by COPY"))
    }
    async fn chunk_done(&self, _: &Arc<TableSchema>, _: &SnapshotChunk, _: u64, _: Lsn) -> Result<bool> {
        Ok(false)
    }
}

/// Decoded rows handed to a `RowTarget` at a time.
const DELIVER_ROWS: usize = 4096;

/// A table to snapshot: its source schema, where it goes in the sink, and the
/// pipeline's enrichment and transforms for it (rows are then decoded, enriched,
/// transformed and re-encoded).
#[derive(Clone)]
pub struct SnapshotTable {
    pub schema: Arc<TableSchema>,
    pub target: TableName,
    pub transform: Option<Arc<TableTransform>>,
    pub enrich: Option<Arc<dyn RowEnrich>>,
    /// The publication's row filter: the snapshot copies the rows the stream publishes.
    pub row_filter: Option<String>,
}

/// Fields added to source rows from outside them (lookups, a team's service), before
/// the transforms: batched and asynchronous, unlike the transforms.
pub trait RowEnrich: Send + Sync {
    /// The source table's shape with the added fields.
    fn output(&self) -> &Arc<TableSchema>;
    /// The rows in the output shape; rows held back by a failure policy are left out
    /// (and recorded by the enricher for a later replay).
    fn enrich(&self, rows: Vec<Row>) -> futures::future::BoxFuture<'_, Result<Vec<Row>>>;
}

/// How one table's rows are reshaped between the source and the sink.
#[derive(Clone, Copy)]
struct Shape<'a> {
    schema: &'a Arc<TableSchema>,
    row_filter: Option<&'a str>,
    enrich: Option<&'a dyn RowEnrich>,
    transform: Option<&'a TableTransform>,
}

impl<'a> Shape<'a> {
    fn decodes(&self) -> bool {
        self.enrich.is_some() || self.transform.is_some()
    }

    fn output(&self) -> &'a Arc<TableSchema> {
        match (self.transform, self.enrich) {
            (Some(t), _) => &t.output,
            (None, Some(e)) => e.output(),
            (None, None) => self.schema,
        }
    }

    async fn rows(&self, rows: Vec<Row>, snapshot_lsn: Lsn) -> Result<Vec<Row>> {
        let rows = match self.enrich {
            Some(e) => e.enrich(rows).await?,
            None => rows,
        };
        transform_rows(self.transform, rows, snapshot_lsn)
    }
}

async fn snapshot_txn(client: &Client, snapshot: &str) -> Result<()> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .map_err(|e| PgError::from_pg("importing the exported snapshot", e))
}

fn int_key(schema: &TableSchema) -> Option<&str> {
    let keys: Vec<_> = schema.columns.iter().filter(|c| c.is_key).collect();
    match keys.as_slice() {
        [k] if matches!(k.pg_type, PgType::Int2 | PgType::Int4 | PgType::Int8) => Some(&k.name),
        _ => None,
    }
}

/// One planned chunk's bounds: integer keys' in `lo`/`hi`, any other key's (uuid, text,
/// composite) in `lo_key`/`hi_key`, as text.
#[derive(Debug, Default, Clone)]
struct Bounds {
    lo: Option<i64>,
    hi: Option<i64>,
    lo_key: Option<Vec<String>>,
    hi_key: Option<Vec<String>>,
}

/// Splits a table into key ranges of about `chunk_rows` rows. The first and last
/// ranges are open so rows inserted later still belong to a chunk.
async fn plan(client: &Client, schema: &TableSchema, chunk_rows: u64) -> Result<(Vec<Bounds>, u64)> {
    let t = schema.name.quoted();
    let err = |e| PgError::from_pg(&format!("planning the snapshot of {}", schema.name), e);
    let est: f64 = client
        .query_one(
            "SELECT GREATEST(c.reltuples, pg_relation_size(c.oid) / 100)::float8 FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&t],
        )
        .await
        .map_err(err)?
        .get(0);
    let est = est.max(0.0) as u64;
    let n = est.div_ceil(chunk_rows.max(1)).clamp(1, 4096);
    let Some(key) = int_key(schema) else { return Ok((sampled_ranges(client, schema, est, n).await?, est)) };
    let k = quote_ident(key);
    let row = client.query_one(&format!("SELECT min({k})::int8, max({k})::int8 FROM {t}"), &[]).await.map_err(err)?;
    let (Some(min), Some(max)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)) else {
        return Ok((vec![Bounds::default()], est));
    };
    let n = n as i128;
    let span = (max as i128 - min as i128 + 1).max(1);
    let mut bounds: Vec<i64> = (1..n).map(|i| (min as i128 + span * i / n) as i64).collect();
    bounds.dedup();
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut lo = None;
    for b in bounds {
        ranges.push(Bounds { lo, hi: Some(b), ..Bounds::default() });
        lo = Some(b);
    }
    ranges.push(Bounds { lo, ..Bounds::default() });
    Ok((ranges, est))
}

/// Key ranges of a table whose key is not one integer column, cut at quantiles of a
/// sample of its keys (about 20 per chunk, read from whole pages), in the key's own
/// order (its columns' types and collations). Ranges of keys stay put whatever
/// snapshot reads them, so a snapshot resumed after a crash copies each row once.
async fn sampled_ranges(client: &Client, schema: &TableSchema, est: u64, n: u64) -> Result<Vec<Bounds>> {
    let keys: Vec<&str> = schema.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect();
    if n <= 1 || keys.is_empty() {
        return Ok(vec![Bounds::default()]);
    }
    let pct = ((n * 20) as f64 * 100.0 / est.max(1) as f64).clamp(0.0001, 100.0);
    let cols: Vec<String> = keys.iter().enumerate().map(|(i, k)| format!("t.{}::text AS _k{i}", quote_ident(k))).collect();
    let order: Vec<String> = keys.iter().map(|k| format!("t.{}", quote_ident(k))).collect();
    let sql =
        format!("SELECT {} FROM {} t TABLESAMPLE SYSTEM ({pct:.6}) ORDER BY {}", cols.join(", "), schema.name.quoted(), order.join(", "));
    // Inside the snapshot's transaction: a table that cannot be sampled is one chunk.
    let err = |e| PgError::from_pg(&format!("planning the snapshot of {}", schema.name), e);
    client.batch_execute("SAVEPOINT sample").await.map_err(err)?;
    let rows = match client.query(&sql, &[]).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(table = %schema.name, error = %e, "the table's keys could not be sampled: it is copied as one chunk");
            client.batch_execute("ROLLBACK TO SAVEPOINT sample").await.map_err(err)?;
            return Ok(vec![Bounds::default()]);
        }
    };
    client.batch_execute("RELEASE SAVEPOINT sample").await.map_err(err)?;
    let samples: Vec<Vec<String>> =
        rows.iter().map(|r| (0..keys.len()).map(|i| r.get::<_, Option<String>>(i).unwrap_or_default()).collect()).collect();
    let mut cuts: Vec<Vec<String>> =
        (1..n).map(|i| i as usize * samples.len() / n as usize).filter_map(|i| samples.get(i).cloned()).collect();
    cuts.dedup();
    if let Some(first) = samples.first() {
        // A cut at the smallest sampled key would leave the first range (almost) empty.
        cuts.retain(|c| c != first);
    }
    let mut ranges = Vec::with_capacity(cuts.len() + 1);
    let mut lo = None;
    for c in cuts {
        ranges.push(Bounds { lo_key: lo, hi_key: Some(c.clone()), ..Bounds::default() });
        lo = Some(c);
    }
    ranges.push(Bounds { lo_key: lo, ..Bounds::default() });
    Ok(ranges)
}

/// The rows of chunk `c`: its key range, and the table's row filter. Sampled bounds
/// become literals quoted by the source itself (`quote_literal`, cast to each key
/// column's type), so no text from the state database is ever SQL.
async fn chunk_predicate(src: &Client, shape: &Shape<'_>, c: &Chunk) -> Result<String> {
    let filter = shape.row_filter.map_or(String::new(), |w| format!(" AND ({w})"));
    if let Some(key) = int_key(shape.schema) {
        let k = quote_ident(key);
        let lo = c.lo.map_or("true".into(), |lo| format!("{k} >= {lo}"));
        let hi = c.hi.map_or("true".into(), |hi| format!("{k} < {hi}"));
        return Ok(format!("{lo} AND {hi}{filter}"));
    }
    let keys: Vec<&sluice_core::ColumnSchema> = shape.schema.columns.iter().filter(|c| c.is_key).collect();
    let names: Vec<String> = keys.iter().map(|k| quote_ident(&k.name)).collect();
    let oids: Vec<u32> = keys.iter().map(|k| k.type_oid).collect();
    let tuple = format!("({})", names.join(", "));
    for values in [&c.lo_key, &c.hi_key].into_iter().flatten() {
        if values.len() != keys.len() {
            return Err(PgError::permanent(format!(
                "snapshot chunk {} of {} has bounds of {} columns, but the table's key has {}: the key changed during the snapshot; \
                 run `sluice resync` for the table",
                c.chunk,
                shape.schema.name,
                values.len(),
                keys.len()
            )));
        }
    }
    // Both bounds' values quoted as typed literals by the server, in one round trip.
    let empty = Vec::new();
    let rows = src
        .query(
            "SELECT b.n, quote_literal(u.v) || '::' || format_type(u.o, NULL)
             FROM (VALUES (1, $1::text[]), (2, $2::text[])) AS b(n, vals),
                  unnest(b.vals, $3::oid[]) WITH ORDINALITY AS u(v, o, i)
             WHERE b.vals IS NOT NULL ORDER BY b.n, u.i",
            &[&c.lo_key.as_ref().unwrap_or(&empty), &c.hi_key.as_ref().unwrap_or(&empty), &oids],
        )
        .await
        .map_err(|e| PgError::from_pg(&format!("reading snapshot chunk {} of {}", c.chunk, shape.schema.name), e))?;
    let mut parts = Vec::new();
    for (n, bound, op) in [(1, &c.lo_key, ">="), (2, &c.hi_key, "<")] {
        if bound.is_some() {
            let literals: Vec<String> = rows.iter().filter(|r| r.get::<_, i32>(0) == n).map(|r| r.get(1)).collect();
            parts.push(format!("{tuple} {op} ({})", literals.join(", ")));
        }
    }
    if parts.is_empty() {
        parts.push("true".into());
    }
    Ok(format!("{}{filter}", parts.join(" AND ")))
}

/// Copies every chunk not yet done. Returns at once when all are done. `state` is the
/// database that records chunk progress; with `row_target` = `None` it is also the sink and
/// takes the rows by COPY into each table's `target`.
pub async fn run_snapshot<R: RowTarget>(
    source: &PgConnConfig,
    sink: &PgConnConfig,
    row_target: Option<R>,
    opts: &SnapshotOptions,
    tables: &[SnapshotTable],
    progress: Arc<SnapshotProgress>,
) -> Result<()> {
    let state = connect(sink, "sink").await?;
    let existing = load_chunks(&state, &opts.pipeline).await?;
    let planned = |t: &SnapshotTable| existing.iter().any(|c| c.table == t.schema.name.to_string());
    let pending_tables = tables.iter().any(|t| !planned(t));
    if !pending_tables && existing.iter().all(|c| c.done) {
        return Ok(());
    }

    // The temporary slot lives as long as this session; its snapshot stays importable
    // until the session runs its next command.
    let mut repl =
        pgwire_replication::ReplicationClient::connect_gated(crate::conn::replication_config(source, &opts.slot, &opts.publication).await?)
            .await
            .map_err(|e| crate::conn::wire_connect_error(source, "opening a replication connection for the snapshot", e))?;
    let temp_slot = format!("{}_snap_{}", opts.slot, std::process::id());
    let rows = repl
        .simple_query(&format!("CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT", quote_ident(&temp_slot)))
        .await
        .map_err(|e| PgError::from_wire("creating the snapshot slot", e))?;
    let row = rows.first().ok_or_else(|| PgError::protocol("CREATE_REPLICATION_SLOT returned no row"))?;
    let text = |i: usize| row.get(i).cloned().flatten().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let consistent: Lsn = text(1).parse().map_err(|_| PgError::protocol("bad consistent point from CREATE_REPLICATION_SLOT"))?;
    let snapshot_name = text(2);
    tracing::info!(consistent_point = %consistent, "snapshot slot created");

    // Plan the tables that have no chunks yet, inside the snapshot.
    let planner = connect(source, "source").await?;
    snapshot_txn(&planner, &snapshot_name).await?;
    let mut estimated = 0u64;
    for t in tables {
        let (ranges, est) = plan(&planner, &t.schema, opts.chunk_rows).await?;
        estimated += est;
        if planned(t) {
            continue;
        }
        let name = t.schema.name.to_string();
        for (i, b) in ranges.iter().enumerate() {
            state
                .execute(
                    "INSERT INTO sluice.snapshot_chunks (pipeline, table_name, chunk, lo, hi, lo_key, hi_key)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    &[&opts.pipeline, &name, &(i as i32), &b.lo, &b.hi, &b.lo_key, &b.hi_key],
                )
                .await
                .map_err(|e| PgError::from_pg("recording the snapshot plan", e))?;
        }
    }
    drop(planner);
    let chunks = load_chunks(&state, &opts.pipeline).await?;
    let todo: Vec<Chunk> = chunks.iter().filter(|c| !c.done).cloned().collect();
    progress.rows_estimated.store(estimated, Ordering::Relaxed);
    progress.chunks_total.store(chunks.len() as u64, Ordering::Relaxed);
    progress.chunks_done.store((chunks.len() - todo.len()) as u64, Ordering::Relaxed);
    tracing::info!(chunks = chunks.len(), remaining = todo.len(), "snapshot planned");

    let queue = Arc::new(Mutex::new(todo));
    let mut workers = Vec::new();
    for _ in 0..opts.parallelism.max(1) {
        let queue = queue.clone();
        let (source, sink, progress) = (source.clone(), sink.clone(), progress.clone());
        let snapshot_name = snapshot_name.clone();
        let pipeline = opts.pipeline.clone();
        let row_target = row_target.clone();
        let tables: Vec<SnapshotTable> = tables.to_vec();
        workers.push(tokio::spawn(async move {
            let src = connect(&source, "source").await?;
            snapshot_txn(&src, &snapshot_name).await?;
            let dst = connect(&sink, "sink").await?;
            loop {
                let Some(chunk) = queue.lock().await.pop() else { break };
                let Some(t) = tables.iter().find(|t| t.schema.name.to_string() == chunk.table) else {
                    continue; // a table no longer in the config
                };
                let shape = Shape {
                    schema: &t.schema,
                    row_filter: t.row_filter.as_deref(),
                    enrich: t.enrich.as_deref(),
                    transform: t.transform.as_deref(),
                };
                match &row_target {
                    None => copy_chunk(&src, &dst, &pipeline, shape, &t.target, &chunk, consistent, &progress).await?,
                    Some(r) => deliver_chunk(&src, &dst, r, &pipeline, shape, &chunk, consistent, &progress).await?,
                }
            }
            Ok::<_, PgError>(())
        }));
    }
    let mut first_err = None;
    for w in workers {
        let r = w.await.map_err(|e| PgError::transient(format!("snapshot worker failed: {e}"))).and_then(|r| r);
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    // Dropping a gated session that never started ends it, and the temporary slot with it.
    drop(repl);
    Ok(())
}

fn transform_rows(transform: Option<&TableTransform>, rows: Vec<Row>, snapshot_lsn: Lsn) -> Result<Vec<Row>> {
    let Some(t) = transform else { return Ok(rows) };
    let position = SourcePosition { lsn: snapshot_lsn, commit_lsn: snapshot_lsn, xid: 0, commit_time_us: now_us(), seq: 0 };
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if let Some(r) = t.apply_read(r, position).map_err(|e| PgError::permanent(format!("snapshot of {}: {e}", t.output.name)))? {
            out.push(r);
        }
    }
    Ok(out)
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

#[allow(clippy::too_many_arguments)]
async fn deliver_chunk<R: RowTarget>(
    src: &Client,
    state: &Client,
    target: &R,
    pipeline: &str,
    shape: Shape<'_>,
    chunk: &Chunk,
    consistent: Lsn,
    progress: &SnapshotProgress,
) -> Result<()> {
    let (schema, out_schema) = (shape.schema, shape.output());
    let cols: Vec<String> = schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let ctx = format!("copying {} chunk {}", schema.name, chunk.chunk);
    let err = |e| PgError::from_pg(&ctx, e);
    let out = src
        .copy_out(&format!(
            "COPY (SELECT {} FROM {} WHERE {}) TO STDOUT",
            cols.join(", "),
            schema.name.quoted(),
            chunk_predicate(src, &shape, chunk).await?
        ))
        .await
        .map_err(err)?;
    futures::pin_mut!(out);
    let (mut decoder, mut batch, mut total) = (CopyRowDecoder::default(), Vec::with_capacity(DELIVER_ROWS), 0u64);
    let id = SnapshotChunk { pipeline: pipeline.to_string(), table: chunk.table.clone(), chunk: chunk.chunk };
    let ncols = schema.columns.len();
    while let Some(data) = out.next().await {
        let data = data.map_err(err)?;
        progress.bytes_copied.fetch_add(data.len() as u64, Ordering::Relaxed);
        decoder.feed(&data, ncols, &mut batch)?;
        if batch.len() >= DELIVER_ROWS {
            let n = batch.len() as u64;
            let rows = shape.rows(std::mem::replace(&mut batch, Vec::with_capacity(DELIVER_ROWS)), consistent).await?;
            target.deliver(out_schema, &id, rows, consistent).await?;
            progress.rows_copied.fetch_add(n, Ordering::Relaxed);
            total += n;
        }
    }
    decoder.finish()?;
    if !batch.is_empty() {
        let n = batch.len() as u64;
        target.deliver(out_schema, &id, shape.rows(batch, consistent).await?, consistent).await?;
        progress.rows_copied.fetch_add(n, Ordering::Relaxed);
        total += n;
    }
    if !target.chunk_done(out_schema, &id, total, consistent).await? {
        state
            .execute(SnapshotChunk::DONE_SQL, &[&pipeline, &chunk.table, &chunk.chunk, &(total as i64), &consistent.to_string()])
            .await
            .map_err(|e| PgError::from_pg(&ctx, e))?;
    }
    progress.chunks_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn copy_chunk(
    src: &Client,
    dst: &Client,
    pipeline: &str,
    shape: Shape<'_>,
    target: &TableName,
    chunk: &Chunk,
    consistent: Lsn,
    progress: &SnapshotProgress,
) -> Result<()> {
    let schema = shape.schema;
    let cols: Vec<String> = schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let cols = cols.join(", ");
    let out_cols = shape.output().columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
    let ctx = format!("copying {} chunk {}", schema.name, chunk.chunk);
    let err = |e| PgError::from_pg(&ctx, e);
    dst.batch_execute("BEGIN").await.map_err(err)?;
    let out = src
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {} WHERE {}) TO STDOUT",
            schema.name.quoted(),
            chunk_predicate(src, &shape, chunk).await?
        ))
        .await
        .map_err(err)?;
    let inp = dst.copy_in(&format!("COPY {} ({out_cols}) FROM STDIN", target.quoted())).await.map_err(err)?;
    futures::pin_mut!(out);
    futures::pin_mut!(inp);
    // The source sends a message per row; the target takes far fewer, larger ones.
    let mut buf = bytes::BytesMut::with_capacity(COPY_BATCH_BYTES * 2);
    let (mut decoder, mut rows) = (CopyRowDecoder::default(), Vec::new());
    while let Some(data) = out.next().await {
        let data = data.map_err(err)?;
        progress.bytes_copied.fetch_add(data.len() as u64, Ordering::Relaxed);
        if shape.decodes() {
            // Reshaped rows are decoded, enriched and transformed, and encoded again;
            // enrichment is batched, so rows wait for a full batch.
            decoder.feed(&data, schema.columns.len(), &mut rows)?;
            if shape.enrich.is_none() || rows.len() >= DELIVER_ROWS {
                for row in shape.rows(std::mem::take(&mut rows), consistent).await? {
                    crate::copy_text::put_row(&mut buf, &row);
                }
            }
        } else {
            buf.extend_from_slice(&data);
        }
        if buf.len() >= COPY_BATCH_BYTES {
            inp.send(buf.split().freeze()).await.map_err(err)?;
        }
    }
    decoder.finish()?;
    if !rows.is_empty() {
        for row in shape.rows(rows, consistent).await? {
            crate::copy_text::put_row(&mut buf, &row);
        }
    }
    if !buf.is_empty() {
        inp.send(buf.split().freeze()).await.map_err(err)?;
    }
    let rows = inp.finish().await.map_err(err)?;
    dst.execute(SnapshotChunk::DONE_SQL, &[&pipeline, &chunk.table, &chunk.chunk, &(rows as i64), &consistent.to_string()])
        .await
        .map_err(err)?;
    dst.batch_execute("COMMIT").await.map_err(err)?;
    progress.rows_copied.fetch_add(rows, Ordering::Relaxed);
    progress.chunks_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A `pg_current_snapshot()`: which transactions it shows as committed.
pub struct SnapshotXids {
    xmax: u32,
    /// Transactions still running when it was taken.
    xip: std::collections::HashSet<u32>,
}

impl SnapshotXids {
    /// Parses `xmin:xmax:xip,xip` (64-bit, with the epoch) into the stream's 32-bit xids.
    pub fn parse(snap: &str) -> Self {
        let mut parts = snap.split(':');
        let (_, xmax, xip) = (parts.next(), parts.next().unwrap_or("0"), parts.next().unwrap_or(""));
        let xmax = xmax.parse::<u64>().unwrap_or(0) as u32;
        let xip = xip.split(',').filter_map(|x| x.parse::<u64>().ok()).map(|x| x as u32).collect();
        Self { xmax, xip }
    }

    /// Whether transaction `x` had committed (or ended) when the snapshot was taken.
    pub fn sees(&self, x: u32) -> bool {
        (x.wrapping_sub(self.xmax) as i32) < 0 && !self.xip.contains(&x)
    }
}

#[cfg(test)]
mod xid_tests {
    use super::*;

    #[test]
    fn snapshot_visibility() {
        let s = SnapshotXids::parse("100:105:101,103");
        assert!([99, 102, 104].iter().all(|&x| s.sees(x)));
        assert!(!s.sees(103));
        assert!(!SnapshotXids::parse("100:105:").sees(105));
        assert!(SnapshotXids::parse("4294967400:4294967410:").sees(4294967405u64 as u32));
    }
}
