//! Decoding of TBinaryProtocol and TCompactProtocol over a borrowed buffer.
//!
//! One [`Reader`] serves both protocols: each accessor reads the value in the reader's protocol (a branch
//! the CPU predicts, since a message never changes protocol half way). The compact protocol's state, the
//! last field id of the struct being read (field ids are sent as deltas) and a bool carried in its field
//! header, lives in the reader; entering a nested struct saves and restores it.

use super::compact;
use super::{mtype, ttype, Limits, Protocol, WireError, VERSION_1, VERSION_MASK};

/// A cursor over one message's bytes. Every accessor checks the remaining length first, so none panics;
/// borrowed values (`bytes`) point into the buffer and copy nothing.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The furthest position a well-formed message may reach: past it a value is too long, not merely
    /// not arrived yet.
    cap: usize,
    proto: Protocol,
    /// Compact: the id of the last field header read in the current struct.
    last_field: i16,
    /// Compact: a bool field's value, carried in its header (0: none, 1: true, 2: false).
    pending_bool: u8,
}

impl<'a> Reader<'a> {
    /// A reader over one whole binary-protocol message: running past its end is a truncated message.
    #[inline]
    pub fn new(buf: &'a [u8]) -> Self {
        Self::of(Protocol::Binary, buf)
    }

    /// A reader over one whole message (or a struct's or list's bytes) in `proto`.
    #[inline]
    pub fn of(proto: Protocol, buf: &'a [u8]) -> Self {
        Self::with_cap_of(proto, buf, buf.len())
    }

    /// A reader over the part of a binary message that has arrived so far; a message may grow to `cap`
    /// bytes.
    #[inline]
    pub fn with_cap(buf: &'a [u8], cap: usize) -> Self {
        Self::with_cap_of(Protocol::Binary, buf, cap)
    }

    /// As [`Reader::with_cap`], in `proto`.
    #[inline]
    pub fn with_cap_of(proto: Protocol, buf: &'a [u8], cap: usize) -> Self {
        Reader {
            buf,
            pos: 0,
            cap,
            proto,
            last_field: 0,
            pending_bool: 0,
        }
    }

    /// The protocol this reader decodes.
    #[inline]
    pub fn protocol(&self) -> Protocol {
        self.proto
    }

    /// Compact: the last field id read in the current struct (the resumable walk keeps it between reads).
    #[inline]
    pub(super) fn set_last_field(&mut self, id: i16) {
        self.last_field = id;
    }

