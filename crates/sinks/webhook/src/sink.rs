//! Requests: events encoded once, cut into bodies by count and bytes, POSTed one at a
//! time (so the endpoint sees each key's changes in commit order), signed, retried,
//! dead-lettered when the endpoint keeps failing or refuses them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::ExposeSecret as _;
use sluice_core::sink::{Sink, SinkContext, SinkError, SinkResult, SnapshotChunk, SnapshotMethod};
use sluice_core::{ChangeEvent, ErrorKind, Lsn, Op, Row, SourcePosition, TableName, TableSchema, Transaction};
use tokio_postgres::Client;

use crate::config::WebhookSinkConfig;
use crate::encoding::{self, SIGNATURE_HEADER};

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Consecutive failed requests, and until when the circuit is open.
#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

/// One breaker per pipeline in this process: the engine reconnects the sink after an
/// error, and an open circuit must stay open across that.
static BREAKERS: LazyLock<Mutex<HashMap<String, Arc<Breaker>>>> = LazyLock::new(Default::default);

/// An event encoded for a request body, with what its dead letter records.
struct Encoded {
    id: String,
    table: String,
    key: String,
    json: String,
}

pub struct WebhookSink {
    cfg: WebhookSinkConfig,
    pipeline: String,
    database: String,
    http: reqwest::Client,
    state: Client,
    breaker: Arc<Breaker>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn pg(context: &str) -> impl Fn(tokio_postgres::Error) -> SinkError + '_ {
    move |e| {
        let e = sluice_postgres::PgError::from_pg(context, e);
        SinkError::wrap(e.kind(), e)
    }
}

impl WebhookSink {
    /// Builds the HTTP client and connects the state database; sends nothing (a probe
    /// request would be a change to the endpoint's eyes).
    pub(crate) async fn connect(cfg: WebhookSinkConfig, ctx: &SinkContext) -> SinkResult<Self> {
        let http = sluice_core::https::client(cfg.ca_file.as_deref(), cfg.ca_pem.as_deref(), "sink.webhook.ca_file")
            .and_then(|b| sluice_core::egress::guard_http(b, &cfg.url, ctx.egress.as_ref()))
            .map_err(SinkError::permanent)?
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| SinkError::permanent(format!("webhook sink: HTTP client: {e}")))?;
        let state = sluice_postgres::connect(&cfg.state.clone().guarded(ctx.egress.as_ref()), "state database")
            .await
            .map_err(|e| SinkError::wrap(e.kind(), e))?;
        let breaker = BREAKERS.lock().expect("breakers").entry(ctx.pipeline.clone()).or_default().clone();
        Ok(Self { cfg, pipeline: ctx.pipeline.clone(), database: ctx.source.database.clone(), http, state, breaker })
    }

    /// Encodes `events` and sends them in requests of at most `max_events` events and
    /// `max_bytes` bytes, in order; returns once each was answered 2xx or dead-lettered.
    async fn deliver<'a>(&self, events: impl Iterator<Item = &'a ChangeEvent>) -> SinkResult<()> {
        let now = now_ms();
        let mut pending: Vec<Encoded> = Vec::new();
        let mut bytes = 0;
        for e in events {
            let err = |x: encoding::EncodeError| SinkError::permanent(format!("webhook sink: {}: {x}", e.table.name));
            let v = encoding::event(e, self.cfg.format, &self.database, now).map_err(err)?;
            let json = v.to_string();
            if !pending.is_empty() && (pending.len() >= self.cfg.max_events || bytes + json.len() + 1 > self.cfg.max_bytes) {
                self.send(&pending).await?;
                pending.clear();
                bytes = 0;
            }
            bytes += json.len() + 1;
            let id = v["id"].as_str().unwrap_or_default().to_string();
            pending.push(Encoded { id, table: e.table.name.to_string(), key: v["key"].to_string(), json });
        }
        if !pending.is_empty() {
            self.send(&pending).await?;
        }
        Ok(())
    }

    /// POSTs one body; retries failures that may pass; dead-letters the events when the
    /// endpoint refuses them (4xx) or keeps failing.
    async fn send(&self, events: &[Encoded]) -> SinkResult<()> {
        let open_until = *self.breaker.open_until.lock().expect("breaker");
        if let Some(until) = open_until
            && Instant::now() < until
        {
            return Err(SinkError::transient(format!(
                "webhook {}: circuit open after {} failed requests in a row; trying again in {:?}",
                self.cfg.url,
                self.breaker.failures.load(Ordering::Relaxed),
                until - Instant::now()
            )));
        }
        let mut body = Vec::with_capacity(events.iter().map(|e| e.json.len() + 1).sum::<usize>() + 64);
        body.extend_from_slice(br#"{"pipeline":"#);
        body.extend_from_slice(serde_json::Value::from(self.pipeline.as_str()).to_string().as_bytes());
        body.extend_from_slice(br#","events":["#);
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(e.json.as_bytes());
        }
        body.extend_from_slice(b"]}");
        let signature = self.cfg.secret.as_ref().map(|s| encoding::sign(s.expose_secret().as_bytes(), &body));
        let idempotency = format!("{}+{}", events[0].id, events.len());
        let mut wait = self.cfg.backoff;
        let mut last = (None, String::new());
        for attempt in 0..=self.cfg.retries {
            if attempt > 0 {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
            let mut req = self
                .http
                .post(&self.cfg.url)
                .header("Content-Type", "application/json")
                .header("Idempotency-Key", &idempotency)
                .body(body.clone());
            if let Some(s) = &signature {
                req = req.header(SIGNATURE_HEADER, s);
            }
            for (name, value) in &self.cfg.headers {
                req = req.header(name, value.expose_secret());
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    self.breaker.failures.store(0, Ordering::Relaxed);
                    *self.breaker.open_until.lock().expect("breaker") = None;
                    return Ok(());
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    // The endpoint's body is not echoed anywhere (it may hold anything).
                    last = (Some(status), format!("HTTP {status}"));
                    if !matches!(status, 408 | 429 | 500..=599) {
                        tracing::warn!(url = %self.cfg.url, status, events = events.len(), "webhook refused a request; dead-lettering its events");
                        return self.dead_letter(events, last.0, &format!("refused: HTTP {status}")).await;
                    }
                }
                Err(e) => {
                    // A refused certificate is the configuration's fault, not the
                    // events': halt (nothing dead-lettered) with the fix.
                    if let Some(line) = sluice_core::https::certificate_refused(&self.cfg.url, &e, "sink.webhook.ca_file") {
                        return Err(SinkError::permanent(format!("webhook sink: {line}")));
                    }
                    last = (None, if e.is_timeout() { "timed out".into() } else { format!("no answer: {e}") })
                }
            }
            tracing::warn!(url = %self.cfg.url, attempt = attempt + 1, error = %last.1, "webhook request failed");
        }
        self.dead_letter(events, last.0, &format!("{} after {} attempts", last.1, self.cfg.retries + 1)).await?;
        let failures = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.cfg.breaker_failures {
            tracing::error!(url = %self.cfg.url, failures, open_for = ?self.cfg.breaker_open_for, "webhook circuit open");
            *self.breaker.open_until.lock().expect("breaker") = Some(Instant::now() + self.cfg.breaker_open_for);
        }
        Ok(())
    }

    async fn dead_letter(&self, events: &[Encoded], status: Option<u16>, reason: &str) -> SinkResult<()> {
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let tables: Vec<&str> = events.iter().map(|e| e.table.as_str()).collect();
        let keys: Vec<&str> = events.iter().map(|e| e.key.as_str()).collect();
        let bodies: Vec<&str> = events.iter().map(|e| e.json.as_str()).collect();
        self.state
            .execute(
                "INSERT INTO sluice.webhook_dead_letters (pipeline, event_id, table_name, event_key, status, reason, event)
                 SELECT $1, i, t, k, $5, $6, b FROM unnest($2::text[], $3::text[], $4::text[], $7::text[]) AS u(i, t, k, b)",
                &[&self.pipeline, &ids, &tables, &keys, &status.map(i32::from), &reason, &bodies],
            )
            .await
            .map_err(pg("recording webhook dead letters"))?;
        tracing::warn!(url = %self.cfg.url, events = events.len(), reason, "webhook events dead-lettered");
        Ok(())
    }
}

