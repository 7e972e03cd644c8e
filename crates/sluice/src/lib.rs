//! The `sluice` binary's library: the CLI's commands, the server's wiring and the demos.
//! The engine (`sluice-engine`) and the control plane (`sluice-control`) are crates of
//! their own; they are re-exported here under their old paths.

pub use sluice_control as control;
pub use sluice_engine::{alerts, config, dogstatsd, enrich, metrics, pipeline, recover, resync, sinks};

pub mod client;
pub mod demo;
mod gate;
pub mod https;
pub mod metrics_summary;
pub mod migrations;
pub mod mirror;
pub mod registry_check;
pub mod search_demo;
pub mod server;
