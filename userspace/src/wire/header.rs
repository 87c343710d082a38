//! The header transports: Apache Thrift's and fbthrift's THeader (magic 0x0FFF) and CloudWeGo's TTHeader
//! (Kitex, Volo; magic 0x1000). Both frame each message as
//!
//! ```text
//!  0  u32 length of the rest of the frame
//!  4  u16 magic         0x0FFF (THeader) | 0x1000 (TTHeader)
//!  6  u16 flags         echoed in the reply
//!  8  u32 sequence id   echoed in the reply
//! 12  u16 header size   in 4-byte words; the header starts at 14
//! 14  protocol id       0 binary, 2 compact   (THeader: varint; TTHeader: u8)
//!     transform count   then the transform ids (same encodings)
//!     info blocks       id, then its data; id 0 is padding, up to the header's end
//!     payload           the bare Thrift message, to the frame's end
//! ```
//!
//! Info blocks: THeader's KEYVALUE (1) and fbthrift's persistent PKEYVALUE (2) hold a varint count and
//! varint-length strings; TTHeader's KEYVALUE (1) holds u16 counts and u16-length strings, INTKEYVALUE
//! (0x10) u16 keys with u16-length values, ACL token (0x11) one u16-length string. They are read in place
//! ([`InfoHeaders`]) and bounded like every other count. Transforms (zlib, snappy, HMAC) are refused with
//! a clear error. Kitex's "TTHeaderFramed" form, a 4-byte length before the payload, is read too and
//! answered the same way.

use super::compact::put_varint;
use super::{Limits, Protocol, WireError};

/// Which header transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderKind {
    /// Apache Thrift's / fbthrift's THeaderTransport (0x0FFF).
    THeader,
    /// CloudWeGo's TTHeader (0x1000).
    TTHeader,
}

/// Bytes before the variable header: length, magic, flags, sequence id, header size.
pub const FIXED: usize = 14;
const INFO_PADDING: u8 = 0;
const INFO_KEYVALUE: u8 = 1;
const INFO_PKEYVALUE: u8 = 2;
const INFO_INTKEYVALUE: u8 = 0x10;
const INFO_ACL_TOKEN: u8 = 0x11;

impl HeaderKind {
    pub fn name(self) -> &'static str {
        match self {
            HeaderKind::THeader => "THeader",
            HeaderKind::TTHeader => "TTHeader",
        }
    }

    pub fn magic(self) -> [u8; 2] {
        match self {
            HeaderKind::THeader => [0x0f, 0xff],
            HeaderKind::TTHeader => [0x10, 0x00],
        }
    }

    /// The header kind whose magic is `m`.
    pub fn of_magic(m: [u8; 2]) -> Option<HeaderKind> {
        match m {
            [0x0f, 0xff] => Some(HeaderKind::THeader),
            [0x10, 0x00] => Some(HeaderKind::TTHeader),
            _ => None,
        }
    }

    fn bad(self, why: &'static str) -> WireError {
        WireError::BadHeader { kind: self, why }
    }
}

/// One header frame, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFrame<'a> {
    pub kind: HeaderKind,
    pub flags: u16,
    pub seq: u32,
    pub protocol: Protocol,
    pub info: InfoHeaders<'a>,
    /// The message (without the inner length of the TTHeaderFramed form).
    pub payload: &'a [u8],
    /// The payload had a 4-byte length of its own (Kitex's TTHeaderFramed).
    pub inner_framed: bool,
    /// Bytes of the buffer the frame used.
    pub consumed: usize,
}

/// The fixed part of a frame, known before the rest is read: what an error reply needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    pub flags: u16,
    pub seq: u32,
}

/// A header frame that cannot be served; `fixed` when its sequence id was read (the error can be answered
/// in a header frame the client matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame {
    pub error: WireError,
    pub fixed: Option<Fixed>,
}

