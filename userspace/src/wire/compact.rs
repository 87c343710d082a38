//! TCompactProtocol's constants and number encodings (Apache Thrift's `doc/specs/thrift-compact-protocol.md`).
//!
//! The compact protocol sends the same values as the binary one in fewer bytes: integers as zigzag varints,
//! field ids as deltas from the previous field packed with the type into one byte, a bool field's value in
//! its field header, short list sizes in the list header. Its type ids differ from the binary protocol's;
//! fae's decoder hands out binary type ids ([`super::ttype`]) whatever the protocol, so servants see one
//! type system.

use super::{ttype, WireError};

/// The first byte of every compact message.
pub const PROTOCOL_ID: u8 = 0x82;
/// The protocol version, in the low 5 bits of the second byte.
pub const VERSION: u8 = 1;
pub const VERSION_MASK: u8 = 0x1f;
/// The message type sits in the top 3 bits of the second byte.
pub const TYPE_SHIFT: u8 = 5;

/// Compact type ids. A bool field's type is its value: [`TRUE`] or [`FALSE`].
pub const TRUE: u8 = 1;
pub const FALSE: u8 = 2;
const BYTE: u8 = 3;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const DOUBLE: u8 = 7;
const BINARY: u8 = 8;
const LIST: u8 = 9;
const SET: u8 = 10;
const MAP: u8 = 11;
const STRUCT: u8 = 12;
const UUID: u8 = 13;

/// The binary type id of each compact type id 0-15 (STOP where there is none: 0 and 14-15).
pub const TTYPE: [u8; 16] = [
    ttype::STOP,
    ttype::BOOL,
    ttype::BOOL,
    ttype::BYTE,
    ttype::I16,
    ttype::I32,
    ttype::I64,
    ttype::DOUBLE,
    ttype::STRING,
    ttype::LIST,
    ttype::SET,
    ttype::MAP,
    ttype::STRUCT,
    ttype::UUID,
    ttype::STOP,
    ttype::STOP,
];

/// The binary type id of compact type `ct` (both bool ids give BOOL).
pub fn to_ttype(ct: u8) -> Result<u8, WireError> {
    Ok(match ct {
        TRUE | FALSE => ttype::BOOL,
        BYTE => ttype::BYTE,
        I16 => ttype::I16,
        I32 => ttype::I32,
        I64 => ttype::I64,
        DOUBLE => ttype::DOUBLE,
        BINARY => ttype::STRING,
        LIST => ttype::LIST,
        SET => ttype::SET,
        MAP => ttype::MAP,
        STRUCT => ttype::STRUCT,
        UUID => ttype::UUID,
        other => return Err(WireError::BadType(other)),
    })
}

/// The compact type id of binary type `t` (a bool element of a list is written as [`TRUE`]).
pub fn of_ttype(t: u8) -> u8 {
    match t {
        ttype::BOOL => TRUE,
        ttype::BYTE => BYTE,
        ttype::I16 => I16,
        ttype::I32 => I32,
        ttype::I64 => I64,
        ttype::DOUBLE => DOUBLE,
        ttype::STRING => BINARY,
        ttype::LIST => LIST,
        ttype::SET => SET,
        ttype::MAP => MAP,
        ttype::UUID => UUID,
        _ => STRUCT,
    }
}

pub fn zigzag32(v: i32) -> u32 {
    ((v << 1) ^ (v >> 31)) as u32
}

pub fn zigzag64(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub fn unzigzag32(v: u32) -> i32 {
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

pub fn unzigzag64(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v` as a varint (7 bits a byte, least significant first).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The bytes of `v` as a varint, and how many of them there are.
pub fn varint_bytes(mut v: u64) -> ([u8; 10], usize) {
    let mut b = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        b[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    b[n] = v as u8;
    (b, n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_round_trips_at_the_edges() {
        for v in [0, 1, -1, 63, -64, i32::MAX, i32::MIN] {
            assert_eq!(unzigzag32(zigzag32(v)), v);
        }
        for v in [0, 1, -1, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag64(zigzag64(v)), v);
        }
        assert_eq!(zigzag32(-1), 1);
        assert_eq!(zigzag32(1), 2);
    }

    #[test]
    fn type_table_matches_the_mapping() {
        for ct in 0..16u8 {
            match to_ttype(ct) {
                Ok(t) => assert_eq!(TTYPE[usize::from(ct)], t),
                Err(_) => assert_eq!(TTYPE[usize::from(ct)], ttype::STOP),
            }
        }
    }

    #[test]
    fn varints() {
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        let (b, n) = varint_bytes(u64::MAX);
        assert_eq!(n, 10);
        assert_eq!(b[9], 1);
    }
}
