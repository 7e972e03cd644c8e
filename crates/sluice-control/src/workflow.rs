//! Durable workflows: provisioning, teardown, pause, resume. A small explicit state
//! machine persisted in the control database (see docs/control-plane.md for why not
//! a framework): a workflow is an ordered list of named steps; the index of the next
//! step, each attempt (who, when, outcome, error) and the retry schedule are written
//! after every step, so any server can resume a workflow after a crash at any point.
//! Every step is idempotent: it is re-run when a server dies after its effect but
//! before its record.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use sluice_core::{TableName, quote_ident};
use tokio::sync::{Semaphore, watch};
use tokio_postgres::Client;

use super::Control;
use sluice_core::quote_literal as literal;
use sluice_engine::metrics::Metrics;
use sluice_engine::pipeline::Pipeline;
use sluice_postgres::replication;

/// Attempts of one step before the workflow fails (a person can `retry` it).
const MAX_ATTEMPTS: i32 = 10;
/// Workflows one server runs at once.
const CONCURRENCY: usize = 16;

/// A step of a workflow. Its name is what the step history and the API show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    CheckSource,
    CreateRole,
    CreatePublication,
    CreateSlot,
    Heartbeat,
    PrepareSink,
    Snapshot,
    Start,
    Stop,
    DropSlot,
    DropPublication,
    DropSinkObjects,
    DropRole,
    Forget,
    RequestResync,
    RequestRecover,
    AwaitResync,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::CheckSource => "check_source",
            Step::CreateRole => "create_role",
            Step::CreatePublication => "create_publication",
            Step::CreateSlot => "create_slot",
            Step::Heartbeat => "heartbeat",
            Step::PrepareSink => "prepare_sink",
            Step::Snapshot => "snapshot",
            Step::Start => "start",
            Step::Stop => "stop",
            Step::DropSlot => "drop_slot",
            Step::DropPublication => "drop_publication",
            Step::DropSinkObjects => "drop_sink_objects",
            Step::DropRole => "drop_role",
            Step::Forget => "forget",
            Step::RequestResync => "request_resync",
            Step::RequestRecover => "request_recover",
            Step::AwaitResync => "await_resync",
        }
    }
}

pub const PROVISION: &[Step] = &[
    Step::CheckSource,
    Step::CreateRole,
    Step::CreatePublication,
    Step::CreateSlot,
    Step::Heartbeat,
    Step::PrepareSink,
    Step::Snapshot,
    Step::Start,
];

/// The steps of a workflow of `kind`.
pub fn steps(kind: &str, params: &Value) -> Vec<Step> {
    use Step::*;
    match kind {
        "provision" => PROVISION.to_vec(),
        "teardown" if params["purge"].as_bool() == Some(true) => vec![Stop, DropSlot, DropPublication, DropSinkObjects, DropRole, Forget],
        "teardown" => vec![Stop, DropSlot, DropPublication, DropRole, Forget],
        "update" => std::iter::once(Stop).chain(PROVISION.iter().copied()).collect(),
        "pause" => vec![Stop],
        "resume" => vec![Start],
        "resync" => vec![RequestResync, AwaitResync],
        "recover" => vec![RequestRecover, AwaitResync],
        _ => vec![],
    }
}

/// Why a step did not finish.
#[derive(Debug)]
pub enum StepError {
    /// Worth another attempt later (the source is down, a restart is pending).
    Retry(String),
    /// Retrying cannot help; a person must act, then `workflows retry`.
    Fatal(String),
    Cancelled,
}

impl From<anyhow::Error> for StepError {
    fn from(e: anyhow::Error) -> Self {
        let msg = format!("{e:#}");
        let pg = e.chain().find_map(|c| c.downcast_ref::<tokio_postgres::Error>());
        if let Some(pg) = pg {
            return match pg.code().map(|c| c.code()) {
                // Connection, shutdown, resources, conflicts: transient. A duplicate
                // object is a concurrent creator of the same thing; steps are
                // idempotent, so the next attempt finds it.
                Some(c) if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") || c.starts_with("40") => Self::Retry(msg),
                Some("23505" | "42P07" | "42710") => Self::Retry(msg),
                Some(_) => Self::Fatal(msg),
                None => Self::Retry(msg),
            };
        }
        match sluice_engine::pipeline::error_kind(&e) {
            sluice_core::ErrorKind::Permanent => Self::Fatal(msg),
            _ => Self::Retry(msg),
        }
    }
}

