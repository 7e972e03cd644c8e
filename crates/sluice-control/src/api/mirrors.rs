//! `/v1/tenants/{t}/mirrors`: Kafka-to-Kafka mirrors (`sluice_mirror`). Created ones
//! are checked against both clusters first, then run by whichever server's supervisor
//! claims them; pause, resume, a changed spec and teardown go through the row.

use super::*;
use crate::model::{MirrorSpec, mirror_runner_name};

/// A mirror's config as the runner takes it, secrets opened.
pub(crate) async fn load_mirror(ctl: &Control, id: i64) -> anyhow::Result<Option<(MirrorSpec, sluice_mirror::MirrorConfig)>> {
    let Some(r) = ctl.db.get().await?.query_opt("SELECT sealed, tenant_id, name FROM mirrors WHERE id = $1", &[&id]).await? else {
        return Ok(None);
    };
    let owner = Owner::new("mirrors", r.get(1), r.get(2));
    let spec = MirrorSpec::from_sealed(&ctl.sealer.open(owner, r.get::<_, &[u8]>(0)).map_err(anyhow::Error::msg)?)?;
    let cfg = spec.config(&mirror_runner_name(&ctl.install, id)).map_err(|i| anyhow::anyhow!("{}", i.message))?;
    Ok(Some((spec, cfg)))
}

/// Both clusters reached, the topics found, no partition-count conflict: the same
/// check as `sluice check -c mirror.yaml` (it writes nothing).
async fn check(cfg: sluice_mirror::MirrorConfig) -> Result<(), ApiError> {
    let checked = tokio::task::spawn_blocking(move || sluice_mirror::check(&cfg)).await.map_err(anyhow::Error::from)?;
    checked.map(|_| ()).map_err(|e| {
        let inv = crate::model::Invalid::from_message(e.to_string());
        ApiError::invalid("invalid_mirror", inv)
    })
}

/// What [`mirror_json`] reads, from `mirrors` or from a statement's `RETURNING *`.
const MIRROR_COLUMNS: &str = "id, spec, desired, owner, status, created_at::text";

fn mirror_json(install: &str, r: &tokio_postgres::Row) -> Value {
    let id: i64 = r.get(0);
    let spec: Value = r.get(1);
    let desired: String = r.get(2);
    let owner: Option<String> = r.get(3);
    let mut status: Value = r.get(4);
    if owner.is_none() && desired != "running" {
        status = json!({ "state": desired });
    }
    let runner = mirror_runner_name(install, id);
    json!({
        "name": spec["name"],
        "spec": spec,
        "desired": desired,
        "server": owner,
        "status": status,
        "objects": {
            "transactional_id": sluice_mirror::config::transactional_id(&runner),
            "offsets_topic": sluice_mirror::config::offsets_topic(&runner),
        },
        "created_at": r.get::<_, String>(5),
    })
}

async fn mirror_row(ctl: &Control, tenant: i64, name: &str) -> Result<i64, ApiError> {
    ctl.db
        .get()
        .await?
        .query_opt("SELECT id FROM mirrors WHERE tenant_id = $1 AND name = $2", &[&tenant, &name])
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| ApiError::not_found("mirror", name))
}

pub(super) async fn mirrors_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let rows =
        ctl.db.get().await?.query(&format!("SELECT {MIRROR_COLUMNS} FROM mirrors WHERE tenant_id = $1 ORDER BY name"), &[&tid]).await?;
    ok(json!({ "mirrors": rows.iter().map(|r| mirror_json(&ctl.install, r)).collect::<Vec<_>>() }))
}

pub(super) async fn mirrors_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let m = MirrorSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_mirror", i))?;
    ctl.check_egress("", &Value::Object(m.settings.clone())).await?;
    let c = ctl.db.get().await?;
    if c.query_opt("SELECT 1 FROM mirrors WHERE tenant_id = $1 AND name = $2", &[&tid, &m.name]).await?.is_some() {
        return Err(ApiError::conflict(format!("mirror {:?} already exists in tenant {tenant:?}", m.name)));
    }
    let id: i64 = c.query_one("SELECT nextval('mirrors_id_seq')", &[]).await?.get(0);
    check(m.config(&mirror_runner_name(&ctl.install, id)).map_err(|i| ApiError::invalid("invalid_mirror", i))?).await?;
    let mut conn = ctl.db.connect().await?;
    let tx = quota::reserve(&ctl, &mut conn, tid, &tenant, quota::Counted::Mirrors).await?;
    let r = tx
        .query_opt(
            &format!(
                "INSERT INTO mirrors (id, tenant_id, name, spec, sealed) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING RETURNING {MIRROR_COLUMNS}"
            ),
            &[&id, &tid, &m.name, &m.public(), &ctl.sealer.seal(Owner::new("mirrors", tid, &m.name), &m.to_sealable())],
        )
        .await?
        .ok_or_else(|| ApiError::conflict(format!("mirror {:?} already exists in tenant {tenant:?}", m.name)))?;
    tx.commit().await?;
    ctl.wake_supervisor.notify_one();
    tracing::info!(tenant = %tenant, mirror = %m.name, "mirror created");
    created(mirror_json(&ctl.install, &r))
}

