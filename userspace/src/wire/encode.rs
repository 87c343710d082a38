//! TBinaryProtocol encoding into a caller's buffer: replies go straight into a session's out buffer.

use super::{mtype, ttype, Transport, VERSION_1};

/// Appends binary-protocol values to a byte buffer.
pub struct Encoder<'b> {
    out: &'b mut Vec<u8>,
}

impl<'b> Encoder<'b> {
    pub fn new(out: &'b mut Vec<u8>) -> Self {
        Encoder { out }
    }

    pub fn message_begin(&mut self, name: &[u8], mtype: u8, seqid: i32) {
        self.i32((VERSION_1 | u32::from(mtype)) as i32);
        self.bytes(name);
        self.i32(seqid);
    }
    pub fn field_begin(&mut self, t: u8, id: i16) {
        self.out.push(t);
        self.i16(id);
    }
    pub fn stop(&mut self) {
        self.out.push(ttype::STOP);
    }
    pub fn list_begin(&mut self, elem: u8, n: usize) {
        self.out.push(elem);
        self.i32(n as i32);
    }
    pub fn bool(&mut self, v: bool) {
        self.out.push(u8::from(v));
    }
    pub fn i16(&mut self, v: i16) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.i32(v.len() as i32);
        self.out.extend_from_slice(v);
    }

    /// A struct field holding a string or binary.
    pub fn field_bytes(&mut self, id: i16, v: &[u8]) {
        self.field_begin(ttype::STRING, id);
        self.bytes(v);
    }
    /// A string field formatted in place: no intermediate `String`.
    pub fn field_fmt(&mut self, id: i16, args: std::fmt::Arguments<'_>) {
        use std::io::Write;
        self.field_begin(ttype::STRING, id);
        let at = self.out.len();
        self.i32(0);
        // Writing into a Vec cannot fail.
        let _ = self.out.write_fmt(args);
        let len = (self.out.len() - at - 4) as i32;
        self.out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    pub fn field_i32(&mut self, id: i16, v: i32) {
        self.field_begin(ttype::I32, id);
        self.i32(v);
    }
    pub fn field_i64(&mut self, id: i16, v: i64) {
        self.field_begin(ttype::I64, id);
        self.i64(v);
    }
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
    transport: Transport,
}

impl<'b> Reply<'b> {
    pub fn begin(out: &'b mut Vec<u8>, transport: Transport, name: &[u8], seqid: i32) -> Self {
        Self::begin_kind(out, transport, name, mtype::REPLY, seqid)
    }

    fn begin_kind(
        out: &'b mut Vec<u8>,
        transport: Transport,
        name: &[u8],
        kind: u8,
        seqid: i32,
    ) -> Self {
        let start = out.len();
        if transport == Transport::Framed {
            out.extend_from_slice(&[0; 4]);
        }
        let mut enc = Encoder::new(out);
        enc.message_begin(name, kind, seqid);
        Reply {
            enc,
            start,
            transport,
        }
    }

    /// The result struct being written.
    pub fn enc(&mut self) -> &mut Encoder<'b> {
        &mut self.enc
    }

    pub fn finish(mut self) {
        self.enc.stop();
        if self.transport == Transport::Framed {
            let len = (self.enc.out.len() - self.start - 4) as u32;
            self.enc.out[self.start..self.start + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    /// Drops what this reply wrote.
    pub fn abort(self) {
        self.enc.out.truncate(self.start);
    }

    /// Writes a whole `TApplicationException` message.
    pub fn app_error(
        out: &'b mut Vec<u8>,
        transport: Transport,
        name: &[u8],
        seqid: i32,
        kind: AppErrorKind,
        message: &str,
    ) {
        let mut r = Self::begin_kind(out, transport, name, mtype::EXCEPTION, seqid);
        r.enc.field_bytes(1, message.as_bytes());
        r.enc.field_i32(2, kind as i32);
        r.finish();
    }
}