    /// Bytes consumed so far.
    #[inline]
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The bytes not yet consumed.
    #[inline]
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Bytes not yet consumed.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.fits(n)?;
        if self.remaining() < n {
            return Err(WireError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Refuses a value of `n` bytes that could not fit in a message of at most `cap` bytes. In a whole
    /// message (`cap` is its length) that is a truncated message; in one still arriving, a value too long.
    #[inline(always)]
    fn fits(&self, n: usize) -> Result<(), WireError> {
        if n > self.cap.saturating_sub(self.pos) {
            if self.cap == self.buf.len() {
                return Err(WireError::Truncated);
            }
            return Err(WireError::TooLong {
                len: self.pos.saturating_add(n),
                max: self.cap,
            });
        }
        Ok(())
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    #[inline(always)]
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    // The binary protocol's path stays small enough to inline; the compact one is a call of its own (with
    // both inline, the accessors grew past what the compiler inlines and binary calls got 10-30% slower).
    #[inline(always)]
    pub fn i16(&mut self) -> Result<i16, WireError> {
        if self.proto == Protocol::Compact {
            // Kept as the compact libraries do: the low 16 bits of the zigzag i32.
            return Ok(self.zigzag32()? as i16);
        }
        Ok(i16::from_be_bytes(self.array()?))
    }
    #[inline(always)]
    pub fn i32(&mut self) -> Result<i32, WireError> {
        if self.proto == Protocol::Compact {
            return self.zigzag32();
        }
        Ok(i32::from_be_bytes(self.array()?))
    }
    #[inline(always)]
    pub fn i64(&mut self) -> Result<i64, WireError> {
        if self.proto == Protocol::Compact {
            return self.zigzag64();
        }
        Ok(i64::from_be_bytes(self.array()?))
    }
    #[inline]
    fn zigzag32(&mut self) -> Result<i32, WireError> {
        Ok(compact::unzigzag32(self.varint32()?))
    }
    #[inline]
    fn zigzag64(&mut self) -> Result<i64, WireError> {
        Ok(compact::unzigzag64(self.varint64()?))
    }
    #[inline]
    pub fn f64(&mut self) -> Result<f64, WireError> {
        match self.proto {
            Protocol::Binary => Ok(f64::from_bits(u64::from_be_bytes(self.array()?))),
            Protocol::Compact => Ok(f64::from_bits(u64::from_le_bytes(self.array()?))),
        }
    }
    #[inline(always)]
    pub fn bool(&mut self) -> Result<bool, WireError> {
        if self.proto == Protocol::Compact {
            return self.compact_bool();
        }
        Ok(self.u8()? != 0)
    }
    #[inline]
    fn compact_bool(&mut self) -> Result<bool, WireError> {
        if self.pending_bool != 0 {
            let v = self.pending_bool == compact::TRUE;
            self.pending_bool = 0;
            return Ok(v);
        }
        Ok(self.u8()? == compact::TRUE)
    }

    /// A varint of at most 5 bytes (a compact i32, length or count); a longer one is malformed.
    #[inline]
    fn varint32(&mut self) -> Result<u32, WireError> {
        Ok(self.varint(5)? as u32)
    }

    /// A varint of at most 10 bytes (a compact i64).
    #[inline]
    fn varint64(&mut self) -> Result<u64, WireError> {
        self.varint(10)
    }

    #[inline]
    fn varint(&mut self, max_bytes: u32) -> Result<u64, WireError> {
        // Most varints (lengths, small numbers, sequence ids) are one byte.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 && self.pos < self.cap {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        let max = max_bytes as usize;
        let rest = &self.buf[self.pos..];
        let mut v = 0u64;
        for (i, &b) in rest.iter().take(max).enumerate() {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.fits(i + 1)?;
                self.pos += i + 1;
                return Ok(v);
            }
        }
        if rest.len() < max {
            // Not all here: more may come (or the message is cut short, or would be too long).
            self.fits(rest.len() + 1)?;
            return Err(WireError::Truncated);
        }
        Err(WireError::BadVarint(max_bytes as u8))
    }

    /// A length or count as an i32 on the wire (compact: a varint); negative ones are malformed.
    #[inline(always)]
    fn length(&mut self) -> Result<usize, WireError> {
        let n = match self.proto {
            Protocol::Binary => i32::from_be_bytes(self.array()?),
            Protocol::Compact => self.varint32()? as i32,
        };
        if n < 0 {
            return Err(WireError::NegativeLength(n.into()));
        }
        Ok(n as usize)
    }

    /// A length-prefixed string or binary, borrowed.
    #[inline(always)]
    pub fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.length()?;
        self.take(n)
    }

    /// A container size; `min_elem` is the smallest encoding of one element, so that a count the remaining
    /// bytes cannot possibly hold is refused before anything is scanned.
    fn count(&mut self, min_elem: usize, limits: &Limits) -> Result<usize, WireError> {
        let n = self.length()?;
        self.check_count(n, min_elem, limits)
    }

    fn check_count(&self, n: usize, min_elem: usize, limits: &Limits) -> Result<usize, WireError> {
        if n > limits.max_container {
            return Err(WireError::ContainerTooLarge {
                n,
                max: limits.max_container,
            });
        }
        self.fits(n.saturating_mul(min_elem))?;
        Ok(n)
    }

    /// A field header: `None` at the struct's STOP. The type is a binary-protocol type id in either
    /// protocol.
    #[inline(always)]
    pub fn field(&mut self) -> Result<Option<(i16, u8)>, WireError> {
        if self.proto == Protocol::Compact {
            // The common compact header inline: a field id delta of 1-15 and a type that is not a bool.
            if let Some(&b) = self.buf.get(self.pos) {
                let t = compact::TTYPE[usize::from(b & 0x0f)];
                if b >> 4 != 0 && t != ttype::STOP && t != ttype::BOOL && self.pos < self.cap {
                    self.pos += 1;
                    self.last_field = self.last_field.wrapping_add(i16::from(b >> 4));
                    return Ok(Some((self.last_field, t)));
                }
            }
            return self.compact_field();
        }
        let t = self.u8()?;
        if t == ttype::STOP {
            return Ok(None);
        }
        Ok(Some((i16::from_be_bytes(self.array()?), t)))
    }

    #[inline]
    fn compact_field(&mut self) -> Result<Option<(i16, u8)>, WireError> {
        let t = self.u8()?;
        if t == ttype::STOP {
            return Ok(None);
        }
        let delta = t >> 4;
        let id = if delta == 0 {
            self.i16()?
        } else {
            self.last_field.wrapping_add(i16::from(delta))
        };
        self.last_field = id;
        let ct = t & 0x0f;
        if ct == compact::TRUE || ct == compact::FALSE {
            self.pending_bool = ct;
        }
        Ok(Some((id, compact::to_ttype(ct)?)))
    }

    /// A list or set header: element type and count.
    pub fn list_header(&mut self, limits: &Limits) -> Result<(u8, usize), WireError> {
        if self.proto == Protocol::Binary {
            let elem = self.u8()?;
            let n = self.count(min_size(self.proto, elem)?, limits)?;
            return Ok((elem, n));
        }
        let b = self.u8()?;
        let elem = compact::to_ttype(b & 0x0f)?;
        let n = match b >> 4 {
            15 => self.length()?,
            short => usize::from(short),
        };
        let n = self.check_count(n, min_size(self.proto, elem)?, limits)?;
        Ok((elem, n))
    }

    /// A map header: key type, value type and count. An empty compact map carries no types: both are
    /// given as STOP.
    pub fn map_header(&mut self, limits: &Limits) -> Result<(u8, u8, usize), WireError> {
        if self.proto == Protocol::Binary {
            let k = self.u8()?;
            let v = self.u8()?;
            let n = self.count(min_size(self.proto, k)? + min_size(self.proto, v)?, limits)?;
            return Ok((k, v, n));
        }
        let n = self.length()?;
        if n == 0 {
            return Ok((ttype::STOP, ttype::STOP, 0));
        }
        let b = self.u8()?;
        let (k, v) = (compact::to_ttype(b >> 4)?, compact::to_ttype(b & 0x0f)?);
        let n = self.check_count(
            n,
            min_size(self.proto, k)? + min_size(self.proto, v)?,
            limits,
        )?;
        Ok((k, v, n))
    }

    /// Skips one value of type `t`, returning the bytes it occupied.
    pub fn skip_value(&mut self, t: u8, limits: &Limits) -> Result<&'a [u8], WireError> {
        self.skip_value_at(t, limits, 0)
    }

