//! Zero-copy views of a call's arguments.
//!
//! The argument struct is walked once; each argument with an id up to [`MAX_ARG_ID`] is kept as a [`Value`]
//! that borrows from the message (strings, nested structs and lists are slices), and the rest are skipped, as
//! Thrift requires of unknown fields. Servants then ask for arguments by id and type.

use super::binary::Reader;
use super::{ttype, Limits, Protocol, WireError};

/// The highest argument id kept; FunServant's widest method (`my_merge`) has eight.
pub const MAX_ARG_ID: usize = 8;

/// One argument, borrowed from the message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Bool(bool),
    Byte(i8),
    I16(i16),
    I32(i32),
    I64(i64),
    Double(f64),
    Bytes(&'a [u8]),
    /// A struct's encoded fields (up to and including its STOP).
    Struct(&'a [u8]),
    /// A list or set: element type, count, encoded elements.
    List(u8, usize, &'a [u8]),
    /// A map or any other type fae does not take as an argument.
    Other(u8),
}

impl Value<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Bool(_) => "bool",
            Value::Byte(_) => "byte",
            Value::I16(_) => "i16",
            Value::I32(_) => "i32",
            Value::I64(_) => "i64",
            Value::Double(_) => "double",
            Value::Bytes(_) => "string",
            Value::Struct(_) => "struct",
            Value::List(..) => "list",
            Value::Other(_) => "map",
        }
    }
}

/// A call's arguments by id.
#[derive(Debug, Clone)]
pub struct Args<'a> {
    vals: [Option<Value<'a>>; MAX_ARG_ID + 1],
    limits: Limits,
    /// The protocol the arguments came in: a struct's or list's bytes are read in it.
    proto: Protocol,
}

