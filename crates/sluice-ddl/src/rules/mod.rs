//! The rules, one per module. Each names its id, its verdict, why, and what to do
//! instead; `check` returns one hit per offending part of a statement.

use pg_query::NodeEnum;
use pg_query::protobuf::{AlterTableCmd, AlterTableType, RangeVar};
use serde::Serialize;

use crate::Model;

mod add_column_not_null;
mod add_column_volatile_default;
mod alter_column_type;
mod constraint_not_valid;
mod create_index_concurrently;
mod drop_column;
mod drop_table;
mod enum_rename_value;
mod partition_attach_detach;
mod rename_column;
mod rename_table;
mod replica_identity;
mod replication_objects;
mod set_not_null;
mod set_schema;
mod truncate;

/// Ordered from harmless to worst; a statement's verdict is its worst finding's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    Warning,
    NeedsCoordination,
    Blocked,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allowed => "ALLOWED",
            Verdict::Warning => "WARNING",
            Verdict::NeedsCoordination => "NEEDS COORDINATION",
            Verdict::Blocked => "BLOCKED",
        }
    }
}

pub struct Hit {
    /// Overrides the rule's verdict (e.g. a drop of an optional column is allowed).
    pub verdict: Option<Verdict>,
    pub message: String,
}

impl Hit {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self { verdict: None, message: message.into() }
    }

    pub(crate) fn with(verdict: Verdict, message: impl Into<String>) -> Self {
        Self { verdict: Some(verdict), message: message.into() }
    }
}

pub struct Rule {
    pub id: &'static str,
    pub verdict: Verdict,
    pub rationale: &'static str,
    pub alternative: &'static str,
    pub check: fn(&Model, &NodeEnum) -> Vec<Hit>,
}

pub static RULES: &[&Rule] = &[
    &set_not_null::RULE,
    &add_column_not_null::RULE,
    &alter_column_type::RULE,
    &rename_column::RULE,
    &rename_table::RULE,
    &set_schema::RULE,
    &drop_column::RULE,
    &drop_table::RULE,
    &truncate::RULE,
    &replica_identity::RULE,
    &replication_objects::RULE,
    &create_index_concurrently::RULE,
    &add_column_volatile_default::RULE,
    &constraint_not_valid::RULE,
    &enum_rename_value::RULE,
    &partition_attach_detach::RULE,
];

pub(crate) fn table_name(rv: &RangeVar) -> String {
    if rv.schemaname.is_empty() { rv.relname.clone() } else { format!("{}.{}", rv.schemaname, rv.relname) }
}

/// The commands of an ALTER TABLE on a table the model says is replicated.
pub(crate) fn replicated_cmds<'a>(model: &Model, node: &'a NodeEnum, kind: AlterTableType) -> Vec<(&'a RangeVar, &'a AlterTableCmd)> {
    let NodeEnum::AlterTableStmt(a) = node else { return vec![] };
    let Some(rv) = &a.relation else { return vec![] };
    if !model.replicated(rv) {
        return vec![];
    }
    a.cmds
        .iter()
        .filter_map(|c| match &c.node {
            Some(NodeEnum::AlterTableCmd(cmd)) if cmd.subtype == kind as i32 => Some((rv, &**cmd)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::Model;

    /// Rule ids hit by `sql` (one statement) without catalog context.
    pub fn hits(rule: &super::Rule, sql: &str) -> Vec<String> {
        hits_in(&Model::default(), rule, sql)
    }

    pub fn hits_in(model: &Model, rule: &super::Rule, sql: &str) -> Vec<String> {
        let r = pg_query::parse(sql, 0).unwrap();
        let node = r.protobuf.stmts[0].stmt.as_ref().unwrap().node.as_ref().unwrap().clone();
        (rule.check)(model, &node).into_iter().map(|h| h.message).collect()
    }
}
