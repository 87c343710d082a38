//! Finding the end of an unframed message that arrives in pieces, without walking again the bytes already
//! walked.
//!
//! An unframed message carries no length: its end is where its structure ends. Re-walking a message from
//! its start on every read costs time quadratic in its size (a 16 MB list of short strings sent in 16 KiB
//! reads took seconds of CPU). [`Progress`] keeps where the walk stopped and what it was inside of, so every
//! byte is walked once however the message is split.

use super::binary::{fixed_size, MessageHeader, Reader};
use super::{compact, ttype, Limits, Protocol, WireError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Inside a struct: next is a field header or STOP; `last` is the last field id read (compact).
    Struct { last: i16 },
    /// Inside a list or set: `left` elements of type `elem` to go.
    Seq { elem: u8, left: usize },
    /// Inside a map: `left` entries to go; `value` when the next value is an entry's value.
    Map {
        k: u8,
        v: u8,
        left: usize,
        value: bool,
    },
}

/// How far the walk of the message at the start of a buffer has come.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the message walked.
    pos: usize,
    /// The containers the walk is inside of, innermost last; empty before the header is read.
    open: Vec<Open>,
    /// The message's protocol, told by its first byte.
    proto: Protocol,
}

impl Progress {
    /// Whether a walk is under way.
    pub fn started(&self) -> bool {
        !self.open.is_empty()
    }

