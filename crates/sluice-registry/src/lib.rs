//! A Confluent-compatible Avro schema registry, stored in Postgres, with one context
//! per tenant (`:.tenant:subject`), each with its own subjects, ids and settings.

mod compat;
mod error;
mod http;
mod store;

pub use compat::{Compatibility, check as check_compatibility};
pub use error::ApiError;
pub use http::router;
pub use store::{Qualified, Store, parse_avro};

/// Serves the registry API on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, store: std::sync::Arc<Store>) -> std::io::Result<()> {
    axum::serve(listener, router(store)).await
}