    /// As [`Reader::skip_value`], for a value inside `depth` containers (counted as the message walk
    /// counts them, so that a message is as deep however it is read).
    pub fn skip_value_at(
        &mut self,
        t: u8,
        limits: &Limits,
        depth: usize,
    ) -> Result<&'a [u8], WireError> {
        let start = self.pos;
        skip(self, t, limits, depth)?;
        Ok(&self.buf[start..self.pos])
    }
}

/// The smallest encoding of one value of type `t`; an unknown type is malformed.
fn min_size(proto: Protocol, t: u8) -> Result<usize, WireError> {
    Ok(match (proto, t) {
        (_, ttype::BOOL | ttype::BYTE | ttype::STRUCT) => 1,
        (_, ttype::DOUBLE) => 8,
        (_, ttype::UUID) => 16,
        // Compact: a varint, a length or a container header of one byte at least.
        (
            Protocol::Compact,
            ttype::I16
            | ttype::I32
            | ttype::I64
            | ttype::STRING
            | ttype::SET
            | ttype::LIST
            | ttype::MAP,
        ) => 1,
        (_, ttype::I16) => 2,
        (_, ttype::I32 | ttype::STRING | ttype::SET | ttype::LIST) => 4,
        (_, ttype::MAP) => 6,
        (_, ttype::I64) => 8,
        (_, other) => return Err(WireError::BadType(other)),
    })
}

