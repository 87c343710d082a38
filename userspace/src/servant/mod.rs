//! The FunServant API, one module per group. Servants know `wire` argument views and reply encoders, never
//! sockets; the engine reaches them through [`Servants::call`], the one dispatch table.

pub mod idgen;
pub mod lcache;
pub mod lock;
pub mod memcache;
pub mod misc;
pub mod mysql;
pub mod redis;
pub mod registry;

use std::time::Instant;

use crate::backend::{BackendError, BackendStartError, Backends, Expect, Job, Response, Ticket};
use crate::config::Config;
use crate::wire::{AppErrorKind, ArgError, Args, Context, Reply};

macro_rules! methods {
    ($($variant:ident = $name:literal,)*) => {
        /// Every method of `idl/fae.thrift`, in the order of API.md.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Method { $($variant,)* }

        impl Method {
            /// All methods, indexed by `Method as usize`.
            pub const ALL: &'static [Method] = &[$(Method::$variant,)*];

            pub fn name(self) -> &'static str {
                match self { $(Method::$variant => $name,)* }
            }

            pub fn from_name(name: &[u8]) -> Option<Method> {
                match name { $(n if n == $name.as_bytes() => Some(Method::$variant),)* _ => None }
            }
        }
    };
}

methods! {
    Noop = "noop",
    Ping = "ping",
    IdNext = "id_next",
    IdNextWithTag = "id_next_with_tag",
    IdDecode = "id_decode",
    LcSet = "lc_set",
    LcGet = "lc_get",
    LcDel = "lc_del",
    Lock = "lock",
    Unlock = "unlock",
    McSet = "mc_set",
    McGet = "mc_get",
    McAdd = "mc_add",
    McDelete = "mc_delete",
    McIncrement = "mc_increment",
    RdCall = "rd_call",
    MyQuery = "my_query",
    MyBulkExec = "my_bulk_exec",
    MyQueryShards = "my_query_shards",
    MyMerge = "my_merge",
    MyEvict = "my_evict",
    ZkCreate = "zk_create",
    ZkChildren = "zk_children",
    ZkDel = "zk_del",
}

/// Why a call got no result: answered as a `TApplicationException`, the session stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub kind: AppErrorKind,
    pub message: String,
}

impl CallError {
    pub fn new(kind: AppErrorKind, message: impl Into<String>) -> Self {
        CallError {
            kind,
            message: message.into(),
        }
    }
    /// A request the servant refuses (bad argument value, limit reached). INTERNAL_ERROR is what FAE, a Go
    /// server, sent for every error a handler returned, so existing clients expect that kind.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(AppErrorKind::InternalError, message)
    }
}

impl From<ArgError> for CallError {
    fn from(e: ArgError) -> Self {
        CallError::new(AppErrorKind::ProtocolError, e.to_string())
    }
}

/// Picks a shard for a key with FNV-1a, cheaper than SipHash on short keys (SipHash showed in the profile of
/// `benches/dispatch.rs`). Keys come from clients, but a skewed key set costs only balance between shards.
pub(crate) fn shard_of(key: &[u8], shards: usize) -> usize {
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    ((h ^ (h >> 32)) as usize) % shards
}

/// Every call but `noop` and `id_decode` must say who asks and why (API.md).
fn checked_context<'a>(args: &Args<'a>) -> Result<Context<'a>, CallError> {
    let ctx = args.context()?;
    if ctx.rid == 0 {
        return Err(CallError::refused("invalid context: rid must be non-zero"));
    }
    if ctx.reason.is_empty() {
        return Err(CallError::refused(
            "invalid context: reason must not be empty",
        ));
    }
    Ok(ctx)
}

/// What the engine tells a servant about the call it runs.
pub struct CallEnv {
    /// Where a deferred answer goes.
    pub ticket: Ticket,
    /// When the call started running.
    pub now: Instant,
    /// `server.call_timeout_ms` after its message arrived.
    pub deadline: Instant,
}

/// How a call left the servant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its result is in the reply.
    Answered,
    /// It went to a back end; [`Servants::finish`] writes its result when the answer comes back.
    Deferred,
}

/// Hands a call placed on `server` to the back end, if the server's breaker lets it through.
fn submit(
    b: &Backends,
    server: usize,
    request: Vec<u8>,
    expect: Expect,
    env: &CallEnv,
) -> Result<Outcome, CallError> {
    let s = &b.servers[server];
    let permit = s
        .breaker
        .admit(env.now)
        .map_err(|r| CallError::refused(s.refused(&r)))?;
    let session = env.ticket.session;
    b.submit(Job {
        server,
        affinity: u64::from(session.lp) << 48 ^ session.generation,
        request,
        expect,
        ticket: env.ticket,
        submitted: env.now,
        deadline: env.deadline,
        permit,
        reply: None,
    });
    Ok(Outcome::Deferred)
}

