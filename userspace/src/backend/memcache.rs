//! memcached's text protocol: requests encoded into a connection's out buffer, answers parsed from its in
//! buffer. The text protocol answers in order, so many calls share one connection in flight (pipelining).
//! Every line is bounded; a value is bounded by the caller's limit; anything unexpected is protocol
//! garbage, after which the connection cannot be trusted and is closed.

use super::ProtoError;

/// The longest key memcached accepts.
pub const MAX_KEY: usize = 250;
/// The longest answer line read (a VALUE line is under 300 bytes; error lines carry a short message).
const MAX_LINE: usize = 4096;

/// What answer a request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `get`: VALUE ... END, or END.
    Value,
    /// `set`, `add`: STORED, NOT_STORED, EXISTS, NOT_FOUND.
    Stored,
    /// `delete`: DELETED, NOT_FOUND.
    Deleted,
    /// `incr`, `decr`: a number, NOT_FOUND.
    Number,
    /// `version` (the health check).
    Version,
}

/// memcached's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Value {
        data: Vec<u8>,
        flags: u32,
    },
    Miss,
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Number(u64),
    Version,
    /// ERROR, CLIENT_ERROR or SERVER_ERROR: memcached answered, refusing (an application error).
    Error(String),
}

/// Why a key cannot be sent: memcached's text protocol takes 1..250 bytes, none of them a space or a
/// control character.
pub fn check_key(key: &[u8]) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key".into());
    }
    if key.len() > MAX_KEY {
        return Err(format!(
            "key of {} bytes: memcached takes at most {MAX_KEY}",
            key.len()
        ));
    }
    if let Some(&b) = key.iter().find(|&&b| b <= b' ' || b == 0x7f) {
        return Err(format!(
            "key contains byte {b:#04x} (a space or a control character), which memcached's text \
             protocol cannot carry"
        ));
    }
    Ok(())
}

pub fn get(out: &mut Vec<u8>, key: &[u8]) {
    out.extend_from_slice(b"get ");
    out.extend_from_slice(key);
    out.extend_from_slice(b"\r\n");
}

/// `set` or `add`.
pub fn store(out: &mut Vec<u8>, verb: &str, key: &[u8], flags: u32, exptime: i32, data: &[u8]) {
    use std::io::Write;
    out.extend_from_slice(verb.as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    let _ = write!(out, " {flags} {exptime} {}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub fn delete(out: &mut Vec<u8>, key: &[u8]) {
    out.extend_from_slice(b"delete ");
    out.extend_from_slice(key);
    out.extend_from_slice(b"\r\n");
}

/// `incr` for a delta of zero or more, `decr` for a negative one (memcached floors at 0).
pub fn incr(out: &mut Vec<u8>, key: &[u8], delta: i64) {
    use std::io::Write;
    out.extend_from_slice(if delta < 0 { b"decr " } else { b"incr " });
    out.extend_from_slice(key);
    let _ = write!(out, " {}\r\n", delta.unsigned_abs());
}

pub fn version(out: &mut Vec<u8>) {
    out.extend_from_slice(b"version\r\n");
}

/// The line at the start of `buf` (without CRLF) and the bytes it takes, or `None` if it has not all come.
fn line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtoError> {
    let scan = &buf[..buf.len().min(MAX_LINE)];
    match scan.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some((&buf[..i], i + 2))),
        None if buf.len() >= MAX_LINE => Err(ProtoError::garbage(format!(
            "memcached sent a line longer than {MAX_LINE} bytes"
        ))),
        None => Ok(None),
    }
}

fn garbage(what: &str, line: &[u8]) -> ProtoError {
    let shown: String = String::from_utf8_lossy(&line[..line.len().min(80)]).into();
    ProtoError::garbage(format!("memcached answered {what} with {shown:?}"))
}

