//! `/metrics`: what Prometheus scrapes on each server (with a token, like every route:
//! `authorization: {credentials: <token>}` in the scrape config). A platform admin's
//! token sees every pipeline this server runs, a tenant's token only its own.

use super::*;

pub(super) async fn metrics_get(State(ctl): Ctl, caller: Caller) -> ApiResult {
    let text = ctl.render_metrics(caller.tenant_id);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