/// Skips one value of type `t` at nesting `depth`, checking every bound on the way.
pub fn skip(r: &mut Reader<'_>, t: u8, limits: &Limits, depth: usize) -> Result<(), WireError> {
    match t {
        ttype::BOOL => {
            r.bool()?;
        }
        ttype::BYTE => {
            r.take(1)?;
        }
        ttype::I16 => {
            r.i16()?;
        }
        ttype::I32 => {
            r.i32()?;
        }
        ttype::I64 => {
            r.i64()?;
        }
        ttype::DOUBLE => {
            r.take(8)?;
        }
        ttype::UUID => {
            r.take(16)?;
        }
        ttype::STRING => {
            r.bytes()?;
        }
        ttype::STRUCT => {
            let depth = enter(depth, limits)?;
            // A nested struct counts its field ids from 0 (compact); the outer count resumes after it.
            let outer = std::mem::replace(&mut r.last_field, 0);
            while let Some((_, ft)) = r.field()? {
                skip(r, ft, limits, depth)?;
            }
            r.last_field = outer;
        }
        ttype::LIST | ttype::SET => {
            let depth = enter(depth, limits)?;
            let (elem, n) = r.list_header(limits)?;
            skip_n(r, elem, n, limits, depth)?;
        }
        ttype::MAP => {
            let depth = enter(depth, limits)?;
            let (k, v, n) = r.map_header(limits)?;
            for _ in 0..n {
                skip(r, k, limits, depth)?;
                skip(r, v, limits, depth)?;
            }
        }
        other => return Err(WireError::BadType(other)),
    }
    Ok(())
}

/// The encoded size of an element of type `t` in a list, if every value of that type has the same size.
pub(super) fn fixed_size(proto: Protocol, t: u8) -> Option<usize> {
    match (proto, t) {
        (_, ttype::BOOL | ttype::BYTE) => Some(1),
        (_, ttype::DOUBLE) => Some(8),
        (_, ttype::UUID) => Some(16),
        (Protocol::Binary, ttype::I16) => Some(2),
        (Protocol::Binary, ttype::I32) => Some(4),
        (Protocol::Binary, ttype::I64) => Some(8),
        _ => None,
    }
}

fn skip_n(
    r: &mut Reader<'_>,
    elem: u8,
    n: usize,
    limits: &Limits,
    depth: usize,
) -> Result<(), WireError> {
    // Fixed-size elements are skipped in one step rather than one by one.
    match fixed_size(r.proto, elem) {
        Some(size) => {
            r.take(size * n)?;
        }
        None => {
            for _ in 0..n {
                skip(r, elem, limits, depth)?;
            }
        }
    }
    Ok(())
}

pub(super) fn enter(depth: usize, limits: &Limits) -> Result<usize, WireError> {
    if depth >= limits.max_depth {
        return Err(WireError::TooDeep(limits.max_depth));
    }
    Ok(depth + 1)
}

/// The header of a strict binary or compact message and the position of its body (the argument or result
/// struct).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader<'a> {
    pub name: &'a [u8],
    pub mtype: u8,
    pub seqid: i32,
}

