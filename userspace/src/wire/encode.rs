//! TBinaryProtocol and TCompactProtocol encoding into a caller's buffer: replies go straight into a
//! session's out buffer, in the protocol and transport of the request.

use super::compact::{self, put_varint, zigzag32, zigzag64};
use super::{header, mtype, ttype, Dialect, Protocol, Transport, VERSION_1};

/// Struct nesting whose last field ids the compact encoder keeps (16 bits each in a u128); deeper structs
/// write their field ids in full, which needs no last id (fae's replies nest two deep).
const KEPT_LEVELS: u8 = 8;

/// Appends binary- or compact-protocol values to a byte buffer. Structs are opened by
/// `field_begin(STRUCT, id)` and closed by [`Encoder::stop`] (the compact protocol numbers a struct's
/// fields from its own start).
pub struct Encoder<'b> {
    out: &'b mut Vec<u8>,
    proto: Protocol,
    /// Compact: the last field id written in the current struct, and the outer structs' ones.
    last: i16,
    outer: u128,
    depth: u8,
    /// Compact: open structs past `KEPT_LEVELS`.
    overflow: u32,
    /// Compact: a bool field whose header waits for its value.
    bool_field: Option<i16>,
}

impl<'b> Encoder<'b> {
    /// A binary-protocol encoder.
    #[inline]
    pub fn new(out: &'b mut Vec<u8>) -> Self {
        Self::of(Protocol::Binary, out)
    }

    #[inline]
    pub fn of(proto: Protocol, out: &'b mut Vec<u8>) -> Self {
        Encoder {
            out,
            proto,
            last: 0,
            outer: 0,
            depth: 0,
            overflow: 0,
            bool_field: None,
        }
    }

    #[inline]
    pub fn message_begin(&mut self, name: &[u8], mtype: u8, seqid: i32) {
        match self.proto {
            Protocol::Binary => {
                self.i32((VERSION_1 | u32::from(mtype)) as i32);
                self.bytes(name);
                self.i32(seqid);
            }
            Protocol::Compact => {
                self.out.extend_from_slice(&[
                    compact::PROTOCOL_ID,
                    compact::VERSION | (mtype << compact::TYPE_SHIFT),
                ]);
                put_varint(self.out, u64::from(seqid as u32));
                self.bytes(name);
            }
        }
    }
    #[inline]
    pub fn field_begin(&mut self, t: u8, id: i16) {
        if self.proto == Protocol::Binary {
            self.out.push(t);
            self.i16(id);
            return;
        }
        if t == ttype::BOOL {
            // The value goes in the header: written by `bool`.
            self.bool_field = Some(id);
            return;
        }
        self.compact_field(compact::of_ttype(t), id);
        if t == ttype::STRUCT {
            if self.overflow > 0 || self.depth == KEPT_LEVELS {
                self.overflow += 1;
            } else {
                self.outer = (self.outer << 16) | u128::from(self.last as u16);
                self.depth += 1;
                self.last = 0;
            }
        }
    }
    #[inline]
    fn compact_field(&mut self, ct: u8, id: i16) {
        let delta = i32::from(id) - i32::from(self.last);
        if self.overflow == 0 && (1..=15).contains(&delta) {
            self.out.push(((delta as u8) << 4) | ct);
        } else {
            self.out.push(ct);
            put_varint(self.out, u64::from(zigzag32(i32::from(id))));
        }
        if self.overflow == 0 {
            self.last = id;
        }
    }
    #[inline]
    pub fn stop(&mut self) {
        self.out.push(ttype::STOP);
        if self.proto == Protocol::Compact {
            if self.overflow > 0 {
                self.overflow -= 1;
            } else if self.depth > 0 {
                self.last = self.outer as u16 as i16;
                self.outer >>= 16;
                self.depth -= 1;
            }
        }
    }
    #[inline]
    pub fn list_begin(&mut self, elem: u8, n: usize) {
        match self.proto {
            Protocol::Binary => {
                self.out.push(elem);
                self.i32(n as i32);
            }
            Protocol::Compact if n < 15 => {
                self.out.push(((n as u8) << 4) | compact::of_ttype(elem))
            }
            Protocol::Compact => {
                self.out.push(0xf0 | compact::of_ttype(elem));
                put_varint(self.out, n as u64);
            }
        }
    }
    #[inline]
    pub fn map_begin(&mut self, k: u8, v: u8, n: usize) {
        match self.proto {
            Protocol::Binary => {
                self.out.extend_from_slice(&[k, v]);
                self.i32(n as i32);
            }
            Protocol::Compact => {
                put_varint(self.out, n as u64);
                if n > 0 {
                    self.out
                        .push((compact::of_ttype(k) << 4) | compact::of_ttype(v));
                }
            }
        }
    }
    #[inline]
    pub fn bool(&mut self, v: bool) {
        match (self.proto, self.bool_field.take()) {
            (Protocol::Binary, _) => self.out.push(u8::from(v)),
            (Protocol::Compact, Some(id)) => {
                let ct = if v { compact::TRUE } else { compact::FALSE };
                self.compact_field(ct, id);
            }
            (Protocol::Compact, None) => {
                self.out
                    .push(if v { compact::TRUE } else { compact::FALSE })
            }
        }
    }
    #[inline]
    pub fn i16(&mut self, v: i16) {
        match self.proto {
            Protocol::Binary => self.out.extend_from_slice(&v.to_be_bytes()),
            Protocol::Compact => put_varint(self.out, u64::from(zigzag32(i32::from(v)))),
        }
    }
    #[inline]
    pub fn i32(&mut self, v: i32) {
        match self.proto {
            Protocol::Binary => self.out.extend_from_slice(&v.to_be_bytes()),
            Protocol::Compact => put_varint(self.out, u64::from(zigzag32(v))),
        }
    }
    #[inline]
    pub fn i64(&mut self, v: i64) {
        match self.proto {
            Protocol::Binary => self.out.extend_from_slice(&v.to_be_bytes()),
            Protocol::Compact => put_varint(self.out, zigzag64(v)),
        }
    }
    #[inline]
    pub fn bytes(&mut self, v: &[u8]) {
        match self.proto {
            Protocol::Binary => self.out.extend_from_slice(&(v.len() as i32).to_be_bytes()),
            Protocol::Compact => put_varint(self.out, v.len() as u64),
        }
        self.out.extend_from_slice(v);
    }

