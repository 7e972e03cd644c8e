use apache_avro::Schema;
#[cfg(test)]
use apache_avro::types::Value as Avro;
use sluice_core::{Datum, PgType, Row, TableSchema, Value};

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("derived Avro schema for {table} is invalid: {reason}")]
    Schema { table: String, reason: String },
    #[error("column {column}: {reason}")]
    Value { column: String, reason: String },
}

/// Encodes rows of one table as Avro values in Confluent's wire format.
pub struct AvroEncoder {
    schema_id: u32,
    columns: Columns,
}

/// What Debezium writes for a TOASTed column an update did not touch (its
/// `unavailable.value.placeholder`), so consumers that know Debezium recognize it.
pub use sluice_core::json::UNAVAILABLE;

struct Col {
    /// Index in the source row.
    index: usize,
    name: String,
    ty: PgType,
    scale: Option<u32>,
    nullable: bool,
    /// Whether the Avro type is a string or bytes (which can carry the placeholder).
    textual: bool,
}

/// The conversion of a table's row (or of its key columns) to an Avro record.
pub(crate) struct Columns(Vec<Col>);

impl Columns {
    pub(crate) fn new(table: &TableSchema, keys_only: bool) -> Self {
        Columns(
            table
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| !keys_only || c.is_key)
                .map(|(index, c)| {
                    let scale = sluice_core::avro::precision_scale(&c.type_name).map(|(_, s)| s);
                    let textual = sluice_core::avro::is_textual(&c.pg_type, &c.type_name);
                    Col { index, name: sluice_core::avro::avro_name(&c.name), ty: c.pg_type.clone(), scale, nullable: !c.is_key, textual }
                })
                .collect(),
        )
    }

    /// The record for `row` as an `apache_avro` value: what [`Self::write`] is held to.
    #[cfg(test)]
    pub(crate) fn record(&self, row: &Row) -> Result<Avro, EncodeError> {
        let mut fields = Vec::with_capacity(self.0.len());
        for c in &self.0 {
            let err = |reason: String| EncodeError::Value { column: c.name.clone(), reason };
            let value = match row.get(c.index).unwrap_or(&Datum::Null) {
                Datum::Null => Value::Null,
                Datum::Unchanged if c.textual && c.ty == PgType::Bytea => Value::Bytea(UNAVAILABLE.as_bytes().to_vec()),
                Datum::Unchanged if c.textual => Value::Text(UNAVAILABLE.into()),
                Datum::Unchanged if c.nullable => Value::Null,
                Datum::Unchanged => {
                    return Err(err("unchanged TOAST value has no content to encode: set REPLICA IDENTITY FULL on the table".into()));
                }
                Datum::Text(b) => {
                    let text = std::str::from_utf8(b).map_err(|_| err("not UTF-8".into()))?;
                    Value::parse(&c.ty, text).map_err(|e| err(e.to_string()))?
                }
            };
            let is_null = value == Value::Null;
            let avro = to_avro(value, &c.ty, c.scale).map_err(err)?;
            let avro = match (c.nullable, is_null) {
                (true, true) => Avro::Union(0, Box::new(Avro::Null)),
                (true, false) => Avro::Union(1, Box::new(avro)),
                (false, true) => return Err(err("NULL in a required field".into())),
                (false, false) => avro,
            };
            fields.push((c.name.clone(), avro));
        }
        Ok(Avro::Record(fields))
    }

    /// Appends the Avro binary of `row`'s record (its columns are the table's, in order)
    /// straight from the row, without an intermediate `Value` tree or a schema walk per
    /// record: the bytes `apache_avro` writes for [`Self::record`] under the schema
    /// `sluice_core::avro` derives (the tests hold the two to the same bytes).
    pub(crate) fn write(&self, row: &Row, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        for c in &self.0 {
            let err = |reason: String| EncodeError::Value { column: c.name.clone(), reason };
            let value = match row.get(c.index).unwrap_or(&Datum::Null) {
                Datum::Null => Value::Null,
                // The placeholder, as a string or as bytes: the same bytes in Avro.
                Datum::Unchanged if c.textual => {
                    union(c.nullable, out);
                    bytes(UNAVAILABLE.as_bytes(), out);
                    continue;
                }
                Datum::Unchanged if c.nullable => Value::Null,
                Datum::Unchanged => {
                    return Err(err("unchanged TOAST value has no content to encode: set REPLICA IDENTITY FULL on the table".into()));
                }
                Datum::Text(b) => {
                    let text = std::str::from_utf8(b).map_err(|_| err("not UTF-8".into()))?;
                    if c.ty == PgType::Text {
                        // Text is written as it came: no parse, no copy.
                        union(c.nullable, out);
                        bytes(text.as_bytes(), out);
                        continue;
                    }
                    Value::parse(&c.ty, text).map_err(|e| err(e.to_string()))?
                }
            };
            match (c.nullable, matches!(value, Value::Null)) {
                (true, true) => out.push(0),
                (false, true) => return Err(err("NULL in a required field".into())),
                (nullable, false) => {
                    union(nullable, out);
                    write_value(value, &c.ty, c.scale, out).map_err(err)?;
                }
            }
        }
        Ok(())
    }
}

