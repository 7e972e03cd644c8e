//! A Confluent-compatible Avro schema registry, stored in Postgres, with one context
//! per tenant (`:.tenant:subject`), each with its own subjects, ids and settings.

mod compat;
mod error;
mod http;
mod store;

pub use http::router;
pub use store::Store;