/// Finds the header frame at the start of `buf`. `Ok(None)`: not all of it has arrived.
pub fn parse<'a>(
    buf: &'a [u8],
    kind: HeaderKind,
    limits: &Limits,
) -> Result<Option<HeaderFrame<'a>>, BadFrame> {
    let early = |error| BadFrame { error, fixed: None };
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > limits.max_message {
        return Err(early(WireError::TooLong {
            len,
            max: limits.max_message,
        }));
    }
    if len < FIXED - 4 {
        return Err(early(kind.bad("frame shorter than its fixed header")));
    }
    let Some(frame) = buf.get(4..4 + len) else {
        // The magic is checked as soon as it is here: a connection that changes transport is refused
        // before its frame is waited for.
        if buf.len() >= 6 && buf[4..6] != kind.magic() {
            return Err(early(
                kind.bad("wrong magic (a connection keeps its transport)"),
            ));
        }
        return Ok(None);
    };
    if frame[0..2] != kind.magic() {
        return Err(early(
            kind.bad("wrong magic (a connection keeps its transport)"),
        ));
    }
    let fixed = Fixed {
        flags: u16::from_be_bytes([frame[2], frame[3]]),
        seq: u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
    };
    let fail = |error| BadFrame {
        error,
        fixed: Some(fixed),
    };
    let words = usize::from(u16::from_be_bytes([frame[8], frame[9]]));
    let header = frame
        .get(FIXED - 4..FIXED - 4 + words * 4)
        .ok_or_else(|| fail(kind.bad("header size runs past the frame")))?;
    let payload = &frame[FIXED - 4 + words * 4..];
    let mut r = Cursor {
        buf: header,
        pos: 0,
    };
    let bad = |why| fail(kind.bad(why));
    let protocol = match r.number(kind).map_err(bad)? {
        0 => Protocol::Binary,
        2 => Protocol::Compact,
        1 => {
            return Err(fail(WireError::Unsupported {
                kind,
                what: "the JSON protocol",
            }))
        }
        _ => return Err(bad("unknown protocol id")),
    };
    let transforms = r.number(kind).map_err(bad)?;
    if transforms > 0 {
        let what = match r.number(kind).map_err(bad)? {
            1 => "the zlib transform",
            2 => "the HMAC transform",
            3 => "the snappy transform",
            _ => "an unknown transform",
        };
        return Err(fail(WireError::Unsupported { kind, what }));
    }
    let info = InfoHeaders {
        kind,
        bytes: &header[r.pos..],
    };
    info.walk(limits, |_, _| {}).map_err(fail)?;
    // Kitex's TTHeaderFramed: the payload has a length of its own.
    let inner = payload
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]));
    let (payload, inner_framed) = match inner {
        Some(n) if kind == HeaderKind::TTHeader && n as usize == payload.len() - 4 => {
            (&payload[4..], true)
        }
        _ => (payload, false),
    };
    if payload.is_empty() {
        return Err(bad("empty payload"));
    }
    Ok(Some(HeaderFrame {
        kind,
        flags: fixed.flags,
        seq: fixed.seq,
        protocol,
        info,
        payload,
        inner_framed,
        consumed: 4 + len,
    }))
}

/// The header's id of `protocol`.
fn protocol_id(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Binary => 0,
        Protocol::Compact => 2,
    }
}

/// Writes a frame's fixed part up to the header size (the length left 0 for [`finish`]); returns where the
/// frame starts.
fn fixed_part(out: &mut Vec<u8>, kind: HeaderKind, flags: u16, seq: u32) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&kind.magic());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    start
}

/// Appends a count or length in `kind`'s encoding (a varint in THeader, a u16 in TTHeader).
fn put_length(out: &mut Vec<u8>, kind: HeaderKind, n: usize) {
    match kind {
        HeaderKind::THeader => put_varint(out, n as u64),
        HeaderKind::TTHeader => out.extend_from_slice(&(n as u16).to_be_bytes()),
    }
}

/// Writes the start of a reply frame (its length is filled in by [`finish`]); returns where it starts.
/// The header holds the protocol id and no transforms or info, padded to one word.
pub fn begin(
    out: &mut Vec<u8>,
    kind: HeaderKind,
    flags: u16,
    seq: u32,
    protocol: Protocol,
    inner_framed: bool,
) -> usize {
    let start = fixed_part(out, kind, flags, seq);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[protocol_id(protocol), 0, INFO_PADDING, INFO_PADDING]);
    if inner_framed {
        out.extend_from_slice(&[0; 4]);
    }
    start
}

/// Fills in the lengths of the reply frame begun at `start`.
pub fn finish(out: &mut [u8], start: usize, inner_framed: bool) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    if inner_framed {
        let at = start + FIXED + 4;
        let inner = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&inner.to_be_bytes());
    }
}

/// A header's info key: a string (KEYVALUE, PKEYVALUE, the ACL token as `acl-token`) or a number
/// (TTHeader's INTKEYVALUE, e.g. Kitex's 3 = the caller's service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoKey<'a> {
    Str(&'a [u8]),
    Int(u16),
}

/// The info headers of one frame, borrowed. They were checked whole when the frame was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoHeaders<'a> {
    kind: HeaderKind,
    bytes: &'a [u8],
}

