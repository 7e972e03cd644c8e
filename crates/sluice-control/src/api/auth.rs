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
        let unauthorized =
            || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or unknown API token: send Authorization: Bearer <token>");
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(unauthorized)?;
        let row = ctl
            .db
            .get()
            .await?
            .query_opt("SELECT tenant_id, role FROM tokens WHERE hash = $1", &[&token_hash(token.trim())])
            .await?
            .ok_or_else(unauthorized)?;
        let role = match row.get::<_, &str>(1) {
            "platform_admin" => Role::PlatformAdmin,
            "tenant_admin" => Role::TenantAdmin,
            _ => Role::TenantViewer,
        };
        Ok(Caller { tenant_id: row.get(0), role })
    }
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
