//! Kafka to Kafka mirroring (`sluice mirror`): topics of one cluster copied to another
//! with their keys, values, headers, timestamps and partitions, exactly once for
//! `read_committed` readers, and with an exact source-to-target offset map so consumer
//! groups fail over to the other cluster without skipping or re-reading a record.
//!
//! - `config`: the YAML (`source: kafka:`, `sink: kafka:`), strictly checked.
//! - `clusters`: clients, topic discovery, target topics shaped like their sources.
//! - `copy`: the loop: a batch per target transaction, positions inside it.
//! - `offsets`: the offset map the transactions carry, and translation.
//! - `check`: `sluice check` for a mirror (reads only).
//! - `checkpoint`: consumer-group offsets translated and written to the target.
//! - `stats`: what `/metrics` shows (lag per partition in records and ms).
//! - `schemas`: schema ids of Confluent's wire format carried across registries.
//! - `teardown`: what a removed mirror leaves behind, deleted.

mod check;
mod checkpoint;
mod clusters;
mod commit_log;
pub mod config;
mod copy;
mod error;
pub mod offsets;
mod schemas;
pub mod stats;
mod teardown;

pub use check::{CheckedTopic, advertised_brokers, check};
pub use checkpoint::{GroupOffset, translate_group};
pub use config::{MirrorConfig, PROVENANCE_HEADER};
pub use copy::{load_map, run};
pub use error::{MirrorError, Result};
pub use stats::MirrorStats;
pub use teardown::teardown;