/// A missing or mistyped argument: the call is answered with a PROTOCOL_ERROR, the session stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("argument {id} ({name}) is missing")]
    Missing { id: i16, name: &'static str },
    #[error("argument {id} ({name}) should be {want}, got {got}")]
    Type {
        id: i16,
        name: &'static str,
        want: &'static str,
        got: &'static str,
    },
    #[error("malformed argument: {0}")]
    Wire(#[from] WireError),
}

macro_rules! accessor {
    ($fn:ident, $variant:ident, $ty:ty, $want:literal) => {
        pub fn $fn(&self, id: i16, name: &'static str) -> Result<$ty, ArgError> {
            match self.get(id, name)? {
                Value::$variant(v) => Ok(v),
                other => Err(ArgError::Type {
                    id,
                    name,
                    want: $want,
                    got: other.type_name(),
                }),
            }
        }
    };
}

impl<'a> Args<'a> {
    /// No arguments yet; [`Args::read_into`] fills them.
    pub fn new(limits: &Limits) -> Self {
        Args {
            vals: [None; MAX_ARG_ID + 1],
            limits: *limits,
            proto: Protocol::Binary,
        }
    }

    /// Reads the argument struct at the reader's position.
    pub fn read(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, WireError> {
        let mut args = Args::new(limits);
        args.read_into(r)?;
        Ok(args)
    }

    /// Reads the argument struct at the reader's position into `self` (cleared first).
    pub fn read_into(&mut self, r: &mut Reader<'a>) -> Result<(), WireError> {
        self.proto = r.protocol();
        let limits = &self.limits;
        let vals = &mut self.vals;
        *vals = [None; MAX_ARG_ID + 1];
        while let Some((id, t)) = r.field()? {
            let v = match t {
                ttype::BOOL => Value::Bool(r.bool()?),
                ttype::BYTE => Value::Byte(r.u8()? as i8),
                ttype::I16 => Value::I16(r.i16()?),
                ttype::I32 => Value::I32(r.i32()?),
                ttype::I64 => Value::I64(r.i64()?),
                ttype::DOUBLE => Value::Double(r.f64()?),
                ttype::STRING => Value::Bytes(r.bytes()?),
                // Depths as the message walk counts them (`scan`, the resumable walk): the argument
                // struct is level 1, so an argument's value is entered from 1.
                ttype::STRUCT => Value::Struct(r.skip_value_at(t, limits, 1)?),
                ttype::LIST | ttype::SET => {
                    let depth = super::binary::enter(1, limits)?;
                    let (elem, n) = r.list_header(limits)?;
                    let start = r.position();
                    let mut body = r.clone();
                    for _ in 0..n {
                        super::binary::skip(r, elem, limits, depth)?;
                    }
                    let len = r.position() - start;
                    Value::List(elem, n, body.take_slice(len)?)
                }
                other => {
                    r.skip_value_at(other, limits, 1)?;
                    Value::Other(other)
                }
            };
            if (1..=MAX_ARG_ID as i16).contains(&id) {
                vals[id as usize] = Some(v);
            }
        }
        Ok(())
    }

    fn get(&self, id: i16, name: &'static str) -> Result<Value<'a>, ArgError> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.vals.get(i).copied().flatten())
            .ok_or(ArgError::Missing { id, name })
    }

    /// Argument `id` as it came, whatever its type.
    pub fn get_value(&self, id: i16, name: &'static str) -> Result<Value<'a>, ArgError> {
        self.get(id, name)
    }

    /// The protocol the arguments came in.
    pub fn protocol(&self) -> Protocol {
        self.proto
    }

    /// A reader over a struct's or list's bytes taken from these arguments (in their protocol).
    pub fn reader(&self, bytes: &'a [u8]) -> Reader<'a> {
        Reader::of(self.proto, bytes)
    }

    /// Whether argument `id` was sent.
    pub fn has(&self, id: i16) -> bool {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.vals.get(i).copied().flatten())
            .is_some()
    }

    accessor!(bool, Bool, bool, "bool");
    accessor!(i16, I16, i16, "i16");
    accessor!(i32, I32, i32, "i32");
    accessor!(i64, I64, i64, "i64");
    accessor!(bytes, Bytes, &'a [u8], "string");
    accessor!(structure, Struct, &'a [u8], "struct");

    /// A `list<string>` argument.
    pub fn string_list(&self, id: i16, name: &'static str) -> Result<ListIter<'a>, ArgError> {
        match self.get(id, name)? {
            Value::List(ttype::STRING, n, body) => Ok(ListIter {
                r: Reader::of(self.proto, body),
                left: n,
            }),
            other => Err(ArgError::Type {
                id,
                name,
                want: "list<string>",
                got: other.type_name(),
            }),
        }
    }

    /// The `Context` in argument 1.
    pub fn context(&self) -> Result<Context<'a>, ArgError> {
        let body = self.structure(1, "ctx")?;
        Context::read(Reader::of(self.proto, body), &self.limits)
    }
}

impl<'a> Reader<'a> {
    fn take_slice(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.rest().get(..n).ok_or(WireError::Truncated)
    }
}

/// The strings of a `list<string>` argument, borrowed.
#[derive(Debug, Clone)]
pub struct ListIter<'a> {
    r: Reader<'a>,
    left: usize,
}

impl<'a> Iterator for ListIter<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The list was walked whole when the arguments were read, so its strings are all there.
        self.r.bytes().ok()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

/// The request context every call but `noop` and `id_decode` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context<'a> {
    pub rid: i64,
    pub reason: &'a [u8],
    pub uid: i64,
    pub sticky: bool,
}

impl<'a> Context<'a> {
    fn read(mut r: Reader<'a>, limits: &Limits) -> Result<Self, ArgError> {
        let (mut rid, mut reason, mut uid, mut sticky) = (None, None, None, false);
        while let Some((id, t)) = r.field()? {
            match (id, t) {
                (1, ttype::I64) => rid = Some(r.i64()?),
                (2, ttype::STRING) => reason = Some(r.bytes()?),
                (3, ttype::I64) => uid = Some(r.i64()?),
                (4, ttype::BOOL) => sticky = r.bool()?,
                _ => {
                    r.skip_value(t, limits)?;
                }
            }
        }
        let missing = |name| ArgError::Missing { id: 1, name };
        Ok(Context {
            rid: rid.ok_or(missing("ctx.rid"))?,
            reason: reason.ok_or(missing("ctx.reason"))?,
            uid: uid.ok_or(missing("ctx.uid"))?,
            sticky,
        })
    }
}
