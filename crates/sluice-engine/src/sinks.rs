//! The sink registry: the one place that names every sink. A pipeline's `sink:` block
//! has one key naming the kind; its settings are that sink's own config type, which
//! checks itself and connects (`SinkConfigure`). Everything else (the runner, the
//! control plane, teardown) goes through the `Sink` trait.
//!
//! Adding a sink: its crate (config with `validate`, the `Sink` impl, tests) and one
//! line below.

use serde::Deserialize;
use sluice_core::sink::SinkConfigure;

macro_rules! registry {
    ($($variant:ident($config:ty),)*) => {
        /// One key naming the sink kind (`postgres:`), holding its settings.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "snake_case")]
        pub enum SinkConfig {
            $($variant($config),)*
        }

        impl SinkConfig {
            /// The sink's settings behind the trait every sink implements.
            pub fn get(&self) -> &dyn SinkConfigure {
                match self {
                    $(Self::$variant(c) => c,)*
                }
            }

            /// The kind as spelled in the config (`postgres`), for metric tags (the
            /// variants are single words).
            pub fn kind(&self) -> String {
                match self {
                    $(Self::$variant(_) => stringify!($variant).to_ascii_lowercase(),)*
                }
            }
        }
    };
}

registry! {
    Postgres(sluice_sink_postgres::PostgresSinkConfig),
    Kafka(sluice_kafka::KafkaSinkConfig),
    Search(sluice_sink_search::SearchSinkConfig),
    Webhook(sluice_sink_webhook::WebhookSinkConfig),
    Iceberg(sluice_sink_iceberg::IcebergSinkConfig),
    Memory(sluice_sink_memory::MemorySinkConfig),
}
