//! Decoder for the `pgoutput` logical-decoding protocol, version 1.
//!
//! Begin, Commit and Message are framed by the replication client; everything else
//! arrives here as raw bytes. Column values stay as `Bytes` slices of the received
//! buffer: no copy per value.

use bytes::Bytes;

use sluice_core::Datum as TupleValue;

use crate::error::PgError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelationColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub relid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Relation(Relation),
    Insert {
        relid: u32,
        new: Vec<TupleValue>,
    },
    /// `old` is the old key ('K') or the full old row ('O') when the key changed or the
    /// table has REPLICA IDENTITY FULL.
    Update {
        relid: u32,
        old: Option<Vec<TupleValue>>,
        new: Vec<TupleValue>,
    },
    Delete {
        relid: u32,
        old: Vec<TupleValue>,
    },
    Truncate {
        relids: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// Type and Origin carry nothing the pipeline needs: Sluice reads types from the
    /// catalog and replicates every origin.
    Ignored(u8),
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn err(&self, what: &str) -> PgError {
        PgError::protocol(format!("pgoutput: truncated or malformed {what} at byte {}", self.pos))
    }

    fn u8(&mut self) -> Result<u8, PgError> {
        let b = *self.buf.get(self.pos).ok_or_else(|| self.err("byte"))?;
        self.pos += 1;
        Ok(b)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], PgError> {
        let s = self.buf.get(self.pos..self.pos + N).ok_or_else(|| self.err("integer"))?;
        self.pos += N;
        Ok(s.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32, PgError> {
        Ok(u32::from_be_bytes(self.bytes()?))
    }

    fn i16(&mut self) -> Result<i16, PgError> {
        Ok(i16::from_be_bytes(self.bytes()?))
    }

    fn i32(&mut self) -> Result<i32, PgError> {
        Ok(i32::from_be_bytes(self.bytes()?))
    }

    fn cstr(&mut self) -> Result<String, PgError> {
        let rest = self.buf.get(self.pos..).ok_or_else(|| self.err("string"))?;
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| self.err("string"))?;
        let s = String::from_utf8(rest[..end].to_vec()).map_err(|_| self.err("string (not UTF-8)"))?;
        self.pos += end + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, PgError> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    if self.pos + len > self.buf.len() {
                        return Err(self.err("column value"));
                    }
                    let v = self.buf.slice(self.pos..self.pos + len);
                    self.pos += len;
                    TupleValue::Text(v)
                }
                b'b' => return Err(PgError::protocol("pgoutput: binary column values were not requested")),
                other => return Err(PgError::protocol(format!("pgoutput: unknown tuple value kind {other:#x}"))),
            });
        }
        Ok(out)
    }
}

pub(crate) fn decode(buf: Bytes) -> Result<Message, PgError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8()?;
    Ok(match tag {
        b'R' => {
            let relid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn { is_key: flags & 1 == 1, name: r.cstr()?, type_oid: r.u32()?, type_modifier: r.i32()? });
            }
            Message::Relation(Relation { relid, namespace, name, replica_identity, columns })
        }
        b'I' => {
            let relid = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert { relid, new: r.tuple()? },
                _ => return Err(r.err("insert")),
            }
        }
        b'U' => {
            let relid = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(r.err("update"));
            }
            Message::Update { relid, old, new: r.tuple()? }
        }
        b'D' => {
            let relid = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete { relid, old: r.tuple()? },
                _ => return Err(r.err("delete")),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            let relids = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { relids, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'Y' | b'O' => Message::Ignored(tag),
        other => return Err(PgError::protocol(format!("pgoutput: unexpected message type {:?}", other as char))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = (vals.len() as i16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                None => b.push(b'n'),
                Some("\u{0}toast") => b.push(b'u'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as u32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_relation() {
        let mut b = vec![b'R'];
        b.extend(16384u32.to_be_bytes());
        b.extend(b"public\0t\0d");
        b.extend(2i16.to_be_bytes());
        b.push(1);
        b.extend(b"id\0");
        b.extend(23u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"v\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        let Message::Relation(rel) = decode(Bytes::from(b)).unwrap() else { panic!() };
        assert_eq!(rel.name, "t");
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
        assert_eq!(rel.columns[1].type_oid, 25);
    }

    #[test]
    fn decodes_update_with_old_key_and_toast_placeholder() {
        let mut b = vec![b'U'];
        b.extend(7u32.to_be_bytes());
        b.push(b'K');
        b.extend(tuple(&[Some("1"), None]));
        b.push(b'N');
        b.extend(tuple(&[Some("2"), Some("\u{0}toast")]));
        let msg = decode(Bytes::from(b)).unwrap();
        assert_eq!(
            msg,
            Message::Update {
                relid: 7,
                old: Some(vec![TupleValue::Text(Bytes::from_static(b"1")), TupleValue::Null]),
                new: vec![TupleValue::Text(Bytes::from_static(b"2")), TupleValue::Unchanged],
            }
        );
    }

    #[test]
    fn decodes_truncate_options() {
        let mut b = vec![b'T'];
        b.extend(2u32.to_be_bytes());
        b.push(3);
        b.extend(10u32.to_be_bytes());
        b.extend(11u32.to_be_bytes());
        assert_eq!(decode(Bytes::from(b)).unwrap(), Message::Truncate { relids: vec![10, 11], cascade: true, restart_identity: true });
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut b = vec![b'I'];
        b.extend(7u32.to_be_bytes());
        b.push(b'N');
        let mut t = tuple(&[Some("hello")]);
        t.truncate(t.len() - 2);
        b.extend(t);
        assert!(decode(Bytes::from(b)).is_err());
        assert!(decode(Bytes::from_static(b"Z")).is_err());
        assert!(decode(Bytes::new()).is_err());
    }
}