    /// A struct field holding a string or binary.
    #[inline]
    pub fn field_bytes(&mut self, id: i16, v: &[u8]) {
        self.field_begin(ttype::STRING, id);
        self.bytes(v);
    }
    /// A string field formatted in place: no intermediate `String`.
    #[inline]
    pub fn field_fmt(&mut self, id: i16, args: std::fmt::Arguments<'_>) {
        use std::io::Write;
        self.field_begin(ttype::STRING, id);
        let at = self.out.len();
        if self.proto == Protocol::Binary {
            self.i32(0);
            // Writing into a Vec cannot fail.
            let _ = self.out.write_fmt(args);
            let len = (self.out.len() - at - 4) as i32;
            self.out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        } else {
            // The varint length's size depends on the text: write the text, then put the length before it.
            let _ = self.out.write_fmt(args);
            let (len, n) = compact::varint_bytes((self.out.len() - at) as u64);
            self.out.splice(at..at, len[..n].iter().copied());
        }
    }
    #[inline]
    pub fn field_i32(&mut self, id: i16, v: i32) {
        self.field_begin(ttype::I32, id);
        self.i32(v);
    }
    #[inline]
    pub fn field_i64(&mut self, id: i16, v: i64) {
        self.field_begin(ttype::I64, id);
        self.i64(v);
    }
    #[inline]
    pub fn field_bool(&mut self, id: i16, v: bool) {
        self.field_begin(ttype::BOOL, id);
        self.bool(v);
    }
}

/// `TApplicationException` kinds, numbered as in every Apache Thrift library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum AppErrorKind {
    Unknown = 0,
    UnknownMethod = 1,
    InvalidMessageType = 2,
    WrongMethodName = 3,
    BadSequenceId = 4,
    MissingResult = 5,
    InternalError = 6,
    ProtocolError = 7,
}

/// One reply message being written into a session's out buffer: the header is written by [`Reply::begin`],
/// the servant writes the result struct's fields, and [`Reply::finish`] closes the struct and the frame.
/// [`Reply::abort`] takes back everything written since `begin`, so that an error found half way through a
/// result never leaves a torn message in the stream.
pub struct Reply<'b> {
    enc: Encoder<'b>,
    start: usize,
    dialect: Dialect,
}

impl<'b> Reply<'b> {
    pub fn begin(out: &'b mut Vec<u8>, dialect: Dialect, name: &[u8], seqid: i32) -> Self {
        Self::begin_kind(out, dialect, name, mtype::REPLY, seqid)
    }

    fn begin_kind(
        out: &'b mut Vec<u8>,
        dialect: Dialect,
        name: &[u8],
        kind: u8,
        seqid: i32,
    ) -> Self {
        let start = dialect.open(out);
        let mut enc = Encoder::of(dialect.protocol, out);
        enc.message_begin(name, kind, seqid);
        Reply {
            enc,
            start,
            dialect,
        }
    }

