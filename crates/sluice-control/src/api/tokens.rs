//! `/v1/tenants/{t}/tokens`: API tokens, shown once, stored hashed, expiring when
//! asked to; `/v1/tokens`: every token, for platform admins.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    pub(super) name: String,
    pub(super) role: String,
    /// How long the token works (`90d`, `12h`); without it, until revoked.
    #[serde(default, with = "humantime_serde")]
    pub(super) expires_in: Option<std::time::Duration>,
}

const TOKEN_COLUMNS: &str = "k.id, k.name, k.role, k.created_at::text, k.expires_at::text, k.last_used_at::text, t.name";

fn token_json(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, i64>(0), "name": r.get::<_, String>(1), "role": r.get::<_, String>(2),
        "created_at": r.get::<_, String>(3), "expires_at": r.get::<_, Option<String>>(4),
        "tenant": r.get::<_, Option<String>>(6),
    })
}

pub(super) async fn tokens_list(State(ctl): Ctl, caller: Caller, Path(tenant): Path<String>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, false).await?;
    let rows = ctl
        .db
        .get()
        .await?
        .query(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens k LEFT JOIN tenants t ON t.id = k.tenant_id WHERE k.tenant_id = $1 ORDER BY k.id"),
            &[&id],
        )
        .await?;
    ok(json!({ "tokens": rows.iter().map(token_json).collect::<Vec<_>>() }))
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
    if t.expires_in.is_some_and(|d| d.as_secs() < 60) {
        return Err(ApiError::invalid("invalid_request", Invalid::new("expires_in", "must be at least 1m")));
    }
    let token = new_token();
    let seconds = t.expires_in.map(|d| d.as_secs_f64());
    let row = ctl
        .db
        .get()
        .await?
        .query_one(
            "INSERT INTO tokens (tenant_id, role, name, hash, expires_at)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING id, expires_at::text",
            &[&id, &t.role, &t.name, &token_hash(&token), &seconds],
        )
        .await?;
    let (tid, expires_at): (i64, Option<String>) = (row.get(0), row.get(1));
    created(json!({
        "id": tid, "name": t.name, "role": t.role, "expires_at": expires_at, "token": token,
        "note": "shown once: only its hash is stored",
    }))
}

pub(super) async fn tokens_delete(State(ctl): Ctl, caller: Caller, Path((tenant, token)): Path<(String, i64)>) -> ApiResult {
    let id = caller.tenant(&ctl, &tenant, true).await?;
    let n = ctl.db.get().await?.execute("DELETE FROM tokens WHERE id = $1 AND tenant_id = $2", &[&token, &id]).await?;
    if n == 0 {
        return Err(ApiError::not_found("token", &token.to_string()));
    }
    ok(json!({ "deleted": token }))
}

/// Every token of every tenant (never their values), for platform admins.
pub(super) async fn all_tokens_list(State(ctl): Ctl, caller: Caller) -> ApiResult {
    caller.platform()?;
    let rows = ctl
        .db
        .get()
        .await?
        .query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens k LEFT JOIN tenants t ON t.id = k.tenant_id ORDER BY k.id"), &[])
        .await?;
    ok(json!({ "tokens": rows.iter().map(token_json).collect::<Vec<_>>() }))
}

/// Revokes any token; the last platform admin token is kept (without it nobody could
/// create tenants or tokens again).
pub(super) async fn all_tokens_delete(State(ctl): Ctl, caller: Caller, Path(token): Path<i64>) -> ApiResult {
    caller.platform()?;
    let n = ctl
        .db
        .get()
        .await?
        .execute(
            "DELETE FROM tokens WHERE id = $1
               AND (role <> 'platform_admin' OR (SELECT count(*) FROM tokens WHERE role = 'platform_admin') > 1)",
            &[&token],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("token {token} not found, or it is the last platform admin token (create another first)"),
        ));
    }
    ok(json!({ "deleted": token }))
}
