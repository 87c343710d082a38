//! Thrift wire formats: the binary (strict) and compact protocols, message boundaries for the buffered,
//! framed and header (THeader, TTHeader) transports, zero-copy argument views and reply encoders.
//!
//! This module is the bedrock of fae: it imports nothing else of the crate, does no I/O and does not allocate
//! while it parses. Every length, nesting depth and element count taken from the network is checked against
//! [`Limits`] before it is used, so that a hostile peer can make fae neither allocate nor scan without bound.

mod args;
mod binary;
pub mod compact;
mod encode;
mod frame;
pub mod header;
mod resume;

pub use args::{ArgError, Args, Context, ListIter, Value, MAX_ARG_ID};
pub use binary::{skip, MessageHeader, Reader};
pub use encode::{AppErrorKind, Encoder, Reply};
pub use frame::{next_call, scan, Call, Dialect, Frame, Malformed, Transport};
pub use header::{HeaderKind, InfoHeaders};
pub use resume::Progress;

/// The protocol of one message, told by its first byte (0x80 binary, 0x82 compact) or by a header
/// transport's protocol id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Protocol {
    /// TBinaryProtocol, strict (the version word 0x8001....).
    #[default]
    Binary,
    /// TCompactProtocol.
    Compact,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Binary => "binary",
            Protocol::Compact => "compact",
        }
    }
}

/// Thrift type ids (the `TType` of every Apache Thrift library).
pub mod ttype {
    pub const STOP: u8 = 0;
    pub const BOOL: u8 = 2;
    pub const BYTE: u8 = 3;
    pub const DOUBLE: u8 = 4;
    pub const I16: u8 = 6;
    pub const I32: u8 = 8;
    pub const I64: u8 = 10;
    pub const STRING: u8 = 11;
    pub const STRUCT: u8 = 12;
    pub const MAP: u8 = 13;
    pub const SET: u8 = 14;
    pub const LIST: u8 = 15;
    pub const UUID: u8 = 16;
}

/// Thrift message types.
pub mod mtype {
    pub const CALL: u8 = 1;
    pub const REPLY: u8 = 2;
    pub const EXCEPTION: u8 = 3;
    pub const ONEWAY: u8 = 4;
}

/// The strict binary protocol's version word (high 16 bits of the first i32 of a message).
pub const VERSION_1: u32 = 0x8001_0000;
/// The mask that selects the version in the first word.
pub const VERSION_MASK: u32 = 0xffff_0000;

/// Bounds on what the network may ask of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (or frame body) in bytes.
    pub max_message: usize,
    /// Deepest nesting of structs and containers.
    pub max_depth: usize,
    /// Most elements in one container.
    pub max_container: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 16 << 20,
            max_depth: 64,
            max_container: 1 << 20,
        }
    }
}

/// A malformed message. The connection it came from cannot be trusted to stay in step afterwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// bad protocol version word {0:#010x}: expected a strict TBinaryProtocol message (0x8001....)
    #[error("bad protocol version word {0:#010x}: expected a strict TBinaryProtocol message (0x8001....)")]
    BadVersion(u32),
    /// bad compact protocol id and version
    #[error("bad compact protocol id and version {0:#06x}: expected 0x82 then version 1")]
    BadCompactVersion(u16),
    /// a varint longer than its type allows
    #[error("malformed varint: longer than {0} bytes")]
    BadVarint(u8),
    /// a header transport's frame that cannot be read
    #[error("malformed {} header: {why}", kind.name())]
    BadHeader { kind: HeaderKind, why: &'static str },
    /// a header transport's feature fae does not implement
    #[error(
        "{}: {what} is not supported (fae reads binary or compact payloads without transforms)",
        kind.name()
    )]
    Unsupported {
        kind: HeaderKind,
        what: &'static str,
    },
    /// negative length
    #[error("negative length {0}")]
    NegativeLength(i64),
    /// message longer than allowed
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    /// nesting too deep
    #[error("nesting deeper than {0} levels")]
    TooDeep(usize),
    /// container too large
    #[error("container of {n} elements exceeds the limit of {max}")]
    ContainerTooLarge { n: usize, max: usize },
    /// unknown field type
    #[error("unknown field type {0}")]
    BadType(u8),
    /// bad message type
    #[error("unknown message type {0}")]
    BadMessageType(u8),
    /// a value runs past the end of its message
    #[error("truncated message: a value runs past the end of the message")]
    Truncated,
    /// empty frame
    #[error("empty frame")]
    EmptyFrame,
}

#[cfg(test)]
mod size_tests {
    /// Every accessor of the decoder returns a `Result<_, WireError>`: the error stays three words, so that
    /// adding a variant does not slow every read (a 40-byte error made binary calls 15-50% slower).
    #[test]
    fn wire_error_stays_small() {
        assert!(std::mem::size_of::<super::WireError>() <= 24);
    }
}
