//! Schema changes the source recorded with their statement (DDL capture): what a sink
//! needs to follow a column drop, rename or type change that a new row shape alone
//! cannot tell apart from a drop and an add.

use std::sync::Arc;

use crate::{TableName, TableSchema};

/// One DDL statement's effect on a replicated table, in commit order within its
/// transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaChange {
    /// How many of the transaction's events came before the statement.
    pub seq: u32,
    /// The statement as the source ran it (never row values: DDL text only).
    pub statement: String,
    pub table: TableName,
    pub kind: SchemaChangeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SchemaChangeKind {
    /// The table's columns changed; `after` is its shape from this statement on.
    Columns {
        after: Arc<TableSchema>,
        changes: Vec<ColumnChange>,
        /// Existing rows took values the log does not carry (a column added with a
        /// volatile default rewrites the table without publishing it): the table must
        /// be read again.
        resync: bool,
    },
    /// The table joined the pipeline's publication: its rows are read through a resync.
    TableAdded { schema: Arc<TableSchema> },
    /// The table left the publication: no more of its changes arrive; the sink keeps
    /// what it has.
    TableRemoved,
    /// A change no sink can follow (a table renamed): the pipeline halts with `reason`.
    Unsupported { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnChange {
    Added { name: String, default: Option<String> },
    Dropped { name: String },
    Renamed { from: String, to: String },
    Retyped { name: String, from: String, to: String },
    Nullability { name: String, not_null: bool },
    Default { name: String, default: Option<String> },
}

impl ColumnChange {
    /// The column's name after the change.
    pub fn column(&self) -> &str {
        match self {
            Self::Added { name, .. }
            | Self::Dropped { name }
            | Self::Retyped { name, .. }
            | Self::Nullability { name, .. }
            | Self::Default { name, .. } => name,
            Self::Renamed { to, .. } => to,
        }
    }
}

/// Whether a default expression is a constant (a literal with casts), so the same
/// expression gives existing rows in a sink what the source gave them. Anything
/// calling a function (`now()`, `nextval(..)`, `random()`) is not.
pub fn is_constant_default(expr: &str) -> bool {
    let mut quoted = false;
    for c in expr.chars() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => return false,
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_defaults_are_literals_with_casts() {
        assert!(is_constant_default("'x'::text"));
        assert!(is_constant_default("0"));
        assert!(is_constant_default("'(1,2)'::point"));
        assert!(!is_constant_default("now()"));
        assert!(!is_constant_default("nextval('t_id_seq'::regclass)"));
    }
}
