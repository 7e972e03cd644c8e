//! Casts between column types, on the columns' text: the meaning of Kafka Connect's
//! `Cast` transform (floats truncate to int, non-zero is true), decided per source type
//! when the chain is compiled.

use bytes::Bytes;

use crate::PgType;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CastTo {
    Text,
    Int,
    Float,
    Bool,
    Decimal {
        precision: u32,
        scale: u32,
    },
    /// From timestamps and dates (`timestamp_converter`).
    UnixMs,
    Iso8601,
    DateOnly,
}

fn time_source(t: &PgType) -> bool {
    matches!(t, PgType::Timestamp | PgType::TimestampTz | PgType::Date)
}

fn numeric_source(t: &PgType) -> bool {
    matches!(
        t,
        PgType::Int2 | PgType::Int4 | PgType::Int8 | PgType::Numeric | PgType::Float4 | PgType::Float8 | PgType::Bool | PgType::Text
    )
}

impl CastTo {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        Ok(match s {
            "string" | "text" => CastTo::Text,
            "int" | "int64" | "bigint" => CastTo::Int,
            "float" | "float64" | "double" => CastTo::Float,
            "bool" | "boolean" => CastTo::Bool,
            _ => {
                let inner = s.strip_prefix("decimal(").and_then(|r| r.strip_suffix(')'));
                let parsed = inner.and_then(|i| {
                    let (p, sc) = i.split_once(',')?;
                    Some((p.trim().parse::<u32>().ok()?, sc.trim().parse::<u32>().ok()?))
                });
                match parsed {
                    Some((precision, scale)) if (1..=1000).contains(&precision) && scale <= precision => {
                        CastTo::Decimal { precision, scale }
                    }
                    _ => return Err(format!("unknown type {s:?}: use string, int, float, bool or decimal(precision,scale)")),
                }
            }
        })
    }

    /// Whether values of `from` can become this type.
    pub(crate) fn check(&self, from: &PgType) -> Result<(), String> {
        if matches!(self, CastTo::UnixMs | CastTo::Iso8601 | CastTo::DateOnly) {
            return if time_source(from) { Ok(()) } else { Err(format!("{} is not a timestamp or a date", from.name())) };
        }
        if *self == CastTo::Text || numeric_source(from) {
            Ok(())
        } else {
            Err(format!("cannot cast {} to {self:?}; only numbers, booleans and text convert to numbers or booleans", from.name()))
        }
    }

    /// The output column's type: (type name as Postgres prints it, type, oid).
    pub(crate) fn target(&self) -> (String, PgType, u32) {
        match self {
            CastTo::Text => ("text".into(), PgType::Text, 25),
            CastTo::Int => ("bigint".into(), PgType::Int8, 20),
            CastTo::Float => ("double precision".into(), PgType::Float8, 701),
            CastTo::Bool => ("boolean".into(), PgType::Bool, 16),
            CastTo::Decimal { precision, scale } => (format!("numeric({precision},{scale})"), PgType::Numeric, 1700),
            CastTo::UnixMs => ("bigint".into(), PgType::Int8, 20),
            CastTo::Iso8601 => ("text".into(), PgType::Text, 25),
            CastTo::DateOnly => ("date".into(), PgType::Date, 1082),
        }
    }

    pub(crate) fn apply(&self, from: &PgType, text: &[u8]) -> Result<Bytes, String> {
        let s = std::str::from_utf8(text).map_err(|_| "not UTF-8".to_string())?.trim();
        let bad = || format!("{} value cannot be cast to {self:?}", from.name());
        let as_bool = || match (from, s) {
            (PgType::Bool, "t") | (PgType::Text, "t" | "true" | "yes" | "on" | "1") => Some(true),
            (PgType::Bool, "f") | (PgType::Text, "f" | "false" | "no" | "off" | "0") => Some(false),
            _ => None,
        };
        let as_f64 = || -> Result<f64, String> {
            match as_bool() {
                Some(b) if *from == PgType::Bool => Ok(f64::from(u8::from(b))),
                _ => s.parse::<f64>().map_err(|_| bad()),
            }
        };
        let micros = || -> Result<i64, String> {
            let v = crate::Value::parse(from, s).map_err(|e| e.to_string())?;
            let us = match v {
                crate::Value::Timestamp(t) | crate::Value::TimestampTz(t) => t,
                crate::Value::Date(d) if d != i32::MAX && d != i32::MIN => i64::from(d) * 86_400_000_000,
                _ => return Err(bad()),
            };
            if us == i64::MAX || us == i64::MIN { Err(format!("{s} has no {self:?} form")) } else { Ok(us) }
        };
        let out = match self {
            CastTo::UnixMs => micros()?.div_euclid(1000).to_string(),
            CastTo::Iso8601 => {
                let tz = *from == PgType::TimestampTz;
                let text = crate::Value::Timestamp(micros()?).to_pg_text().unwrap_or_default().replacen(' ', "T", 1);
                if tz { format!("{text}Z") } else { text }
            }
            CastTo::DateOnly => crate::Value::Date(micros()?.div_euclid(86_400_000_000) as i32).to_pg_text().unwrap_or_default(),
            CastTo::Text => s.to_string(),
            CastTo::Int => match from {
                PgType::Int2 | PgType::Int4 | PgType::Int8 => s.to_string(),
                PgType::Bool => u8::from(as_bool().ok_or_else(bad)?).to_string(),
                _ => match s.parse::<i64>() {
                    Ok(i) => i.to_string(),
                    Err(_) => {
                        let f = as_f64()?.trunc();
                        if !f.is_finite() || f.abs() >= 9.2e18 {
                            return Err(bad());
                        }
                        (f as i64).to_string()
                    }
                },
            },
            CastTo::Float => {
                let f = as_f64()?;
                if f.is_nan() {
                    "NaN".into()
                } else if f.is_infinite() {
                    if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
                } else {
                    f.to_string()
                }
            }
            CastTo::Bool => match from {
                PgType::Bool | PgType::Text => if as_bool().ok_or_else(bad)? { "t" } else { "f" }.to_string(),
                _ => if as_f64()? != 0.0 { "t" } else { "f" }.to_string(),
            },
            CastTo::Decimal { precision, scale } => {
                let v = match from {
                    PgType::Float4 | PgType::Float8 | PgType::Bool => {
                        let f = as_f64()?;
                        if !f.is_finite() {
                            return Err(bad());
                        }
                        format!("{f:.*}", *scale as usize)
                    }
                    _ => round_decimal(s, *scale).ok_or_else(bad)?,
                };
                let digits = v.trim_start_matches('-').split('.').next().unwrap_or("").trim_start_matches('0').len();
                if digits + *scale as usize > *precision as usize {
                    return Err(format!("{v} does not fit numeric({precision},{scale})"));
                }
                v
            }
        };
        Ok(Bytes::from(out))
    }
}

