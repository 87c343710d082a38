//! Message boundaries: which transport a connection speaks, and where each whole message ends.
//!
//! A connection's first byte tells its transport: 0x80 starts a strict binary message sent unframed (what PHP's
//! and Python's `TBufferedTransport` send); anything else is the first byte of a framed transport's 4-byte
//! big-endian length. Unframed messages carry no length, so their end is found by walking the message's
//! structure without decoding it; that walk is also where every bound of [`Limits`] is enforced, so a message
//! that [`scan`] accepts can be decoded without further checks failing on truncation.

use super::binary::{skip, MessageHeader, Reader};
use super::{ttype, Args, Limits, Progress, WireError};

/// A connection's transport, fixed by its first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Messages back to back, no length prefix (TBufferedTransport).
    Buffered,
    /// Each message preceded by its length as a 4-byte big-endian integer (TFramedTransport).
    Framed,
}

const COMPACT_PROTOCOL_ID: u8 = 0x82;
const FRAME_HEADER: usize = 4;

/// One whole message found in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub transport: Transport,
    /// The message itself (without a frame header).
    pub message: &'a [u8],
    /// Bytes of the buffer this message used, frame header included.
    pub consumed: usize,
}

/// A message that cannot be served, with what is known of it so that the error can be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed<'a> {
    pub error: WireError,
    pub transport: Option<Transport>,
    pub header: Option<MessageHeader<'a>>,
}

impl<'a> Malformed<'a> {
    /// The error of a message on a connection speaking `transport`.
    fn on(transport: Transport) -> impl Fn(WireError, Option<MessageHeader<'a>>) -> Malformed<'a> {
        move |error, header| Malformed {
            error,
            transport: Some(transport),
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
            transport: w.transport,
            message: w.message,
            consumed: w.consumed,
        }),
    )
}

/// One whole call found in a buffer (its arguments went into the caller's [`Args`]).
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub transport: Transport,
    pub header: MessageHeader<'a>,
    /// The whole message (no frame header).
    pub message: &'a [u8],
    /// Bytes of the buffer this call used, frame header included.
    pub consumed: usize,
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
        transport: w.transport,
        header: w.header,
        message: w.message,
        consumed: w.consumed,
    };
    let unframed_error = |error| Malformed {
        error,
        transport: Some(Transport::Buffered),
        header: MessageHeader::read(&mut Reader::new(buf)).ok(),
    };
    if progress.started() {
        // Part of this message was walked already: walk on from there, then decode it once it is whole.
        return match progress.walk(buf, limits) {
            Ok(None) => Ok(None),
            Ok(Some(len)) => {
                let w = walk_whole(&buf[..len], Transport::Buffered, limits, |r, _| {
                    args.read_into(r)
                })?;
                Ok(Some(call(w)))
            }
            Err(error) => Err(unframed_error(error)),
        };
    }
    let w = walk(buf, known, limits, |r, _| args.read_into(r))?;
    if w.is_none() && buf.first() == Some(&0x80) {
        // An unframed message not all here: note how far it goes, to walk on from there next time.
        progress.reset();
        progress.walk(buf, limits).map_err(unframed_error)?;
    }
    Ok(w.map(call))
}

/// Decodes a message known to be whole (a frame's body, or an unframed message whose end was found).
fn walk_whole<'a, F>(
    message: &'a [u8],
    transport: Transport,
    limits: &Limits,
    body: F,
) -> Result<Walked<'a>, Malformed<'a>>
where
    F: FnOnce(&mut Reader<'a>, &Limits) -> Result<(), WireError>,
{
    let fail = Malformed::on(transport);
    // Running out of bytes inside a whole message is a truncated message.
    let mut r = Reader::new(message);
    let header = MessageHeader::read(&mut r).map_err(|e| fail(e, None))?;
    body(&mut r, limits).map_err(|e| fail(e, Some(header)))?;
    Ok(Walked {
        transport,
        header,
        message,
        consumed: message.len(),
    })
}

struct Walked<'a> {
    transport: Transport,
    header: MessageHeader<'a>,
    message: &'a [u8],
    consumed: usize,
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
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let transport = match known {
        Some(t) => t,
        None if first == 0x80 => Transport::Buffered,
        None if first == COMPACT_PROTOCOL_ID => {
            return Err(Malformed {
                error: WireError::UnknownTransport(first),
                transport: None,
                header: None,
            })
        }
        None => Transport::Framed,
    };
    match transport {
        Transport::Buffered => walk_unframed(buf, limits, body),
        Transport::Framed => walk_framed(buf, limits, body),
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
    // Running out of bytes here means the rest has not arrived yet, unless the message would then be
    // longer than allowed.
    let mut r = Reader::with_cap(buf, limits.max_message);
    let fail = Malformed::on(Transport::Buffered);
    let header = match MessageHeader::read(&mut r) {
        Ok(h) => h,
        Err(WireError::Truncated) => return Ok(None),
        Err(e) => return Err(fail(e, None)),
    };
    match body(&mut r, limits) {
        Ok(()) => {
            let len = r.position();
            Ok(Some(Walked {
                transport: Transport::Buffered,
                header,
                message: &buf[..len],
                consumed: len,
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
    let fail = Malformed::on(Transport::Framed);
    let Some(len) = buf.get(..FRAME_HEADER) else {
        return Ok(None);
    };
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
    if buf.get(FRAME_HEADER) == Some(&COMPACT_PROTOCOL_ID) {
        return Err(fail(WireError::UnknownTransport(COMPACT_PROTOCOL_ID), None));
    }
    let Some(message) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Ok(None);
    };
    let w = walk_whole(message, Transport::Framed, limits, body)?;
    Ok(Some(Walked {
        consumed: FRAME_HEADER + len,
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

    #[test]
    fn unframed_message_found_byte_by_byte() {
        let msg = call("noop", 3);
        let limits = Limits::default();
        for cut in 0..msg.len() {
            assert_eq!(scan(&msg[..cut], None, &limits), Ok(None), "cut at {cut}");
        }
        let f = scan(&msg, None, &limits).unwrap().unwrap();
        assert_eq!(f.transport, Transport::Buffered);
        assert_eq!(f.consumed, msg.len());
    }

    #[test]
    fn framed_message_and_pipelining() {
        let msg = call("noop", 9);
        let mut buf = (msg.len() as i32).to_be_bytes().to_vec();
        buf.extend_from_slice(&msg);
        buf.extend_from_slice(&buf.clone());
        let f = scan(&buf, None, &Limits::default()).unwrap().unwrap();
        assert_eq!(f.transport, Transport::Framed);
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
