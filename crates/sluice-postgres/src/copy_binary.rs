//! COPY's binary format, written from the text values pgoutput and COPY TO send.
//!
//! For wide rows the target server spends most of a text COPY scanning every byte for
//! escapes and running each type's input function; in binary a text value is copied as
//! is and a number or timestamp is read in one step. Only types whose binary form is a
//! plain, exact function of their text output are encoded here (the session prints
//! dates as ISO in UTC, see `conn::SESSION_OPTIONS`); a table with any other column, or
//! a value not in the expected form, is copied as text instead, so binary is never a
//! second interpretation of a value.

use bytes::{BufMut, BytesMut};
use sluice_core::{ColumnSchema, Datum, PG_EPOCH_DAYS, PgType, Row, Value, numeric_digits, pg_epoch_micros};

/// The signature, flags and header-extension length that open a binary COPY stream.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// How one column's text is written in binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryField {
    /// The bytes as they are: text, varchar, char(n), json, enum labels.
    Raw,
    /// jsonb: a version byte, then the text.
    Jsonb,
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Bytea,
    Uuid,
    Date,
    Timestamp,
    TimestampTz,
}

impl BinaryField {
    /// The binary form of a column of this type, or `None` when it is copied as text.
    /// `name` and `"char"` are left out: their input functions truncate or unescape
    /// what the binary ones would refuse or take literally.
    pub fn of(col: &ColumnSchema) -> Option<BinaryField> {
        Some(match col.type_oid {
            16 => BinaryField::Bool,
            17 => BinaryField::Bytea,
            20 => BinaryField::Int8,
            21 => BinaryField::Int2,
            23 => BinaryField::Int4,
            25 | 1042 | 1043 | 114 => BinaryField::Raw,
            3802 => BinaryField::Jsonb,
            700 => BinaryField::Float4,
            701 => BinaryField::Float8,
            1700 => BinaryField::Numeric,
            2950 => BinaryField::Uuid,
            1082 => BinaryField::Date,
            1114 => BinaryField::Timestamp,
            1184 => BinaryField::TimestampTz,
            _ if col.pg_type == PgType::Enum => BinaryField::Raw,
            _ => return None,
        })
    }

    /// Appends the field (length and value); `false` when the text is not in the form
    /// this type prints, and the caller copies the batch as text instead.
    fn put(self, buf: &mut BytesMut, text: &[u8]) -> bool {
        match self {
            BinaryField::Raw => {
                let Ok(len) = i32::try_from(text.len()) else { return false };
                buf.put_i32(len);
                buf.put_slice(text);
                return true;
            }
            BinaryField::Jsonb => {
                let Ok(len) = i32::try_from(text.len() + 1) else { return false };
                buf.put_i32(len);
                buf.put_u8(1);
                buf.put_slice(text);
                return true;
            }
            _ => {}
        }
        let Ok(s) = std::str::from_utf8(text) else { return false };
        match self {
            BinaryField::Bool => match s {
                "t" => put_fixed(buf, &[1]),
                "f" => put_fixed(buf, &[0]),
                _ => return false,
            },
            BinaryField::Int2 => match s.parse::<i16>() {
                Ok(v) => put_fixed(buf, &v.to_be_bytes()),
                Err(_) => return false,
            },
            BinaryField::Int4 => match s.parse::<i32>() {
                Ok(v) => put_fixed(buf, &v.to_be_bytes()),
                Err(_) => return false,
            },
            BinaryField::Int8 => match s.parse::<i64>() {
                Ok(v) => put_fixed(buf, &v.to_be_bytes()),
                Err(_) => return false,
            },
            // Parsed straight into the width stored: going through f64 first could round
            // a float4 twice.
            BinaryField::Float4 => match special_float(s).map(|v| v as f32).or_else(|| plain_float(s)?.parse::<f32>().ok()) {
                Some(v) => put_fixed(buf, &v.to_bits().to_be_bytes()),
                None => return false,
            },
            BinaryField::Float8 => match special_float(s).or_else(|| plain_float(s)?.parse::<f64>().ok()) {
                Some(v) => put_fixed(buf, &v.to_bits().to_be_bytes()),
                None => return false,
            },
            BinaryField::Numeric => return put_numeric(buf, s),
            BinaryField::Bytea => match Value::parse(&PgType::Bytea, s) {
                Ok(Value::Bytea(b)) => return BinaryField::Raw.put(buf, &b),
                _ => return false,
            },
            BinaryField::Uuid => match Value::parse(&PgType::Uuid, s) {
                Ok(Value::Uuid(u)) => put_fixed(buf, &u),
                _ => return false,
            },
            BinaryField::Date => match Value::parse(&PgType::Date, s) {
                Ok(Value::Date(d)) => {
                    let d = match d {
                        i32::MAX | i32::MIN => d,
                        _ => match i32::try_from(i64::from(d) - PG_EPOCH_DAYS) {
                            Ok(d) => d,
                            Err(_) => return false,
                        },
                    };
                    put_fixed(buf, &d.to_be_bytes())
                }
                _ => return false,
            },
            BinaryField::Timestamp | BinaryField::TimestampTz => match pg_epoch_micros(s, self == BinaryField::TimestampTz) {
                Some(t) => put_fixed(buf, &t.to_be_bytes()),
                None => return false,
            },
            BinaryField::Raw | BinaryField::Jsonb => unreachable!("handled above"),
        }
        true
    }
}

