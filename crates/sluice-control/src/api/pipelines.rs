//! `/v1/tenants/{t}/pipelines`: pipelines, checked before provisioning; changes run as workflows.

use super::*;

pub(super) async fn sealed_of(
    ctl: &Control,
    table: &'static str,
    tenant: i64,
    name: &str,
    field: &str,
) -> Result<(i64, Vec<u8>), ApiError> {
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(&format!("SELECT id, sealed FROM {table} WHERE tenant_id = $1 AND name = $2"), &[&tenant, &name])
        .await?
        .ok_or_else(|| ApiError::invalid("invalid_pipeline", Invalid::new(field, format!("no {field} named {name:?} in this tenant"))))?;
    let plain = ctl.sealer.open(Owner::new(table, tenant, name), r.get::<_, &[u8]>(1)).map_err(anyhow::Error::msg)?;
    Ok((r.get(0), plain))
}

/// Everything that can be known before provisioning: the config, the tables and
/// transforms against the source's catalog, the sink, the admin's privileges.
pub(super) async fn validate_pipeline(
    ctl: &Control,
    tenant: i64,
    id: i64,
    p: &PipelineSpec,
) -> Result<(i64, i64, Vec<TableName>), ApiError> {
    let (source_id, s) = sealed_of(ctl, "sources", tenant, &p.source, "source").await?;
    let (sink_id, k) = sealed_of(ctl, "sinks", tenant, &p.sink, "sink").await?;
    let source = SourceSpec::from_sealed(&s)?;
    let sink = SinkSpec::from_sealed(&k)?;
    let mut enrichers = Vec::with_capacity(p.enrichers.len());
    for (i, name) in p.enrichers.iter().enumerate() {
        if p.enrichers[..i].contains(name) {
            return Err(ApiError::invalid("invalid_pipeline", Invalid::new("enrichers", format!("{name:?} is listed twice"))));
        }
        let (_, e) = sealed_of(ctl, "enrichers", tenant, name, "enrichers").await?;
        enrichers.push(EnricherSpec::from_sealed(&e)?);
    }
    let tables = validate_with(ctl, id, p, &source, &sink, &enrichers).await?;
    Ok((source_id, sink_id, tables))
}

/// [`validate_pipeline`] with the pieces loaded: the runner's own checks, as the
/// source's admin.
pub(super) async fn validate_with(
    ctl: &Control,
    id: i64,
    p: &PipelineSpec,
    source: &SourceSpec,
    sink: &SinkSpec,
    enrichers: &[Value],
) -> Result<Vec<TableName>, ApiError> {
    let policy = ctl.egress_policy();
    let admin = source.admin().guarded(Some(&policy));
    let mut cfg =
        run_config(&ctl.install, id, p, source, sink, enrichers, &admin.user, secrecy::ExposeSecret::expose_secret(&admin.password))
            .map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    cfg.egress = Some(policy);
    let tables = cfg.source_tables();
    let own_tables = cfg.tables();
    let c = sluice_postgres::connect(&admin, &format!("source {}", source.name)).await.map_err(|e| {
        ApiError::invalid(
            "source_unreachable",
            Invalid { field: Some("source".into()), message: format!("{e}; check source {}", source.name) },
        )
    })?;
    crate::check_privileges(&c, source, &tables).await.map_err(|m| {
        if m.starts_with("tables:") {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pipeline", m).with_field("tables")
        } else {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "insufficient_privileges", m).with_field("source")
        }
    })?;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mut pipeline = Pipeline::new(cfg, Arc::new(Metrics::default()), rx);
    pipeline.require_logical_wal = false;
    // A changed pipeline (or enricher) is checked while the pipeline runs on its slot.
    pipeline.slot_may_be_in_use = true;
    if let Err((part, e)) = pipeline.check_parts().await {
        let field = match part {
            CheckPart::Source => "source",
            CheckPart::Tables => "tables",
            CheckPart::Enrich => "enrichers",
            CheckPart::Transforms => "transforms",
            CheckPart::Sink => "sink",
        };
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pipeline", format!("{e:#}")).with_field(field));
    }
    Ok(own_tables)
}

