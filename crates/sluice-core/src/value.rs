//! Typed Postgres values, decoded from (and printed back to) Postgres's text encoding.
//!
//! The decoder expects the session settings Sluice pins on every source connection:
//! `DateStyle=ISO`, `IntervalStyle=iso_8601`, `TimeZone=UTC`, `bytea_output=hex`,
//! `extra_float_digits=3`. Anything it cannot type precisely stays [`Value::Other`]
//! with the exact text, so no value is ever lost.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::CoreError;

/// The Postgres types Sluice decodes into typed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Numeric,
    Float4,
    Float8,
    /// text, varchar, char(n), name.
    Text,
    Bytea,
    Uuid,
    Json,
    Jsonb,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Inet,
    Cidr,
    /// A user-defined enum; the label is kept as text.
    Enum,
    Array(Box<PgType>),
    /// Anything else: kept as the exact text Postgres printed.
    Other,
}

impl PgType {
    /// Maps a built-in type OID (scalar or array). Enums and arrays of user types are
    /// resolved from the catalog by the caller.
    pub fn from_oid(oid: u32) -> PgType {
        use PgType::*;
        let arr = |t: PgType| Array(Box::new(t));
        match oid {
            16 => Bool,
            17 => Bytea,
            18 | 19 | 25 | 1042 | 1043 => Text,
            20 => Int8,
            21 => Int2,
            23 => Int4,
            114 => Json,
            650 => Cidr,
            700 => Float4,
            701 => Float8,
            869 => Inet,
            1082 => Date,
            1083 => Time,
            1114 => Timestamp,
            1184 => TimestampTz,
            1186 => Interval,
            1266 => TimeTz,
            1700 => Numeric,
            2950 => Uuid,
            3802 => Jsonb,
            1000 => arr(Bool),
            1001 => arr(Bytea),
            1002 | 1003 | 1009 | 1014 | 1015 => arr(Text),
            1005 => arr(Int2),
            1007 => arr(Int4),
            1016 => arr(Int8),
            199 => arr(Json),
            651 => arr(Cidr),
            1021 => arr(Float4),
            1022 => arr(Float8),
            1041 => arr(Inet),
            1182 => arr(Date),
            1183 => arr(Time),
            1115 => arr(Timestamp),
            1185 => arr(TimestampTz),
            1187 => arr(Interval),
            1270 => arr(TimeTz),
            1231 => arr(Numeric),
            2951 => arr(Uuid),
            3807 => arr(Jsonb),
            _ => Other,
        }
    }

    /// Maps a type as Postgres prints it (`format_type`) or as a migration writes it
    /// (`int4`, `varchar(20)`, `timestamptz`); enums and other user types are `Other`.
    pub fn from_name(name: &str) -> PgType {
        let n = name.trim().to_ascii_lowercase();
        if let Some(elem) = n.strip_suffix("[]") {
            return PgType::Array(Box::new(PgType::from_name(elem)));
        }
        let base = n.split('(').next().unwrap_or("").trim();
        match base {
            "boolean" | "bool" => PgType::Bool,
            "smallint" | "int2" => PgType::Int2,
            "integer" | "int" | "int4" => PgType::Int4,
            "bigint" | "int8" => PgType::Int8,
            "numeric" | "decimal" => PgType::Numeric,
            "real" | "float4" => PgType::Float4,
            "double precision" | "float8" => PgType::Float8,
            "text" | "character varying" | "varchar" | "character" | "char" | "bpchar" | "name" => PgType::Text,
            "bytea" => PgType::Bytea,
            "uuid" => PgType::Uuid,
            "json" => PgType::Json,
            "jsonb" => PgType::Jsonb,
            "date" => PgType::Date,
            "time" | "time without time zone" => PgType::Time,
            "timetz" | "time with time zone" => PgType::TimeTz,
            "timestamp" | "timestamp without time zone" => PgType::Timestamp,
            "timestamptz" | "timestamp with time zone" => PgType::TimestampTz,
            "interval" => PgType::Interval,
            "inet" => PgType::Inet,
            "cidr" => PgType::Cidr,
            _ => PgType::Other,
        }
    }