pub(super) async fn mirrors_get(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(&format!("SELECT {MIRROR_COLUMNS} FROM mirrors WHERE tenant_id = $1 AND name = $2"), &[&tid, &name])
        .await?
        .ok_or_else(|| ApiError::not_found("mirror", &name))?;
    ok(mirror_json(&ctl.install, &r))
}

/// A new spec: checked like a new mirror, then the running mirror restarts with it
/// (from its last committed batch: same transactional id, same offsets topic).
pub(super) async fn mirrors_put(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    let id = mirror_row(&ctl, tid, &name).await?;
    let body = with_stored_secrets(&ctl, "mirrors", tid, &name, body, |plain| {
        let old = MirrorSpec::from_sealed(plain)?;
        let mut v = Value::Object(old.settings);
        v["name"] = json!(old.name);
        Ok(v)
    })
    .await?;
    let m = MirrorSpec::parse(&body).map_err(|i| ApiError::invalid("invalid_mirror", i))?;
    ctl.check_egress("", &Value::Object(m.settings.clone())).await?;
    if m.name != name {
        return Err(ApiError::invalid(
            "invalid_mirror",
            Invalid::new("name", format!("{:?} differs from the URL's {name:?}; resources cannot be renamed", m.name)),
        ));
    }
    check(m.config(&mirror_runner_name(&ctl.install, id)).map_err(|i| ApiError::invalid("invalid_mirror", i))?).await?;
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(
            &format!(
                "UPDATE mirrors SET spec = $2, sealed = $3, generation = generation + 1, updated_at = now()
                 WHERE id = $1 AND desired <> 'deleting' RETURNING {MIRROR_COLUMNS}"
            ),
            &[&id, &m.public(), &ctl.sealer.seal(Owner::new("mirrors", tid, &name), &m.to_sealable())],
        )
        .await?
        .ok_or_else(|| ApiError::conflict(format!("mirror {name:?} is being deleted")))?;
    ctl.wake_supervisor.notify_one();
    ok(mirror_json(&ctl.install, &r))
}

/// Sets what the supervisors should make of the mirror; a mirror being deleted stays so.
async fn set_desired(ctl: &Control, caller: &Caller, tenant: &str, name: &str, desired: &str, purge: bool) -> ApiResult {
    let tid = caller.tenant(ctl, tenant, true).await?;
    let id = mirror_row(ctl, tid, name).await?;
    let r = ctl
        .db
        .get()
        .await?
        .query_opt(
            &format!(
                "UPDATE mirrors SET desired = $2, purge = purge OR $3, retry_at = now(), updated_at = now()
                 WHERE id = $1 AND (desired <> 'deleting' OR $2 = 'deleting') RETURNING {MIRROR_COLUMNS}"
            ),
            &[&id, &desired, &purge],
        )
        .await?
        .ok_or_else(|| ApiError::conflict(format!("mirror {name:?} is being deleted")))?;
    ctl.wake_supervisor.notify_one();
    accepted(mirror_json(&ctl.install, &r))
}

pub(super) async fn mirrors_pause(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    set_desired(&ctl, &caller, &tenant, &name, "paused", false).await
}

pub(super) async fn mirrors_resume(State(ctl): Ctl, caller: Caller, Path((tenant, name)): Path<(String, String)>) -> ApiResult {
    set_desired(&ctl, &caller, &tenant, &name, "running", false).await
}

pub(super) async fn mirrors_delete(
    State(ctl): Ctl,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult {
    set_desired(&ctl, &caller, &tenant, &name, "deleting", q.purge).await
}

/// How a source consumer group's committed offsets translate to the target (what
/// `sluice mirror offsets GROUP` shows for a mirror file).
pub(super) async fn mirrors_offsets(
    State(ctl): Ctl,
    caller: Caller,
    Path((tenant, name, group)): Path<(String, String, String)>,
) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let id = mirror_row(&ctl, tid, &name).await?;
    let (_, cfg) = load_mirror(&ctl, id).await?.ok_or_else(|| ApiError::not_found("mirror", &name))?;
    let rows = tokio::task::spawn_blocking(move || {
        let map = sluice_mirror::load_map(&cfg)?;
        sluice_mirror::translate_group(&cfg, &map, &group)
    })
    .await
    .map_err(anyhow::Error::from)?
    .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "cluster_unavailable", e.to_string()))?;
    ok(json!({ "name": name, "offsets": rows }))
}