impl ApiError {
    pub(super) fn with_field(mut self, f: &str) -> Self {
        self.field = Some(f.into());
        self
    }
}

pub(super) async fn pipeline_row(ctl: &Control, tenant: i64, name: &str) -> Result<i64, ApiError> {
    ctl.db
        .get()
        .await?
        .query_opt("SELECT id FROM pipelines WHERE tenant_id = $1 AND name = $2", &[&tenant, &name])
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| ApiError::not_found("pipeline", name))
}

/// Starts a workflow unless the pipeline has one running (409 then).
pub(super) async fn start_workflow(
    ctl: &Control,
    tenant: i64,
    pipeline: i64,
    name: &str,
    kind: &str,
    params: Value,
) -> Result<i64, ApiError> {
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(
            "INSERT INTO workflows (tenant_id, pipeline_id, pipeline_name, kind, params) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (pipeline_id) WHERE state IN ('pending', 'running', 'retrying') DO NOTHING RETURNING id",
            &[&tenant, &pipeline, &name, &kind, &params],
        )
        .await?;
    match r {
        Some(r) => {
            ctl.wake.notify_one();
            Ok(r.get(0))
        }
        None => Err(ApiError::conflict(format!(
            "pipeline {name:?} has a workflow in progress: wait for it, or cancel it (sluice workflows list --pipeline {name})"
        ))),
    }
}

pub(super) async fn pipelines_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl.db.get().await?.query(&format!("{PIPELINE_SELECT} WHERE p.tenant_id = $1 ORDER BY p.name"), &[&id]).await?;
    ok(json!({ "pipelines": rows.iter().map(|r| pipeline_json(&ctl.install, r)).collect::<Vec<_>>() }))
}

pub(super) const PIPELINE_SELECT: &str = "SELECT p.id, p.name, p.spec, p.desired, p.owner, p.status, p.created_at::text,
        (SELECT json_build_object('id', w.id, 'kind', w.kind, 'state', w.state, 'error', w.error)
         FROM workflows w WHERE w.pipeline_id = p.id ORDER BY w.id DESC LIMIT 1)
     FROM pipelines p";

/// The pipeline's objects in its source (one name for all three).
pub(super) fn objects(install: &str, id: i64) -> Value {
    let name = object_name(install, id);
    json!({ "slot": name, "publication": name, "role": name })
}

pub(super) fn pipeline_json(install: &str, r: &tokio_postgres::Row) -> Value {
    let id: i64 = r.get(0);
    let desired: String = r.get(3);
    let owner: Option<String> = r.get(4);
    let mut status: Value = r.get(5);
    if owner.is_none() && desired != "running" {
        status = json!({ "state": if desired == "provisioning" { "provisioning" } else { "paused" } });
    }
    json!({
        "name": r.get::<_, String>(1),
        "spec": r.get::<_, Value>(2),
        "desired": desired,
        "server": owner,
        "status": status,
        "objects": objects(install, id),
        "created_at": r.get::<_, String>(6),
        "last_workflow": r.get::<_, Option<Value>>(7),
    })
}