    pub fn name(&self) -> &'static str {
        use PgType::*;
        match self {
            Bool => "bool",
            Int2 => "int2",
            Int4 => "int4",
            Int8 => "int8",
            Numeric => "numeric",
            Float4 => "float4",
            Float8 => "float8",
            Text => "text",
            Bytea => "bytea",
            Uuid => "uuid",
            Json => "json",
            Jsonb => "jsonb",
            Date => "date",
            Time => "time",
            TimeTz => "timetz",
            Timestamp => "timestamp",
            TimestampTz => "timestamptz",
            Interval => "interval",
            Inet => "inet",
            Cidr => "cidr",
            Enum => "enum",
            Array(_) => "array",
            Other => "other",
        }
    }
}

/// An exact decimal. Finite values keep Postgres's own digits, so any precision survives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Numeric {
    Finite(String),
    NaN,
    PosInfinity,
    NegInfinity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interval {
    pub months: i32,
    pub days: i32,
    pub micros: i64,
}

/// A typed value. Dates count days and timestamps microseconds from 1970-01-01;
/// `i32::MAX`/`i32::MIN` and `i64::MAX`/`i64::MIN` stand for `infinity`/`-infinity`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Numeric(Numeric),
    Float4(f32),
    Float8(f64),
    Text(String),
    Bytea(Vec<u8>),
    Uuid([u8; 16]),
    Json(String),
    Jsonb(String),
    Date(i32),
    /// Microseconds since midnight.
    Time(i64),
    TimeTz {
        micros: i64,
        offset_secs: i32,
    },
    Timestamp(i64),
    TimestampTz(i64),
    Interval(Interval),
    Inet {
        addr: IpAddr,
        prefix: u8,
    },
    Cidr {
        addr: IpAddr,
        prefix: u8,
    },
    Enum(String),
    Array(Vec<Value>),
    Other(String),
}

fn invalid(type_name: &'static str, reason: impl Into<String>) -> CoreError {
    CoreError::InvalidValue { type_name, reason: reason.into() }
}