impl<'a> InfoHeaders<'a> {
    /// No info headers (a message that did not come in a header frame).
    pub const NONE: InfoHeaders<'static> = InfoHeaders {
        kind: HeaderKind::THeader,
        bytes: &[],
    };

    /// Calls `f` with every key and value; a malformed block or a count past the limits is an error.
    pub fn walk(
        &self,
        limits: &Limits,
        mut f: impl FnMut(InfoKey<'a>, &'a [u8]),
    ) -> Result<(), WireError> {
        let kind = self.kind;
        let mut r = Cursor {
            buf: self.bytes,
            pos: 0,
        };
        let bad = |why| kind.bad(why);
        let mut total = 0usize;
        while r.pos < r.buf.len() {
            let id = r.number(kind).map_err(bad)?;
            match (kind, id) {
                (_, id) if id == u32::from(INFO_PADDING) => {
                    // Padding: the header ends here (TTHeader pads with zeros only; THeader readers
                    // stop at the first padding byte).
                    if kind == HeaderKind::TTHeader && r.buf[r.pos..].iter().any(|&b| b != 0) {
                        return Err(bad("data after the padding"));
                    }
                    return Ok(());
                }
                (_, id)
                    if id == u32::from(INFO_KEYVALUE)
                        || (kind == HeaderKind::THeader && id == u32::from(INFO_PKEYVALUE)) =>
                {
                    let n = r.count(kind).map_err(bad)?;
                    total = add_count(total, n, limits)?;
                    for _ in 0..n {
                        let k = r.string(kind).map_err(bad)?;
                        let v = r.string(kind).map_err(bad)?;
                        f(InfoKey::Str(k), v);
                    }
                }
                (HeaderKind::TTHeader, id) if id == u32::from(INFO_INTKEYVALUE) => {
                    let n = r.count(kind).map_err(bad)?;
                    total = add_count(total, n, limits)?;
                    for _ in 0..n {
                        let k = r.u16().map_err(bad)?;
                        let v = r.string(kind).map_err(bad)?;
                        f(InfoKey::Int(k), v);
                    }
                }
                (HeaderKind::TTHeader, id) if id == u32::from(INFO_ACL_TOKEN) => {
                    let v = r.string(kind).map_err(bad)?;
                    f(InfoKey::Str(b"acl-token"), v);
                }
                // THeader readers stop at an unknown block (its length is unknown); TTHeader's refuse it.
                (HeaderKind::THeader, _) => return Ok(()),
                (HeaderKind::TTHeader, _) => return Err(bad("unknown info block")),
            }
        }
        Ok(())
    }

    /// The value of string key `key`, if sent.
    pub fn get(&self, key: &[u8]) -> Option<&'a [u8]> {
        self.find(InfoKey::Str(key))
    }

    /// The value of integer key `key` (TTHeader), if sent.
    pub fn get_int(&self, key: u16) -> Option<&'a [u8]> {
        self.find(InfoKey::Int(key))
    }

    fn find(&self, want: InfoKey<'_>) -> Option<&'a [u8]> {
        if self.bytes.is_empty() {
            return None;
        }
        let mut found = None;
        let limits = Limits {
            max_container: usize::MAX,
            ..Limits::default()
        };
        let _ = self.walk(&limits, |k, v| {
            if found.is_none() && k == want {
                found = Some(v);
            }
        });
        found
    }

    /// The calling service, where the client said: Kitex's FromService (int key 3), or a string key
    /// `caller` / `from_service` / `client_name`.
    pub fn caller(&self) -> Option<&'a [u8]> {
        self.get_int(3)
            .or_else(|| self.get(b"caller"))
            .or_else(|| self.get(b"from_service"))
            .or_else(|| self.get(b"client_name"))
    }
}

/// Adds a block's count of headers to the frame's total, which the container limit bounds.
fn add_count(total: usize, n: usize, limits: &Limits) -> Result<usize, WireError> {
    let total = total + n;
    if total > limits.max_container {
        return Err(WireError::ContainerTooLarge {
            n: total,
            max: limits.max_container,
        });
    }
    Ok(total)
}

/// The numbers of a header: varints in THeader, fixed widths in TTHeader.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Result<u8, &'static str> {
        let b = *self.buf.get(self.pos).ok_or("runs past the header")?;
        self.pos += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn varint(&mut self) -> Result<u32, &'static str> {
        let mut v = 0u32;
        for i in 0..5 {
            let b = self.u8()?;
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("malformed varint")
    }

    /// An id (protocol, transform, info block): a varint in THeader, a byte in TTHeader.
    fn number(&mut self, kind: HeaderKind) -> Result<u32, &'static str> {
        match kind {
            HeaderKind::THeader => self.varint(),
            HeaderKind::TTHeader => self.u8().map(u32::from),
        }
    }

    /// A count or length: a varint in THeader, a u16 in TTHeader.
    fn length(&mut self, kind: HeaderKind) -> Result<usize, &'static str> {
        Ok(match kind {
            HeaderKind::THeader => self.varint()? as usize,
            HeaderKind::TTHeader => usize::from(self.u16()?),
        })
    }

    /// A count of items; at least one byte per item must remain.
    fn count(&mut self, kind: HeaderKind) -> Result<usize, &'static str> {
        let n = self.length(kind)?;
        if n > self.buf.len() - self.pos {
            return Err("a count runs past the header");
        }
        Ok(n)
    }

    fn string(&mut self, kind: HeaderKind) -> Result<&'a [u8], &'static str> {
        let n = self.length(kind)?;
        let s = self
            .buf
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or("a string runs past the header")?;
        self.pos += n;
        Ok(s)
    }
}

