use pg_query::NodeEnum;

use super::{Hit, Rule, Verdict};
use crate::model::names;

pub static RULE: Rule = Rule {
    id: "enum-rename-value",
    verdict: Verdict::Warning,
    rationale: "renaming an enum label changes the value consumers receive for existing rows' future changes, \
                and their enum schema may not know the new symbol",
    alternative: "ADD VALUE the new label, migrate rows and consumers, and keep the old label until nothing uses it",
    check: |_, node| match node {
        NodeEnum::AlterEnumStmt(e) if !e.old_val.is_empty() => {
            vec![Hit::new(format!("RENAME VALUE {:?} TO {:?} on enum {}", e.old_val, e.new_val, names(&e.type_name).join(".")))]
        }
        _ => vec![],
    },
};

#[cfg(test)]
mod tests {
    use super::super::testing::hits;
    use super::RULE;

    #[test]
    fn flags_renames_not_additions() {
        assert_eq!(hits(&RULE, "ALTER TYPE mood RENAME VALUE 'sad' TO 'blue'").len(), 1);
        assert!(hits(&RULE, "ALTER TYPE mood ADD VALUE 'meh'").is_empty());
    }
}
