//! `/v1/tenants/{t}/workflows`: provisioning, teardown and resync runs, with their step history.

use super::*;

#[derive(Deserialize)]
pub(super) struct WorkflowQuery {
    pub(super) pipeline: Option<String>,
}

pub(super) const WORKFLOW_SELECT: &str =
    "SELECT id, pipeline_name, kind, state, step, attempt, error, params, created_at::text, updated_at::text, owner FROM workflows";

pub(super) fn workflow_json(r: &tokio_postgres::Row) -> Value {
    let kind: String = r.get(2);
    let params: Value = r.get(7);
    let steps = crate::workflow::steps(&kind, &params);
    let step: i32 = r.get(4);
    json!({
        "id": r.get::<_, i64>(0), "pipeline": r.get::<_, String>(1), "kind": kind, "state": r.get::<_, String>(3),
        "step": steps.get(step as usize).map(|s| s.name()), "steps_done": step, "steps_total": steps.len(), "attempt": r.get::<_, i32>(5),
        "error": r.get::<_, Option<String>>(6), "params": params, "created_at": r.get::<_, String>(8),
        "updated_at": r.get::<_, String>(9), "server": r.get::<_, Option<String>>(10),
    })
}

pub(super) async fn workflows_list(
    State(ctl): Ctl,
    caller: Caller,
    Path(tenant): Path<String>,
    Query(q): Query<WorkflowQuery>,
) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl
        .db
        .get()
        .await?
        .query(
            &format!("{WORKFLOW_SELECT} WHERE tenant_id = $1 AND ($2::text IS NULL OR pipeline_name = $2) ORDER BY id DESC LIMIT 200"),
            &[&tid, &q.pipeline],
        )
        .await?;
    ok(json!({ "workflows": rows.iter().map(workflow_json).collect::<Vec<_>>() }))
}

pub(super) async fn workflow_of(ctl: &Control, tid: i64, id: i64) -> Result<tokio_postgres::Row, ApiError> {
    ctl.db
        .get()
        .await?
        .query_opt(&format!("{WORKFLOW_SELECT} WHERE tenant_id = $1 AND id = $2"), &[&tid, &id])
        .await?
        .ok_or_else(|| ApiError::not_found("workflow", &id.to_string()))
}

pub(super) async fn workflows_get(State(ctl): Ctl, caller: Caller, Path((tenant, id)): Path<(String, i64)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, false).await?;
    let mut w = workflow_json(&workflow_of(&ctl, tid, id).await?);
    let steps = ctl
        .db
        .get()
        .await?
        .query(
            "SELECT name, attempt, started_at::text, ended_at::text, outcome, error, owner FROM workflow_steps WHERE workflow_id = $1 ORDER BY id",
            &[&id],
        )
        .await?;
    w["history"] = steps
        .iter()
        .map(|r| {
            json!({"step": r.get::<_, String>(0), "attempt": r.get::<_, i32>(1), "started_at": r.get::<_, String>(2),
                   "ended_at": r.get::<_, Option<String>>(3), "outcome": r.get::<_, Option<String>>(4).unwrap_or_else(|| "running".into()),
                   "error": r.get::<_, Option<String>>(5), "server": r.get::<_, String>(6)})
        })
        .collect();
    ok(w)
}

pub(super) async fn workflows_cancel(State(ctl): Ctl, caller: Caller, Path((tenant, id)): Path<(String, i64)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    workflow_of(&ctl, tid, id).await?;
    // A waiting workflow is cancelled at once; a running one at its next step boundary
    // (or sooner: the snapshot step stops when asked).
    let c = ctl.db.get().await?;
    let n = c
        .execute(
            "UPDATE workflows SET state = CASE WHEN state IN ('pending', 'retrying') THEN 'cancelled' ELSE state END,
                    cancel_requested = true, updated_at = now()
             WHERE id = $1 AND state IN ('pending', 'running', 'retrying')",
            &[&id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("workflow {id} has already ended")));
    }
    accepted(workflow_json(&workflow_of(&ctl, tid, id).await?))
}

pub(super) async fn workflows_retry(State(ctl): Ctl, caller: Caller, Path((tenant, id)): Path<(String, i64)>) -> ApiResult {
    let tid = caller.tenant(&ctl, &tenant, true).await?;
    workflow_of(&ctl, tid, id).await?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "UPDATE workflows SET state = 'pending', attempt = 0, cancel_requested = false, next_run_at = now(), error = NULL, updated_at = now()
             WHERE id = $1 AND state IN ('failed', 'cancelled')
               AND NOT EXISTS (SELECT FROM workflows o WHERE o.pipeline_id = workflows.pipeline_id AND o.state IN ('pending', 'running', 'retrying'))",
            &[&id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::conflict(format!(
            "workflow {id} is not failed or cancelled, or its pipeline has another workflow in progress"
        )));
    }
    ctl.wake.notify_one();
    accepted(workflow_json(&workflow_of(&ctl, tid, id).await?))
}