impl Value {
    /// Decodes Postgres's text output for a value of type `ty`.
    pub fn parse(ty: &PgType, text: &str) -> Result<Value, CoreError> {
        let name = ty.name();
        let bad = |why: &str| invalid(name, format!("{why}: {}", preview(text)));
        Ok(match ty {
            PgType::Bool => match text {
                "t" | "true" => Value::Bool(true),
                "f" | "false" => Value::Bool(false),
                _ => return Err(bad("expected t or f")),
            },
            PgType::Int2 => Value::Int2(text.parse().map_err(|_| bad("not an int2"))?),
            PgType::Int4 => Value::Int4(text.parse().map_err(|_| bad("not an int4"))?),
            PgType::Int8 => Value::Int8(text.parse().map_err(|_| bad("not an int8"))?),
            PgType::Numeric => Value::Numeric(parse_numeric(text).ok_or_else(|| bad("not a numeric"))?),
            PgType::Float4 => Value::Float4(parse_float(text).ok_or_else(|| bad("not a float"))? as f32),
            PgType::Float8 => Value::Float8(parse_float(text).ok_or_else(|| bad("not a float"))?),
            PgType::Text => Value::Text(text.to_string()),
            PgType::Enum => Value::Enum(text.to_string()),
            PgType::Json => Value::Json(text.to_string()),
            PgType::Jsonb => Value::Jsonb(text.to_string()),
            PgType::Other => Value::Other(text.to_string()),
            PgType::Bytea => Value::Bytea(parse_bytea(text).ok_or_else(|| bad("expected \\x hex"))?),
            PgType::Uuid => Value::Uuid(parse_uuid(text).ok_or_else(|| bad("not a uuid"))?),
            PgType::Date => Value::Date(parse_date(text).ok_or_else(|| bad("not an ISO date"))?),
            PgType::Time => Value::Time(parse_time(text).ok_or_else(|| bad("not a time"))?),
            PgType::TimeTz => {
                let (t, off) = split_offset(text).ok_or_else(|| bad("no UTC offset"))?;
                let micros = parse_time(t).ok_or_else(|| bad("not a time"))?;
                Value::TimeTz { micros, offset_secs: parse_offset(off).ok_or_else(|| bad("bad offset"))? }
            }
            PgType::Timestamp => Value::Timestamp(parse_timestamp(text, false).ok_or_else(|| bad("not an ISO timestamp"))?),
            PgType::TimestampTz => Value::TimestampTz(parse_timestamp(text, true).ok_or_else(|| bad("not an ISO timestamp with offset"))?),
            PgType::Interval => Value::Interval(parse_interval(text).ok_or_else(|| bad("not an ISO 8601 interval"))?),
            PgType::Inet | PgType::Cidr => {
                let (addr, prefix) = match text.split_once('/') {
                    Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad("bad prefix"))?),
                    None => (text, 0),
                };
                let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = if text.contains('/') { prefix } else { max };
                if prefix > max {
                    return Err(bad("prefix too long"));
                }
                if *ty == PgType::Inet { Value::Inet { addr, prefix } } else { Value::Cidr { addr, prefix } }
            }
            PgType::Array(elem) => parse_array(elem, text)?,
        })
    }

    /// Prints the value as Postgres's text input accepts it.
    pub fn to_pg_text(&self) -> Option<String> {
        let mut s = String::new();
        match self {
            Value::Null => return None,
            Value::Bool(b) => s.push(if *b { 't' } else { 'f' }),
            Value::Int2(v) => write!(s, "{v}").ok()?,
            Value::Int4(v) => write!(s, "{v}").ok()?,
            Value::Int8(v) => write!(s, "{v}").ok()?,
            Value::Numeric(n) => s.push_str(match n {
                Numeric::Finite(d) => d,
                Numeric::NaN => "NaN",
                Numeric::PosInfinity => "Infinity",
                Numeric::NegInfinity => "-Infinity",
            }),
            Value::Float4(v) => write_float(&mut s, f64::from(*v), v.is_nan()),
            Value::Float8(v) => write_float(&mut s, *v, v.is_nan()),
            Value::Text(t) | Value::Enum(t) | Value::Json(t) | Value::Jsonb(t) | Value::Other(t) => s.push_str(t),
            Value::Bytea(b) => {
                s.push_str("\\x");
                for byte in b {
                    write!(s, "{byte:02x}").ok()?;
                }
            }
            Value::Uuid(u) => {
                for (i, byte) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        s.push('-');
                    }
                    write!(s, "{byte:02x}").ok()?;
                }
            }
            Value::Date(d) => write_date(&mut s, *d),
            Value::Time(t) => write_time(&mut s, *t),
            Value::TimeTz { micros, offset_secs } => {
                write_time(&mut s, *micros);
                write_offset(&mut s, *offset_secs);
            }
            Value::Timestamp(t) => write_timestamp(&mut s, *t, false),
            Value::TimestampTz(t) => write_timestamp(&mut s, *t, true),
            Value::Interval(i) => write_interval(&mut s, i),
            Value::Inet { addr, prefix } => {
                write!(s, "{addr}").ok()?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                if *prefix != max {
                    write!(s, "/{prefix}").ok()?;
                }
            }
            Value::Cidr { addr, prefix } => write!(s, "{addr}/{prefix}").ok()?,
            Value::Array(items) => write_array(&mut s, items),
        }
        Some(s)
    }
}

fn preview(text: &str) -> String {
    // Error messages name the shape of the problem, never a long value.
    let t: String = text.chars().take(24).collect();
    if t.len() < text.len() { format!("{t:?}...") } else { format!("{t:?}") }
}

fn parse_numeric(text: &str) -> Option<Numeric> {
    match text {
        "NaN" => return Some(Numeric::NaN),
        "Infinity" => return Some(Numeric::PosInfinity),
        "-Infinity" => return Some(Numeric::NegInfinity),
        _ => {}
    }
    numeric_digits(text).map(|_| Numeric::Finite(text.to_string()))
}

/// A finite numeric as Postgres prints it (`-12.50`), split into its sign (true when
/// negative), integer digits and fraction digits; `None` in any other form.
pub fn numeric_digits(text: &str) -> Option<(bool, &str, &str)> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let ok = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(digits.contains('.') && frac.is_empty());
    ok.then_some((negative, int, frac))
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

