//! The control plane: tenants, tokens, sources, sinks and pipelines behind an HTTP API
//! (`api`), durable workflows that provision and tear down every piece of a pipeline
//! (`workflow`), and the supervisor that runs pipelines under leases shared by all the
//! servers pointed at one control database (`supervisor`). State lives in the control
//! database (`db`); secrets are sealed with the master key (`crypto`).

pub mod api;
pub mod crypto;
pub mod db;
pub mod egress;
pub mod keys;
pub mod model;
pub mod supervisor;
pub mod workflow;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;
use sluice_core::TableName;
use tokio::sync::{Notify, watch};
use tokio_postgres::Client;

use crypto::Owner;
use model::{Invalid, PipelineSpec, SinkSpec, SourceSpec, object_name};
use sluice_engine::config::PipelineConfig;

/// One server's view of the control plane.
pub struct Control {
    pub db: db::Db,
    pub sealer: crypto::Sealer,
    /// Names this server in leases: unique among live servers, stable across restarts.
    pub server_id: String,
    /// How long a lease lasts without renewal (pipelines and workflows).
    pub lease: Duration,
    /// Names this installation's objects in sources (see [`model::object_name`]).
    pub install: String,
    pub(crate) wake: Notify,
    pub(crate) wake_supervisor: Notify,
    /// DogStatsD metrics and alert state of the pipelines this server runs.
    pub(crate) signals: std::sync::Mutex<supervisor::Signals>,
    /// The address ranges tenants may name besides public ones.
    egress: std::sync::RwLock<Arc<egress::Egress>>,
    /// How many pipelines and mirrors each tenant may hold.
    quotas: std::sync::RwLock<api::Quotas>,
    /// The pipelines this server runs, for `/metrics`.
    pub(crate) running: std::sync::Mutex<std::collections::BTreeMap<i64, Running>>,
}

/// A pipeline running on this server: its names and live metrics.
pub(crate) struct Running {
    pub tenant_id: i64,
    pub tenant: String,
    pub pipeline: String,
    pub sink: String,
    pub metrics: Arc<sluice_engine::metrics::Metrics>,
}

/// A pipeline with its source and sink, secrets opened.
pub struct Loaded {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    pub spec: PipelineSpec,
    pub source: SourceSpec,
    pub sink: SinkSpec,
    /// The enrichers the spec names, in its order, secrets opened.
    pub enrichers: Vec<Value>,
    pub role_password: String,
    pub install: String,
    /// The server's egress policy when loaded: every connection made for the
    /// pipeline goes through it.
    pub egress: Arc<egress::Egress>,
}

impl Loaded {
    /// The runner's config: it connects as the pipeline's own replication role.
    pub fn run_config(&self) -> Result<PipelineConfig, Invalid> {
        let mut cfg = model::run_config(
            &self.install,
            self.id,
            &self.spec,
            &self.source,
            &self.sink,
            &self.enrichers,
            &self.object_name(),
            &self.role_password,
        )?;
        cfg.egress = Some(self.egress.clone());
        Ok(cfg)
    }

    /// The source as its admin, through the egress policy.
    pub fn admin(&self) -> sluice_postgres::PgConnConfig {
        self.source.admin().guarded(Some(&self.egress))
    }

    pub fn object_name(&self) -> String {
        object_name(&self.install, self.id)
    }
}

impl Control {
    /// The control plane over a migrated control database.
    pub async fn new(db: db::Db, sealer: crypto::Sealer, server_id: String, lease: Duration) -> Result<Arc<Self>> {
        let install = db.installation().await?;
        Ok(Arc::new(Self {
            db,
            sealer,
            server_id,
            lease,
            install,
            wake: Notify::new(),
            wake_supervisor: Notify::new(),
            signals: Default::default(),
            egress: Default::default(),
            quotas: Default::default(),
            running: Default::default(),
        }))
    }