/// Parses one answer to a request of kind `expect` from the start of `buf`: the answer and the bytes it
/// took, `None` if it has not all arrived, or an error if the bytes are not such an answer.
pub fn parse(
    buf: &[u8],
    expect: Expect,
    max_value: usize,
) -> Result<Option<(Answer, usize)>, ProtoError> {
    let Some((l, used)) = line(buf)? else {
        return Ok(None);
    };
    let text = |rest: &[u8]| String::from_utf8_lossy(rest).trim().to_owned();
    if l == b"ERROR" {
        return Ok(Some((Answer::Error("ERROR".into()), used)));
    }
    if let Some(rest) = l.strip_prefix(b"CLIENT_ERROR") {
        return Ok(Some((
            Answer::Error(format!("CLIENT_ERROR {}", text(rest))),
            used,
        )));
    }
    if let Some(rest) = l.strip_prefix(b"SERVER_ERROR") {
        return Ok(Some((
            Answer::Error(format!("SERVER_ERROR {}", text(rest))),
            used,
        )));
    }
    let a = match (expect, l) {
        (Expect::Value, b"END") => Answer::Miss,
        (Expect::Value, _) if l.starts_with(b"VALUE ") => {
            let mut parts = l.split(|&b| b == b' ').skip(2);
            let num =
                |p: Option<&[u8]>| -> Option<u64> { std::str::from_utf8(p?).ok()?.parse().ok() };
            let (Some(flags), Some(len)) = (num(parts.next()), num(parts.next())) else {
                return Err(garbage("a get", l));
            };
            let flags = u32::try_from(flags).map_err(|_| garbage("a get", l))?;
            let len = len as usize;
            if len > max_value {
                return Err(ProtoError::oversized(format!(
                    "memcached sent a value of {len} bytes, over the limit of {max_value} (server.max_message_bytes)"
                )));
            }
            let end = used + len + 2 + 5;
            if buf.len() < end {
                return Ok(None);
            }
            if &buf[used + len..end] != b"\r\nEND\r\n" {
                return Err(garbage("a get", &buf[used + len..end]));
            }
            let data = buf[used..used + len].to_vec();
            return Ok(Some((Answer::Value { data, flags }, end)));
        }
        (Expect::Stored, b"STORED") => Answer::Stored,
        (Expect::Stored, b"NOT_STORED") => Answer::NotStored,
        (Expect::Stored, b"EXISTS") => Answer::Exists,
        (Expect::Stored | Expect::Deleted | Expect::Number, b"NOT_FOUND") => Answer::NotFound,
        (Expect::Deleted, b"DELETED") => Answer::Deleted,
        (Expect::Number, _) if !l.is_empty() && l.iter().all(u8::is_ascii_digit) => {
            let n = std::str::from_utf8(l)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| garbage("an incr", l))?;
            Answer::Number(n)
        }
        (Expect::Version, _) if l.starts_with(b"VERSION ") => Answer::Version,
        _ => return Err(garbage(&format!("{expect:?}"), l)),
    };
    Ok(Some((a, used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let mut o = Vec::new();
        get(&mut o, b"k");
        store(&mut o, "set", b"k", 7, 60, b"ab");
        delete(&mut o, b"k");
        incr(&mut o, b"k", 5);
        incr(&mut o, b"k", -5);
        incr(&mut o, b"k", i64::MIN);
        assert_eq!(
            String::from_utf8(o).unwrap(),
            "get k\r\nset k 7 60 2\r\nab\r\ndelete k\r\nincr k 5\r\ndecr k 5\r\ndecr k 9223372036854775808\r\n"
        );
    }

    #[test]
    fn keys() {
        assert!(check_key(&[b'a'; 250]).is_ok());
        assert!(check_key(&[b'a'; 251]).unwrap_err().contains("251"));
        assert!(check_key(b"a b").unwrap_err().contains("0x20"));
        assert!(check_key(b"a\nb").is_err());
        assert!(check_key(b"a\x7fb").is_err());
        assert!(check_key(b"").is_err());
        assert!(check_key("ключ".as_bytes()).is_ok());
    }

    #[test]
    fn answers_split_anywhere() {
        let cases: &[(&[u8], Expect, Answer)] = &[
            (
                b"VALUE k 42 3\r\na\r\n\r\nEND\r\n",
                Expect::Value,
                Answer::Value {
                    data: b"a\r\n".to_vec(),
                    flags: 42,
                },
            ),
            (b"END\r\n", Expect::Value, Answer::Miss),
            (b"STORED\r\n", Expect::Stored, Answer::Stored),
            (b"NOT_STORED\r\n", Expect::Stored, Answer::NotStored),
            (b"DELETED\r\n", Expect::Deleted, Answer::Deleted),
            (b"NOT_FOUND\r\n", Expect::Deleted, Answer::NotFound),
            (
                b"18446744073709551615\r\n",
                Expect::Number,
                Answer::Number(u64::MAX),
            ),
            (b"VERSION 1.6.18\r\n", Expect::Version, Answer::Version),
            (
                b"SERVER_ERROR object too large for cache\r\n",
                Expect::Stored,
                Answer::Error("SERVER_ERROR object too large for cache".into()),
            ),
            (
                b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
                Expect::Number,
                Answer::Error(
                    "CLIENT_ERROR cannot increment or decrement non-numeric value".into(),
                ),
            ),
        ];
        for (bytes, expect, want) in cases {
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse(&bytes[..cut], *expect, 1 << 20).unwrap(),
                    None,
                    "{cut}"
                );
            }
            let mut two = bytes.to_vec();
            two.extend_from_slice(bytes);
            let (a, used) = parse(&two, *expect, 1 << 20).unwrap().unwrap();
            assert_eq!((&a, used), (want, bytes.len()));
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse(b"STORED\r\n", Expect::Value, 100).is_err());
        assert!(parse(b"VALUE k x 3\r\nabc\r\nEND\r\n", Expect::Value, 100).is_err());
        assert!(parse(b"VALUE k 1 3\r\nabcXXEND\r\n", Expect::Value, 100).is_err());
        assert!(
            parse(b"VALUE k 1 300\r\n", Expect::Value, 100).is_err(),
            "over the value limit"
        );
        assert!(parse(b"VALUE k 4294967296 1\r\n", Expect::Value, 100).is_err());
        assert!(parse(b"12a\r\n", Expect::Number, 100).is_err());
        assert!(
            parse(&[b'x'; 5000], Expect::Stored, 100).is_err(),
            "unbounded line"
        );
    }
}
