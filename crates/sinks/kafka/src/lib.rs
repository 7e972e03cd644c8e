//! Kafka delivery: change events in Debezium's envelope, encoded as Avro in
//! Confluent's wire format (schemas registered in a Confluent-compatible registry) or
//! as JSON, produced idempotently with `acks=all` through librdkafka.

mod avro;
pub mod broker;
mod config;
mod envelope;
mod error;
pub mod probe;
mod registry;
mod sink;

pub use avro::{AvroEncoder, EncodeError, UNAVAILABLE};
pub use config::{KafkaEncoding, KafkaSinkConfig};
pub use envelope::{EventEncoder, EventMeta, envelope_schema, value_schema};
pub use error::KafkaSinkError;
pub use registry::RegistryClient;
pub use sink::{Encoding, KafkaSink, KafkaSinkOptions, TOPIC_PLACEHOLDERS};
