//! The webhook sink: change events POSTed to an HTTP endpoint as JSON batches.
//!
//! - `config`: the settings (`sink: webhook:`), checked, and how they connect.
//! - `encoding`: an event as JSON (Debezium's envelope or the row form) with its
//!   idempotency id, and the request signature.
//! - `sink`: batching by count and bytes, retries with backoff, the circuit breaker,
//!   dead letters in the state database; the `Sink` lifecycle.
//!
//! Delivery is at least once, in order per key: requests go one at a time in commit
//! order, and the engine confirms a batch's LSN to the source only after every request
//! of it was answered 2xx (or dead-lettered). Each event carries an `id` (the commit
//! LSN and the change's order in its transaction; a snapshot read: its table and key)
//! that stays the same when a crash makes the event arrive again.

mod config;
mod encoding;
mod sink;

pub use config::WebhookSinkConfig;
pub use encoding::{Format, SIGNATURE_HEADER, sign};
pub use sink::WebhookSink;