fn put_fixed(buf: &mut BytesMut, v: &[u8]) {
    buf.put_i32(v.len() as i32);
    buf.put_slice(v);
}

/// The words Postgres prints for the float specials (Rust's parser spells them
/// differently and accepts more).
fn special_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// A float as Postgres prints it: digits, a point, an exponent; never Rust's `inf`.
fn plain_float(s: &str) -> Option<&str> {
    s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')).then_some(s)
}

/// numeric's binary form: digit count, weight, sign, display scale, then base-10000
/// digits. The server normalizes leading and trailing zero digits itself.
fn put_numeric(buf: &mut BytesMut, s: &str) -> bool {
    let (sign, int, frac) = match s {
        "NaN" => return put_numeric_special(buf, 0xC000),
        "Infinity" => return put_numeric_special(buf, 0xD000),
        "-Infinity" => return put_numeric_special(buf, 0xF000),
        _ => match numeric_digits(s) {
            Some((negative, int, frac)) => (if negative { 0x4000u16 } else { 0 }, int.trim_start_matches('0').as_bytes(), frac.as_bytes()),
            None => return false,
        },
    };
    let Ok(dscale) = i16::try_from(frac.len()) else { return false };
    // Whole groups of four decimal digits, the integer part padded on the left and the
    // fraction on the right.
    let int_groups = int.len().div_ceil(4);
    let frac_groups = frac.len().div_ceil(4);
    let Ok(ndigits) = i16::try_from(int_groups + frac_groups) else { return false };
    let weight = int_groups as i16 - 1;
    buf.put_i32(8 + 2 * i32::from(ndigits));
    buf.put_i16(ndigits);
    buf.put_i16(weight);
    buf.put_u16(sign);
    buf.put_i16(dscale);
    let digit = |b: u8| u16::from(b - b'0');
    let lead = int_groups * 4 - int.len();
    for g in 0..int_groups {
        let mut v = 0u16;
        for k in 0..4 {
            let pos = (g * 4 + k).checked_sub(lead);
            v = v * 10 + pos.map_or(0, |p| digit(int[p]));
        }
        buf.put_u16(v);
    }
    for g in 0..frac_groups {
        let mut v = 0u16;
        for k in 0..4 {
            v = v * 10 + frac.get(g * 4 + k).map_or(0, |&b| digit(b));
        }
        buf.put_u16(v);
    }
    true
}

fn put_numeric_special(buf: &mut BytesMut, sign: u16) -> bool {
    buf.put_i32(8);
    buf.put_i16(0);
    buf.put_i16(0);
    buf.put_u16(sign);
    buf.put_i16(0);
    true
}

/// A binary COPY stream written into a buffer, row by row and field by field.
pub struct BinaryRows<'a> {
    buf: &'a mut BytesMut,
    start: usize,
}

impl<'a> BinaryRows<'a> {
    pub fn begin(buf: &'a mut BytesMut) -> Self {
        let start = buf.len();
        buf.put_slice(HEADER);
        BinaryRows { buf, start }
    }

    /// Starts a row of `fields` fields.
    pub fn row(&mut self, fields: i16) {
        self.buf.put_i16(fields);
    }

    /// A value as `field`; `false` when its text is not in the form the type prints or
    /// it is an unchanged TOAST value, which has no value to write.
    pub fn value(&mut self, field: BinaryField, d: &Datum) -> bool {
        match d {
            Datum::Text(t) => field.put(self.buf, t),
            Datum::Null => {
                self.null();
                true
            }
            Datum::Unchanged => false,
        }
    }

    pub fn null(&mut self) {
        self.buf.put_i32(-1);
    }