/// `s` (a plain decimal) rounded half away from zero to `scale` digits.
fn round_decimal(s: &str, scale: u32) -> Option<String> {
    let (neg, digits) = s.strip_prefix('-').map_or((false, s), |d| (true, d));
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scale = scale as usize;
    let mut all: Vec<u8> = int.bytes().chain(frac.bytes().chain(std::iter::repeat(b'0')).take(scale)).map(|b| b - b'0').collect();
    if frac.len() > scale && frac.as_bytes()[scale] >= b'5' {
        let mut i = all.len();
        loop {
            if i == 0 {
                all.insert(0, 1);
                break;
            }
            i -= 1;
            if all[i] == 9 {
                all[i] = 0;
            } else {
                all[i] += 1;
                break;
            }
        }
    }
    let split = all.len() - scale;
    let int: String = all[..split].iter().map(|d| (d + b'0') as char).collect();
    let int = match int.trim_start_matches('0') {
        "" => "0".to_string(),
        t => t.to_string(),
    };
    let frac: String = all[split..].iter().map(|d| (d + b'0') as char).collect();
    let zero = int == "0" && frac.bytes().all(|b| b == b'0');
    let sign = if neg && !zero { "-" } else { "" };
    Some(if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cast(to: &str, from: PgType, v: &str) -> Result<String, String> {
        CastTo::parse(to).unwrap().apply(&from, v.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn casts_like_kafka_connect() {
        assert_eq!(cast("int", PgType::Float8, "12.9").unwrap(), "12");
        assert_eq!(cast("int", PgType::Numeric, "-7.5").unwrap(), "-7");
        assert_eq!(cast("int", PgType::Bool, "t").unwrap(), "1");
        assert!(cast("int", PgType::Text, "abc").is_err());
        assert_eq!(cast("float", PgType::Int4, "3").unwrap(), "3");
        assert_eq!(cast("bool", PgType::Int8, "0").unwrap(), "f");
        assert_eq!(cast("bool", PgType::Text, "yes").unwrap(), "t");
        assert_eq!(cast("decimal(10,2)", PgType::Numeric, "1.005").unwrap(), "1.01");
        assert_eq!(cast("decimal(10,2)", PgType::Numeric, "-0.004").unwrap(), "0.00");
        assert_eq!(cast("decimal(10,0)", PgType::Numeric, "9.5").unwrap(), "10");
        assert_eq!(cast("decimal(5,2)", PgType::Int4, "12").unwrap(), "12.00");
        assert!(cast("decimal(3,2)", PgType::Int4, "12").is_err(), "does not fit");
        assert_eq!(cast("string", PgType::Date, "2024-01-01").unwrap(), "2024-01-01");
        let ts = |to: CastTo, from: PgType, v: &str| String::from_utf8(to.apply(&from, v.as_bytes()).unwrap().to_vec()).unwrap();
        assert_eq!(ts(CastTo::UnixMs, PgType::TimestampTz, "1970-01-01 00:00:01.5+00"), "1500");
        assert_eq!(ts(CastTo::UnixMs, PgType::Date, "1969-12-31"), "-86400000");
        assert_eq!(ts(CastTo::Iso8601, PgType::TimestampTz, "2024-02-29 10:11:12.25+00"), "2024-02-29T10:11:12.25Z");
        assert_eq!(ts(CastTo::DateOnly, PgType::Timestamp, "2024-02-29 23:59:59"), "2024-02-29");
        assert!(CastTo::UnixMs.apply(&PgType::TimestampTz, b"infinity").is_err());
        assert!(CastTo::UnixMs.check(&PgType::Text).is_err());
    }

    #[test]
    fn rejects_impossible_casts_and_unknown_types() {
        assert!(CastTo::parse("integer-ish").is_err());
        assert!(CastTo::parse("decimal(2,5)").is_err());
        assert!(CastTo::Int.check(&PgType::Jsonb).is_err());
        assert!(CastTo::Bool.check(&PgType::Uuid).is_err());
        assert!(CastTo::Text.check(&PgType::Bytea).is_ok());
    }
}