    pub fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
    }

    /// Walks on over `buf` (the message so far, from its first byte). `Ok(Some(len))`: the message is whole
    /// and `len` bytes long (the progress is reset); `Ok(None)`: more bytes are needed.
    pub fn walk(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, WireError> {
        if self.open.is_empty() {
            self.proto = match buf.first() {
                Some(&compact::PROTOCOL_ID) => Protocol::Compact,
                _ => Protocol::Binary,
            };
            let mut r = Reader::with_cap_of(self.proto, buf, limits.max_message);
            match MessageHeader::read(&mut r) {
                Ok(_) => {}
                Err(WireError::Truncated) => return Ok(None),
                Err(e) => return Err(e),
            }
            self.pos = r.position();
            self.open.push(Open::Struct { last: 0 });
        }
        loop {
            let Some(top) = self.open.last_mut() else {
                let len = self.pos;
                self.reset();
                return Ok(Some(len));
            };
            let avail = &buf[self.pos.min(buf.len())..];
            let mut r = Reader::with_cap_of(
                self.proto,
                avail,
                limits.max_message.saturating_sub(self.pos),
            );
            // A field's id, kept once its value is walked (compact ids are deltas from the last one).
            let mut field_id = None;
            // The type of the next value, once whatever precedes it (a field header) is consumed.
            let next = match top {
                Open::Struct { last } => {
                    r.set_last_field(*last);
                    match r.field() {
                        Ok(None) => {
                            self.pos += r.position();
                            self.open.pop();
                            continue;
                        }
                        Ok(Some((id, t))) => {
                            field_id = Some(id);
                            t
                        }
                        Err(WireError::Truncated) => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
                Open::Seq { left: 0, .. } | Open::Map { left: 0, .. } => {
                    self.open.pop();
                    continue;
                }
                Open::Seq { elem, left } => {
                    if let Some(size) = fixed_size(self.proto, *elem) {
                        // Skip every whole element that has arrived in one step.
                        let n = (*left).min(avail.len() / size);
                        *left -= n;
                        self.pos += n * size;
                        if *left > 0 {
                            return Ok(None);
                        }
                        continue;
                    }
                    *elem
                }
                Open::Map { k, v, value, .. } => {
                    if *value {
                        *v
                    } else {
                        *k
                    }
                }
            };
            let depth = self.open.len();
            // A container too deep is refused before its header is read, as the one-pass walk does (so
            // that both stop at the same byte).
            let container = matches!(next, ttype::STRUCT | ttype::LIST | ttype::SET | ttype::MAP);
            if container && depth >= limits.max_depth {
                return Err(WireError::TooDeep(limits.max_depth));
            }
            let opened = match next {
                ttype::STRUCT => Some(Open::Struct { last: 0 }),
                ttype::LIST | ttype::SET => match r.list_header(limits) {
                    Ok((elem, left)) => Some(Open::Seq { elem, left }),
                    Err(WireError::Truncated) => return Ok(None),
                    Err(e) => return Err(e),
                },
                ttype::MAP => match r.map_header(limits) {
                    Ok((k, v, left)) => Some(Open::Map {
                        k,
                        v,
                        left,
                        value: false,
                    }),
                    Err(WireError::Truncated) => return Ok(None),
                    Err(e) => return Err(e),
                },
                t => match r.skip_value(t, limits) {
                    Ok(_) => None,
                    Err(WireError::Truncated) => return Ok(None),
                    Err(e) => return Err(e),
                },
            };
            // The value has begun (a container) or ended (a scalar): count it in its parent.
            match self.open.last_mut() {
                Some(Open::Seq { left, .. }) => *left -= 1,
                Some(Open::Map { left, value, .. }) => {
                    if *value {
                        *left -= 1;
                    }
                    *value = !*value;
                }
                Some(Open::Struct { last }) => {
                    if let Some(id) = field_id {
                        *last = id;
                    }
                }
                None => {}
            }
            self.pos += r.position();
            if let Some(o) = opened {
                if depth >= limits.max_depth {
                    return Err(WireError::TooDeep(limits.max_depth));
                }
                self.open.push(o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{mtype, skip, Encoder};

    fn message(proto: Protocol) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder::of(proto, &mut out);
        e.message_begin(b"m", mtype::CALL, 1);
        e.field_begin(ttype::STRUCT, 1);
        e.field_i64(1, 5);
        e.field_bytes(2, b"reason");
        e.stop();
        e.field_begin(ttype::LIST, 2);
        e.list_begin(ttype::STRING, 3);
        for s in [&b"a"[..], b"bb", b""] {
            e.bytes(s);
        }
        e.field_begin(ttype::LIST, 3);
        e.list_begin(ttype::I64, 3);
        for v in [1, 2, 3] {
            e.i64(v);
        }
        e.field_begin(ttype::MAP, 4);
        e.map_begin(ttype::STRING, ttype::LIST, 2);
        for k in [&b"k1"[..], b"k2"] {
            e.bytes(k);
            e.list_begin(ttype::I32, 1);
            e.i32(9);
        }
        e.field_begin(ttype::LIST, 5);
        e.list_begin(ttype::STRUCT, 0);
        e.field_bool(6, true);
        e.field_begin(ttype::MAP, 7);
        e.map_begin(ttype::I32, ttype::I32, 0);
        e.field_begin(ttype::LIST, 40);
        e.list_begin(ttype::BOOL, 20);
        for i in 0..20 {
            e.bool(i % 3 == 0);
        }
        e.field_bool(41, false);
        e.stop();
        out
    }

    #[test]
    fn finds_the_end_however_the_message_is_split() {
        for proto in [Protocol::Binary, Protocol::Compact] {
            finds_the_end(proto);
        }
    }

    fn finds_the_end(proto: Protocol) {
        let msg = message(proto);
        let limits = Limits::default();
        // the same length the recursive walk finds
        let mut r = Reader::of(proto, &msg);
        MessageHeader::read(&mut r).unwrap();
        skip(&mut r, ttype::STRUCT, &limits, 0).unwrap();
        assert_eq!(r.position(), msg.len());
        for step in 1..=msg.len() {
            let mut p = Progress::default();
            let mut got = None;
            let mut end = 0;
            while got.is_none() {
                end = (end + step).min(msg.len());
                got = p.walk(&msg[..end], &limits).unwrap();
                assert!(
                    got.is_some() || end < msg.len(),
                    "step {step}: whole message not found"
                );
            }
            assert_eq!(got, Some(msg.len()), "step {step}");
            assert!(!p.started());
        }
    }

    #[test]
    fn bounds_hold_while_resuming() {
        let limits = Limits {
            max_message: 1 << 20,
            max_depth: 8,
            max_container: 1000,
        };
        let mut deep = Vec::new();
        Encoder::new(&mut deep).message_begin(b"m", mtype::CALL, 1);
        for _ in 0..100 {
            deep.extend_from_slice(&[ttype::STRUCT, 0, 1]);
        }
        let mut p = Progress::default();
        assert_eq!(p.walk(&deep, &limits), Err(WireError::TooDeep(8)));

        let mut big = Vec::new();
        let mut e = Encoder::new(&mut big);
        e.message_begin(b"m", mtype::CALL, 1);
        e.field_begin(ttype::LIST, 1);
        e.list_begin(ttype::I64, 999);
        let mut p = Progress::default();
        assert_eq!(p.walk(&big, &limits), Ok(None));
        big.extend_from_slice(&[0; 8 * 10]);
        assert_eq!(p.walk(&big, &limits), Ok(None));

        let mut huge = Vec::new();
        let mut e = Encoder::new(&mut huge);
        e.message_begin(b"m", mtype::CALL, 1);
        e.field_begin(ttype::LIST, 1);
        e.list_begin(ttype::I64, 1000);
        let tight = Limits {
            max_message: 100,
            ..limits
        };
        let err = Progress::default().walk(&huge, &tight).unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }), "{err}");
    }
}
