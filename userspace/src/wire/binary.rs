//! TBinaryProtocol decoding over a borrowed buffer.

use super::{mtype, ttype, Limits, WireError, VERSION_1, VERSION_MASK};

/// A cursor over one message's bytes. Every accessor checks the remaining length first, so none panics;
/// borrowed values (`bytes`) point into the buffer and copy nothing.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The furthest position a well-formed message may reach: past it a value is too long, not merely
    /// not arrived yet.
    cap: usize,
}

impl<'a> Reader<'a> {
    /// A reader over one whole message: running past its end is a truncated message.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            cap: buf.len(),
        }
    }

    /// A reader over the part of a message that has arrived so far; a message may grow to `cap` bytes.
    pub fn with_cap(buf: &'a [u8], cap: usize) -> Self {
        Reader { buf, pos: 0, cap }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The bytes not yet consumed.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

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

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn i16(&mut self) -> Result<i16, WireError> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    pub fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    pub fn f64(&mut self) -> Result<f64, WireError> {
        Ok(f64::from_bits(u64::from_be_bytes(self.array()?)))
    }
    pub fn bool(&mut self) -> Result<bool, WireError> {
        Ok(self.u8()? != 0)
    }

    /// A length-prefixed string or binary, borrowed.
    pub fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.i32()?;
        if n < 0 {
            return Err(WireError::NegativeLength(n.into()));
        }
        self.take(n as usize)
    }

    /// A container size; `min_elem` is the smallest encoding of one element, so that a count the remaining
    /// bytes cannot possibly hold is refused before anything is scanned.
    fn count(&mut self, min_elem: usize, limits: &Limits) -> Result<usize, WireError> {
        let n = self.i32()?;
        if n < 0 {
            return Err(WireError::NegativeLength(n.into()));
        }
        let n = n as usize;
        if n > limits.max_container {
            return Err(WireError::ContainerTooLarge {
                n,
                max: limits.max_container,
            });
        }
        self.fits(n.saturating_mul(min_elem))?;
        Ok(n)
    }

    /// A field header: `None` at the struct's STOP.
    pub fn field(&mut self) -> Result<Option<(i16, u8)>, WireError> {
        let t = self.u8()?;
        if t == ttype::STOP {
            return Ok(None);
        }
        Ok(Some((self.i16()?, t)))
    }

    /// A list or set header: element type and count.
    pub fn list_header(&mut self, limits: &Limits) -> Result<(u8, usize), WireError> {
        let elem = self.u8()?;
        let n = self.count(min_size(elem)?, limits)?;
        Ok((elem, n))
    }

    /// A map header: key type, value type and count.
    pub fn map_header(&mut self, limits: &Limits) -> Result<(u8, u8, usize), WireError> {
        let k = self.u8()?;
        let v = self.u8()?;
        let n = self.count(min_size(k)? + min_size(v)?, limits)?;
        Ok((k, v, n))
    }

    /// Skips one value of type `t`, returning the bytes it occupied.
    pub fn skip_value(&mut self, t: u8, limits: &Limits) -> Result<&'a [u8], WireError> {
        let start = self.pos;
        skip(self, t, limits, 0)?;
        Ok(&self.buf[start..self.pos])
    }
}

/// The smallest encoding of one value of type `t`; an unknown type is malformed.
fn min_size(t: u8) -> Result<usize, WireError> {
    Ok(match t {
        ttype::BOOL | ttype::BYTE | ttype::STRUCT => 1,
        ttype::I16 => 2,
        ttype::I32 | ttype::STRING | ttype::SET | ttype::LIST => 4,
        ttype::MAP => 6,
        ttype::DOUBLE | ttype::I64 => 8,
        ttype::UUID => 16,
        other => return Err(WireError::BadType(other)),
    })
}

/// Skips one value of type `t` at nesting `depth`, checking every bound on the way.
pub fn skip(r: &mut Reader<'_>, t: u8, limits: &Limits, depth: usize) -> Result<(), WireError> {
    match t {
        ttype::BOOL | ttype::BYTE => {
            r.take(1)?;
        }
        ttype::I16 => {
            r.take(2)?;
        }
        ttype::I32 => {
            r.take(4)?;
        }
        ttype::I64 | ttype::DOUBLE => {
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
            while let Some((_, ft)) = r.field()? {
                skip(r, ft, limits, depth)?;
            }
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

/// The encoded size of a value of type `t`, if every value of that type has the same size.
pub(super) fn fixed_size(t: u8) -> Option<usize> {
    match t {
        ttype::BOOL | ttype::BYTE => Some(1),
        ttype::I16 => Some(2),
        ttype::I32 => Some(4),
        ttype::I64 | ttype::DOUBLE => Some(8),
        ttype::UUID => Some(16),
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
    match fixed_size(elem) {
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

fn enter(depth: usize, limits: &Limits) -> Result<usize, WireError> {
    if depth >= limits.max_depth {
        return Err(WireError::TooDeep(limits.max_depth));
    }
    Ok(depth + 1)
}

/// The header of a strict binary message and the position of its body (the argument or result struct).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader<'a> {
    pub name: &'a [u8],
    pub mtype: u8,
    pub seqid: i32,
}

impl<'a> MessageHeader<'a> {
    /// Reads the header; the reader is left at the start of the body.
    pub fn read(r: &mut Reader<'a>) -> Result<Self, WireError> {
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
