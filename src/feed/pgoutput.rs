//! The messages of PostgreSQL's built-in `pgoutput` plugin, protocol version 1, as returned by
//! `pg_logical_slot_peek_binary_changes`: one message per row, big-endian, values in the text
//! form of each type's output function.

use super::FeedError;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A write-ahead log position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    /// PostgreSQL's `X/Y` spelling, accepted by `::pg_lsn`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// One column value of a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Datum {
    Null,
    /// A TOASTed value the update did not change; the plugin leaves it out.
    Unchanged,
    Text(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) type_oid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Relation {
    pub(crate) oid: u32,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) columns: Vec<Column>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Message {
    /// Start of a transaction; `commit_micros` is the commit time in Unix microseconds.
    Begin {
        final_lsn: Lsn,
        commit_micros: i64,
    },
    Commit {
        end_lsn: Lsn,
        commit_micros: i64,
    },
    Relation(Relation),
    /// A non-builtin type used by a relation (name only; we look types up in the catalog).
    Type {
        oid: u32,
    },
    Insert {
        rel: u32,
        new: Vec<Datum>,
    },
    /// `old` is the old key ('K') or, with `REPLICA IDENTITY FULL`, the whole old row ('O').
    Update {
        rel: u32,
        old: Option<Vec<Datum>>,
        new: Vec<Datum>,
    },
    Delete {
        rel: u32,
        old: Vec<Datum>,
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// Origin, logical messages and anything newer than protocol 1 that we do not use.
    Other(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn short(what: &str) -> FeedError {
    FeedError::Decode(format!("pgoutput message truncated in {what}"))
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FeedError> {
        let end = self.pos.checked_add(n).ok_or_else(|| short(what))?;
        let s = self.buf.get(self.pos..end).ok_or_else(|| short(what))?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, FeedError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, FeedError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, FeedError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, FeedError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn string(&mut self, what: &str) -> Result<String, FeedError> {
        let rest = &self.buf[self.pos.min(self.buf.len())..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| short(what))?;
        let s = String::from_utf8_lossy(&rest[..nul]).into_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Datum>, FeedError> {
        let n = self.u16("tuple")? as usize;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8("tuple column")? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.u32("tuple value length")? as usize;
                    Datum::Text(self.take(len, "tuple value")?.to_vec())
                }
                other => {
                    return Err(FeedError::Decode(format!(
                        "unexpected tuple column kind {:?}",
                        other as char
                    )))
                }
            });
        }
        Ok(out)
    }
}

fn unix_micros(pg_micros: u64) -> i64 {
    (pg_micros as i64).saturating_add(PG_EPOCH_UNIX_MICROS)
}

/// Decodes one message.
pub(crate) fn decode(buf: &[u8]) -> Result<Message, FeedError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8("tag")?;
    Ok(match tag {
        b'B' => {
            let final_lsn = Lsn(r.u64("begin")?);
            let ts = r.u64("begin")?;
            let _xid = r.u32("begin")?;
            Message::Begin {
                final_lsn,
                commit_micros: unix_micros(ts),
            }
        }
        b'C' => {
            let _flags = r.u8("commit")?;
            let _commit_lsn = r.u64("commit")?;
            let end_lsn = Lsn(r.u64("commit")?);
            let ts = r.u64("commit")?;
            Message::Commit {
                end_lsn,
                commit_micros: unix_micros(ts),
            }
        }
        b'R' => {
            let oid = r.u32("relation")?;
            let namespace = r.string("relation namespace")?;
            let name = r.string("relation name")?;
            let _identity = r.u8("relation")?;
            let n = r.u16("relation")? as usize;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let _flags = r.u8("column")?;
                let name = r.string("column name")?;
                let type_oid = r.u32("column type")?;
                let _typmod = r.u32("column typmod")?;
                columns.push(Column { name, type_oid });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32("type")?,
        },
        b'I' => {
            let rel = r.u32("insert")?;
            match r.u8("insert")? {
                b'N' => Message::Insert {
                    rel,
                    new: r.tuple()?,
                },
                other => {
                    return Err(FeedError::Decode(format!(
                        "insert without a new tuple (found {:?})",
                        other as char
                    )))
                }
            }
        }
        b'U' => {
            let rel = r.u32("update")?;
            let mut kind = r.u8("update")?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8("update")?;
            }
            if kind != b'N' {
                return Err(FeedError::Decode(format!(
                    "update without a new tuple (found {:?})",
                    kind as char
                )));
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32("delete")?;
            match r.u8("delete")? {
                b'K' | b'O' => Message::Delete {
                    rel,
                    old: r.tuple()?,
                },
                other => {
                    return Err(FeedError::Decode(format!(
                        "delete without an old tuple (found {:?})",
                        other as char
                    )))
                }
            }
        }
        b'T' => {
            let n = r.u32("truncate")? as usize;
            let _options = r.u8("truncate")?;
            let mut rels = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                rels.push(r.u32("truncate")?);
            }
            Message::Truncate { rels }
        }
        other => Message::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
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
    fn lsn_prints_like_postgresql() {
        assert_eq!(Lsn(0x1_0000_00AB).to_string(), "1/AB");
        assert_eq!(Lsn(0).to_string(), "0/0");
    }

    #[test]
    fn begin_commit_and_relation_decode() {
        let mut b = vec![b'B'];
        b.extend(0x10u64.to_be_bytes());
        b.extend(1_000_000u64.to_be_bytes());
        b.extend(7u32.to_be_bytes());
        assert_eq!(
            decode(&b).expect("begin"),
            Message::Begin {
                final_lsn: Lsn(0x10),
                commit_micros: PG_EPOCH_UNIX_MICROS + 1_000_000
            }
        );
        let mut c = vec![b'C', 0];
        c.extend(1u64.to_be_bytes());
        c.extend(2u64.to_be_bytes());
        c.extend(3u64.to_be_bytes());
        assert_eq!(
            decode(&c).expect("commit"),
            Message::Commit {
                end_lsn: Lsn(2),
                commit_micros: PG_EPOCH_UNIX_MICROS + 3
            }
        );
        let mut r = vec![b'R'];
        r.extend(16384u32.to_be_bytes());
        r.extend(b"public\0kv\0");
        r.push(b'f');
        r.extend(2u16.to_be_bytes());
        r.push(1);
        r.extend(b"k\0");
        r.extend(20u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        r.push(0);
        r.extend(b"v\0");
        r.extend(17u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        let Message::Relation(rel) = decode(&r).expect("relation") else {
            panic!("not a relation")
        };
        assert_eq!(rel.name, "kv");
        assert_eq!(rel.columns[1].type_oid, 17);
    }

    #[test]
    fn changes_decode_with_nulls_and_old_tuples() {
        let mut i = vec![b'I'];
        i.extend(5u32.to_be_bytes());
        i.push(b'N');
        i.extend(tuple(&[Some("1"), None]));
        assert_eq!(
            decode(&i).expect("insert"),
            Message::Insert {
                rel: 5,
                new: vec![Datum::Text(b"1".to_vec()), Datum::Null]
            }
        );
        let mut u = vec![b'U'];
        u.extend(5u32.to_be_bytes());
        u.push(b'O');
        u.extend(tuple(&[Some("1"), Some("a")]));
        u.push(b'N');
        u.extend(tuple(&[Some("1"), Some("b")]));
        let Message::Update { old: Some(old), .. } = decode(&u).expect("update") else {
            panic!("old tuple expected")
        };
        assert_eq!(old[1], Datum::Text(b"a".to_vec()));
        let mut d = vec![b'D'];
        d.extend(5u32.to_be_bytes());
        d.push(b'K');
        d.extend(tuple(&[Some("1"), None]));
        assert!(matches!(decode(&d), Ok(Message::Delete { rel: 5, .. })));
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"B\0\0",
            b"I\0\0\0\x05N\0\x01t\xff\xff\xff\xff",
            b"R\0\0\0\x01no-nul",
            b"I\0\0\0\x05X",
            b"U\0\0\0\x05K\0\0Z",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
        assert_eq!(decode(b"M...").expect("other"), Message::Other(b'M'));
    }
}
