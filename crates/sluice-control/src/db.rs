//! The control database: connection (re-established when lost) and embedded schema
//! migrations, applied in order on start under an advisory lock so several servers
//! starting at once apply each migration exactly once.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::sync::Mutex;
use tokio_postgres::Client;

/// Each entry runs once, in its own transaction, recorded in `schema_migrations`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE tokens (
    id bigserial PRIMARY KEY,
    tenant_id bigint REFERENCES tenants(id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('platform_admin', 'tenant_admin', 'tenant_viewer')),
    name text NOT NULL,
    hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((role = 'platform_admin') = (tenant_id IS NULL))
);
CREATE TABLE sources (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants(id),
    name text NOT NULL,
    spec jsonb NOT NULL,
    sealed bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE TABLE sinks (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants(id),
    name text NOT NULL,
    kind text NOT NULL,
    spec jsonb NOT NULL,
    sealed bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE TABLE pipelines (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants(id),
    name text NOT NULL,
    source_id bigint NOT NULL REFERENCES sources(id),
    sink_id bigint NOT NULL REFERENCES sinks(id),
    spec jsonb NOT NULL,
    role_password bytea NOT NULL,
    desired text NOT NULL DEFAULT 'provisioning' CHECK (desired IN ('provisioning', 'running', 'paused', 'stopped')),
    generation int NOT NULL DEFAULT 0,
    owner text,
    lease_until timestamptz,
    retry_at timestamptz NOT NULL DEFAULT now(),
    status jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE TABLE workflows (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants(id),
    pipeline_id bigint NOT NULL,
    pipeline_name text NOT NULL,
    kind text NOT NULL,
    params jsonb NOT NULL DEFAULT '{}',
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'retrying', 'succeeded', 'failed', 'cancelled')),
    step int NOT NULL DEFAULT 0,
    attempt int NOT NULL DEFAULT 0,
    next_run_at timestamptz NOT NULL DEFAULT now(),
    owner text,
    lease_until timestamptz,
    cancel_requested bool NOT NULL DEFAULT false,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- One workflow at a time per pipeline.
CREATE UNIQUE INDEX workflows_one_active ON workflows (pipeline_id) WHERE state IN ('pending', 'running', 'retrying');
CREATE INDEX workflows_runnable ON workflows (next_run_at) WHERE state IN ('pending', 'running', 'retrying');
CREATE TABLE workflow_steps (
    id bigserial PRIMARY KEY,
    workflow_id bigint NOT NULL REFERENCES workflows(id) ON DELETE CASCADE,
    step int NOT NULL,
    name text NOT NULL,
    attempt int NOT NULL,
    owner text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    outcome text,
    error text
);
CREATE INDEX workflow_steps_by_workflow ON workflow_steps (workflow_id, id);
"#,
    r#"
-- Names this installation's objects in sources (roles and slots are cluster-wide, so
-- two control databases using one source must not collide).
CREATE TABLE installation (id text NOT NULL);
INSERT INTO installation SELECT substr(md5(random()::text || clock_timestamp()::text), 1, 6);
"#,
    r#"
-- Enrichers a tenant registers once and pipelines reference by name.
CREATE TABLE enrichers (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants(id),
    name text NOT NULL,
    spec jsonb NOT NULL,
    sealed bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
"#,
    r#"
-- A tenant's alert settings: the webhook (sealed: a Slack URL is a credential) and
-- the rules' thresholds, applied to all its pipelines.
CREATE TABLE alert_settings (
    tenant_id bigint PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
    spec jsonb NOT NULL,
    sealed bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"#,
    r#"
-- Kafka-to-Kafka mirrors: run under leases like pipelines (no source objects to
-- provision, so no workflow); `deleting` is a teardown the supervisor carries out
-- (the offsets topic, and with `purge` the target topics) before it removes the row.
CREATE TABLE mirrors (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants(id),
    name text NOT NULL,
    spec jsonb NOT NULL,
    sealed bytea NOT NULL,
    desired text NOT NULL DEFAULT 'running' CHECK (desired IN ('running', 'paused', 'deleting')),
    purge bool NOT NULL DEFAULT false,
    generation int NOT NULL DEFAULT 0,
    owner text,
    lease_until timestamptz,
    retry_at timestamptz NOT NULL DEFAULT now(),
    status jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
"#,
    r#"
-- Tokens that expire (NULL: never), and when each was last used.
ALTER TABLE tokens ADD COLUMN expires_at timestamptz, ADD COLUMN last_used_at timestamptz;
"#,
];

/// The schema everything lives in, so the control database may be shared.
pub const SCHEMA: &str = "sluice_control";

/// A connection to the control database, re-opened when it drops.
#[derive(Clone)]
pub struct Db {
    config: Arc<sluice_postgres::PgConnConfig>,
    client: Arc<Mutex<Option<Arc<Client>>>>,
}

impl Db {
    pub fn new(dsn: &str) -> Result<Self, String> {
        let config = sluice_postgres::parse_dsn(dsn).map_err(|e| format!("control database: {e}"))?;
        Ok(Self { config: Arc::new(config), client: Arc::new(Mutex::new(None)) })
    }

    /// A live client (a new connection each call for [`Db::dedicated`] users).
    pub async fn get(&self) -> Result<Arc<Client>> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.connect().await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A connection of its own (for transactions, and for loops that must not wait
    /// behind API requests).
    pub async fn connect(&self) -> Result<Client> {
        let options = format!("-c search_path={SCHEMA} -c timezone=UTC");
        Ok(sluice_postgres::connect_as(&self.config, "the control database", &options, "sluice-control").await?)
    }

    /// This installation's id (from the control database).
    pub async fn installation(&self) -> Result<String> {
        Ok(self.get().await?.query_one("SELECT id FROM installation", &[]).await?.get(0))
    }

    /// Applies the migrations this build has and the database does not.
    pub async fn migrate(&self) -> Result<()> {
        let mut c = self.connect().await?;
        let tx = c.transaction().await?;
        tx.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock(7290451); CREATE SCHEMA IF NOT EXISTS {SCHEMA};
             CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
        ))
        .await
        .context("preparing the control database schema")?;
        let done: i32 = tx.query_one(&format!("SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_migrations"), &[]).await?.get(0);
        anyhow::ensure!(
            done as usize <= MIGRATIONS.len(),
            "the control database is at schema version {done}, newer than this build knows ({}): upgrade sluice",
            MIGRATIONS.len()
        );
        for (i, m) in MIGRATIONS.iter().enumerate().skip(done as usize) {
            tx.batch_execute(&format!("SET LOCAL search_path = {SCHEMA}; {m}"))
                .await
                .with_context(|| format!("applying control database migration {}", i + 1))?;
            tx.execute(&format!("INSERT INTO {SCHEMA}.schema_migrations (version) VALUES ($1)"), &[&(i as i32 + 1)]).await?;
            tracing::info!(version = i + 1, "applied control database migration");
        }
        tx.commit().await?;
        Ok(())
    }
}
