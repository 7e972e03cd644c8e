use pg_query::NodeEnum;

use super::{Hit, Rule, Verdict, table_name};

pub static RULE: Rule = Rule {
    id: "create-index-not-concurrently",
    verdict: Verdict::Warning,
    rationale: "CREATE INDEX blocks writes to the table while it builds, stalling the application and the \
                replication stream behind it",
    alternative: "CREATE INDEX CONCURRENTLY (outside a transaction block)",
    check: |model, node| match node {
        // A table created by the same migration is empty: nothing to block.
        NodeEnum::IndexStmt(i) if !i.concurrent => i
            .relation
            .as_ref()
            .filter(|rv| !model.has_context || model.table(rv).is_some_and(|t| t.replicated))
            .map(|rv| vec![Hit::new(format!("CREATE INDEX on {} without CONCURRENTLY", table_name(rv)))])
            .unwrap_or_default(),
        _ => vec![],
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_blocking_index_builds() {
        assert_eq!(hits(&RULE, "CREATE INDEX i ON t (a)").len(), 1);
        assert!(hits(&RULE, "CREATE INDEX CONCURRENTLY i ON t (a)").is_empty());
    }
}