/// All servants of one node, shared by every event loop.
pub struct Servants {
    pub misc: misc::Misc,
    pub idgen: idgen::IdGen,
    pub lcache: lcache::LCache,
    pub lock: lock::Locks,
    pub registry: registry::Registry,
    /// The back ends in service; a reload puts new ones in place (calls out finish on the old ones).
    backends: arc_swap::ArcSwap<Backends>,
}

impl Servants {
    /// The node's servants; starts the back-end I/O threads when pools are configured.
    pub fn new(cfg: &Config) -> Result<Self, BackendStartError> {
        Ok(Servants {
            misc: misc::Misc::new(cfg.node.id),
            idgen: idgen::IdGen::new(&cfg.idgen),
            lcache: lcache::LCache::new(&cfg.lcache),
            lock: lock::Locks::new(&cfg.lock),
            registry: registry::Registry::new(&cfg.registry),
            backends: arc_swap::ArcSwap::new(Backends::start(cfg)?),
        })
    }

    /// The back ends in service.
    pub fn backends(&self) -> std::sync::Arc<Backends> {
        self.backends.load_full()
    }

    /// Puts `next` in service; returns the back ends it replaces (still finishing their calls).
    pub fn replace_backends(&self, next: std::sync::Arc<Backends>) -> std::sync::Arc<Backends> {
        self.backends.swap(next)
    }

    /// Runs one call: writes its result struct's fields into `reply`, or hands it to a back end.
    pub fn call(
        &self,
        method: Method,
        args: &Args<'_>,
        reply: &mut Reply<'_>,
        env: &CallEnv,
    ) -> Result<Outcome, CallError> {
        use Method::*;
        let out = reply.enc();
        match method {
            Noop => out.field_i32(0, args.i32(1, "x")?),
            IdDecode => {
                // API.md: id_decode takes a Context but does not require a valid one.
                idgen::decode(args.i64(2, "id")?, out);
            }
            _ => {
                let _ctx = checked_context(args)?;
                match method {
                    Ping => self.misc.ping(out),
                    IdNext => out.field_i64(0, self.idgen.next(0)?),
                    IdNextWithTag => {
                        out.field_i64(0, self.idgen.next_with_tag(args.i16(2, "tag")?)?)
                    }
                    LcSet => out.field_bool(
                        0,
                        self.lcache
                            .set(args.bytes(2, "key")?, args.bytes(3, "value")?),
                    ),
                    LcGet => self.lcache.get(args.bytes(2, "key")?, out),
                    LcDel => self.lcache.del(args.bytes(2, "key")?),
                    Lock => out.field_bool(0, self.lock.lock(args.bytes(3, "key")?)),
                    Unlock => self.lock.unlock(args.bytes(3, "key")?),
                    ZkCreate => {
                        let created = self
                            .registry
                            .create(args.bytes(2, "path")?, args.bytes(3, "data")?)?;
                        out.field_bool(0, created)
                    }
                    ZkChildren => self.registry.children(args.bytes(2, "path")?, out)?,
                    ZkDel => out.field_bool(0, self.registry.delete(args.bytes(2, "path")?)?),
                    McSet | McGet | McAdd | McDelete | McIncrement => {
                        return memcache::call(&self.backends.load(), method, args, env)
                    }
                    RdCall => return redis::call(&self.backends.load(), args, env),
                    MyQuery | MyBulkExec | MyQueryShards | MyMerge | MyEvict => {
                        return mysql::call(&self.backends.load(), method, args, out, env)
                    }
                    Noop | IdDecode => unreachable!("handled above"),
                }
            }
        }
        Ok(Outcome::Answered)
    }

    /// Writes the result of a deferred call whose back end answered (or failed).
    pub fn finish(
        &self,
        method: Method,
        result: Result<Response, BackendError>,
        reply: &mut Reply<'_>,
    ) -> Result<(), CallError> {
        let out = reply.enc();
        match method {
            Method::RdCall => redis::finish(result, out),
            Method::MyQuery
            | Method::MyBulkExec
            | Method::MyQueryShards
            | Method::MyMerge
            | Method::MyEvict => mysql::finish(method, result, out),
            _ => memcache::finish(method, result, out),
        }
    }
}
