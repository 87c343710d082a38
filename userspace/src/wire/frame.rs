//! Message boundaries: which transport a connection speaks, and where each whole message ends.
//!
//! A connection's first bytes tell its transport (the detection table of docs/ARCHITECTURE.md):
//!
//! | first bytes                          | transport | protocol                  |
//! |--------------------------------------|-----------|---------------------------|
//! | `80 01 ..`                           | buffered  | binary (strict)           |
//! | `82 ..`                              | buffered  | compact                   |
//! | length, then `0F FF`                 | THeader   | the header's protocol id  |
//! | length, then `10 00`                 | TTHeader  | the header's protocol id  |
//! | length, then `80 01` / `82`          | framed    | binary / compact          |
//!
//! The transport is fixed by the first message; the protocol is read from each message (a framed or
//! buffered message's first byte, a header's protocol id), and every reply goes back in its request's
//! protocol and transport (a [`Dialect`]). Unframed messages carry no length, so their end is found by
//! walking the message's structure without decoding it; that walk is also where every bound of [`Limits`]
//! is enforced, so a message that [`scan`] accepts can be decoded without further checks failing on
//! truncation.

use super::binary::{skip, MessageHeader, Reader};
use super::header::{self, HeaderKind, InfoHeaders};
use super::{compact, ttype, Args, Limits, Progress, Protocol, WireError};

/// A connection's transport, fixed by its first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Messages back to back, no length prefix (TBufferedTransport).
    Buffered,
    /// Each message preceded by its length as a 4-byte big-endian integer (TFramedTransport).
    Framed,
    /// Each message in a header frame (THeaderTransport, TTHeader).
    Header(HeaderKind),
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Buffered => "buffered",
            Transport::Framed => "framed",
            Transport::Header(k) => k.name(),
        }
    }
}

/// How one message was written, so that its reply is written the same way: transport, protocol, and for a
/// header frame the sequence id and flags its reply echoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    pub transport: Transport,
    pub protocol: Protocol,
    /// Header transports: the request frame's sequence id and flags.
    pub seq: u32,
    pub flags: u16,
    /// TTHeader: the payload had a 4-byte length of its own (Kitex's TTHeaderFramed).
    pub inner_framed: bool,
}

impl Dialect {
    /// Binary messages, buffered: what is answered before a connection's transport is known.
    pub const BINARY: Dialect = Dialect::plain(Transport::Buffered, Protocol::Binary);

    /// A buffered or framed dialect.
    pub const fn plain(transport: Transport, protocol: Protocol) -> Dialect {
        Dialect {
            transport,
            protocol,
            seq: 0,
            flags: 0,
            inner_framed: false,
        }
    }
}

/// The protocol of a buffered or framed message starting with `first`.
fn protocol_of(first: u8) -> Protocol {
    if first == compact::PROTOCOL_ID {
        Protocol::Compact
    } else {
        Protocol::Binary
    }
}

const FRAME_HEADER: usize = 4;

/// One whole message found in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub dialect: Dialect,
    /// The message itself (without a frame header).
    pub message: &'a [u8],
    /// Bytes of the buffer this message used, frame header included.
    pub consumed: usize,
}

/// A message that cannot be served, with what is known of it so that the error can be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed<'a> {
    pub error: WireError,
    pub dialect: Option<Dialect>,
    pub header: Option<MessageHeader<'a>>,
}

impl<'a> Malformed<'a> {
    /// The error of a message written in `dialect`.
    fn on(dialect: Dialect) -> impl Fn(WireError, Option<MessageHeader<'a>>) -> Malformed<'a> {
        move |error, header| Malformed {
            error,
            dialect: Some(dialect),
            header,
        }
    }
}

/// Finds the first whole message at the start of `buf`. `Ok(None)`: not all of it has arrived yet.
/// `known` is the connection's transport once its first message fixed it.
pub fn scan<'a>(
    buf: &'a [u8],
    known: Option<Transport>,
    limits: &Limits,
) -> Result<Option<Frame<'a>>, Malformed<'a>> {
    Ok(
        walk(buf, known, limits, |r, l| skip(r, ttype::STRUCT, l, 0))?.map(|w| Frame {
            dialect: w.dialect,
            message: w.message,
            consumed: w.consumed,
        }),
    )
}

