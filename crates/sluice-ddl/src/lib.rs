//! Vets schema-migration SQL before it runs, knowing which tables Sluice replicates.
//!
//! Statements are parsed with Postgres's own grammar (`pg_query`). Each rule (one per
//! module under `rules/`) looks at one statement against a [`Model`] of the schema: the
//! real catalog when a source is given, otherwise "every table is replicated, nothing
//! else is known". After a statement is checked its effect is applied to the model, so
//! a later statement sees what the earlier ones did.

mod error;
mod model;
mod report;
mod rules;
mod statements;

pub use error::DdlError;
pub use model::{ColumnModel, Model, TableModel};
pub use report::{FileReport, Finding, StatementReport, render_text};
pub use rules::{RULES, Rule, Verdict};

/// Checks one file's SQL. `name` is used in messages (a path, or `-` for stdin).
pub fn check(name: &str, sql: &str, model: &mut Model) -> Result<FileReport, DdlError> {
    let stmts = statements::split(name, sql)?;
    let mut out = Vec::with_capacity(stmts.len());
    let mut touched: Vec<((String, String), Vec<usize>)> = Vec::new();
    for (index, s) in stmts.into_iter().enumerate() {
        let node = statements::parse(name, sql, &s)?;
        let mut findings = Vec::new();
        if let Some(node) = &node {
            for rule in RULES {
                for hit in (rule.check)(model, node) {
                    let acknowledged = s.allows.iter().find(|(id, _)| id == rule.id).map(|(_, why)| why.clone());
                    findings.push(Finding {
                        rule: rule.id,
                        verdict: hit.verdict.unwrap_or(rule.verdict),
                        message: hit.message,
                        rationale: rule.rationale,
                        safe_alternative: rule.alternative,
                        acknowledged,
                    });
                }
            }
            model.apply(node);
            if let Some(key) = altered_table(node) {
                match touched.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, idx)) => idx.push(index),
                    None => touched.push((key, vec![index])),
                }
            }
        }
        out.push(StatementReport {
            line: s.line,
            column: s.column,
            sql: s.text[statements::skip_trivia(s.text)..].trim().to_string(),
            findings,
            allows: s.allows,
        });
    }
    Ok(FileReport::new(name, out, touched))
}

/// The table whose columns an ALTER TABLE changes (its name after the statement).
fn altered_table(node: &pg_query::NodeEnum) -> Option<(String, String)> {
    match node {
        pg_query::NodeEnum::AlterTableStmt(a) => a.relation.as_ref().map(model::key),
        pg_query::NodeEnum::RenameStmt(r) if r.rename_type == pg_query::protobuf::ObjectType::ObjectColumn as i32 => {
            r.relation.as_ref().map(model::key)
        }
        _ => None,
    }
}
