use pg_query::NodeEnum;
use pg_query::protobuf::ObjectType;

use super::{Hit, Rule, Verdict, table_name};

pub static RULE: Rule = Rule {
    id: "rename-table",
    verdict: Verdict::Blocked,
    rationale: "pipelines, topics and subjects are bound to the table's name; a renamed table drops out of \
                replication",
    alternative: "create the new table, replicate both during a transition (or use a view), then retire the old one",
    check: |model, node| match node {
        NodeEnum::RenameStmt(r) if r.rename_type == ObjectType::ObjectTable as i32 => r
            .relation
            .as_ref()
            .filter(|rv| model.replicated(rv))
            .map(|rv| vec![Hit::new(format!("RENAME TABLE {} TO {} (replicated)", table_name(rv), r.newname))])
            .unwrap_or_default(),
        _ => vec![],
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_table_renames() {
        assert_eq!(hits(&RULE, "ALTER TABLE t RENAME TO u").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t RENAME COLUMN a TO b").is_empty());
    }
}