/// One whole call found in a buffer (its arguments went into the caller's [`Args`]).
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub dialect: Dialect,
    pub header: MessageHeader<'a>,
    /// The whole message (no frame header).
    pub message: &'a [u8],
    /// Bytes of the buffer this call used, frame header included.
    pub consumed: usize,
    /// A header frame's info headers (none for other transports).
    pub info: InfoHeaders<'a>,
}

/// Like [`scan`], but reads the call's header and arguments on the way: one walk over each message that
/// arrived whole. The arguments are written into `args` in place: returning the few hundred bytes of
/// [`Args`] by value cost a `memcpy` per call that showed as 10% of `benches/dispatch.rs`.
///
/// `progress` carries the walk of an unframed message that has not fully arrived from one call to the next
/// (see [`Progress`]), so that a message split over many reads is walked once, not once per read.
pub fn next_call<'a>(
    buf: &'a [u8],
    known: Option<Transport>,
    limits: &Limits,
    args: &mut Args<'a>,
    progress: &mut Progress,
) -> Result<Option<Call<'a>>, Malformed<'a>> {
    let call = |w: Walked<'a>| Call {
        dialect: w.dialect,
        header: w.header,
        message: w.message,
        consumed: w.consumed,
        info: w.info,
    };
    let unframed = |buf: &'a [u8]| {
        let proto = protocol_of(buf[0]);
        let error = move |error| Malformed {
            error,
            dialect: Some(Dialect::plain(Transport::Buffered, proto)),
            header: MessageHeader::read(&mut Reader::of(proto, buf)).ok(),
        };
        (Dialect::plain(Transport::Buffered, proto), error)
    };
    if progress.started() {
        // Part of this message was walked already: walk on from there, then decode it once it is whole.
        let (dialect, error) = unframed(buf);
        return match progress.walk(buf, limits) {
            Ok(None) => Ok(None),
            Ok(Some(len)) => {
                let w = walk_whole(&buf[..len], dialect, limits, |r, _| args.read_into(r))?;
                Ok(Some(call(w)))
            }
            Err(e) => Err(error(e)),
        };
    }
    let w = walk(buf, known, limits, |r, _| args.read_into(r))?;
    let unframed_start = matches!(buf.first(), Some(&0x80 | &compact::PROTOCOL_ID));
    if w.is_none() && unframed_start && matches!(known, None | Some(Transport::Buffered)) {
        // An unframed message not all here: note how far it goes, to walk on from there next time.
        let (_, error) = unframed(buf);
        progress.reset();
        progress.walk(buf, limits).map_err(error)?;
    }
    Ok(w.map(call))
}

/// Decodes a message known to be whole (a frame's body, or an unframed message whose end was found).
fn walk_whole<'a, F>(
    message: &'a [u8],
    dialect: Dialect,
    limits: &Limits,
    body: F,
) -> Result<Walked<'a>, Malformed<'a>>
where
    F: FnOnce(&mut Reader<'a>, &Limits) -> Result<(), WireError>,
{
    let fail = Malformed::on(dialect);
    // Running out of bytes inside a whole message is a truncated message.
    let mut r = Reader::of(dialect.protocol, message);
    let header = MessageHeader::read(&mut r).map_err(|e| fail(e, None))?;
    body(&mut r, limits).map_err(|e| fail(e, Some(header)))?;
    Ok(Walked {
        dialect,
        header,
        message,
        consumed: message.len(),
        info: InfoHeaders::NONE,
    })
}

struct Walked<'a> {
    dialect: Dialect,
    header: MessageHeader<'a>,
    message: &'a [u8],
    consumed: usize,
    info: InfoHeaders<'a>,
}

