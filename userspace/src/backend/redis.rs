//! RESP2, Redis's protocol: commands encoded as arrays of bulk strings, replies parsed from a connection's
//! in buffer. Redis answers in order, so many calls share one connection in flight (pipelining).
//!
//! A reply is first walked by [`Scan`], which keeps its place between reads (a reply of a million elements
//! arriving in 64 KiB reads is walked once, not once per read) and bounds every length, count and depth;
//! only a whole reply is then turned into a [`Value`].

use super::ProtoError;

/// Deepest nesting of arrays in a reply.
const MAX_DEPTH: usize = 8;
/// The longest header line (`+status`, `-error`, `:int`, `$len`, `*count`).
const MAX_LINE: usize = 64 << 10;

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Status(Vec<u8>),
    /// `-ERR ...`: Redis refused the command (an application error).
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`
    Nil,
    Array(Vec<Value>),
}

/// Appends a command: `*N\r\n` then `$len\r\narg\r\n` for each part.
pub fn command<'a>(out: &mut Vec<u8>, parts: impl ExactSizeIterator<Item = &'a [u8]>) {
    header(out, b'*', parts.len());
    for p in parts {
        header(out, b'$', p.len());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
}

fn header(out: &mut Vec<u8>, kind: u8, n: usize) {
    use std::io::Write;
    out.push(kind);
    let _ = write!(out, "{n}\r\n");
}

/// Where a walk of a partly arrived reply stopped.
#[derive(Debug, Default, Clone)]
pub struct Scan {
    /// Bytes of the reply walked so far.
    pos: usize,
    /// Elements still to come of each open array, innermost last.
    open: Vec<usize>,
}

impl Scan {
    /// Walks on from where the last call stopped: `Some(len)` once the whole reply at the start of `buf` is
    /// there (then the scan is reset for the next reply), `None` while it is not.
    pub fn walk(
        &mut self,
        buf: &[u8],
        max_bulk: usize,
        max_count: usize,
    ) -> Result<Option<usize>, ProtoError> {
        loop {
            let rest = &buf[self.pos..];
            let Some((kind, line, used)) = header_line(rest)? else {
                return Ok(None);
            };
            match kind {
                b'+' | b'-' | b':' => self.pos += used,
                b'$' => {
                    let n = number(line)?;
                    if n >= 0 {
                        let n = n as usize;
                        if n > max_bulk || self.pos + n > max_bulk {
                            return Err(ProtoError::oversized(format!(
                                "Redis sent a reply of more than {max_bulk} bytes (server.max_message_bytes)"
                            )));
                        }
                        if rest.len() < used + n + 2 {
                            return Ok(None);
                        }
                        if &rest[used + n..used + n + 2] != b"\r\n" {
                            return Err(ProtoError::garbage(
                                "Redis sent a bulk string without its CRLF",
                            ));
                        }
                        self.pos += used + n + 2;
                    } else {
                        self.pos += used;
                    }
                }
                b'*' => {
                    let n = number(line)?;
                    self.pos += used;
                    if n > 0 {
                        let n = n as usize;
                        if n > max_count {
                            return Err(ProtoError::oversized(format!(
                                "Redis sent an array of {n} elements, over the limit of {max_count} \
                                 (server.max_container)"
                            )));
                        }
                        if self.open.len() >= MAX_DEPTH {
                            return Err(ProtoError::garbage(format!(
                                "Redis sent arrays nested deeper than {MAX_DEPTH}"
                            )));
                        }
                        self.open.push(n);
                        continue;
                    }
                }
                other => {
                    return Err(ProtoError::garbage(format!(
                        "Redis sent a reply starting with byte {other:#04x}"
                    )))
                }
            }
            if self.pos > max_bulk {
                return Err(ProtoError::oversized(format!(
                    "Redis sent a reply of more than {max_bulk} bytes (server.max_message_bytes)"
                )));
            }
            // One element done: close every array it completes.
            loop {
                match self.open.last_mut() {
                    None => {
                        let len = self.pos;
                        *self = Scan::default();
                        return Ok(Some(len));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }
}

/// A header line: its type byte, the rest of the line, and the bytes it takes with its CRLF.
type Header<'a> = (u8, &'a [u8], usize);

fn header_line(buf: &[u8]) -> Result<Option<Header<'_>>, ProtoError> {
    let scan = &buf[..buf.len().min(MAX_LINE)];
    match scan.windows(2).position(|w| w == b"\r\n") {
        Some(0) => Err(ProtoError::garbage("Redis sent an empty line")),
        Some(i) => Ok(Some((buf[0], &buf[1..i], i + 2))),
        None if buf.len() >= MAX_LINE => Err(ProtoError::garbage(format!(
            "Redis sent a line longer than {MAX_LINE} bytes"
        ))),
        None => Ok(None),
    }
}

fn number(line: &[u8]) -> Result<i64, ProtoError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|&n| n >= -1)
        .ok_or_else(|| {
            ProtoError::garbage(format!(
                "Redis sent {:?} where a length was due",
                String::from_utf8_lossy(&line[..line.len().min(40)])
            ))
        })
}

/// Builds the value of a reply that [`Scan::walk`] found whole at the start of `buf`.
pub fn value(buf: &[u8]) -> Result<Value, ProtoError> {
    let mut pos = 0;
    read(buf, &mut pos)
}

fn read(buf: &[u8], pos: &mut usize) -> Result<Value, ProtoError> {
    let short = || ProtoError::garbage("Redis reply ends early");
    let (kind, line, used) = header_line(&buf[*pos..])?.ok_or_else(short)?;
    *pos += used;
    Ok(match kind {
        b'+' => Value::Status(line.to_vec()),
        b'-' => Value::Error(String::from_utf8_lossy(line).into_owned()),
        b':' => Value::Int(
            std::str::from_utf8(line)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ProtoError::garbage("Redis sent an integer that is not one"))?,
        ),
        b'$' => match number(line)? {
            -1 => Value::Nil,
            n => {
                let n = n as usize;
                let v = buf.get(*pos..*pos + n).ok_or_else(short)?.to_vec();
                *pos += n + 2;
                Value::Bulk(v)
            }
        },
        b'*' => match number(line)? {
            -1 => Value::Nil,
            n => {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(read(buf, pos)?);
                }
                Value::Array(items)
            }
        },
        other => {
            return Err(ProtoError::garbage(format!(
                "Redis sent a reply starting with byte {other:#04x}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let mut o = Vec::new();
        let parts: [&[u8]; 3] = [b"SET", b"k", b""];
        command(&mut o, parts.into_iter());
        assert_eq!(o, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }

    #[test]
    fn replies_split_anywhere() {
        let cases: &[(&[u8], Value)] = &[
            (b"+OK\r\n", Value::Status(b"OK".to_vec())),
            (
                b"-WRONGTYPE Operation\r\n",
                Value::Error("WRONGTYPE Operation".into()),
            ),
            (b":-42\r\n", Value::Int(-42)),
            (b"$3\r\na\r\n\r\n", Value::Bulk(b"a\r\n".to_vec())),
            (b"$0\r\n\r\n", Value::Bulk(Vec::new())),
            (b"$-1\r\n", Value::Nil),
            (b"*-1\r\n", Value::Nil),
            (b"*0\r\n", Value::Array(vec![])),
            (
                b"*3\r\n$1\r\na\r\n$-1\r\n*2\r\n:1\r\n*1\r\n+x\r\n",
                Value::Array(vec![
                    Value::Bulk(b"a".to_vec()),
                    Value::Nil,
                    Value::Array(vec![
                        Value::Int(1),
                        Value::Array(vec![Value::Status(b"x".to_vec())]),
                    ]),
                ]),
            ),
        ];
        for (bytes, want) in cases {
            // Fed one byte at a time to one scan, as reads would bring them.
            let mut two = bytes.to_vec();
            two.extend_from_slice(bytes);
            let mut scan = Scan::default();
            let mut found = None;
            for end in 0..=two.len() {
                if let Some(len) = scan.walk(&two[..end], 1 << 20, 1000).unwrap() {
                    found = Some((end, len));
                    break;
                }
            }
            assert_eq!(found, Some((bytes.len(), bytes.len())), "{want:?}");
            assert_eq!(&value(&two).unwrap(), want);
        }
    }

    #[test]
    fn bounds_and_garbage() {
        let mut s = Scan::default();
        assert!(s.walk(b"$2000000\r\n", 1 << 20, 10).is_err());
        assert!(Scan::default().walk(b"*11\r\n", 1 << 20, 10).is_err());
        assert!(Scan::default()
            .walk(
                b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n",
                1 << 20,
                10
            )
            .is_err());
        assert!(Scan::default().walk(b"?x\r\n", 1 << 20, 10).is_err());
        assert!(Scan::default().walk(b"$-2\r\n", 1 << 20, 10).is_err());
        assert!(Scan::default().walk(b"$1\r\nabc", 1 << 20, 10).is_err());
        assert!(Scan::default().walk(b"\r\n", 1 << 20, 10).is_err());
        assert!(Scan::default()
            .walk(&vec![b'+'; MAX_LINE + 1], 1 << 20, 10)
            .is_err());
    }
}
