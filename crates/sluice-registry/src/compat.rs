//! Compatibility modes, decided by Avro's own schema-resolution rules
//! (`apache_avro::schema_compatibility`), never by a copy of them.

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Compatibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Compatibility::None => "NONE",
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    pub(crate) fn transitive(self) -> bool {
        matches!(self, Compatibility::BackwardTransitive | Compatibility::ForwardTransitive | Compatibility::FullTransitive)
    }
}

/// Checks `new` against the existing versions (oldest first) under `mode`; returns
/// the reasons it is incompatible (empty: compatible).
pub fn check(mode: Compatibility, new: &Schema, existing: &[Schema]) -> Vec<String> {
    if mode == Compatibility::None || existing.is_empty() {
        return vec![];
    }
    let against: &[Schema] = if mode.transitive() { existing } else { &existing[existing.len() - 1..] };
    let mut reasons = Vec::new();
    for (i, old) in against.iter().enumerate() {
        let which = if mode.transitive() { format!("version {}", i + 1) } else { "the latest version".to_string() };
        // BACKWARD: consumers using the new schema read data written with the old one.
        let backward = || SchemaCompatibility::can_read(old, new).err();
        let forward = || SchemaCompatibility::can_read(new, old).err();
        let errs = match mode {
            Compatibility::Backward | Compatibility::BackwardTransitive => backward().into_iter().collect::<Vec<_>>(),
            Compatibility::Forward | Compatibility::ForwardTransitive => forward().into_iter().collect(),
            Compatibility::Full | Compatibility::FullTransitive => backward().into_iter().chain(forward()).collect(),
            Compatibility::None => vec![],
        };
        reasons.extend(errs.into_iter().map(|e| format!("incompatible with {which}: {e}")));
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(fields: &str) -> Schema {
        Schema::parse_str(&format!(r#"{{"type":"record","name":"r","fields":[{fields}]}}"#)).unwrap()
    }

    #[test]
    fn backward_allows_optional_additions_and_removals() {
        let v1 = s(r#"{"name":"a","type":"int"}"#);
        let add_optional = s(r#"{"name":"a","type":"int"},{"name":"b","type":["null","string"],"default":null}"#);
        let add_required = s(r#"{"name":"a","type":"int"},{"name":"b","type":"string"}"#);
        let promoted = s(r#"{"name":"a","type":"long"}"#);
        let narrowed = s(r#"{"name":"a","type":"string"}"#);
        assert!(check(Compatibility::Backward, &add_optional, std::slice::from_ref(&v1)).is_empty());
        assert!(!check(Compatibility::Backward, &add_required, std::slice::from_ref(&v1)).is_empty());
        assert!(check(Compatibility::Backward, &promoted, std::slice::from_ref(&v1)).is_empty());
        assert!(!check(Compatibility::Forward, &promoted, std::slice::from_ref(&v1)).is_empty());
        assert!(!check(Compatibility::Backward, &narrowed, std::slice::from_ref(&v1)).is_empty());
        assert!(check(Compatibility::None, &narrowed, &[v1]).is_empty());
    }

    #[test]
    fn transitive_checks_every_version() {
        let v1 = s(r#"{"name":"a","type":"int"}"#);
        let v2 = s(r#"{"name":"a","type":"int"},{"name":"b","type":"string","default":"x"}"#);
        let v3 = s(r#"{"name":"b","type":"string"}"#);
        assert!(check(Compatibility::Backward, &v3, &[v1.clone(), v2.clone()]).is_empty());
        assert!(!check(Compatibility::BackwardTransitive, &v3, &[v1, v2]).is_empty());
    }

    /// The compatibility matrix, from Avro's schema-resolution rules: each case is
    /// (what changed, old fields, new fields, BACKWARD ok, FORWARD ok). FULL must be
    /// the conjunction of both, NONE always accepts.
    #[test]
    fn matrix_follows_avro_resolution_rules() {
        let e = |syms: &str| format!(r#"{{"name":"e","type":{{"type":"enum","name":"E","symbols":[{syms}]}}}}"#);
        let nested = |fields: &str| format!(r#"{{"name":"n","type":{{"type":"record","name":"N","fields":[{fields}]}}}}"#);
        let cases: Vec<(&str, String, String, bool, bool)> = vec![
            (
                "add field with default",
                r#"{"name":"a","type":"int"}"#.into(),
                r#"{"name":"a","type":"int"},{"name":"b","type":"int","default":0}"#.into(),
                true,
                true,
            ),
            (
                "add field without default",
                r#"{"name":"a","type":"int"}"#.into(),
                r#"{"name":"a","type":"int"},{"name":"b","type":"int"}"#.into(),
                false,
                true,
            ),
            (
                "remove field without default",
                r#"{"name":"a","type":"int"},{"name":"b","type":"int"}"#.into(),
                r#"{"name":"a","type":"int"}"#.into(),
                true,
                false,
            ),
            (
                "remove field with default",
                r#"{"name":"a","type":"int"},{"name":"b","type":"int","default":1}"#.into(),
                r#"{"name":"a","type":"int"}"#.into(),
                true,
                true,
            ),
            ("int to long", r#"{"name":"a","type":"int"}"#.into(), r#"{"name":"a","type":"long"}"#.into(), true, false),
            ("long to int", r#"{"name":"a","type":"long"}"#.into(), r#"{"name":"a","type":"int"}"#.into(), false, true),
            ("string to bytes", r#"{"name":"a","type":"string"}"#.into(), r#"{"name":"a","type":"bytes"}"#.into(), true, true),
            ("enum symbol added", e(r#""A","B""#), e(r#""A","B","C""#), true, false),
            ("enum symbol removed", e(r#""A","B","C""#), e(r#""A","B""#), false, true),
            (
                "union widened",
                r#"{"name":"a","type":["null","int"]}"#.into(),
                r#"{"name":"a","type":["null","int","string"]}"#.into(),
                true,
                false,
            ),
            (
                "union narrowed",
                r#"{"name":"a","type":["null","int","string"]}"#.into(),
                r#"{"name":"a","type":["null","int"]}"#.into(),
                false,
                true,
            ),
            (
                "nested field added without default",
                nested(r#"{"name":"x","type":"int"}"#),
                nested(r#"{"name":"x","type":"int"},{"name":"y","type":"int"}"#),
                false,
                true,
            ),
            (
                "nested optional field added",
                nested(r#"{"name":"x","type":"int"}"#),
                nested(r#"{"name":"x","type":"int"},{"name":"y","type":["null","int"],"default":null}"#),
                true,
                true,
            ),
        ];
        for (what, old, new, backward, forward) in cases {
            let (old, new) = (s(&old), s(&new));
            let ok = |mode| check(mode, &new, std::slice::from_ref(&old)).is_empty();
            assert_eq!(ok(Compatibility::Backward), backward, "BACKWARD, {what}");
            assert_eq!(ok(Compatibility::Forward), forward, "FORWARD, {what}");
            assert_eq!(ok(Compatibility::Full), backward && forward, "FULL, {what}");
            assert_eq!(ok(Compatibility::BackwardTransitive), backward, "BACKWARD_TRANSITIVE over one version, {what}");
            assert!(ok(Compatibility::None), "NONE, {what}");
        }
    }

    #[test]
    fn parses_mode_names() {
        assert_eq!(Compatibility::parse("FULL_TRANSITIVE"), Some(Compatibility::FullTransitive));
        assert_eq!(Compatibility::parse("full"), None);
    }
}
