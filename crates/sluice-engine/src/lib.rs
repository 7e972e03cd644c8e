//! Sluice's engine: runs one pipeline from a source to a sink.
//!
//! - [`config`]: the pipeline's YAML (strict: unknown keys are errors).
//! - [`pipeline`]: the runner: checks, setup, snapshot, then streaming and applying
//!   batches, with reconnects, until asked to stop.
//! - [`resync`]: reading tables again while streaming (watermarks, as in DBLog).
//! - [`recover`]: replacing a lost replication slot, and reading every table again.
//! - [`enrich`]: enrichers that add fields from reference tables, HTTP services or
//!   expressions, as one batched async step per sink batch.
//! - [`alerts`]: built-in alert rules, delivered to a webhook.
//! - [`metrics`]: counters and the Prometheus exposition; [`dogstatsd`]: the same
//!   pushed to a Datadog agent.
//! - [`sinks`]: the sink registry, the one place that names every sink.
//! - [`state`]: the state store (the `sluice` schema), one migration file per feature.

pub mod alerts;
pub mod config;
pub mod dogstatsd;
pub mod enrich;
pub mod metrics;
pub mod pipeline;
pub mod recover;
pub mod resync;
pub mod sinks;
pub mod state;