/// The transport of a connection whose first bytes are `buf`; `None` until enough of them are here.
fn detect(buf: &[u8], limits: &Limits) -> Option<Transport> {
    let first = *buf.first()?;
    if first == 0x80 || first == compact::PROTOCOL_ID {
        return Some(Transport::Buffered);
    }
    if let Some(magic) = buf.get(FRAME_HEADER..FRAME_HEADER + 2) {
        if let Some(kind) = HeaderKind::of_magic([magic[0], magic[1]]) {
            // A header frame, even one whose length is refused: the error goes back as a header frame.
            return Some(Transport::Header(kind));
        }
        return Some(Transport::Framed);
    }
    let len = buf.get(..FRAME_HEADER)?;
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    if len <= 0 || len as usize > limits.max_message {
        // Refused at once, as a frame, before the bytes that would tell a header frame arrive.
        return Some(Transport::Framed);
    }
    None
}

fn walk<'a, F>(
    buf: &'a [u8],
    known: Option<Transport>,
    limits: &Limits,
    body: F,
) -> Result<Option<Walked<'a>>, Malformed<'a>>
where
    F: FnOnce(&mut Reader<'a>, &Limits) -> Result<(), WireError>,
{
    let transport = match known {
        Some(t) => t,
        None => match detect(buf, limits) {
            Some(t) => t,
            None => return Ok(None),
        },
    };
    match transport {
        Transport::Buffered => walk_unframed(buf, limits, body),
        Transport::Framed => walk_framed(buf, limits, body),
        Transport::Header(kind) => walk_header(buf, kind, limits, body),
    }
}

fn walk_unframed<'a, F>(
    buf: &'a [u8],
    limits: &Limits,
    body: F,
) -> Result<Option<Walked<'a>>, Malformed<'a>>
where
    F: FnOnce(&mut Reader<'a>, &Limits) -> Result<(), WireError>,
{
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let dialect = Dialect::plain(Transport::Buffered, protocol_of(first));
    // Running out of bytes here means the rest has not arrived yet, unless the message would then be
    // longer than allowed.
    let mut r = Reader::with_cap_of(dialect.protocol, buf, limits.max_message);
    let fail = Malformed::on(dialect);
    let header = match MessageHeader::read(&mut r) {
        Ok(h) => h,
        Err(WireError::Truncated) => return Ok(None),
        Err(e) => return Err(fail(e, None)),
    };
    match body(&mut r, limits) {
        Ok(()) => {
            let len = r.position();
            Ok(Some(Walked {
                dialect,
                header,
                message: &buf[..len],
                consumed: len,
                info: InfoHeaders::NONE,
            }))
        }
        Err(WireError::Truncated) => Ok(None),
        Err(e) => Err(fail(e, Some(header))),
    }
}

fn walk_framed<'a, F>(
    buf: &'a [u8],
    limits: &Limits,
    body: F,
) -> Result<Option<Walked<'a>>, Malformed<'a>>
where
    F: FnOnce(&mut Reader<'a>, &Limits) -> Result<(), WireError>,
{
    let Some(len) = buf.get(..FRAME_HEADER) else {
        return Ok(None);
    };
    let protocol = buf
        .get(FRAME_HEADER)
        .map_or(Protocol::Binary, |&b| protocol_of(b));
    let fail = Malformed::on(Dialect::plain(Transport::Framed, protocol));
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    if len < 0 {
        return Err(fail(WireError::NegativeLength(len.into()), None));
    }
    let len = len as usize;
    if len == 0 {
        return Err(fail(WireError::EmptyFrame, None));
    }
    if len > limits.max_message {
        return Err(fail(
            WireError::TooLong {
                len,
                max: limits.max_message,
            },
            None,
        ));
    }
    let Some(message) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Ok(None);
    };
    let dialect = Dialect::plain(Transport::Framed, protocol);
    let w = walk_whole(message, dialect, limits, body)?;
    Ok(Some(Walked {
        consumed: FRAME_HEADER + len,
        ..w
    }))
}

