use pg_query::NodeEnum;
use pg_query::protobuf::ObjectType;

use super::{Hit, Rule, Verdict, table_name};

pub static RULE: Rule = Rule {
    id: "rename-column",
    verdict: Verdict::Blocked,
    rationale: "consumers find the column by name; after a rename, in-flight and new changes no longer match \
                their schema",
    alternative: "add the new column, dual-write and backfill, move consumers to it, then drop the old one",
    check: |model, node| match node {
        NodeEnum::RenameStmt(r) if r.rename_type == ObjectType::ObjectColumn as i32 => r
            .relation
            .as_ref()
            .filter(|rv| model.replicated(rv))
            .map(|rv| vec![Hit::new(format!("RENAME COLUMN {}.{} TO {} (replicated)", table_name(rv), r.subname, r.newname))])
            .unwrap_or_default(),
        _ => vec![],
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_column_renames() {
        assert_eq!(hits(&RULE, "ALTER TABLE t RENAME COLUMN a TO b").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t RENAME TO u").is_empty());
    }
}
