//! The memory sink: every change kept in this process under a name (or only counted),
//! for engine tests that need no sink server and benchmarks that measure everything
//! but the sink. Nothing survives the process: it has no delivery guarantee to test.
//!
//! - `config`: the settings (`sink: memory:`).
//! - `sink`: the store and the `Sink` lifecycle.

mod config;
mod sink;

pub use config::MemorySinkConfig;
pub use sink::{MemorySink, Received, received};