fn write_float(s: &mut String, v: f64, nan: bool) {
    if nan {
        s.push_str("NaN");
    } else if v == f64::INFINITY {
        s.push_str("Infinity");
    } else if v == f64::NEG_INFINITY {
        s.push_str("-Infinity");
    } else {
        let _ = write!(s, "{v}");
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    let h = text.strip_prefix("\\x")?.as_bytes();
    if h.len() % 2 != 0 {
        return None;
    }
    h.chunks(2).map(|p| Some(hex(p[0])? << 4 | hex(p[1])?)).collect()
}

fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let h: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if h.len() != 32 || text.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, p) in h.chunks(2).enumerate() {
        out[i] = hex(p[0])? << 4 | hex(p[1])?;
    }
    Some(out)
}

// Days from 1970-01-01 for a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// Parses `YYYY-MM-DD` with an optional ` BC` already stripped by the caller.
fn parse_ymd(text: &str, bc: bool) -> Option<i64> {
    let mut it = text.splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1 {
        return None;
    }
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m, d))
}

fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    }
}

fn parse_date(text: &str) -> Option<i32> {
    match text {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (t, bc) = strip_bc(text);
    i32::try_from(parse_ymd(t, bc)?).ok()
}

fn write_ymd(s: &mut String, days: i64) {
    let (y, m, d) = civil_from_days(days);
    let (y, bc) = if y <= 0 { (1 - y, true) } else { (y, false) };
    let _ = write!(s, "{y:04}-{m:02}-{d:02}");
    if bc {
        // Postgres puts the era after the whole value; callers append it last.
        s.push('\u{0}');
    }
}

fn finish_bc(s: &mut String) {
    if let Some(pos) = s.find('\u{0}') {
        s.remove(pos);
        s.push_str(" BC");
    }
}

fn write_date(s: &mut String, d: i32) {
    match d {
        i32::MAX => s.push_str("infinity"),
        i32::MIN => s.push_str("-infinity"),
        _ => {
            write_ymd(s, i64::from(d));
            finish_bc(s);
        }
    }
}

const DAY_US: i64 = 86_400_000_000;

fn parse_time(text: &str) -> Option<i64> {
    let (hms, frac) = text.split_once('.').unwrap_or((text, ""));
    let mut it = hms.split(':');
    let h: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let sec: i64 = it.next().map_or(Some(0), |x| x.parse().ok())?;
    if it.next().is_some() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_us: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().ok()? };
    let t = ((h * 60 + m) * 60 + sec) * 1_000_000 + frac_us;
    (0..=DAY_US).contains(&t).then_some(t)
}