    /// The Prometheus metrics of the pipelines this server runs (of one tenant's, when
    /// `tenant` is given), labelled pipeline, tenant and sink.
    pub fn render_metrics(&self, tenant: Option<i64>) -> String {
        use sluice_engine::metrics::label_value as v;
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let shown: Vec<(String, &sluice_engine::metrics::Metrics)> = running
            .values()
            .filter(|r| tenant.is_none_or(|t| t == r.tenant_id))
            .map(|r| (format!("pipeline=\"{}\",tenant=\"{}\",sink=\"{}\"", v(&r.pipeline), v(&r.tenant), v(&r.sink)), &*r.metrics))
            .collect();
        sluice_engine::metrics::render_all(&shown)
    }

    /// The ranges tenants may reach besides public addresses (default: none).
    pub fn set_egress(&self, e: egress::Egress) {
        *self.egress.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(e);
    }

    /// How many pipelines and mirrors each tenant may hold (default 100 of each).
    pub fn set_quotas(&self, q: api::Quotas) {
        *self.quotas.write().unwrap_or_else(|e| e.into_inner()) = q;
    }

    pub(crate) fn quotas(&self) -> api::Quotas {
        *self.quotas.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn egress_policy(&self) -> Arc<egress::Egress> {
        self.egress.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Refuses (422 `egress_refused`) settings naming a host tenants may not reach.
    pub(crate) async fn check_egress(&self, at: &str, settings: &Value) -> Result<(), api::ApiError> {
        egress::check_settings(&self.egress_policy(), at, settings).await.map_err(|i| api::ApiError::invalid("egress_refused", i))
    }

    /// Every host a stored pipeline or mirror names, checked again just before this
    /// server connects to them: what was checked when it was saved no longer holds
    /// once the name resolves elsewhere (DNS rebinding) or the operator has narrowed
    /// `--allow-egress`. The error is one line for the resource's status.
    pub(crate) async fn recheck_egress(&self, named: &[(&str, &Value)]) -> Result<(), String> {
        let policy = self.egress_policy();
        for (at, settings) in named {
            if let Err(refused) = egress::check_settings(&policy, at, settings).await {
                return Err(format!("egress refused when connecting: {}", refused.message));
            }
        }
        Ok(())
    }

    /// [`Control::recheck_egress`] for a pipeline: its source, its sink and its enrichers.
    pub(crate) async fn recheck_pipeline_egress(&self, p: &Loaded) -> Result<(), String> {
        let source = serde_json::json!({ "host": p.source.host });
        let mut named: Vec<(&str, &Value)> = vec![("", &source), (&p.sink.kind, &p.sink.settings)];
        named.extend(p.enrichers.iter().map(|e| ("", e)));
        self.recheck_egress(&named).await
    }

    /// Sends every pipeline's metrics to a DogStatsD agent, tagged with its tenant.
    pub fn set_dogstatsd(&self, d: sluice_engine::dogstatsd::DogStatsd) {
        self.signals.lock().unwrap_or_else(|e| e.into_inner()).statsd = Some(d);
    }

    pub async fn load_pipeline(&self, id: i64) -> Result<Option<Loaded>> {
        let c = self.db.get().await?;
        let Some(r) = c
            .query_opt(
                "SELECT p.id, p.tenant_id, p.name, p.spec, p.role_password, s.sealed, k.sealed, s.name, k.name
                 FROM pipelines p JOIN sources s ON s.id = p.source_id JOIN sinks k ON k.id = p.sink_id WHERE p.id = $1",
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let tenant_id: i64 = r.get(1);
        let open = |table, name_col: usize, col: usize| {
            self.sealer.open(Owner::new(table, tenant_id, r.get(name_col)), r.get::<_, &[u8]>(col)).map_err(anyhow::Error::msg)
        };
        let spec = PipelineSpec::from_json(&r.get::<_, Value>(3))?;
        let mut enrichers = Vec::with_capacity(spec.enrichers.len());
        for name in &spec.enrichers {
            let e = c
                .query_opt("SELECT sealed FROM enrichers WHERE tenant_id = $1 AND name = $2", &[&tenant_id, name])
                .await?
                .with_context(|| format!("enricher {name:?} of pipeline {id} no longer exists"))?;
            let plain = self.sealer.open(Owner::new("enrichers", tenant_id, name), e.get::<_, &[u8]>(0)).map_err(anyhow::Error::msg)?;
            enrichers.push(model::EnricherSpec::from_sealed(&plain)?);
        }
        Ok(Some(Loaded {
            id: r.get(0),
            tenant_id,
            name: r.get(2),
            enrichers,
            spec,
            role_password: String::from_utf8(open("pipelines", 2, 4)?).context("role password")?,
            source: SourceSpec::from_sealed(&open("sources", 7, 5)?)?,
            sink: SinkSpec::from_sealed(&open("sinks", 8, 6)?)?,
            install: self.install.clone(),
            egress: self.egress_policy(),
        }))
    }

    /// Starts the workflow worker and the pipeline supervisor.
    pub fn spawn_loops(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        vec![tokio::spawn(workflow::worker(self.clone(), shutdown.clone())), tokio::spawn(supervisor::supervisor(self.clone(), shutdown))]
    }

    /// Creates a platform-admin token when the control database has none; returns it.
    pub async fn bootstrap(&self) -> Result<Option<String>> {
        let c = self.db.get().await?;
        let token = crypto::new_token();
        let n = c
            .execute(
                "INSERT INTO tokens (tenant_id, role, name, hash)
                 SELECT NULL, 'platform_admin', 'bootstrap', $1 WHERE NOT EXISTS (SELECT FROM tokens WHERE role = 'platform_admin')",
                &[&crypto::token_hash(&token)],
            )
            .await?;
        Ok((n == 1).then_some(token))
    }
}

/// Whether the source's admin user can provision a pipeline over `tables`: it must
/// create roles and replication slots, and own the tables (to publish them and grant
/// SELECT on them), or be a superuser.
pub async fn check_privileges(c: &Client, source: &SourceSpec, tables: &[TableName]) -> Result<(), String> {
    let e = |e: tokio_postgres::Error| format!("source {}: reading the admin user's privileges: {e}", source.name);
    let r =
        c.query_one("SELECT rolsuper, rolcreaterole, rolreplication FROM pg_roles WHERE rolname = current_user", &[]).await.map_err(e)?;
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let absent: Vec<String> = c
        .query("SELECT t FROM unnest($1::text[]) t WHERE to_regclass(t) IS NULL", &[&names])
        .await
        .map_err(e)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !absent.is_empty() {
        return Err(format!("tables: {} not found in source {} (database {})", absent.join(", "), source.name, source.database));
    }
    if r.get::<_, bool>(0) {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !r.get::<_, bool>(1) {
        missing.push("CREATEROLE");
    }
    if !r.get::<_, bool>(2) {
        missing.push("REPLICATION");
    }
    let not_owned: Vec<String> = c
        .query(
            "SELECT t FROM unnest($1::text[]) t
             WHERE NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = to_regclass(t)), 'USAGE')",
            &[&names],
        )
        .await
        .map_err(e)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if missing.is_empty() && not_owned.is_empty() {
        return Ok(());
    }
    let mut need = Vec::new();
    if !missing.is_empty() {
        need.push(format!("ALTER ROLE {} {}", sluice_core::quote_ident(&source.admin_user), missing.join(" ")));
    }
    if !not_owned.is_empty() {
        need.push(format!("ownership of {}", not_owned.join(", ")));
    }
    Err(format!(
        "source {}: admin user {} cannot provision pipelines: it needs {} (or to be a superuser)",
        source.name,
        source.admin_user,
        need.join(" and ")
    ))
}

/// Removes what the pipeline created in its sink (teardown with `purge`): target
/// tables, or topics and their schema subjects, or the index (the sink's own
/// `teardown`), then the pipeline's rows in every state table.
pub(crate) async fn purge_sink(p: &Loaded, cfg: &PipelineConfig) -> Result<(), workflow::StepError> {
    let (_tx, rx) = watch::channel(false);
    let pipeline = sluice_engine::pipeline::Pipeline::new(cfg.clone(), Arc::new(sluice_engine::metrics::Metrics::default()), rx);
    pipeline.teardown_sink(true).await?;
    let state = cfg.state_connection();
    let c = sluice_postgres::connect(&state, "sink").await.map_err(anyhow::Error::from)?;
    sluice_engine::state::forget_pipeline(&c, &model::runner_name(&p.install, p.id)).await.map_err(anyhow::Error::from)?;
    Ok(())
}
