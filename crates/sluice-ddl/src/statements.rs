//! Splitting a file into statements, with positions and `-- sluice:allow` comments.

use pg_query::NodeEnum;

use crate::DdlError;

pub(crate) struct Statement<'a> {
    pub text: &'a str,
    pub offset: usize,
    pub line: usize,
    pub column: usize,
    /// `(rule id, reason)` from `-- sluice:allow <rule-id> <reason>` comments before
    /// or inside the statement.
    pub allows: Vec<(String, String)>,
}

fn line_col(sql: &str, offset: usize) -> (usize, usize) {
    let before = &sql[..offset.min(sql.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.chars().count(), |i| before[i + 1..].chars().count()) + 1;
    (line, column)
}

/// Bytes of whitespace and comments before the first token.
pub(crate) fn skip_trivia(text: &str) -> usize {
    let mut i = 0;
    loop {
        let rest = &text[i..];
        let trimmed = rest.trim_start();
        i += rest.len() - trimmed.len();
        if trimmed.starts_with("--") {
            i += trimmed.find('\n').map_or(trimmed.len(), |n| n + 1);
        } else if trimmed.starts_with("/*") {
            i += trimmed.find("*/").map_or(trimmed.len(), |n| n + 2);
        } else {
            return i;
        }
    }
}

fn allows(region: &str) -> Vec<(String, String)> {
    region
        .lines()
        .filter_map(|l| l.trim().strip_prefix("--")?.trim().strip_prefix("sluice:allow"))
        .filter_map(|rest| {
            let mut it = rest.trim().splitn(2, char::is_whitespace);
            let id = it.next().filter(|s| !s.is_empty())?;
            Some((id.to_string(), it.next().unwrap_or("").trim().to_string()))
        })
        .collect()
}

pub(crate) fn split<'a>(file: &str, sql: &'a str) -> Result<Vec<Statement<'a>>, DdlError> {
    let parts = pg_query::split_with_scanner(sql).map_err(|e| {
        let (line, column) = line_col(sql, 0);
        DdlError::Parse { file: file.to_string(), line, column, message: e.to_string() }
    })?;
    let mut out = Vec::with_capacity(parts.len());
    let mut prev_end = 0;
    for p in parts {
        let offset = p.as_ptr() as usize - sql.as_ptr() as usize;
        if p.trim().is_empty() {
            continue;
        }
        // Leading whitespace and comments belong to the statement's region, not its position.
        let lead = skip_trivia(p);
        let (line, column) = line_col(sql, offset + lead);
        let region = &sql[prev_end.min(offset)..offset + p.len()];
        out.push(Statement { text: p, offset, line, column, allows: allows(region) });
        prev_end = offset + p.len();
    }
    if out.iter().all(|s| s.text.lines().all(|l| l.trim().is_empty() || l.trim().starts_with("--"))) {
        return Err(DdlError::Empty(file.to_string()));
    }
    Ok(out)
}

/// Parses one statement; `None` for a piece that is only comments.
pub(crate) fn parse(file: &str, sql: &str, s: &Statement<'_>) -> Result<Option<NodeEnum>, DdlError> {
    match pg_query::parse(s.text, 0) {
        Ok(r) => Ok(r.protobuf.stmts.into_iter().next().and_then(|raw| raw.stmt).and_then(|n| n.node)),
        Err(e) => {
            let message = match e {
                pg_query::Error::Parse(m) => m,
                other => other.to_string(),
            };
            // Point at the token Postgres names ("syntax error at or near \"X\"").
            let at = message
                .split_once("at or near \"")
                .and_then(|(_, rest)| rest.rsplit_once('"').map(|(tok, _)| tok))
                .and_then(|tok| s.text.find(tok))
                .unwrap_or_else(|| skip_trivia(s.text));
            let (line, column) = line_col(sql, s.offset + at);
            Err(DdlError::Parse { file: file.to_string(), line, column, message })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_allow_comments() {
        let sql =
            "-- first\nCREATE TABLE a (id int);\n\n-- sluice:allow rename-column consumers updated in v2\nALTER TABLE a RENAME id TO key;";
        let s = split("f.sql", sql).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].line, s[0].column), (2, 1));
        assert_eq!((s[1].line, s[1].column), (5, 1));
        assert!(s[0].allows.is_empty());
        assert_eq!(s[1].allows, vec![("rename-column".to_string(), "consumers updated in v2".to_string())]);
    }

    #[test]
    fn syntax_errors_point_at_the_token() {
        let sql = "SELECT 1;\nALTER TABLE t ADD COLUMN x int;\nALTER TABEL t DROP y;";
        let stmts = split("m.sql", sql).unwrap();
        let err = parse("m.sql", sql, &stmts[2]).unwrap_err().to_string();
        assert!(err.starts_with("m.sql:3:7: cannot parse SQL: syntax error at or near \"TABEL\""), "{err}");
    }

    #[test]
    fn empty_files_are_errors() {
        assert!(matches!(split("e.sql", "  \n-- only a comment\n"), Err(DdlError::Empty(_))));
        assert!(matches!(split("e.sql", ""), Err(DdlError::Empty(_))));
    }
}