fn walk_header<'a, F>(
    buf: &'a [u8],
    kind: HeaderKind,
    limits: &Limits,
    body: F,
) -> Result<Option<Walked<'a>>, Malformed<'a>>
where
    F: FnOnce(&mut Reader<'a>, &Limits) -> Result<(), WireError>,
{
    let f = match header::parse(buf, kind, limits) {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(None),
        Err(bad) => {
            // Answered in a header frame, with the request's sequence id when it was read.
            let fixed = bad.fixed.unwrap_or(header::Fixed { flags: 0, seq: 0 });
            return Err(Malformed {
                error: bad.error,
                dialect: Some(Dialect {
                    transport: Transport::Header(kind),
                    protocol: Protocol::Binary,
                    seq: fixed.seq,
                    flags: fixed.flags,
                    inner_framed: false,
                }),
                header: None,
            });
        }
    };
    let dialect = Dialect {
        transport: Transport::Header(kind),
        protocol: f.protocol,
        seq: f.seq,
        flags: f.flags,
        inner_framed: f.inner_framed,
    };
    let w = walk_whole(f.payload, dialect, limits, body)?;
    Ok(Some(Walked {
        consumed: f.consumed,
        info: f.info,
        ..w
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{mtype, Encoder};

    fn call(name: &str, seqid: i32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out);
        e.message_begin(name.as_bytes(), mtype::CALL, seqid);
        e.field_begin(ttype::I32, 1);
        e.i32(7);
        e.stop();
        out
    }

    fn compact_call(name: &str, seqid: i32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder::of(Protocol::Compact, &mut out);
        e.message_begin(name.as_bytes(), mtype::CALL, seqid);
        e.field_begin(ttype::STRUCT, 1);
        e.field_i64(1, 5);
        e.field_bytes(2, b"r");
        e.field_i64(3, 0);
        e.stop();
        e.field_bytes(2, b"key");
        e.stop();
        out
    }

    /// Every row of the detection table, each message walked whole and byte by byte, the arguments read.
    #[test]
    fn detection_table() {
        let limits = Limits::default();
        let binary = call("noop", 3);
        let compact = compact_call("lc_get", 4);
        let mut th = Vec::new();
        header::request(
            &mut th,
            HeaderKind::THeader,
            9,
            Protocol::Compact,
            &[],
            &compact,
        );
        let mut tth = Vec::new();
        let info: &[(&[u8], &[u8])] = &[(b"caller", b"svc")];
        header::request(
            &mut tth,
            HeaderKind::TTHeader,
            10,
            Protocol::Binary,
            info,
            &binary,
        );
        let rows = [
            (binary.clone(), Transport::Buffered, Protocol::Binary),
            (compact.clone(), Transport::Buffered, Protocol::Compact),
            (framed(&binary), Transport::Framed, Protocol::Binary),
            (framed(&compact), Transport::Framed, Protocol::Compact),
            (
                th,
                Transport::Header(HeaderKind::THeader),
                Protocol::Compact,
            ),
            (
                tth,
                Transport::Header(HeaderKind::TTHeader),
                Protocol::Binary,
            ),
        ];
        for (bytes, transport, protocol) in rows {
            for cut in 0..bytes.len() {
                let mut args = Args::new(&limits);
                let mut p = Progress::default();
                let got = next_call(&bytes[..cut], None, &limits, &mut args, &mut p);
                assert!(
                    matches!(got, Ok(None)),
                    "{transport:?} cut at {cut}: {got:?}"
                );
            }
            let mut args = Args::new(&limits);
            let c = next_call(&bytes, None, &limits, &mut args, &mut Progress::default())
                .unwrap()
                .unwrap();
            assert_eq!(
                (c.dialect.transport, c.dialect.protocol),
                (transport, protocol)
            );
            assert_eq!(c.consumed, bytes.len());
            if c.header.name == b"lc_get" {
                assert_eq!(args.bytes(2, "key").unwrap(), b"key");
                assert_eq!(args.context().unwrap().rid, 5);
            }
            if transport == Transport::Header(HeaderKind::TTHeader) {
                assert_eq!(c.info.caller(), Some(&b"svc"[..]));
                assert_eq!(c.dialect.seq, 10);
            }
        }
        // A framed connection may change protocol from one frame to the next (a forwarding peer's does).
        let mut two = framed(&binary);
        two.extend_from_slice(&framed(&compact));
        let f = scan(&two, None, &limits).unwrap().unwrap();
        let g = scan(&two[f.consumed..], Some(f.dialect.transport), &limits)
            .unwrap()
            .unwrap();
        assert_eq!(g.dialect.protocol, Protocol::Compact);
        // Nothing else: a clear error.
        let err = scan(b"GET / HTTP/1.1\r\n", None, &limits).unwrap_err();
        assert!(
            matches!(err.error, WireError::TooLong { .. }),
            "{:?}",
            err.error
        );
        let err = scan(&[0, 0, 0, 8, 0x12, 0x34, 0, 0, 0, 0, 0, 0], None, &limits).unwrap_err();
        assert!(
            matches!(err.error, WireError::BadVersion(_)),
            "{:?}",
            err.error
        );
    }

    /// A compact message that arrives in pieces is walked on from where it stopped, as a binary one is.
    #[test]
    fn compact_message_resumed_across_reads() {
        let limits = Limits::default();
        let msg = compact_call("lc_get", 77);
        let mut p = Progress::default();
        for cut in 1..msg.len() {
            let mut args = Args::new(&limits);
            assert!(next_call(&msg[..cut], None, &limits, &mut args, &mut p)
                .unwrap()
                .is_none());
        }
        let mut args = Args::new(&limits);
        let c = next_call(&msg, None, &limits, &mut args, &mut p)
            .unwrap()
            .unwrap();
        assert_eq!((c.header.seqid, c.consumed), (77, msg.len()));
        assert_eq!(args.bytes(2, "key").unwrap(), b"key");
    }

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut buf = (msg.len() as i32).to_be_bytes().to_vec();
        buf.extend_from_slice(msg);
        buf
    }

    #[test]
    fn unframed_message_found_byte_by_byte() {
        let msg = call("noop", 3);
        let limits = Limits::default();
        for cut in 0..msg.len() {
            assert_eq!(scan(&msg[..cut], None, &limits), Ok(None), "cut at {cut}");
        }
        let f = scan(&msg, None, &limits).unwrap().unwrap();
        assert_eq!(f.dialect.transport, Transport::Buffered);
        assert_eq!(f.consumed, msg.len());
    }

    #[test]
    fn framed_message_and_pipelining() {
        let msg = call("noop", 9);
        let mut buf = (msg.len() as i32).to_be_bytes().to_vec();
        buf.extend_from_slice(&msg);
        buf.extend_from_slice(&buf.clone());
        let f = scan(&buf, None, &Limits::default()).unwrap().unwrap();
        assert_eq!(f.dialect.transport, Transport::Framed);
        assert_eq!(f.message, &msg[..]);
        let g = scan(
            &buf[f.consumed..],
            Some(Transport::Framed),
            &Limits::default(),
        );
        assert_eq!(g.unwrap().unwrap().consumed, f.consumed);
    }

    #[test]
    fn absurd_frame_length_is_refused_at_once() {
        let buf = 0x7fff_ffffu32.to_be_bytes();
        let err = scan(&buf, None, &Limits::default()).unwrap_err();
        assert!(matches!(err.error, WireError::TooLong { .. }));
    }

    #[test]
    fn truncated_field_inside_a_frame_is_malformed() {
        let msg = call("noop", 1);
        let short = &msg[..msg.len() - 3];
        let mut buf = (short.len() as i32).to_be_bytes().to_vec();
        buf.extend_from_slice(short);
        let err = scan(&buf, None, &Limits::default()).unwrap_err();
        assert_eq!(err.error, WireError::Truncated);
        assert_eq!(err.header.unwrap().seqid, 1);
    }

    #[test]
    fn string_longer_than_the_limit_is_refused_before_it_arrives() {
        let mut msg = Vec::new();
        let mut e = Encoder::new(&mut msg);
        e.message_begin(b"lc_get", mtype::CALL, 1);
        e.field_begin(ttype::STRING, 2);
        msg.extend_from_slice(&0x7fff_ffffi32.to_be_bytes());
        let err = scan(&msg, None, &Limits::default()).unwrap_err();
        assert!(matches!(err.error, WireError::TooLong { .. }), "{:?}", err);
        assert_eq!(err.header.unwrap().name, b"lc_get");
    }
}