pub(super) async fn pipelines_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let p = PipelineSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    let c = ctl.db.get().await?;
    if c.query_opt("SELECT 1 FROM pipelines WHERE tenant_id = $1 AND name = $2", &[&tid, &p.name]).await?.is_some() {
        return Err(ApiError::conflict(format!("pipeline {:?} already exists in tenant {tenant:?}", p.name)));
    }
    let id: i64 = c.query_one("SELECT nextval('pipelines_id_seq')", &[]).await?.get(0);
    let (source_id, sink_id, _) = validate_pipeline(&ctl, tid, id, &p).await?;
    let pw = ctl.sealer.seal(Owner::new("pipelines", tid, &p.name), new_password().as_bytes());
    let mut conn = ctl.db.connect().await?;
    let tx = quota::reserve(&ctl, &mut conn, tid, &tenant, quota::Counted::Pipelines).await?;
    // The pipeline and its provisioning workflow appear together or not at all.
    let r = tx
        .query_opt(
            "WITH p AS (INSERT INTO pipelines (id, tenant_id, name, source_id, sink_id, spec, role_password)
                        VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING id)
             INSERT INTO workflows (tenant_id, pipeline_id, pipeline_name, kind) SELECT $2, id, $3, 'provision' FROM p RETURNING id",
            &[&id, &tid, &p.name, &source_id, &sink_id, &p.public(), &pw],
        )
        .await?;
    let Some(r) = r else {
        return Err(ApiError::conflict(format!("pipeline {:?} already exists in tenant {tenant:?}", p.name)));
    };
    tx.commit().await?;
    ctl.wake.notify_one();
    let wf: i64 = r.get(0);
    tracing::info!(tenant = %tenant, pipeline = %p.name, workflow = wf, "pipeline created; provisioning");
    Ok((StatusCode::CREATED, Json(json!({ "name": p.name, "workflow": wf, "objects": objects(&ctl.install, id) }))).into_response())
}

pub(super) async fn pipelines_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(&format!("{PIPELINE_SELECT} WHERE p.tenant_id = $1 AND p.name = $2"), &[&tid, &name])
        .await?
        .ok_or_else(|| ApiError::not_found("pipeline", &name))?;
    ok(pipeline_json(&ctl.install, &r))
}

/// Rows waiting for an enricher, and the re-enrichments running or done, read from
/// the pipeline's state database.
pub(super) async fn pipelines_enrichment(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let p = ctl.load_pipeline(id).await?.ok_or_else(|| ApiError::not_found("pipeline", &name))?;
    let cfg = p.run_config().map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    let state = sluice_postgres::connect(&cfg.state_connection(), "state database").await.map_err(anyhow::Error::from)?;
    let mut out = sluice_engine::enrich::report(&state, &cfg.pipeline).await?;
    out["name"] = json!(name);
    ok(out)
}

pub(super) async fn pipelines_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let p = PipelineSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    if p.name != name {
        return Err(ApiError::invalid(
            "invalid_pipeline",
            Invalid::new("name", format!("{:?} differs from the URL's {name:?}; resources cannot be renamed", p.name)),
        ));
    }
    let (source_id, sink_id, _) = validate_pipeline(&ctl, tid, id, &p).await?;
    let old: (i64, i64) = {
        let r = ctl.db.get().await?.query_one("SELECT source_id, sink_id FROM pipelines WHERE id = $1", &[&id]).await?;
        (r.get(0), r.get(1))
    };
    if old != (source_id, sink_id) {
        return Err(ApiError::invalid(
            "invalid_pipeline",
            Invalid::new("source", "a pipeline's source and sink cannot change: create a new pipeline"),
        ));
    }
    // Re-provisioning is idempotent: it grants and publishes new tables, snapshots them,
    // and restarts the pipeline with the new spec.
    let wf = start_workflow(&ctl, tid, id, &name, "update", json!({})).await?;
    ctl.db
        .get()
        .await?
        .execute("UPDATE pipelines SET spec = $2, generation = generation + 1, updated_at = now() WHERE id = $1", &[&id, &p.public()])
        .await?;
    accepted(json!({ "name": name, "workflow": wf }))
}

#[derive(Deserialize)]
pub(super) struct DeleteQuery {
    #[serde(default)]
    pub(super) purge: bool,
}

pub(super) async fn pipelines_delete(
    State(ctl): Ctl,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let wf = start_workflow(&ctl, tid, id, &name, "teardown", json!({ "purge": q.purge })).await?;
    accepted(json!({ "name": name, "workflow": wf }))
}

