//! The search sink: one document per row of a root table, denormalized from its related
//! tables, kept in Elasticsearch, OpenSearch or `sluice search serve`.
//!
//! - `config`: the settings (`sink: search:`), checked, and how they connect.
//! - `document`: the document definition turned into SQL that builds documents, the
//!   index mapping, and the reverse lookups from a changed row to its documents.
//! - `error`: the one error type, with its retry kind.
//! - `sink`: rebuilds, `_bulk` requests, retries, dead letters; the `Sink` lifecycle.

mod config;
mod document;
mod error;
mod sink;

pub use config::SearchSinkConfig;
pub use document::{CountSpec, DocumentPlan, DocumentSpec, RelationKind, RelationSpec};
pub use error::SearchError;
pub use sink::{SearchSink, SearchSinkOptions};
