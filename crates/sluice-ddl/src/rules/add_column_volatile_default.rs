use pg_query::NodeEnum;
use pg_query::protobuf::{AlterTableType, ConstrType};

use super::{Hit, Rule, Verdict, replicated_cmds, table_name};

const VOLATILE: &[&str] = &["random", "gen_random_uuid", "uuid_generate_v4", "clock_timestamp", "timeofday", "nextval", "txid_current"];

pub static RULE: Rule = Rule {
    id: "add-column-volatile-default",
    verdict: Verdict::Warning,
    rationale: "a volatile default makes Postgres rewrite the whole table under an exclusive lock, and \
                replicate nothing for the rewrite: existing rows in sinks keep no value for the column",
    alternative: "add the column without a default (or with a constant), then backfill in batches",
    check: |model, node| {
        replicated_cmds(model, node, AlterTableType::AtAddColumn)
            .into_iter()
            .filter_map(|(rv, cmd)| {
                let Some(NodeEnum::ColumnDef(d)) = cmd.def.as_ref().and_then(|d| d.node.as_ref()) else { return None };
                let defaults = d.raw_default.iter().map(|b| format!("{b:?}")).chain(d.constraints.iter().filter_map(|c| match &c.node {
                    Some(NodeEnum::Constraint(c)) if c.contype == ConstrType::ConstrDefault as i32 => Some(format!("{:?}", c.raw_expr)),
                    _ => None,
                }));
                let volatile =
                    defaults.into_iter().find_map(|text| VOLATILE.iter().find(|f| text.contains(&format!("sval: \"{f}\""))).copied())?;
                Some(Hit::new(format!("ADD COLUMN {} on {} with volatile default {volatile}()", d.colname, table_name(rv))))
            })
            .collect()
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_volatile_defaults_only() {
        assert_eq!(hits(&RULE, "ALTER TABLE t ADD COLUMN u uuid DEFAULT gen_random_uuid()").len(), 1);
        assert!(hits(&RULE, "ALTER TABLE t ADD COLUMN at timestamptz DEFAULT now()").is_empty());
        assert!(hits(&RULE, "ALTER TABLE t ADD COLUMN n int DEFAULT 0").is_empty());
    }
}