pub(super) async fn pipeline_action(ctl: Arc<Control>, caller: Caller, tenant: String, name: String, kind: &str) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let wf = start_workflow(&ctl, tid, id, &name, kind, json!({})).await?;
    accepted(json!({ "name": name, "workflow": wf }))
}

pub(super) async fn pipelines_pause(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    pipeline_action(ctl, caller, tenant, name, "pause").await
}

pub(super) async fn pipelines_resume(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    pipeline_action(ctl, caller, tenant, name, "resume").await
}

/// Re-reads tables of a running pipeline while it streams (see `sluice_engine::resync`).
pub(super) async fn pipelines_resync(
    State(ctl): Ctl,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let spec = ResyncSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_resync", i))?;
    let p = ctl.load_pipeline(id).await?.ok_or_else(|| ApiError::not_found("pipeline", &name))?;
    let cfg = p.run_config().map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    let tables = cfg.pick_tables(&spec.tables).map_err(|m| ApiError::invalid("invalid_resync", Invalid::new("tables", m)))?;
    let desired: String = ctl.db.get().await?.query_one("SELECT desired FROM pipelines WHERE id = $1", &[&id]).await?.get(0);
    if desired != "running" {
        return Err(ApiError::conflict(format!(
            "pipeline {name:?} is {desired}: a resync is read by the running pipeline; resume it first (sluice pipelines resume {name})"
        )));
    }
    let admin = p.admin();
    let src = sluice_postgres::connect(&admin, &format!("source {}", p.source.name))
        .await
        .map_err(|e| ApiError::invalid("source_unreachable", Invalid { field: Some("source".into()), message: e.to_string() }))?;
    sluice_engine::resync::check_keys(&src, &tables, &admin.describe())
        .await
        .map_err(|m| ApiError::invalid("invalid_resync", Invalid { field: Some("tables".into()), message: m }))?;
    let tables: Vec<String> = tables.iter().map(ToString::to_string).collect();
    let wf = start_workflow(&ctl, tid, id, &name, "resync", json!({ "tables": tables })).await?;
    accepted(json!({ "name": name, "workflow": wf, "tables": tables }))
}

/// Brings back a pipeline whose slot the source invalidated (see `sluice_engine::recover`):
/// refused unless the slot is lost.
pub(super) async fn pipelines_recover(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = pipeline_row(&ctl, tid, &name).await?;
    let p = ctl.load_pipeline(id).await?.ok_or_else(|| ApiError::not_found("pipeline", &name))?;
    let cfg = p.run_config().map_err(|i| ApiError::invalid("invalid_pipeline", i))?;
    let admin = p.admin();
    let src = sluice_postgres::connect(&admin, &format!("source {}", p.source.name))
        .await
        .map_err(|e| ApiError::invalid("source_unreachable", Invalid { field: Some("source".into()), message: e.to_string() }))?;
    let slot = cfg.slot_name();
    let info = sluice_postgres::slot_info(&src, &slot)
        .await
        .map_err(|e| ApiError::invalid("source_unreachable", Invalid::new("source", e.to_string())))?;
    if let Some(why) = sluice_postgres::recover_refusal(&slot, info.as_ref()) {
        return Err(ApiError::conflict(format!("pipeline {name:?}: {why}; to read tables again, use resync")));
    }
    let tables = cfg.tables();
    sluice_engine::resync::check_keys(&src, &tables, &admin.describe())
        .await
        .map_err(|m| ApiError::invalid("invalid_recover", Invalid { field: Some("tables".into()), message: m }))?;
    let tables: Vec<String> = tables.iter().map(ToString::to_string).collect();
    let wf = start_workflow(&ctl, tid, id, &name, "recover", json!({ "tables": tables })).await?;
    accepted(json!({ "name": name, "workflow": wf, "tables": tables }))
}