/// A claimed workflow.
struct Claimed {
    id: i64,
    pipeline_id: i64,
    kind: String,
    params: Value,
    step: i32,
    attempt: i32,
}

/// Claims runnable workflows and runs them, until `shutdown`.
pub async fn worker(ctl: Arc<Control>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let active: Arc<std::sync::Mutex<Vec<i64>>> = Arc::default();
    let mut client: Option<Client> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let mut idle = true;
        if slots.available_permits() > 0 {
            if client.as_ref().is_none_or(Client::is_closed) {
                client = ctl.db.connect().await.map_err(|e| tracing::warn!(error = %e, "workflow worker: control database")).ok();
            }
            if let Some(c) = &client {
                let mine: Vec<i64> = active.lock().expect("lock").clone();
                match claim(c, &ctl, &mine).await {
                    Ok(Some(wf)) => {
                        idle = false;
                        active.lock().expect("lock").push(wf.id);
                        let (ctl, active, permit) = (ctl.clone(), active.clone(), slots.clone().acquire_owned().await.expect("open"));
                        let sd = shutdown.clone();
                        tokio::spawn(async move {
                            let id = wf.id;
                            if let Err(e) = run(&ctl, wf, sd).await {
                                tracing::warn!(workflow = id, error = %format!("{e:#}"), "workflow interrupted; it resumes from its last recorded step");
                            }
                            active.lock().expect("lock").retain(|w| *w != id);
                            drop(permit);
                        });
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "workflow worker: claim failed"),
                }
            }
        }
        if idle {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = ctl.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

async fn claim(c: &Client, ctl: &Control, mine: &[i64]) -> Result<Option<Claimed>> {
    // A server restarted under the same id takes its own leases back at once: the
    // process that held them is gone.
    let row = c
        .query_opt(
            "UPDATE workflows SET owner = $1, lease_until = now() + make_interval(secs => $2),
                    state = 'running', updated_at = now()
             WHERE id = (SELECT id FROM workflows
                         WHERE state IN ('pending', 'running', 'retrying') AND next_run_at <= now()
                           AND (owner IS NULL OR lease_until < now() OR (owner = $1 AND NOT id = ANY($3)))
                         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING id, pipeline_id, kind, params, step, attempt",
            &[&ctl.server_id, &ctl.lease.as_secs_f64(), &mine],
        )
        .await?;
    Ok(row.map(|r| Claimed { id: r.get(0), pipeline_id: r.get(1), kind: r.get(2), params: r.get(3), step: r.get(4), attempt: r.get(5) }))
}

/// Test hook (fail points): `SLUICE_FAILPOINT=kill-after:provision.create_slot` kills
/// this process with SIGKILL right after that step is recorded; `kill-before-record:`
/// right after its effect, before the record. Nothing else reads it.
fn failpoint(when: &str, kind: &str, step: &str) {
    if std::env::var("SLUICE_FAILPOINT").is_ok_and(|f| f == format!("{when}:{kind}.{step}")) {
        tracing::warn!(failpoint = %format!("{when}:{kind}.{step}"), "failpoint: killing this process");
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::thread::sleep(Duration::from_secs(60));
    }
}

async fn run(ctl: &Arc<Control>, mut wf: Claimed, shutdown: watch::Receiver<bool>) -> Result<()> {
    let c = ctl.db.connect().await?;
    let names = steps(&wf.kind, &wf.params);
    loop {
        let Some(&step) = names.get(wf.step as usize) else {
            c.execute(
                "UPDATE workflows SET state = 'succeeded', owner = NULL, error = NULL, updated_at = now() WHERE id = $1 AND owner = $2",
                &[&wf.id, &ctl.server_id],
            )
            .await?;
            tracing::info!(workflow = wf.id, kind = %wf.kind, "workflow succeeded");
            return Ok(());
        };
        let name = step.name();
        let cancel: bool = c.query_one("SELECT cancel_requested FROM workflows WHERE id = $1", &[&wf.id]).await?.get(0);
        if cancel {
            finish(&c, ctl, wf.id, "cancelled", "cancelled on request").await?;
            return Ok(());
        }
        wf.attempt += 1;
        let attempt_id: i64 = c
            .query_one(
                "WITH w AS (UPDATE workflows SET attempt = $3, updated_at = now() WHERE id = $1)
                 INSERT INTO workflow_steps (workflow_id, step, name, attempt, owner) VALUES ($1, $2, $4, $3, $5) RETURNING id",
                &[&wf.id, &wf.step, &wf.attempt, &name, &ctl.server_id],
            )
            .await?
            .get(0);
        tracing::info!(workflow = wf.id, kind = %wf.kind, step = name, attempt = wf.attempt, "workflow step");
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let outcome = {
            let step = run_step(ctl, &wf, step, cancel_rx);
            tokio::pin!(step);
            let mut sd = shutdown.clone();
            let mut tick = tokio::time::interval(ctl.lease / 3);
            loop {
                tokio::select! {
                    r = &mut step => break r,
                    _ = tick.tick() => {
                        // Keep the lease; a lost lease means another server took over.
                        let row = c.query_opt(
                            "UPDATE workflows SET lease_until = now() + make_interval(secs => $3) WHERE id = $1 AND owner = $2 RETURNING cancel_requested",
                            &[&wf.id, &ctl.server_id, &ctl.lease.as_secs_f64()]).await?;
                        match row {
                            None => anyhow::bail!("lost the lease on workflow {}", wf.id),
                            Some(r) if r.get::<_, bool>(0) => { let _ = cancel_tx.send(true); }
                            Some(_) => {}
                        }
                    }
                    _ = sd.changed() => { let _ = cancel_tx.send(true); anyhow::bail!("server stopping"); }
                }
            }
        };
        match outcome {
            Ok(()) => {
                failpoint("kill-before-record", &wf.kind, name);
                advance(&c, wf.id, &ctl.server_id, wf.step, attempt_id).await?;
                failpoint("kill-after", &wf.kind, name);
                wf.step += 1;
                wf.attempt = 0;
            }
            Err(e) => {
                let (state, msg) = match &e {
                    StepError::Cancelled => ("cancelled", "cancelled on request".to_string()),
                    StepError::Retry(m) if wf.attempt < MAX_ATTEMPTS => ("retrying", m.clone()),
                    StepError::Retry(m) => {
                        ("failed", format!("{m} (gave up after {MAX_ATTEMPTS} attempts; `sluice workflows retry` tries again)"))
                    }
                    StepError::Fatal(m) => ("failed", m.clone()),
                };
                let backoff = Duration::from_secs(1 << (wf.attempt - 1).clamp(0, 6)).min(Duration::from_secs(60));
                tracing::warn!(workflow = wf.id, step = name, attempt = wf.attempt, state, error = %msg, "workflow step failed");
                // Fenced like `advance`: a server that lost the lease records nothing.
                let n = c
                    .execute(
                        "WITH s AS (UPDATE workflow_steps SET ended_at = now(), outcome = $3, error = $4 WHERE id = $2)
                         UPDATE workflows SET state = $5, error = $4, owner = NULL, updated_at = now(),
                                next_run_at = now() + make_interval(secs => $6) WHERE id = $1 AND owner = $7 AND step = $8",
                        &[
                            &wf.id,
                            &attempt_id,
                            &if state == "cancelled" { "cancelled" } else { "failed" },
                            &msg,
                            &state,
                            &backoff.as_secs_f64(),
                            &ctl.server_id,
                            &wf.step,
                        ],
                    )
                    .await?;
                if n == 0 {
                    anyhow::bail!("lost the lease on workflow {} at step {}: not recording its outcome", wf.id, wf.step);
                }
                if state == "retrying" {
                    ctl.wake.notify_one();
                }
                return Ok(());
            }
        }
    }
}

/// Records step `step` of workflow `id` as succeeded and moves to the next one, only if
/// `owner` still holds the workflow at that step: a server whose lease lapsed (and whose
/// workflow another server took over, maybe already further along) must not skip the
/// new owner's next step. Zero rows updated is an error: stop running this workflow.
async fn advance(c: &Client, id: i64, owner: &str, step: i32, attempt_id: i64) -> Result<()> {
    let n = c
        .execute(
            "WITH w AS (UPDATE workflows SET step = step + 1, attempt = 0, error = NULL, updated_at = now()
                        WHERE id = $1 AND owner = $2 AND step = $3 RETURNING id)
             UPDATE workflow_steps SET ended_at = now(), outcome = 'succeeded'
             WHERE id = $4 AND EXISTS (SELECT 1 FROM w)",
            &[&id, &owner, &step, &attempt_id],
        )
        .await?;
    if n == 0 {
        anyhow::bail!("lost the lease on workflow {id} at step {step}: another server owns it now");
    }
    Ok(())
}

async fn finish(c: &Client, ctl: &Control, id: i64, state: &str, error: &str) -> Result<()> {
    c.execute(
        "UPDATE workflows SET state = $2, error = $3, owner = NULL, updated_at = now() WHERE id = $1 AND owner = $4",
        &[&id, &state, &error, &ctl.server_id],
    )
    .await?;
    Ok(())
}

async fn run_step(ctl: &Arc<Control>, wf: &Claimed, step: Step, cancel: watch::Receiver<bool>) -> Result<(), StepError> {
    let p = match ctl.load_pipeline(wf.pipeline_id).await? {
        Some(p) => p,
        // Only `forget` removes the row: its re-run after a crash finds it gone.
        None if step == Step::Forget => return Ok(()),
        None => return Err(StepError::Fatal(format!("pipeline {} no longer exists", wf.pipeline_id))),
    };
    // Forgetting connects to nothing; every other step reaches the tenant's hosts.
    if step != Step::Forget {
        ctl.recheck_pipeline_egress(&p).await.map_err(StepError::Fatal)?;
    }
    let obj = p.object_name();
    let role = quote_ident(&obj);
    let cfg = p.run_config().map_err(|e| StepError::Fatal(e.message))?;
    // Reference tables of lookups in the source too: granted and published.
    let tables = cfg.source_tables();
    let admin = || async { Ok::<_, StepError>(sluice_postgres::connect(&p.admin(), "source (admin)").await.map_err(anyhow::Error::from)?) };
    match step {
        Step::CheckSource => {
            let c = admin().await?;
            let level: String = q1(&c, "SHOW wal_level", &[]).await?;
            if level != "logical" {
                let superuser: bool = q1(&c, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[]).await?;
                if !superuser {
                    return Err(StepError::Fatal(format!(
                        "source {}: wal_level is {level}; logical replication needs logical: ask a superuser to run ALTER SYSTEM SET wal_level = logical and restart Postgres, then retry this workflow",
                        p.source.name
                    )));
                }
                c.batch_execute("ALTER SYSTEM SET wal_level = logical").await.map_err(anyhow::Error::from)?;
                return Err(StepError::Retry(format!(
                    "source {}: wal_level was {level}; set to logical with ALTER SYSTEM: restart Postgres to apply it (this step checks again)",
                    p.source.name
                )));
            }
            super::check_privileges(&c, &p.source, &tables).await.map_err(StepError::Fatal)?;
        }
        Step::CreateRole => {
            let c = admin().await?;
            let pw = password_verifier(&p.role_password);
            c.batch_execute(&format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {name}) THEN CREATE ROLE {role} LOGIN REPLICATION PASSWORD {pw}; END IF; END $$;
                 ALTER ROLE {role} WITH LOGIN REPLICATION PASSWORD {pw};
                 GRANT CONNECT ON DATABASE {db} TO {role};",
                name = literal(&obj),
                db = quote_ident(&p.source.database)
            ))
            .await
            .map_err(anyhow::Error::from)?;
            let mut schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
            schemas.dedup();
            for s in schemas {
                c.batch_execute(&format!("GRANT USAGE ON SCHEMA {} TO {role}", quote_ident(s))).await.map_err(anyhow::Error::from)?;
            }
            let list: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
            if !list.is_empty() {
                c.batch_execute(&format!("GRANT SELECT ON TABLE {} TO {role}", list.join(", "))).await.map_err(anyhow::Error::from)?;
            }
        }
        Step::CreatePublication => {
            let c = admin().await?;
            replication::ensure_publication(&c, &obj, &tables, &cfg.table_filters(), replication::PublicationTables::Set)
                .await
                .map_err(anyhow::Error::from)?;
            // Schema changes reach the pipeline as messages; the admin may create the
            // event trigger, the pipeline's role may not.
            sluice_postgres::ddl_capture::install(&c, &obj).await.map_err(anyhow::Error::from)?;
        }
        Step::CreateSlot => {
            replication::create_slot(&admin().await?, &obj).await.map_err(anyhow::Error::from)?;
        }
        Step::Heartbeat => {
            // The heartbeat is a logical message the pipeline writes on a timer (no
            // table): the role must be allowed to emit it.
            let c = admin().await?;
            let function = replication::EMIT_MESSAGE_FUNCTION;
            let allowed: bool = q1(&c, "SELECT has_function_privilege($1, $2, 'EXECUTE')", &[&obj, &function]).await?;
            if !allowed {
                c.batch_execute(&format!("GRANT EXECUTE ON FUNCTION {function} TO {role}")).await.map_err(anyhow::Error::from)?;
            }
            let as_role =
                sluice_postgres::connect(&cfg.source_connection(), "source (pipeline role)").await.map_err(anyhow::Error::from)?;
            replication::emit_heartbeat(&as_role, &cfg.pipeline).await.map_err(anyhow::Error::from)?;
        }
        Step::PrepareSink => {
            let (_tx, rx) = watch::channel(false);
            let pipeline = Pipeline::new(cfg, Arc::new(Metrics::default()), rx);
            pipeline.prepare().await?;
        }
        Step::Snapshot => {
            if cfg.snapshot.enabled {
                let mut pipeline = Pipeline::new(cfg, Arc::new(Metrics::default()), cancel.clone());
                pipeline.stop_after_snapshot = true;
                pipeline.run_once().await?;
                if *cancel.borrow() {
                    return Err(StepError::Cancelled);
                }
            }
        }
        Step::Start => {
            ctl.db
                .get()
                .await?
                .execute("UPDATE pipelines SET desired = 'running', retry_at = now(), updated_at = now() WHERE id = $1", &[&p.id])
                .await
                .map_err(anyhow::Error::from)?;
            ctl.wake_supervisor.notify_one();
        }
        Step::Stop => {
            let desired = if wf.kind == "teardown" { "stopped" } else { "paused" };
            let db = ctl.db.get().await?;
            db.execute("UPDATE pipelines SET desired = $2, updated_at = now() WHERE id = $1", &[&p.id, &desired])
                .await
                .map_err(anyhow::Error::from)?;
            ctl.wake_supervisor.notify_one();
            // The server running it stops it and lets go; a dead one's lease runs out.
            let deadline = tokio::time::Instant::now() + ctl.lease * 2 + Duration::from_secs(5);
            loop {
                let free: bool = q1(&db, "SELECT owner IS NULL OR lease_until < now() FROM pipelines WHERE id = $1", &[&p.id]).await?;
                if free {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(StepError::Retry("the pipeline is still running on its server".into()));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Step::DropSlot => {
            let c = admin().await?;
            // Tries for 30 s, waiting longer each time (a walsender takes a moment to
            // end), then hands the step back to the workflow's own retries.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let mut wait = Duration::from_millis(100);
            loop {
                // The slot is ours by name: dropped when idle.
                let why = match replication::drop_slot_if_idle(&c, &obj).await.map_err(anyhow::Error::from)? {
                    None if !replication::slot_exists(&c, &obj).await.map_err(anyhow::Error::from)? => break,
                    None => format!("replication slot {obj} was taken again as it was dropped"),
                    Some(pid) => {
                        // A walsender left by a stopped pipeline's server: end it.
                        let _ = c.execute("SELECT pg_terminate_backend($1)", &[&pid]).await;
                        format!("replication slot {obj} is still in use by backend {pid}")
                    }
                };
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(StepError::Retry(why));
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
        Step::DropPublication => {
            let c = admin().await?;
            sluice_postgres::ddl_capture::remove(&c, &obj).await.map_err(anyhow::Error::from)?;
            replication::drop_publication(&c, &obj).await.map_err(anyhow::Error::from)?;
        }
        Step::DropRole => {
            let c = admin().await?;
            let exists: bool = q1(&c, "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", &[&obj]).await?;
            if exists {
                // Sessions of the role (a lingering pipeline connection) block DROP ROLE.
                c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", &[&obj])
                    .await
                    .map_err(anyhow::Error::from)?;
                c.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await.map_err(anyhow::Error::from)?;
            }
        }
        Step::RequestResync | Step::RequestRecover | Step::AwaitResync => {
            let tables: Vec<TableName> =
                wf.params["tables"].as_array().into_iter().flatten().filter_map(|t| TableName::parse(t.as_str()?)).collect();
            let state = sluice_postgres::connect(&cfg.state_connection(), "state database").await.map_err(anyhow::Error::from)?;
            if step == Step::RequestResync {
                sluice_engine::resync::request(&state, &cfg.pipeline, wf.id, &tables).await?;
                return Ok(());
            }
            if step == Step::RequestRecover {
                // The pipeline (halted on its lost slot) takes the request at its next
                // retry; the resync rows it reads carry this workflow's id.
                let id = sluice_engine::recover::request(&state, &cfg.pipeline, wf.id, &tables).await?;
                if id != wf.id {
                    return Err(StepError::Fatal(format!("recovery {id} of pipeline {} is already pending", p.name)));
                }
                return Ok(());
            }
            let db = ctl.db.get().await?;
            loop {
                let progress = sluice_engine::resync::progress(&state, &cfg.pipeline, wf.id).await?;
                db.execute(
                    "UPDATE workflows SET params = params || jsonb_build_object('progress', $2::jsonb) WHERE id = $1",
                    &[&wf.id, &serde_json::to_value(&progress).map_err(anyhow::Error::from)?],
                )
                .await
                .map_err(anyhow::Error::from)?;
                if progress.iter().all(|t| t.done) {
                    break;
                }
                if *cancel.borrow() {
                    sluice_engine::resync::cancel(&state, &cfg.pipeline, wf.id).await?;
                    return Err(StepError::Cancelled);
                }
                let desired: String = q1(&db, "SELECT desired FROM pipelines WHERE id = $1", &[&p.id]).await?;
                if desired != "running" {
                    return Err(StepError::Fatal(format!(
                        "pipeline {} is {desired}: the resync goes on when it runs again (resume it, then retry this workflow)",
                        p.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Step::DropSinkObjects => super::purge_sink(&p, &cfg).await?,
        Step::Forget => {
            ctl.db.get().await?.execute("DELETE FROM pipelines WHERE id = $1", &[&p.id]).await.map_err(anyhow::Error::from)?;
        }
    }
    Ok(())
}

/// The role's password as a SCRAM-SHA-256 verifier (a quoted literal): the source
/// stores it as it is, and the password itself never appears in SQL text (statement
/// logs, `pg_stat_statements`, a proxy's logs).
fn password_verifier(password: &str) -> String {
    literal(&postgres_protocol::password::scram_sha_256(password.as_bytes()))
}

async fn q1<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    c: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<T, StepError> {
    Ok(c.query_one(sql, params).await.map_err(anyhow::Error::from)?.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_postgres::cluster::TempCluster;

    /// The role is created from the verifier alone, and the password logs it in.
    #[tokio::test(flavor = "multi_thread")]
    async fn role_passwords_go_to_the_source_as_scram_verifiers() {
        let pg = tokio::task::spawn_blocking(|| TempCluster::start(&[])).await.unwrap().unwrap();
        let password = crate::crypto::new_password();
        let verifier = password_verifier(&password);
        assert!(verifier.starts_with("'SCRAM-SHA-256$4096:") && !verifier.contains(&password), "{verifier}");
        let admin = sluice_postgres::connect(&sluice_postgres::parse_dsn(&pg.dsn("postgres")).unwrap(), "test").await.unwrap();
        admin.batch_execute(&format!("CREATE ROLE verified LOGIN PASSWORD {verifier}")).await.unwrap();
        let stored: String = admin.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = 'verified'", &[]).await.unwrap().get(0);
        assert_eq!(format!("'{stored}'"), verifier, "stored as given, not hashed again");
        let mut cfg = sluice_postgres::parse_dsn(&pg.dsn("postgres")).unwrap();
        cfg.user = "verified".into();
        cfg.password = password.clone().into();
        let c = sluice_postgres::connect(&cfg, "test").await.expect("the password logs in");
        assert_eq!(c.query_one("SELECT current_user::text", &[]).await.unwrap().get::<_, String>(0), "verified");
        cfg.password = "wrong".to_string().into();
        assert!(sluice_postgres::connect(&cfg, "test").await.is_err());
    }

    /// A server that lost a workflow's lease (and whose workflow another server took
    /// over) cannot advance it: the step stays where the new owner has it.
    #[tokio::test(flavor = "multi_thread")]
    async fn advance_is_fenced_by_owner_and_step() {
        let pg = tokio::task::spawn_blocking(|| TempCluster::start(&[])).await.unwrap().unwrap();
        let db = super::super::db::Db::new(&pg.dsn("postgres")).unwrap();
        db.migrate().await.unwrap();
        let c = db.connect().await.unwrap();
        let id: i64 = c
            .query_one(
                "WITH t AS (INSERT INTO tenants (name) VALUES ('t') RETURNING id)
                 INSERT INTO workflows (tenant_id, pipeline_id, pipeline_name, kind, state, step, owner, lease_until)
                 SELECT id, 1, 'p', 'provision', 'running', 2, 'node-b', now() + interval '15 s' FROM t RETURNING id",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let attempt = |who: &'static str, step: i32| {
            let c = &c;
            async move {
                c.query_one(
                    "INSERT INTO workflow_steps (workflow_id, step, name, attempt, owner) VALUES ($1, $2, 'x', 1, $3) RETURNING id",
                    &[&id, &step, &who],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
            }
        };
        let step = || async { c.query_one("SELECT step FROM workflows WHERE id = $1", &[&id]).await.unwrap().get::<_, i32>(0) };

        // node-a ran step 1 before its lease lapsed; node-b now owns the run at step 2.
        let a = attempt("node-a", 1).await;
        let err = advance(&c, id, "node-a", 1, a).await.unwrap_err();
        assert!(err.to_string().contains("lost the lease"), "{err}");
        assert_eq!(step().await, 2);
        // The owner at the wrong step is refused too (a replayed success).
        let b = attempt("node-b", 1).await;
        assert!(advance(&c, id, "node-b", 1, b).await.is_err());
        assert_eq!(step().await, 2);
        let outcome: Option<String> = c.query_one("SELECT outcome FROM workflow_steps WHERE id = $1", &[&a]).await.unwrap().get(0);
        assert_eq!(outcome, None, "a refused advance records no outcome");
        // The owner at its own step advances.
        let b2 = attempt("node-b", 2).await;
        advance(&c, id, "node-b", 2, b2).await.unwrap();
        assert_eq!(step().await, 3);
    }
}
