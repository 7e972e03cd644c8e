//! Verdicts per statement and per file, as text for people and JSON for CI.

use std::fmt::Write as _;

use serde::Serialize;

use crate::Verdict;

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub verdict: Verdict,
    pub message: String,
    pub rationale: &'static str,
    pub safe_alternative: &'static str,
    /// The reason given in a `-- sluice:allow <rule> <reason>` comment, if any: an
    /// acknowledged finding is reported but does not fail the check.
    pub acknowledged: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatementReport {
    pub line: usize,
    pub column: usize,
    pub sql: String,
    pub findings: Vec<Finding>,
    /// `-- sluice:allow <rule> <reason>` comments of the statement, for findings added
    /// after the check (the registry's).
    #[serde(skip)]
    pub allows: Vec<(String, String)>,
}

impl StatementReport {
    /// The reason given for acknowledging `rule` on this statement, if any.
    pub fn acknowledgement(&self, rule: &str) -> Option<String> {
        self.allows.iter().find(|(id, _)| id == rule).map(|(_, why)| why.clone())
    }
}

impl StatementReport {
    /// The worst verdict among findings not acknowledged.
    pub fn verdict(&self) -> Verdict {
        self.findings.iter().filter(|f| f.acknowledged.is_none()).map(|f| f.verdict).max().unwrap_or(Verdict::Allowed)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub file: String,
    pub verdict: Verdict,
    pub statements: Vec<StatementReport>,
    /// Tables whose definition the file changes, with the statements that change them.
    #[serde(skip)]
    pub touched: Vec<((String, String), Vec<usize>)>,
}

impl FileReport {
    pub(crate) fn new(file: &str, statements: Vec<StatementReport>, touched: Vec<((String, String), Vec<usize>)>) -> Self {
        let mut r = Self { file: file.to_string(), verdict: Verdict::Allowed, statements, touched };
        r.recompute();
        r
    }

    /// Recomputes the file's verdict after findings were added or changed.
    pub fn recompute(&mut self) {
        self.verdict = self.statements.iter().map(StatementReport::verdict).max().unwrap_or(Verdict::Allowed);
    }

    /// Rule ids found (acknowledged or not), in statement order.
    pub fn rule_ids(&self) -> Vec<&'static str> {
        self.statements.iter().flat_map(|s| s.findings.iter().map(|f| f.rule)).collect()
    }
}

fn first_line(sql: &str) -> String {
    let one: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 70 { format!("{}...", one.chars().take(67).collect::<String>()) } else { one }
}

/// Human-readable: a line per finding, with the reason and the safe alternative.
pub fn render_text(reports: &[FileReport]) -> String {
    let mut s = String::new();
    for r in reports {
        for st in &r.statements {
            for f in &st.findings {
                let ack = f.acknowledged.as_ref().map_or(String::new(), |why| format!(" (acknowledged: {why})"));
                let _ = writeln!(s, "{}:{}:{}: {} [{}] {}{ack}", r.file, st.line, st.column, f.verdict.label(), f.rule, f.message);
                let _ = writeln!(s, "    statement: {}", first_line(&st.sql));
                if f.verdict > Verdict::Allowed {
                    let _ = writeln!(s, "    why: {}", f.rationale);
                    let _ = writeln!(s, "    instead: {}", f.safe_alternative);
                }
            }
        }
        let _ = writeln!(
            s,
            "{}: {} ({} statement{})",
            r.file,
            r.verdict.label(),
            r.statements.len(),
            if r.statements.len() == 1 { "" } else { "s" }
        );
    }
    s
}
