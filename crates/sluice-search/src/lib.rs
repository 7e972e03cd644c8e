//! Sluice's search platform: an Elasticsearch-compatible service on tantivy, and the
//! sink that feeds it (or Elasticsearch/OpenSearch) with documents built from Postgres.

mod error;
mod http;
mod index;
mod mapping;
mod query;
mod search;
mod service;
pub mod sink;

pub use error::{EsError, EsResult};
pub use http::router;
pub use service::SearchService;