fn write_time(s: &mut String, t: i64) {
    let (secs, us) = (t / 1_000_000, t % 1_000_000);
    let _ = write!(s, "{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if us != 0 {
        let frac = format!("{us:06}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
}

/// Splits `10:00:00+05:30` into time and offset.
fn split_offset(text: &str) -> Option<(&str, &str)> {
    let pos = text.rfind(['+', '-'])?;
    Some((&text[..pos], &text[pos..]))
}

fn parse_offset(off: &str) -> Option<i32> {
    let sign = if off.starts_with('-') { -1 } else { 1 };
    let mut parts = off[1..].split(':');
    let h: i32 = parts.next()?.parse().ok()?;
    let m: i32 = parts.next().map_or(Some(0), |x| x.parse().ok())?;
    let sec: i32 = parts.next().map_or(Some(0), |x| x.parse().ok())?;
    Some(sign * (h * 3600 + m * 60 + sec))
}

fn write_offset(s: &mut String, off: i32) {
    let sign = if off < 0 { '-' } else { '+' };
    let a = off.abs();
    let _ = write!(s, "{sign}{:02}", a / 3600);
    if a % 3600 != 0 {
        let _ = write!(s, ":{:02}", a / 60 % 60);
    }
    if a % 60 != 0 {
        let _ = write!(s, ":{:02}", a % 60);
    }
}

fn parse_timestamp(text: &str, with_tz: bool) -> Option<i64> {
    parse_timestamp_from(text, with_tz, 0)
}

/// Days from 1970-01-01 ([`Value`]'s epoch) to 2000-01-01, Postgres's own (its binary
/// format counts from there).
pub const PG_EPOCH_DAYS: i64 = 10_957;

/// Microseconds from 2000-01-01, Postgres's own epoch, to the timestamp it printed as
/// `text` in ISO style; `None` when not in that form.
pub fn pg_epoch_micros(text: &str, with_tz: bool) -> Option<i64> {
    parse_timestamp_from(text, with_tz, PG_EPOCH_DAYS)
}

/// Microseconds from `epoch_days` after 1970-01-01; `None` outside i64 (the latest
/// timestamps Postgres holds are past i64 microseconds from 1970).
fn parse_timestamp_from(text: &str, with_tz: bool, epoch_days: i64) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (t, bc) = strip_bc(text);
    let (date, time) = t.split_once(' ')?;
    let (time, offset) = if with_tz {
        let (tm, off) = split_offset(time)?;
        (tm, parse_offset(off)?)
    } else {
        (time, 0)
    };
    let days = parse_ymd(date, bc)? - epoch_days;
    let t = days.checked_mul(DAY_US)?.checked_add(parse_time(time)?)?.checked_sub(i64::from(offset) * 1_000_000)?;
    // The extremes stand for the infinities.
    (t != i64::MAX && t != i64::MIN).then_some(t)
}

fn write_timestamp(s: &mut String, t: i64, with_tz: bool) {
    match t {
        i64::MAX => return s.push_str("infinity"),
        i64::MIN => return s.push_str("-infinity"),
        _ => {}
    }
    write_ymd(s, t.div_euclid(DAY_US));
    s.push(' ');
    write_time(s, t.rem_euclid(DAY_US));
    if with_tz {
        s.push_str("+00");
    }
    finish_bc(s);
}

/// Parses the ISO 8601 form Postgres prints with `IntervalStyle=iso_8601`,
/// e.g. `P1Y2M3DT4H5M6.5S`, `P-1Y-2M` or `PT0S`.
fn parse_interval(text: &str) -> Option<Interval> {
    let body = text.strip_prefix('P')?;
    let (date, time) = body.split_once('T').unwrap_or((body, ""));
    let mut iv = Interval::default();
    let mut num = String::new();
    for c in date.chars() {
        match c {
            'Y' | 'M' | 'W' | 'D' => {
                let n: i32 = num.parse().ok()?;
                num.clear();
                match c {
                    'Y' => iv.months = iv.months.checked_add(n.checked_mul(12)?)?,
                    'M' => iv.months = iv.months.checked_add(n)?,
                    'W' => iv.days = iv.days.checked_add(n.checked_mul(7)?)?,
                    _ => iv.days = iv.days.checked_add(n)?,
                }
            }
            _ => num.push(c),
        }
    }
    for c in time.chars() {
        match c {
            'H' | 'M' => {
                let n: i64 = num.parse().ok()?;
                num.clear();
                iv.micros += n * if c == 'H' { 3_600_000_000 } else { 60_000_000 };
            }
            'S' => {
                let neg = num.starts_with('-');
                let (whole, frac) = num.split_once('.').unwrap_or((&num, ""));
                let whole: i64 = whole.parse().ok()?;
                let frac_us: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").get(..6)?.parse().ok()? };
                iv.micros += whole * 1_000_000 + if neg { -frac_us } else { frac_us };
                num.clear();
            }
            _ => num.push(c),
        }
    }
    num.is_empty().then_some(iv)
}

fn write_interval(s: &mut String, iv: &Interval) {
    if iv.months == 0 && iv.days == 0 && iv.micros == 0 {
        return s.push_str("PT0S");
    }
    s.push('P');
    let (y, m) = (iv.months / 12, iv.months % 12);
    for (n, unit) in [(y, 'Y'), (m, 'M'), (iv.days, 'D')] {
        if n != 0 {
            let _ = write!(s, "{n}{unit}");
        }
    }
    if iv.micros != 0 {
        s.push('T');
        let neg = iv.micros < 0;
        let a = iv.micros.unsigned_abs();
        let (h, mi, sec, us) = (a / 3_600_000_000, a / 60_000_000 % 60, a / 1_000_000 % 60, a % 1_000_000);
        let sign = if neg { "-" } else { "" };
        if h != 0 {
            let _ = write!(s, "{sign}{h}H");
        }
        if mi != 0 {
            let _ = write!(s, "{sign}{mi}M");
        }
        if sec != 0 || us != 0 {
            let _ = write!(s, "{sign}{sec}");
            if us != 0 {
                let frac = format!("{us:06}");
                s.push('.');
                s.push_str(frac.trim_end_matches('0'));
            }
            s.push('S');
        }
    }
}

fn parse_array(elem: &PgType, text: &str) -> Result<Value, CoreError> {
    let bad = |why: &str| invalid("array", format!("{why}: {}", preview(text)));
    // A non-default lower bound (`[0:1]={...}`) has no place in the typed model.
    if text.starts_with('[') {
        return Ok(Value::Other(text.to_string()));
    }
    let bytes = text.as_bytes();
    let mut pos = 0;
    let v = parse_array_level(elem, bytes, &mut pos).map_err(|e| e.unwrap_or_else(|| bad("malformed array literal")))?;
    if pos != bytes.len() {
        return Err(bad("trailing characters"));
    }
    Ok(v)
}

fn parse_array_level(elem: &PgType, b: &[u8], pos: &mut usize) -> Result<Value, Option<CoreError>> {
    if b.get(*pos) != Some(&b'{') {
        return Err(None);
    }
    *pos += 1;
    let mut items = Vec::new();
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Ok(Value::Array(items));
    }
    loop {
        match b.get(*pos) {
            Some(b'{') => items.push(parse_array_level(elem, b, pos)?),
            Some(b'"') => {
                *pos += 1;
                let mut out = Vec::new();
                loop {
                    match b.get(*pos) {
                        Some(b'\\') => {
                            out.push(*b.get(*pos + 1).ok_or(None)?);
                            *pos += 2;
                        }
                        Some(b'"') => {
                            *pos += 1;
                            break;
                        }
                        Some(&c) => {
                            out.push(c);
                            *pos += 1;
                        }
                        None => return Err(None),
                    }
                }
                let s = String::from_utf8(out).map_err(|_| None)?;
                items.push(Value::parse(elem, &s).map_err(Some)?);
            }
            Some(_) => {
                let start = *pos;
                while !matches!(b.get(*pos), Some(b',' | b'}') | None) {
                    *pos += 1;
                }
                let s = std::str::from_utf8(&b[start..*pos]).map_err(|_| None)?;
                items.push(if s == "NULL" { Value::Null } else { Value::parse(elem, s).map_err(Some)? });
            }
            None => return Err(None),
        }
        match b.get(*pos) {
            Some(b',') => *pos += 1,
            Some(b'}') => {
                *pos += 1;
                return Ok(Value::Array(items));
            }
            _ => return Err(None),
        }
    }
}

