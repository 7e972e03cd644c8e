use pg_query::NodeEnum;
use pg_query::protobuf::{AlterTableType, ConstrType};

use super::{Hit, Rule, Verdict, replicated_cmds, table_name};

pub static RULE: Rule = Rule {
    id: "constraint-not-valid",
    verdict: Verdict::Warning,
    rationale: "adding a CHECK or FOREIGN KEY constraint scans the table under a lock that blocks writes",
    alternative: "ADD CONSTRAINT ... NOT VALID, then VALIDATE CONSTRAINT in a separate statement; for UNIQUE, \
                  CREATE UNIQUE INDEX CONCURRENTLY then ADD CONSTRAINT ... USING INDEX",
    check: |model, node| {
        replicated_cmds(model, node, AlterTableType::AtAddConstraint)
            .into_iter()
            .filter_map(|(rv, cmd)| {
                let Some(NodeEnum::Constraint(c)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) else { return None };
                let kind = match ConstrType::try_from(c.contype) {
                    Ok(ConstrType::ConstrCheck) => "CHECK",
                    Ok(ConstrType::ConstrForeign) => "FOREIGN KEY",
                    Ok(ConstrType::ConstrUnique) if c.indexname.is_empty() => "UNIQUE",
                    _ => return None,
                };
                (!c.skip_validation)
                    .then(|| Hit::new(format!("ADD {kind} constraint on {} validates the whole table under lock", table_name(rv))))
            })
            .collect()
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_validating_constraints() {
        assert_eq!(hits(&RULE, "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0)").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID").is_empty());
        assert_eq!(hits(&RULE, "ALTER TABLE t ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES u (id)").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t ADD CONSTRAINT u UNIQUE USING INDEX i").is_empty());
    }
}
