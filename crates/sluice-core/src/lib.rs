//! Sluice's core model: log positions, table schemas, change events and typed values.
//!
//! Row images are kept as the source's own text encoding ([`Datum`]) because that is
//! lossless and costs nothing to forward to a Postgres sink; sinks that need typed
//! values (Avro, search documents) decode a datum with [`Value::parse`] on demand.

pub mod avro;
pub mod conn;
pub mod ddl;
pub mod egress;
mod error;
mod event;
pub mod https;
pub mod json;
mod lsn;
mod path;
mod schema;
pub mod sink;
pub mod source;
pub mod transform;
mod value;

pub use conn::{PgConnConfig, PgTls, SslMode};
pub use error::{CoreError, ErrorKind, one_line};
pub use event::{ChangeEvent, Datum, Op, Row, SourcePosition, Transaction, key_of};
pub use lsn::Lsn;
pub use path::encode_path_segment;
pub use schema::{ColumnSchema, ColumnStorage, ReplicaIdentity, TableName, TableSchema, quote_ident, quote_literal};
pub use value::{Interval, Numeric, PG_EPOCH_DAYS, PgType, Value, numeric_digits, pg_epoch_micros};