fn write_array(s: &mut String, items: &[Value]) {
    s.push('{');
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match v {
            Value::Array(inner) => write_array(s, inner),
            Value::Null => s.push_str("NULL"),
            other => {
                let t = other.to_pg_text().unwrap_or_default();
                let plain = !t.is_empty()
                    && !t.eq_ignore_ascii_case("null")
                    && !t.bytes().any(|c| matches!(c, b'{' | b'}' | b',' | b'"' | b'\\' | b' ' | b'\t' | b'\n'));
                if plain {
                    s.push_str(&t);
                } else {
                    s.push('"');
                    for c in t.chars() {
                        if c == '"' || c == '\\' {
                            s.push('\\');
                        }
                        s.push(c);
                    }
                    s.push('"');
                }
            }
        }
    }
    s.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text exactly as Postgres prints it under Sluice's session settings.
    const PG_OUTPUT: &[(PgType, &str)] = &[
        (PgType::Bool, "t"),
        (PgType::Int2, "-32768"),
        (PgType::Int8, "9223372036854775807"),
        (PgType::Numeric, "-123456789012345678901234567890.000000000000000000001"),
        (PgType::Numeric, "NaN"),
        (PgType::Numeric, "-Infinity"),
        (PgType::Float8, "Infinity"),
        (PgType::Float8, "NaN"),
        (PgType::Float8, "1.5"),
        (PgType::Bytea, "\\x00ff10"),
        (PgType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (PgType::Date, "2024-02-29"),
        (PgType::Date, "0044-03-15 BC"),
        (PgType::Date, "infinity"),
        (PgType::Time, "23:59:59.999999"),
        (PgType::Time, "24:00:00"),
        (PgType::TimeTz, "10:00:00+05:30"),
        (PgType::TimeTz, "10:00:00.5-08"),
        (PgType::Timestamp, "1999-12-31 23:59:59.5"),
        (PgType::Timestamp, "4713-01-01 00:00:00 BC"),
        (PgType::TimestampTz, "2024-06-01 12:00:00+00"),
        (PgType::TimestampTz, "-infinity"),
        (PgType::Interval, "P1Y2M3DT4H5M6.789S"),
        (PgType::Interval, "P-1Y-2MT-3H"),
        (PgType::Interval, "PT0S"),
        (PgType::Inet, "192.168.0.1/24"),
        (PgType::Inet, "::1"),
        (PgType::Cidr, "10.0.0.0/8"),
    ];

    #[test]
    fn parses_postgres_output_and_prints_it_back() {
        for (ty, text) in PG_OUTPUT {
            let v = Value::parse(ty, text).unwrap_or_else(|e| panic!("{ty:?} {text}: {e}"));
            assert!(!matches!(v, Value::Other(_)), "{text} fell back to text");
            assert_eq!(v.to_pg_text().as_deref(), Some(*text), "{ty:?}");
        }
    }

    #[test]
    fn decodes_to_the_right_numbers() {
        assert_eq!(Value::parse(&PgType::Date, "1970-01-02").unwrap(), Value::Date(1));
        assert_eq!(Value::parse(&PgType::TimestampTz, "1970-01-01 01:00:00+01").unwrap(), Value::TimestampTz(0));
        assert_eq!(
            Value::parse(&PgType::Interval, "P1DT-0.5S").unwrap(),
            Value::Interval(Interval { months: 0, days: 1, micros: -500_000 })
        );
        assert!(matches!(Value::parse(&PgType::Float4, "-Infinity").unwrap(), Value::Float4(f) if f == f32::NEG_INFINITY));
    }

    #[test]
    fn arrays_nest_quote_and_hold_nulls() {
        let ty = PgType::Array(Box::new(PgType::Text));
        let text = r#"{{a,"b c",NULL},{"\"q\"","",x}}"#;
        let v = Value::parse(&ty, text).unwrap();
        assert_eq!(
            v,
            Value::Array(vec![
                Value::Array(vec![Value::Text("a".into()), Value::Text("b c".into()), Value::Null]),
                Value::Array(vec![Value::Text("\"q\"".into()), Value::Text(String::new()), Value::Text("x".into())]),
            ])
        );
        assert_eq!(v.to_pg_text().unwrap(), text);
        assert_eq!(Value::parse(&ty, "{}").unwrap(), Value::Array(vec![]));
        let ints = PgType::Array(Box::new(PgType::Int4));
        assert_eq!(Value::parse(&ints, "{1,-2}").unwrap(), Value::Array(vec![Value::Int4(1), Value::Int4(-2)]));
        assert!(Value::parse(&ints, "{1,x}").is_err());
        assert!(matches!(Value::parse(&ints, "[0:1]={1,2}").unwrap(), Value::Other(_)));
    }

    #[test]
    fn bad_input_is_an_error_not_a_guess() {
        for (ty, text) in [
            (PgType::Int4, "12x"),
            (PgType::Bool, "yes"),
            (PgType::Numeric, "1e5"),
            (PgType::Uuid, "zzzz"),
            (PgType::Date, "2024-13-01"),
            (PgType::Bytea, "\\x0"),
            (PgType::Inet, "1.2.3.4/40"),
            (PgType::Interval, "1 day"),
        ] {
            assert!(Value::parse(&ty, text).is_err(), "{ty:?} {text}");
        }
    }

    #[test]
    fn long_values_are_not_copied_into_errors() {
        let long = "9".repeat(10_000) + "x";
        let err = Value::parse(&PgType::Int8, &long).unwrap_err().to_string();
        assert!(err.len() < 100, "{err}");
    }
}
