//! The `sluice` binary's library: configuration, the pipeline runner, metrics and the demo.

pub mod client;
pub mod config;
pub mod control;
pub mod demo;
pub mod enrich;
pub mod metrics;
pub mod metrics_summary;
pub mod search_demo;
pub mod migrations;
pub mod pipeline;
pub mod registry_check;
pub mod resync;
pub mod server;