impl<'a> MessageHeader<'a> {
    /// Reads the header in the reader's protocol; the reader is left at the start of the body.
    pub fn read(r: &mut Reader<'a>) -> Result<Self, WireError> {
        if r.proto == Protocol::Compact {
            return Self::read_compact(r);
        }
        let word = r.i32()? as u32;
        if word & VERSION_MASK != VERSION_1 {
            return Err(WireError::BadVersion(word));
        }
        let mtype = (word & 0xff) as u8;
        if !(mtype::CALL..=mtype::ONEWAY).contains(&mtype) {
            return Err(WireError::BadMessageType(mtype));
        }
        let name = r.bytes()?;
        let seqid = r.i32()?;
        Ok(MessageHeader { name, mtype, seqid })
    }

    /// Compact: protocol id 0x82, version and type in one byte, the sequence id (a plain varint, not
    /// zigzag), then the name.
    fn read_compact(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let id = r.u8()?;
        let vt = r.u8()?;
        if id != compact::PROTOCOL_ID || vt & compact::VERSION_MASK != compact::VERSION {
            return Err(WireError::BadCompactVersion(u16::from_be_bytes([id, vt])));
        }
        let mtype = vt >> compact::TYPE_SHIFT;
        if !(mtype::CALL..=mtype::ONEWAY).contains(&mtype) {
            return Err(WireError::BadMessageType(mtype));
        }
        let seqid = r.varint32()? as i32;
        let name = r.bytes()?;
        Ok(MessageHeader { name, mtype, seqid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_list_count_is_refused_before_scanning() {
        // list<i64> claiming 2^30 elements with no data behind it
        let mut b = vec![ttype::I64];
        b.extend_from_slice(&(1i32 << 30).to_be_bytes());
        let mut r = Reader::new(&b);
        let err = r.list_header(&Limits::default()).unwrap_err();
        assert!(matches!(err, WireError::ContainerTooLarge { .. }), "{err}");
        let small = Limits {
            max_container: usize::MAX,
            ..Limits::default()
        };
        // in a whole message: truncated; in one still arriving, more than a message may hold
        assert_eq!(
            Reader::new(&b).list_header(&small).unwrap_err(),
            WireError::Truncated
        );
        let err = Reader::with_cap(&b, 1 << 20)
            .list_header(&small)
            .unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }), "{err}");
    }

    #[test]
    fn deep_nesting_is_bounded() {
        // struct { 1: struct { 1: struct { ... } } } 10,000 deep
        let mut b = Vec::new();
        for _ in 0..10_000 {
            b.push(ttype::STRUCT);
            b.extend_from_slice(&1i16.to_be_bytes());
        }
        let mut r = Reader::new(&b);
        let err = skip(&mut r, ttype::STRUCT, &Limits::default(), 0).unwrap_err();
        assert_eq!(err, WireError::TooDeep(64));
    }

    #[test]
    fn negative_and_overlong_strings() {
        let b = (-5i32).to_be_bytes();
        assert_eq!(
            Reader::new(&b).bytes().unwrap_err(),
            WireError::NegativeLength(-5)
        );
        let mut b = 10i32.to_be_bytes().to_vec();
        b.extend_from_slice(b"short");
        assert_eq!(Reader::new(&b).bytes().unwrap_err(), WireError::Truncated);
        // the same string in a message still arriving: wait for more, unless it cannot fit
        assert_eq!(
            Reader::with_cap(&b, 1000).bytes().unwrap_err(),
            WireError::Truncated
        );
        let err = Reader::with_cap(&b, 12).bytes().unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }), "{err}");
    }

    #[test]
    fn header_rejects_bad_version() {
        let b = 0x8002_0001u32.to_be_bytes();
        let err = MessageHeader::read(&mut Reader::new(&b)).unwrap_err();
        assert_eq!(err, WireError::BadVersion(0x8002_0001));
    }
}
