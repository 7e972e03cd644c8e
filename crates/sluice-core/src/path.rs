//! URL path segments built from names users choose (registry subjects with contexts
//! hold `:`; topic names hold `.`).

/// Percent-encodes everything but RFC 3986's unreserved characters, so a name is one
/// path segment whatever it holds.
pub fn encode_path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_with_contexts_are_escaped() {
        assert_eq!(super::encode_path_segment(":.team-a:shop.public.items-value"), "%3A.team-a%3Ashop.public.items-value");
    }
}