    /// A `"char"` value.
    pub fn char(&mut self, c: u8) {
        put_fixed(self.buf, &[c]);
    }

    /// A one-dimensional `bool[]` without NULLs.
    pub fn bools(&mut self, flags: impl ExactSizeIterator<Item = bool>) {
        let n = flags.len() as i32;
        self.buf.put_i32(20 + 5 * n);
        self.buf.put_i32(1); // dimensions
        self.buf.put_i32(0); // no NULL elements
        self.buf.put_u32(16); // bool's type oid
        self.buf.put_i32(n);
        self.buf.put_i32(1); // lower bound
        for f in flags {
            put_fixed(self.buf, &[u8::from(f)]);
        }
    }

    pub fn finish(self) {
        self.buf.put_i16(-1);
    }

    /// Takes back everything written since [`BinaryRows::begin`].
    pub fn abandon(self) {
        self.buf.truncate(self.start);
    }
}

/// Writes rows as one binary COPY stream of `fields.len()` columns (a row shorter than
/// that ends in NULLs). `false`, with `buf` as it was, when a value is not in the form
/// its type prints: copy these rows as text.
pub fn put_rows<'a>(buf: &mut BytesMut, fields: &[BinaryField], rows: impl IntoIterator<Item = &'a Row>) -> bool {
    let Ok(ncols) = i16::try_from(fields.len()) else { return false };
    let mut w = BinaryRows::begin(buf);
    for row in rows {
        w.row(ncols);
        for (i, &f) in fields.iter().enumerate() {
            if !w.value(f, row.get(i).unwrap_or(&Datum::Null)) {
                w.abandon();
                return false;
            }
        }
    }
    w.finish();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(f: BinaryField, s: &str) -> Option<Vec<u8>> {
        let mut b = BytesMut::new();
        f.put(&mut b, s.as_bytes()).then(|| b[4..].to_vec())
    }

    #[test]
    fn numerics_in_base_10000() {
        // 12345.678: weight 1, digits 1 2345 6780, dscale 3.
        assert_eq!(field(BinaryField::Numeric, "12345.678").unwrap(), [0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1A, 0x7C]);
        // -0.5: weight -1 (no integer groups), digit 5000.
        assert_eq!(field(BinaryField::Numeric, "-0.5").unwrap(), [0, 1, 0xFF, 0xFF, 0x40, 0, 0, 1, 0x13, 0x88]);
        assert_eq!(field(BinaryField::Numeric, "0").unwrap(), [0, 0, 0xFF, 0xFF, 0, 0, 0, 0]);
        assert_eq!(field(BinaryField::Numeric, "NaN").unwrap(), [0, 0, 0, 0, 0xC0, 0, 0, 0]);
        assert!(field(BinaryField::Numeric, "1e5").is_none());
    }

    #[test]
    fn text_not_in_the_printed_form_is_refused() {
        for (f, s) in [
            (BinaryField::Int4, " 1"),
            (BinaryField::Int2, "40000"),
            (BinaryField::Bool, "yes"),
            (BinaryField::Float8, "inf"),
            (BinaryField::Uuid, "a0eebc999c0b4ef8bb6d6bb9bd380a11"),
            (BinaryField::Timestamp, "2024-01-01T00:00:00"),
            (BinaryField::Bytea, "abc"),
        ] {
            assert!(field(f, s).is_none(), "{f:?} {s:?}");
        }
        assert_eq!(field(BinaryField::Date, "2000-01-02").unwrap(), 1i32.to_be_bytes());
        assert_eq!(field(BinaryField::TimestampTz, "2000-01-01 00:00:01+00").unwrap(), 1_000_000i64.to_be_bytes());
        assert_eq!(field(BinaryField::Timestamp, "infinity").unwrap(), i64::MAX.to_be_bytes());
        // The latest timestamp Postgres holds is past i64 microseconds from 1970.
        assert_eq!(field(BinaryField::Timestamp, "294276-12-31 23:59:59.999999").unwrap(), 9_223_371_331_199_999_999i64.to_be_bytes());
    }

    #[test]
    fn a_refused_value_leaves_the_buffer_as_it_was() {
        let mut b = BytesMut::from(&b"before"[..]);
        let rows = [vec![Datum::Text("1".into())], vec![Datum::Text("x".into())]];
        assert!(!put_rows(&mut b, &[BinaryField::Int4], &rows));
        assert_eq!(&b[..], b"before");
        assert!(!put_rows(&mut b, &[BinaryField::Raw], &[vec![Datum::Unchanged]]));
        assert_eq!(&b[..], b"before");
    }
}