/// At least once, in order per key; the slot's confirmed position is the checkpoint and
/// snapshot progress lives in the state database.
impl Sink for WebhookSink {
    fn snapshot_method(&self) -> SnapshotMethod {
        SnapshotMethod::Rows
    }

    /// Nothing to create: the endpoint is the user's, the dead-letter table is in the
    /// state store's migrations.
    async fn prepare(&mut self, _tables: &[Arc<TableSchema>]) -> SinkResult<()> {
        Ok(())
    }

    async fn has_progress(&self) -> SinkResult<bool> {
        // Known from the snapshot progress in the state database.
        Ok(false)
    }

    async fn snapshot_rows(&self, table: &Arc<TableSchema>, _: &SnapshotChunk, rows: Vec<Row>, snapshot_lsn: Lsn) -> SinkResult<()> {
        let position = SourcePosition { lsn: snapshot_lsn, commit_lsn: snapshot_lsn, xid: 0, commit_time_us: now_ms() * 1000, seq: 0 };
        let events: Vec<ChangeEvent> =
            rows.into_iter().map(|r| ChangeEvent { op: Op::Read, table: table.clone(), before: None, after: Some(r), position }).collect();
        self.deliver(events.iter()).await
    }

    async fn apply(&mut self, batch: &[Transaction]) -> SinkResult<()> {
        self.deliver(batch.iter().flat_map(|t| &t.events)).await
    }

    async fn teardown(&self, _tables: &[TableName], purge: bool) -> SinkResult<()> {
        if purge {
            self.state
                .execute("DELETE FROM sluice.webhook_dead_letters WHERE pipeline = $1", &[&self.pipeline])
                .await
                .map_err(pg("removing webhook dead letters"))?;
        }
        Ok(())
    }

    async fn health(&self) -> SinkResult<()> {
        match *self.breaker.open_until.lock().expect("breaker") {
            Some(until) if Instant::now() < until => {
                Err(SinkError::new(ErrorKind::Transient, format!("webhook {}: circuit open", self.cfg.url)))
            }
            _ => Ok(()),
        }
    }
}
