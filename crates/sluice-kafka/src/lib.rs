//! Kafka delivery. Today: Avro encoding of rows in Confluent's wire format (magic byte
//! 0, 4-byte schema id, Avro body), with schemas derived by `sluice_core::avro`.

mod avro;

pub use avro::{AvroEncoder, EncodeError};
