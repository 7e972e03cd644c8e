//! Sluice's integration tests: one test binary (linked once), one module per area.
//! They start real Postgres clusters, a real Kafka broker and the `sluice` binary.

mod common;

mod avro;
mod checks;
mod control;
mod ddl;
mod egress;
mod enrich;
mod filters;
mod iceberg;
mod kafka;
mod large_txn;
mod migrations;
mod mirror;
mod registry;
mod restart;
mod resync;
mod search;
mod server;
mod services;
mod slots;
mod smoke;
mod snapshot;
mod tls;
mod transforms;
mod types;
mod webhook;
mod workload;
