//! `/v1/tenants/{t}/tokens`: API tokens, shown once, stored hashed.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    pub(super) name: String,
    pub(super) role: String,
}

pub(super) async fn tokens_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows =
        ctl.db.get().await?.query("SELECT id, name, role, created_at::text FROM tokens WHERE tenant_id = $1 ORDER BY id", &[&id]).await?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| json!({"id": r.get::<_, i64>(0), "name": r.get::<_, String>(1), "role": r.get::<_, String>(2), "created_at": r.get::<_, String>(3)}))
        .collect();
    ok(json!({ "tokens": list }))
}

pub(super) async fn tokens_create(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>, body: Bytes) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let t: NewToken = serde_yaml::from_slice(&body)
        .map_err(|e| ApiError::invalid("invalid_request", Invalid { field: None, message: format!("token: {e}").replace('\n', " ") }))?;
    if !matches!(t.role.as_str(), "tenant_admin" | "tenant_viewer") {
        return Err(ApiError::invalid(
            "invalid_request",
            Invalid::new("role", format!("{:?} must be tenant_admin or tenant_viewer", t.role)),
        ));
    }
    if t.name.trim().is_empty() {
        return Err(ApiError::invalid("invalid_request", Invalid::new("name", "must not be empty")));
    }
    let token = new_token();
    let tid: i64 = ctl
        .db
        .get()
        .await?
        .query_one(
            "INSERT INTO tokens (tenant_id, role, name, hash) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&id, &t.role, &t.name, &token_hash(&token)],
        )
        .await?
        .get(0);
    created(json!({ "id": tid, "name": t.name, "role": t.role, "token": token, "note": "shown once: only its hash is stored" }))
}

pub(super) async fn tokens_delete(State(ctl): Ctl, caller: Caller, Path((tenant, token)): Path<(String, i64)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let n = ctl.db.get().await?.execute("DELETE FROM tokens WHERE id = $1 AND tenant_id = $2", &[&token, &id]).await?;
    if n == 0 {
        return Err(ApiError::not_found("token", &token.to_string()));
    }
    ok(json!({ "deleted": token }))
}
