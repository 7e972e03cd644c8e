use pg_query::protobuf::AlterTableType;

use super::{Hit, Rule, Verdict, replicated_cmds, table_name};

pub static RULE: Rule = Rule {
    id: "set-not-null",
    verdict: Verdict::Blocked,
    rationale: "changes already in flight, and consumers' schemas, may carry NULL for this column; a NOT NULL \
                constraint makes the replicated schema reject them",
    alternative: "keep the column nullable and enforce presence in the application, or add \
                  CHECK (col IS NOT NULL) NOT VALID after every consumer handles the column as required",
    check: |model, node| {
        replicated_cmds(model, node, AlterTableType::AtSetNotNull)
            .into_iter()
            .map(|(rv, cmd)| Hit::new(format!("SET NOT NULL on {}.{} (replicated)", table_name(rv), cmd.name)))
            .collect()
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_set_not_null_only() {
        assert_eq!(hits(&RULE, "ALTER TABLE t ALTER COLUMN c SET NOT NULL").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t ALTER COLUMN c DROP NOT NULL").is_empty());
    }
}
