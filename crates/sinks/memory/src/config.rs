//! The memory sink's settings (`sink: memory:`).

use serde::Deserialize;
use sluice_core::PgConnConfig;
use sluice_core::sink::{BoxFuture, DynSink, PipelineShape, SinkConfigure, SinkContext, SinkResult};

use crate::sink::MemorySink;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySinkConfig {
    /// The store's name in this process ([`crate::received`] reads it).
    pub name: String,
    /// Keep the changes (tests), or only count them (benchmarks: a null sink).
    #[serde(default = "yes")]
    pub keep: bool,
    /// Where snapshot progress is kept (schema `sluice`).
    pub state: PgConnConfig,
}

fn yes() -> bool {
    true
}

impl SinkConfigure for MemorySinkConfig {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn validate(&self, _: &PipelineShape<'_>) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("sink.memory.name: give the store a name".into());
        }
        Ok(())
    }

    fn state(&self) -> PgConnConfig {
        self.state.clone()
    }

    fn connect<'a>(&'a self, _: &'a SinkContext) -> BoxFuture<'a, SinkResult<Box<dyn DynSink>>> {
        Box::pin(async move { Ok(Box::new(MemorySink::open(&self.name, self.keep)) as Box<dyn DynSink>) })
    }
}
