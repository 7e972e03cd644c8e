//! Who calls: the bearer token looked up by its hash, its role and tenant.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    PlatformAdmin,
    TenantAdmin,
    TenantViewer,
}

/// The caller, from `Authorization: Bearer <token>`.
pub struct Caller {
    pub(super) tenant_id: Option<i64>,
    pub(super) role: Role,
}

impl FromRequestParts<Arc<Control>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctl: &Arc<Control>) -> Result<Self, ApiError> {
        let (tenant_id, role, _) = lookup(ctl, &parts.headers).await?;
        Ok(Caller { tenant_id, role })
    }
}

/// Who calls the registry or the search service of `sluice server`: the tenant
/// (by name) a token belongs to, none for a platform admin.
pub struct Principal {
    pub tenant: Option<String>,
    pub role: Role,
}

/// The caller of a request from its `Authorization` header ([`token_of`]).
pub async fn authenticate(ctl: &Control, headers: &axum::http::HeaderMap) -> Result<Principal, ApiError> {
    let (_, role, tenant) = lookup(ctl, headers).await?;
    Ok(Principal { tenant, role })
}

fn unauthorized() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or unknown API token: send Authorization: Bearer <token>")
}

async fn lookup(ctl: &Control, headers: &axum::http::HeaderMap) -> Result<(Option<i64>, Role, Option<String>), ApiError> {
    let token = token_of(headers).ok_or_else(unauthorized)?;
    let row = ctl
        .db
        .get()
        .await?
        .query_opt(
            "SELECT k.tenant_id, k.role, t.name FROM tokens k LEFT JOIN tenants t ON t.id = k.tenant_id
             WHERE k.hash = $1 AND (k.expires_at IS NULL OR k.expires_at > now())",
            &[&token_hash(token.trim())],
        )
        .await?
        .ok_or_else(unauthorized)?;
    let role = match row.get::<_, &str>(1) {
        "platform_admin" => Role::PlatformAdmin,
        "tenant_admin" => Role::TenantAdmin,
        _ => Role::TenantViewer,
    };
    Ok((row.get(0), role, row.get(2)))
}

/// The token a request carries: `Bearer <token>`; or Basic auth's password (Confluent
/// clients send `basic.auth.user.info` as user:token, Elasticsearch clients user and
/// password); or an Elasticsearch `ApiKey`, base64 of `id:token` (or the token itself).
pub(crate) fn token_of(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Some(rest.to_string()),
        "basic" => {
            let plain = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(rest).ok()?).ok()?;
            let (user, password) = plain.split_once(':')?;
            Some(if password.is_empty() { user } else { password }.to_string())
        }
        "apikey" => {
            let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok().and_then(|b| String::from_utf8(b).ok());
            Some(match decoded.as_deref().and_then(|d| d.split_once(':')) {
                Some((_, key)) => key.to_string(),
                None => rest.to_string(),
            })
        }
        _ => None,
    }
    .filter(|t| !t.is_empty())
}

impl Caller {
    pub(super) fn platform(&self) -> Result<(), ApiError> {
        if self.role == Role::PlatformAdmin {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this needs a platform admin token"))
        }
    }

    /// The tenant named in the path, if this caller may see it (404 otherwise, so
    /// other tenants' names do not leak); `write` also refuses viewers.
    pub(super) async fn tenant(&self, ctl: &Control, name: &str, write: bool) -> Result<i64, ApiError> {
        let id: Option<i64> = ctl.db.get().await?.query_opt("SELECT id FROM tenants WHERE name = $1", &[&name]).await?.map(|r| r.get(0));
        let id = match id {
            Some(id) if self.role == Role::PlatformAdmin || self.tenant_id == Some(id) => id,
            _ => return Err(ApiError::not_found("tenant", name)),
        };
        if write && self.role == Role::TenantViewer {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this token is read-only (tenant_viewer)"));
        }
        Ok(id)
    }
}