/// Writes a request frame (for clients and tests): `info` as string key-values.
pub fn request(
    out: &mut Vec<u8>,
    kind: HeaderKind,
    seq: u32,
    protocol: Protocol,
    info: &[(&[u8], &[u8])],
    message: &[u8],
) {
    let start = fixed_part(out, kind, 0, seq);
    let size_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let h = out.len();
    out.extend_from_slice(&[protocol_id(protocol), 0]);
    if !info.is_empty() {
        out.push(INFO_KEYVALUE);
        put_length(out, kind, info.len());
        for (k, v) in info {
            for s in [k, v] {
                put_length(out, kind, s.len());
                out.extend_from_slice(s);
            }
        }
    }
    while (out.len() - h) % 4 != 0 {
        out.push(INFO_PADDING);
    }
    let words = ((out.len() - h) / 4) as u16;
    out[size_at..size_at + 2].copy_from_slice(&words.to_be_bytes());
    out.extend_from_slice(message);
    finish(out, start, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: HeaderKind, info: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        request(
            &mut out,
            kind,
            7,
            Protocol::Compact,
            info,
            &[0x82, 0x21, 1, 0],
        );
        out
    }

    #[test]
    fn frames_round_trip_with_their_info() {
        for kind in [HeaderKind::THeader, HeaderKind::TTHeader] {
            let buf = frame(kind, &[(b"caller", b"php-web"), (b"k", b"")]);
            for cut in 0..buf.len() {
                assert_eq!(parse(&buf[..cut], kind, &Limits::default()), Ok(None));
            }
            let f = parse(&buf, kind, &Limits::default()).unwrap().unwrap();
            assert_eq!(
                (f.seq, f.protocol, f.consumed),
                (7, Protocol::Compact, buf.len())
            );
            assert_eq!(f.payload, &[0x82, 0x21, 1, 0]);
            assert_eq!(f.info.caller(), Some(&b"php-web"[..]));
            assert_eq!(f.info.get(b"k"), Some(&b""[..]));
            assert_eq!(f.info.get(b"nope"), None);
        }
    }

    #[test]
    fn transforms_and_bad_headers_are_refused() {
        let mut buf = frame(HeaderKind::THeader, &[]);
        buf[15] = 1; // one transform
        buf[16] = 1; // zlib
        let err = parse(&buf, HeaderKind::THeader, &Limits::default()).unwrap_err();
        assert!(err.error.to_string().contains("zlib"), "{}", err.error);
        assert_eq!(err.fixed.unwrap().seq, 7);
        // a header size past the frame
        let mut buf = frame(HeaderKind::TTHeader, &[]);
        buf[12..14].copy_from_slice(&100u16.to_be_bytes());
        let err = parse(&buf, HeaderKind::TTHeader, &Limits::default()).unwrap_err();
        assert!(matches!(err.error, WireError::BadHeader { .. }));
        // a count of info headers no header could hold
        let mut buf = frame(HeaderKind::THeader, &[(b"a", b"b")]);
        buf[17] = 0x7f;
        let err = parse(&buf, HeaderKind::THeader, &Limits::default()).unwrap_err();
        assert!(
            matches!(err.error, WireError::BadHeader { .. }),
            "{:?}",
            err
        );
        // an absurd length, at once
        let err = parse(
            &[0x7f, 0xff, 0xff, 0xff],
            HeaderKind::THeader,
            &Limits::default(),
        );
        assert!(matches!(err.unwrap_err().error, WireError::TooLong { .. }));
    }

    #[test]
    fn reply_frames() {
        for inner in [false, true] {
            let mut out = vec![9];
            let start = begin(
                &mut out,
                HeaderKind::TTHeader,
                1,
                5,
                Protocol::Binary,
                inner,
            );
            out.extend_from_slice(&[0x80, 1, 0, 2]);
            finish(&mut out, start, inner);
            let f = parse(&out[1..], HeaderKind::TTHeader, &Limits::default())
                .unwrap()
                .unwrap();
            assert_eq!((f.seq, f.flags, f.inner_framed), (5, 1, inner));
            assert_eq!(f.payload, &[0x80, 1, 0, 2]);
        }
    }
}