/// Appends Confluent's header: magic byte 0 and the schema id, big-endian.
pub(crate) fn header(schema_id: u32, out: &mut Vec<u8>) {
    out.push(0);
    out.extend(schema_id.to_be_bytes());
}

#[cfg(test)]
pub(crate) fn datum(schema: &Schema, value: Avro, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let body =
        apache_avro::to_avro_datum(schema, value).map_err(|e| EncodeError::Value { column: "(record)".into(), reason: e.to_string() })?;
    out.extend(body);
    Ok(())
}

/// Unscaled big-endian two's-complement bytes of a decimal string at `scale`.
fn decimal_bytes(text: &str, scale: u32) -> Option<Vec<u8>> {
    let (neg, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if frac.len() > scale as usize || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let all = format!("{int}{frac}{}", "0".repeat(scale as usize - frac.len()));
    // Base 10 to base 256, most significant byte first.
    let mut mag: Vec<u8> = vec![0];
    for d in all.bytes().map(|b| b - b'0') {
        let mut carry = u32::from(d);
        for byte in mag.iter_mut().rev() {
            let v = u32::from(*byte) * 10 + carry;
            *byte = (v & 0xff) as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            mag.insert(0, (carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    // Room for the sign bit.
    if mag[0] & 0x80 != 0 {
        mag.insert(0, 0);
    }
    if neg {
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                break;
            }
        }
    }
    Some(mag)
}

/// Avro's `long` (and `int`: the same zig-zag varint for values in range).
pub(crate) fn long(v: i64, out: &mut Vec<u8>) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Avro's `bytes` and `string`: the length, then the bytes.
pub(crate) fn bytes(b: &[u8], out: &mut Vec<u8>) {
    long(b.len() as i64, out);
    out.extend_from_slice(b);
}

/// The branch of a `["null", T]` union holding a value, when the field is one.
pub(crate) fn union(nullable: bool, out: &mut Vec<u8>) {
    if nullable {
        out.push(2); // branch 1, zig-zag encoded
    }
}

/// A value as [`to_avro`] converts it, written in Avro binary.
fn write_value(v: Value, ty: &PgType, scale: Option<u32>, out: &mut Vec<u8>) -> Result<(), String> {
    match (v, ty) {
        (Value::Null, _) => {}
        (Value::Bool(b), _) => out.push(u8::from(b)),
        (Value::Int2(i), _) => long(i64::from(i), out),
        (Value::Int4(i) | Value::Date(i), _) => long(i64::from(i), out),
        (Value::Int8(i) | Value::Time(i) | Value::Timestamp(i) | Value::TimestampTz(i), _) => long(i, out),
        (Value::Float4(f), _) => out.extend_from_slice(&f.to_le_bytes()),
        (Value::Float8(f), _) => out.extend_from_slice(&f.to_le_bytes()),
        (Value::Numeric(n), _) => match (n, scale) {
            (sluice_core::Numeric::Finite(text), Some(s)) => {
                bytes(&decimal_bytes(&text, s).ok_or_else(|| format!("{text:?} does not fit scale {s}"))?, out);
            }
            (sluice_core::Numeric::Finite(text), None) => bytes(text.as_bytes(), out),
            (other, Some(_)) => return Err(format!("{other:?} has no decimal representation")),
            (other, None) => bytes(Value::Numeric(other).to_pg_text().unwrap_or_default().as_bytes(), out),
        },
        (Value::Bytea(b), _) => bytes(&b, out),
        (Value::Uuid(u), _) => bytes(uuid::Uuid::from_bytes(u).hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes(), out),
        (Value::Array(items), PgType::Array(elem)) => {
            if !items.is_empty() {
                long(items.len() as i64, out);
                for i in items {
                    if matches!(i, Value::Null) {
                        out.push(0);
                    } else {
                        out.push(2);
                        write_value(i, elem, scale, out)?;
                    }
                }
            }
            out.push(0);
        }
        // Everything else travels as its exact text.
        (other, _) => bytes(other.to_pg_text().unwrap_or_default().as_bytes(), out),
    }
    Ok(())
}

#[cfg(test)]
fn to_avro(v: Value, ty: &PgType, scale: Option<u32>) -> Result<Avro, String> {
    Ok(match (v, ty) {
        (Value::Null, _) => Avro::Null,
        (Value::Bool(b), _) => Avro::Boolean(b),
        (Value::Int2(i), _) => Avro::Int(i32::from(i)),
        (Value::Int4(i), _) => Avro::Int(i),
        (Value::Int8(i), _) => Avro::Long(i),
        (Value::Float4(f), _) => Avro::Float(f),
        (Value::Float8(f), _) => Avro::Double(f),
        (Value::Numeric(n), _) => match (n, scale) {
            (sluice_core::Numeric::Finite(text), Some(s)) => {
                Avro::Decimal(decimal_bytes(&text, s).ok_or_else(|| format!("{text:?} does not fit scale {s}"))?.into())
            }
            (sluice_core::Numeric::Finite(text), None) => Avro::String(text),
            (other, Some(_)) => return Err(format!("{other:?} has no decimal representation")),
            (other, None) => Avro::String(Value::Numeric(other).to_pg_text().unwrap_or_default()),
        },
        (Value::Bytea(b), _) => Avro::Bytes(b),
        (Value::Uuid(u), _) => Avro::Uuid(uuid::Uuid::from_bytes(u)),
        (Value::Date(d), _) => Avro::Date(d),
        (Value::Time(t), _) => Avro::TimeMicros(t),
        (Value::Timestamp(t) | Value::TimestampTz(t), _) => Avro::TimestampMicros(t),
        (Value::Array(items), PgType::Array(elem)) => Avro::Array(
            items
                .into_iter()
                .map(|i| {
                    Ok(match to_avro(i, elem, scale)? {
                        Avro::Null => Avro::Union(0, Box::new(Avro::Null)),
                        v => Avro::Union(1, Box::new(v)),
                    })
                })
                .collect::<Result<_, String>>()?,
        ),
        // Everything else travels as its exact text.
        (other, _) => Avro::String(other.to_pg_text().unwrap_or_default()),
    })
}

impl AvroEncoder {
    /// An encoder for `table`'s value schema (as `sluice_core::avro::value_schema`
    /// derives it), registered under `schema_id`.
    pub fn value(table: &TableSchema, prefix: &str, schema_id: u32) -> Result<Self, EncodeError> {
        let json = sluice_core::avro::value_schema(prefix, table);
        // Parsed only to refuse a schema readers could not parse; records are written
        // straight from rows.
        Schema::parse(&json).map_err(|e| EncodeError::Schema { table: table.name.to_string(), reason: e.to_string() })?;
        Ok(Self { schema_id, columns: Columns::new(table, false) })
    }

    /// Appends the row's record: `0`, the schema id (big-endian), then the Avro datum.
    pub fn encode(&self, row: &Row, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        header(self.schema_id, out);
        self.columns.write(row, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_twos_complement() {
        assert_eq!(decimal_bytes("1.5", 2), Some(vec![0, 150]));
        assert_eq!(decimal_bytes("-1", 0), Some(vec![0xff]));
        assert_eq!(decimal_bytes("0", 3), Some(vec![0]));
        assert_eq!(decimal_bytes("256", 0), Some(vec![1, 0]));
        assert_eq!(decimal_bytes("-128", 0), Some(vec![0xff, 0x80]));
        assert_eq!(decimal_bytes("1.234", 2), None);
    }
}