    /// The result struct being written.
    pub fn enc(&mut self) -> &mut Encoder<'b> {
        &mut self.enc
    }

    pub fn finish(mut self) {
        self.enc.stop();
        self.dialect.close(self.enc.out, self.start);
    }

    /// Drops what this reply wrote.
    pub fn abort(self) {
        self.enc.out.truncate(self.start);
    }

    /// Writes a whole `TApplicationException` message.
    pub fn app_error(
        out: &'b mut Vec<u8>,
        dialect: Dialect,
        name: &[u8],
        seqid: i32,
        kind: AppErrorKind,
        message: &str,
    ) {
        let mut r = Self::begin_kind(out, dialect, name, mtype::EXCEPTION, seqid);
        r.enc.field_bytes(1, message.as_bytes());
        r.enc.field_i32(2, kind as i32);
        r.finish();
    }
}

impl Dialect {
    /// Writes what goes before a message in this dialect's transport (a frame length, a header); returns
    /// where it starts, for [`Dialect::close`].
    pub fn open(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        match self.transport {
            Transport::Buffered => {}
            Transport::Framed => out.extend_from_slice(&[0; 4]),
            Transport::Header(kind) => {
                header::begin(
                    out,
                    kind,
                    self.flags,
                    self.seq,
                    self.protocol,
                    self.inner_framed,
                );
            }
        }
        start
    }

    /// Fills in the lengths of the message opened at `start`, now that it is written.
    pub fn close(&self, out: &mut [u8], start: usize) {
        match self.transport {
            Transport::Buffered => {}
            Transport::Framed => {
                let len = (out.len() - start - 4) as u32;
                out[start..start + 4].copy_from_slice(&len.to_be_bytes());
            }
            Transport::Header(_) => header::finish(out, start, self.inner_framed),
        }
    }

    /// Appends a whole message (a peer's reply to a forwarded call, already in this dialect's protocol)
    /// in this dialect's transport.
    pub fn wrap(&self, out: &mut Vec<u8>, message: &[u8]) {
        let start = self.open(out);
        out.extend_from_slice(message);
        self.close(out, start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Args, Limits, MessageHeader, Reader};

    /// Structs nested deeper than the encoder keeps last ids for still read back (their ids written in full).
    #[test]
    fn deep_compact_nesting_reads_back() {
        let mut out = Vec::new();
        let mut e = Encoder::of(Protocol::Compact, &mut out);
        e.message_begin(b"m", mtype::CALL, 1);
        for level in 0..20i16 {
            e.field_i32(3, i32::from(level));
            e.field_begin(ttype::STRUCT, 5);
        }
        for _ in 0..20 {
            e.stop();
            e.field_i32(9, 9);
        }
        e.stop();
        let mut r = Reader::of(Protocol::Compact, &out);
        MessageHeader::read(&mut r).unwrap();
        let limits = Limits::default();
        crate::wire::skip(&mut r, ttype::STRUCT, &limits, 0).unwrap();
        assert_eq!(r.remaining(), 0);
        // and the field ids come back right at every level
        let mut r = Reader::of(Protocol::Compact, &out);
        MessageHeader::read(&mut r).unwrap();
        for level in 0..20 {
            assert_eq!(r.field().unwrap(), Some((3, ttype::I32)));
            assert_eq!(r.i32().unwrap(), level);
            assert_eq!(r.field().unwrap(), Some((5, ttype::STRUCT)));
            r.set_last_field(0);
        }
    }

    /// The same struct written in each protocol reads back the same, nested struct and bool fields included.
    #[test]
    fn compact_encoding_reads_back() {
        for proto in [Protocol::Binary, Protocol::Compact] {
            let mut out = Vec::new();
            let mut e = Encoder::of(proto, &mut out);
            e.message_begin(b"lc_get", mtype::CALL, -5);
            e.field_begin(ttype::STRUCT, 1);
            e.field_i64(1, -1234567890123);
            e.field_bytes(2, b"why");
            e.field_i64(3, 7);
            e.field_bool(4, true);
            e.stop();
            e.field_fmt(2, format_args!("k{}", "ey".repeat(100)));
            e.field_bool(3, false);
            e.field_begin(ttype::LIST, 20);
            e.list_begin(ttype::STRING, 20);
            for i in 0..20 {
                e.bytes(format!("s{i}").as_bytes());
            }
            e.field_i32(6, i32::MIN);
            e.stop();
            let mut r = Reader::of(proto, &out);
            let h = MessageHeader::read(&mut r).unwrap();
            assert_eq!(
                (h.name, h.seqid, h.mtype),
                (&b"lc_get"[..], -5, mtype::CALL)
            );
            let args = Args::read(&mut r, &Limits::default()).unwrap();
            assert_eq!(r.remaining(), 0, "{proto:?}");
            let ctx = args.context().unwrap();
            assert_eq!(
                (ctx.rid, ctx.reason, ctx.uid, ctx.sticky),
                (-1234567890123, &b"why"[..], 7, true)
            );
            assert_eq!(args.bytes(2, "key").unwrap().len(), 201);
            assert!(!args.bool(3, "b").unwrap());
            assert_eq!(args.i32(6, "n").unwrap(), i32::MIN);
        }
    }
}
