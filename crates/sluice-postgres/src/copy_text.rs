//! COPY's text format: decoding into row images, for sinks that need rows rather than a
//! COPY stream to pass through (Kafka, search), and encoding rows into it, for COPY
//! into a Postgres table (the snapshot's chunks, the Postgres sink's staging tables).

use bytes::{BufMut, Bytes, BytesMut};
use sluice_core::{Datum, Row};

use crate::error::{PgError, Result};

/// Splits COPY output into rows. Postgres sends one row per CopyData message, but the
/// protocol does not promise it, so lines are reassembled across messages.
#[derive(Default)]
pub struct CopyRowDecoder {
    partial: BytesMut,
}

impl CopyRowDecoder {
    /// Feeds one CopyData message and appends every row it completes to `out`.
    pub fn feed(&mut self, data: &[u8], ncols: usize, out: &mut Vec<Row>) -> Result<()> {
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            if self.partial.is_empty() {
                out.push(decode_row(line, ncols)?);
            } else {
                self.partial.extend_from_slice(line);
                let whole = self.partial.split();
                out.push(decode_row(&whole, ncols)?);
            }
            rest = &tail[1..];
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    /// Errors when the stream ended inside a row.
    pub fn finish(&self) -> Result<()> {
        if self.partial.is_empty() { Ok(()) } else { Err(PgError::protocol("COPY output ended inside a row")) }
    }
}

/// One line of COPY text output (without its newline) as a row of `ncols` columns.
pub fn decode_row(line: &[u8], ncols: usize) -> Result<Row> {
    let mut row = Vec::with_capacity(ncols);
    for field in line.split(|&b| b == b'\t') {
        row.push(decode_field(field)?);
    }
    if row.len() != ncols {
        return Err(PgError::protocol(format!("COPY row has {} columns, expected {ncols}", row.len())));
    }
    Ok(row)
}

fn decode_field(f: &[u8]) -> Result<Datum> {
    if f == b"\\N" {
        return Ok(Datum::Null);
    }
    if !f.contains(&b'\\') {
        return Ok(Datum::Text(Bytes::copy_from_slice(f)));
    }
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        let b = f[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(&e) = f.get(i) else { return Err(PgError::protocol("COPY field ends with a backslash")) };
        i += 1;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match f.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let start = i;
                while i < f.len() && i < start + 2 && f[i].is_ascii_hexdigit() {
                    v = v * 16 + (f[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                }
                if i == start {
                    out.push(b'x');
                } else {
                    out.push(v as u8);
                }
            }
            other => out.push(other),
        }
    }
    Ok(Datum::Text(Bytes::from(out)))
}

/// Appends a COPY text-format field.
pub fn put_field(buf: &mut BytesMut, d: &Datum) {
    match d {
        Datum::Text(b) => {
            for &c in b.iter() {
                match c {
                    b'\\' => buf.put_slice(b"\\\\"),
                    b'\t' => buf.put_slice(b"\\t"),
                    b'\n' => buf.put_slice(b"\\n"),
                    b'\r' => buf.put_slice(b"\\r"),
                    _ => buf.put_u8(c),
                }
            }
        }
        Datum::Null | Datum::Unchanged => buf.put_slice(b"\\N"),
    }
}

/// Appends a row as a COPY text-format line.
pub fn put_row(buf: &mut BytesMut, row: &Row) {
    for (i, d) in row.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b'\t');
        }
        put_field(buf, d);
    }
    buf.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn escapes_and_nulls() {
        let row = decode_row(b"1\t\\N\ta\\tb\\nc\\\\d\t\\101\\x42\t", 5).unwrap();
        assert_eq!(row, vec![text("1"), Datum::Null, text("a\tb\nc\\d"), text("AB"), text("")]);
        assert!(decode_row(b"1\t2", 3).is_err());
        assert!(decode_row(b"a\\", 1).is_err());
    }

    #[test]
    fn rows_split_across_messages() {
        let mut d = CopyRowDecoder::default();
        let mut out = Vec::new();
        d.feed(b"1\tx\n2\t", 2, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert!(d.finish().is_err());
        d.feed(b"y\n3\tz\n", 2, &mut out).unwrap();
        d.finish().unwrap();
        assert_eq!(out, vec![vec![text("1"), text("x")], vec![text("2"), text("y")], vec![text("3"), text("z")]]);
    }

    #[test]
    fn copy_fields_escape_control_characters() {
        let mut b = BytesMut::new();
        put_field(&mut b, &Datum::Text(Bytes::from_static(b"a\tb\\c\nd\re")));
        assert_eq!(&b[..], b"a\\tb\\\\c\\nd\\re");
        b.clear();
        put_field(&mut b, &Datum::Null);
        assert_eq!(&b[..], b"\\N");
    }
}
