use pg_query::NodeEnum;
use pg_query::protobuf::{AlterTableType, ConstrType};

use super::{Hit, Rule, Verdict, replicated_cmds, table_name};
use crate::model::column_not_null;

pub static RULE: Rule = Rule {
    id: "add-column-not-null-no-default",
    verdict: Verdict::Blocked,
    rationale: "a required column without a default has no value for rows and messages written before it, so \
                consumers cannot read older changes",
    alternative: "add the column nullable (or with a DEFAULT), backfill, and only then consider requiring it",
    check: |model, node| {
        replicated_cmds(model, node, AlterTableType::AtAddColumn)
            .into_iter()
            .filter_map(|(rv, cmd)| {
                let Some(NodeEnum::ColumnDef(d)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) else { return None };
                let has_default = d.raw_default.is_some()
                    || !d.identity.is_empty()
                    || !d.generated.is_empty()
                    || d.constraints.iter().any(|c| {
                        matches!(&c.node, Some(NodeEnum::Constraint(c)) if [ConstrType::ConstrDefault as i32, ConstrType::ConstrIdentity as i32, ConstrType::ConstrGenerated as i32].contains(&c.contype))
                    });
                (column_not_null(d) && !has_default)
                    .then(|| Hit::new(format!("ADD COLUMN {} NOT NULL without a default on {} (replicated)", d.colname, table_name(rv))))
            })
            .collect()
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn needs_not_null_and_no_default() {
        assert_eq!(hits(&RULE, "ALTER TABLE t ADD COLUMN c int NOT NULL").len(), 1);
        assert_eq!(hits(&RULE, "ALTER TABLE t ADD COLUMN c int PRIMARY KEY").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT 0").is_empty());
        assert!(hits(&RULE, "ALTER TABLE t ADD COLUMN c int").is_empty());
        assert!(hits(&RULE, "ALTER TABLE t ADD COLUMN c int GENERATED ALWAYS AS IDENTITY").is_empty());
    }
}
