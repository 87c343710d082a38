//! Back ends: pooled, pipelined connections to memcached and Redis servers, guarded by a circuit breaker per
//! server, run off the event loops.
//!
//! A call that waits on a store leaves its event loop as a [`Job`]: the servant has validated it, placed its
//! key on a server ([`Pool::pick`]), asked that server's [`Breaker`] and encoded the request in the store's
//! protocol. The job goes over a crossbeam channel to the I/O thread that owns the server (`backend.threads`
//! of them, each a mio loop), which writes it on one of the server's at most `max_conns` connections,
//! behind the calls already in flight there (pipelining: the stores answer in order), reads the answer and
//! hands it back through a [`Sink`], which wakes the loop that owns the session. The calls of one session
//! go to one connection of a server, so they reach the store in the order the client sent them.
//!
//! This module knows no Thrift: it takes bytes in the stores' protocols and gives back their answers.

pub mod breaker;
pub mod memcache;
pub mod mysql;
mod pool;
pub mod redis;
pub mod ring;

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::config::{Config, McHash, PoolSettings};
use crate::engine::metrics::{bucket, BUCKETS};
pub use breaker::Breaker;
use ring::Ring;

/// A session, across loops: which loop, which slot, which generation of that slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SessionId {
    pub lp: u32,
    pub slot: u64,
    pub generation: u64,
}

/// Where a deferred call's answer goes: its session, and its place among the session's deferred calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ticket {
    pub session: SessionId,
    pub tag: u64,
}

/// A store sent bytes that are not an answer of its protocol, or an answer larger than fae takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProtoError {
    pub message: String,
    /// The answer is well-formed but over the size limit: the server is not at fault.
    pub oversized: bool,
}

impl ProtoError {
    pub fn garbage(message: impl Into<String>) -> Self {
        ProtoError {
            message: message.into(),
            oversized: false,
        }
    }
    pub fn oversized(message: impl Into<String>) -> Self {
        ProtoError {
            message: message.into(),
            oversized: true,
        }
    }
}

/// The stores fae speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Memcache,
    Redis,
    Mysql,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Memcache => "memcache",
            Protocol::Redis => "redis",
            Protocol::Mysql => "mysql",
        }
    }
}

/// What answer a request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Memcache(memcache::Expect),
    Redis,
}

/// A store's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Memcache(memcache::Answer),
    Redis(redis::Value),
    Mysql(mysql::MyAnswer),
}

/// Why a call got no answer from its server. Connect, timeout, broken and protocol failures are the
/// server's, counted by its breaker (unless fae itself was at fault: a call that waited past its deadline
/// before it was sent, a call on a connection closed for another call's oversized answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Timeout,
    Broken,
    Protocol,
    /// Too many calls already queued for the server (`max_queue`).
    Overloaded,
    /// The answer was larger than `server.max_message_bytes`.
    TooLarge,
}

impl FailureKind {
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Connect,
        FailureKind::Timeout,
        FailureKind::Broken,
        FailureKind::Protocol,
        FailureKind::Overloaded,
        FailureKind::TooLarge,
    ];
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Broken => "broken",
            FailureKind::Protocol => "protocol",
            FailureKind::Overloaded => "overloaded",
            FailureKind::TooLarge => "too_large",
        }
    }
}

/// A call that got no answer: what went wrong, on which server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} server {server} (pool {pool}): {message}", protocol.name())]
pub struct BackendError {
    pub kind: FailureKind,
    pub protocol: Protocol,
    pub server: Arc<str>,
    pub pool: Arc<str>,
    pub message: String,
}

/// A call handed to a back-end I/O thread.
pub struct Job {
    /// Index of the server in [`Backends::servers`].
    pub server: usize,
    /// Picks the connection: one session's calls share one, so they stay in order.
    pub affinity: u64,
    /// The request, encoded in the server's protocol.
    pub request: Vec<u8>,
    pub expect: Expect,
    pub ticket: Ticket,
    pub submitted: Instant,
    /// `server.call_timeout_ms` after the call's message arrived: queueing and the store's time together.
    pub deadline: Instant,
    pub permit: breaker::Permit,
    /// Where the answer goes when not to a session's loop (a MySQL worker waiting on the result cache).
    pub reply: Option<Sender<Done>>,
}

/// A deferred call's outcome, on its way back to the loop that owns the session.
pub struct Done {
    pub ticket: Ticket,
    pub submitted: Instant,
    pub result: Result<Response, BackendError>,
}

/// Takes answers back to the event loops (the engine implements it).
pub trait Sink: Send + Sync {
    fn deliver(&self, done: Done);
}

/// Wakes a thread that sleeps in `mio::Poll`, with a system call only when it really sleeps: a busy thread
/// finds new work when it next looks, so under load waking costs an atomic load, not a write to an eventfd.
pub struct Doorbell {
    sleeping: AtomicBool,
    waker: mio::Waker,
}

impl Doorbell {
    pub fn new(waker: mio::Waker) -> Doorbell {
        Doorbell {
            sleeping: AtomicBool::new(false),
            waker,
        }
    }

    /// After work was queued for the thread.
    pub fn ring(&self) {
        // Pairs with the fence in `sleep`: either the sleeper sees the work, or this sees it sleeping.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }

    /// Before the thread sleeps: false if work arrived meanwhile (`pending` says whether any is queued), so
    /// that it must not sleep.
    pub fn sleep(&self, pending: impl Fn() -> bool) -> bool {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if pending() {
            self.sleeping.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Wakes the thread whether or not it sleeps (to stop it).
    pub fn wake_now(&self) {
        let _ = self.waker.wake();
    }

    /// After the thread woke up.
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }
}

/// One back-end server's counters, written by its I/O thread (and by the loops for refusals).
pub struct ServerMetrics {
    pub calls: AtomicU64,
    /// Failures by [`FailureKind`].
    pub failures: [AtomicU64; 6],
    /// Answers that were application errors (NOT_STORED aside: ERROR, CLIENT_ERROR, a Redis error).
    pub app_errors: AtomicU64,
    /// Calls refused at once because the breaker was open.
    pub rejected_open: AtomicU64,
    pub latency: Box<[AtomicU64]>,
    pub latency_sum_ns: AtomicU64,
    pub conns_open: AtomicU64,
    pub conns_busy: AtomicU64,
    pub connects: AtomicU64,
    pub queued: AtomicU64,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            calls: AtomicU64::new(0),
            failures: Default::default(),
            app_errors: AtomicU64::new(0),
            rejected_open: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            latency_sum_ns: AtomicU64::new(0),
            conns_open: AtomicU64::new(0),
            conns_busy: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        }
    }
}

impl ServerMetrics {
    pub(crate) fn latency(&self, d: Duration) {
        let ns = d.as_nanos() as u64;
        self.latency[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// A back-end server, shared by its I/O thread, the servants that place keys on it and the admin endpoint.
pub struct Server {
    pub protocol: Protocol,
    /// `HOST:PORT` as configured (placement hashes it).
    pub name: Arc<str>,
    pub pool: Arc<str>,
    pub settings: PoolSettings,
    pub breaker: Breaker,
    pub metrics: ServerMetrics,
    /// Its addresses, resolved when faed started (an I/O thread never waits on DNS).
    addrs: Vec<std::net::SocketAddr>,
    /// Commands sent first on every new connection (Redis AUTH and SELECT), and how many.
    setup: Vec<u8>,
    setup_count: usize,
    /// The I/O thread that owns it.
    thread: usize,
}

impl Server {
    pub(crate) fn error(&self, kind: FailureKind, message: impl Into<String>) -> BackendError {
        BackendError {
            kind,
            protocol: self.protocol,
            server: self.name.clone(),
            pool: self.pool.clone(),
            message: message.into(),
        }
    }

    /// The error for a call the breaker refused.
    pub fn refused(&self, r: &breaker::Refused) -> String {
        self.rejected();
        let when = if r.retry_in.is_zero() {
            "its probe calls are out".to_owned()
        } else {
            format!("next probe in {} ms", r.retry_in.as_millis().max(1))
        };
        format!(
            "{} server {} (pool {}): circuit breaker {} after failures (last: {}); {when}",
            self.protocol.name(),
            self.name,
            self.pool,
            r.state.name(),
            if r.last_failure.is_empty() {
                "none recorded"
            } else {
                &r.last_failure
            },
        )
    }

    fn rejected(&self) {
        self.metrics.rejected_open.fetch_add(1, Ordering::Relaxed);
    }
}

/// A pool: servers by name, and the placement of keys on them.
pub struct Pool {
    pub name: String,
    pub protocol: Protocol,
    ring: Ring,
    /// Indexes into [`Backends::servers`], in configured order.
    pub servers: Vec<usize>,
    eject: bool,
    max_ejected: usize,
}

impl Pool {
    /// The server holding `key`: by the pool's placement, skipping servers ejected while their breaker is
    /// open (with `eject`, at most `max_ejected_percent` of the pool, the first ones in configured order).
    pub fn pick(&self, key: &[u8], all: &[Arc<Server>], now: Instant) -> usize {
        let mut ejected = 0u64;
        if self.eject {
            let mut n = 0;
            for (i, &s) in self.servers.iter().enumerate() {
                if n < self.max_ejected && all[s].breaker.rejecting(now) {
                    ejected |= 1 << i;
                    n += 1;
                }
            }
        }
        self.servers[self.ring.place(key, ejected)]
    }
}

/// Every back-end pool of the node and the I/O threads that serve them.
pub struct Backends {
    pub servers: Vec<Arc<Server>>,
    pub memcache: Vec<Pool>,
    pub redis: Vec<Pool>,
    pub mysql: Option<Arc<mysql::Mysql>>,
    /// Commands rd_call refuses, upper case.
    pub redis_deny: Vec<String>,
    /// The largest value a store may send back (`server.max_message_bytes`).
    pub max_value: usize,
    pub call_timeout: Duration,
    threads: Vec<(Sender<Job>, Arc<Doorbell>)>,
    sink: Arc<OnceLock<Arc<dyn Sink>>>,
    /// Set when a reload replaced these back ends: their threads end once their calls are answered.
    retired: Arc<AtomicBool>,
}

/// A back end that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BackendStartError {
    #[error("redis pool {pool}: cannot read password_file {path}: {source}")]
    PasswordFile {
        pool: String,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start a back-end I/O thread: {0}")]
    Thread(std::io::Error),
}

impl Backends {
    /// Builds the pools and starts the I/O threads (when there is any pool) and the MySQL workers (when there
    /// are MySQL servers). Answers are delivered once the engine has given its [`Sink`]
    /// ([`Backends::set_sink`]).
    pub fn start(cfg: &Config) -> Result<Arc<Backends>, BackendStartError> {
        let threads = cfg.backend.threads.max(1);
        let mut servers: Vec<Arc<Server>> = Vec::new();
        let mut make_pool = |protocol: Protocol,
                             name: &str,
                             list: &[String],
                             hash: McHash,
                             settings: PoolSettings,
                             setup: (Vec<u8>, usize)| {
            let pool: Arc<str> = name.into();
            let ids = list
                .iter()
                .map(|s| {
                    let id = servers.len();
                    let addrs = match std::net::ToSocketAddrs::to_socket_addrs(s.as_str()) {
                        Ok(a) => a.collect(),
                        Err(e) => {
                            tracing::warn!(server = %s, error = %e, "cannot resolve a back-end server; its calls will fail");
                            Vec::new()
                        }
                    };
                    servers.push(Arc::new(Server {
                        protocol,
                        name: s.as_str().into(),
                        addrs,
                        pool: pool.clone(),
                        settings: settings.clone(),
                        breaker: Breaker::new(&settings.breaker),
                        metrics: ServerMetrics::default(),
                        setup: setup.0.clone(),
                        setup_count: setup.1,
                        thread: id % threads,
                    }));
                    id
                })
                .collect();
            let b = &settings.breaker;
            Pool {
                name: name.to_owned(),
                protocol,
                ring: Ring::new(hash, list),
                servers: ids,
                eject: b.eject,
                max_ejected: list.len() * b.max_ejected_percent as usize / 100,
            }
        };
        let mut memcache = Vec::new();
        for p in &cfg.memcache.pools {
            let settings = cfg.backend.settings(&p.backend);
            let hash = p.hash.unwrap_or(cfg.memcache.hash);
            memcache.push(make_pool(
                Protocol::Memcache,
                &p.name,
                &p.servers,
                hash,
                settings,
                (Vec::new(), 0),
            ));
        }
        let mut redis_pools = Vec::new();
        for p in &cfg.redis.pools {
            let settings = cfg.backend.settings(&p.backend);
            let password = match (&p.password, &p.password_file) {
                (Some(pw), _) => Some(pw.clone()),
                (None, Some(path)) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|source| BackendStartError::PasswordFile {
                            pool: p.name.clone(),
                            path: path.clone(),
                            source,
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                (None, None) => None,
            };
            let mut setup = Vec::new();
            let mut count = 0;
            if let Some(pw) = password {
                let parts: [&[u8]; 2] = [b"AUTH", pw.as_bytes()];
                redis::command(&mut setup, parts.into_iter());
                count += 1;
            }
            if p.db != 0 {
                let db = p.db.to_string();
                let parts: [&[u8]; 2] = [b"SELECT", db.as_bytes()];
                redis::command(&mut setup, parts.into_iter());
                count += 1;
            }
            redis_pools.push(make_pool(
                Protocol::Redis,
                &p.name,
                &p.servers,
                McHash::Ketama,
                settings,
                (setup, count),
            ));
        }
        let sink: Arc<OnceLock<Arc<dyn Sink>>> = Arc::new(OnceLock::new());
        let max_value = cfg.server.max_message_bytes;
        let mut handles = Vec::new();
        let retired = Arc::new(AtomicBool::new(false));
        // MySQL servers are listed with the others (metrics, admin); their calls run on the MySQL workers.
        let io_servers = servers.len();
        let reach: Arc<OnceLock<RedisReach>> = Arc::new(OnceLock::new());
        let mysql = mysql::Mysql::start(cfg, &mut servers, sink.clone(), reach.clone())?;
        if io_servers > 0 {
            for t in 0..threads {
                let mine: Vec<(usize, Arc<Server>)> = servers[..io_servers]
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.thread == t)
                    .map(|(g, s)| (g, s.clone()))
                    .collect();
                let limits = (max_value, cfg.server.max_container);
                handles.push(
                    pool::spawn(
                        t,
                        mine,
                        servers.len(),
                        sink.clone(),
                        limits,
                        retired.clone(),
                    )
                    .map_err(BackendStartError::Thread)?,
                );
            }
        }
        let backends = Arc::new(Backends {
            servers,
            memcache,
            redis: redis_pools,
            mysql,
            redis_deny: cfg
                .redis
                .deny
                .iter()
                .map(|c| c.to_ascii_uppercase())
                .collect(),
            max_value,
            call_timeout: Duration::from_millis(cfg.server.call_timeout_ms),
            threads: handles,
            sink,
            retired,
        });
        let _ = reach.set(RedisReach {
            backends: Arc::downgrade(&backends),
            pool: cfg.mysql.cache_redis_pool.clone(),
        });
        Ok(backends)
    }

    /// Takes these back ends out of service (a reload put others in place): their threads answer the calls
    /// they have, close their connections and end.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        for (_, bell) in &self.threads {
            bell.wake_now();
        }
        if let Some(m) = &self.mysql {
            m.retire();
        }
    }

    /// Where answers go: set once by the engine, after its loops exist.
    pub fn set_sink(&self, sink: Arc<dyn Sink>) {
        let _ = self.sink.set(sink);
    }

    /// Hands a call to the I/O thread owning its server.
    pub fn submit(&self, job: Job) {
        let s = &self.servers[job.server];
        let (tx, bell) = &self.threads[s.thread];
        if let Err(e) = tx.send(job) {
            // The I/O thread is gone (it never stops while faed runs): answer rather than lose the call.
            let job = e.into_inner();
            s.breaker.release(job.permit);
            let done = Done {
                ticket: job.ticket,
                submitted: job.submitted,
                result: Err(s.error(FailureKind::Broken, "the back-end I/O thread has stopped")),
            };
            match (&job.reply, self.sink.get()) {
                (Some(tx), _) => {
                    let _ = tx.send(done);
                }
                (None, Some(sink)) => sink.deliver(done),
                (None, None) => {}
            }
            return;
        }
        bell.ring();
    }

    /// The pool named `name` of `protocol`, or an error listing the pools there are.
    pub fn pool(&self, protocol: Protocol, name: &[u8]) -> Result<&Pool, String> {
        let pools = match protocol {
            Protocol::Memcache => &self.memcache,
            Protocol::Redis | Protocol::Mysql => &self.redis,
        };
        pools
            .iter()
            .find(|p| p.name.as_bytes() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                format!(
                    "unknown {} pool {:?}; configured: {}",
                    protocol.name(),
                    String::from_utf8_lossy(name),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )
            })
    }
}

/// A blocking way into one Redis pool, for threads that may wait (the MySQL workers' result cache): the
/// command goes through the pool's I/O thread, pipelined with every other call, under the server's breaker.
pub struct RedisReach {
    backends: std::sync::Weak<Backends>,
    pool: String,
}

impl RedisReach {
    /// Sends `parts` (command and arguments; the key is `parts[1]`) and waits for the answer until
    /// `deadline`; `None` when there is none (the store failed, its breaker is open, the deadline passed).
    pub fn call(&self, parts: &[&[u8]], deadline: Instant) -> Option<redis::Value> {
        let b = self.backends.upgrade()?;
        let pool = b.pool(Protocol::Redis, self.pool.as_bytes()).ok()?;
        let now = Instant::now();
        let server = pool.pick(parts.get(1).copied().unwrap_or(b""), &b.servers, now);
        let permit = b.servers[server].breaker.admit(now).ok()?;
        let mut request = Vec::new();
        redis::command(&mut request, parts.iter().copied());
        let (tx, rx) = crossbeam_channel::bounded(1);
        b.submit(Job {
            server,
            affinity: 0,
            request,
            expect: Expect::Redis,
            ticket: Ticket::default(),
            submitted: now,
            deadline,
            permit,
            reply: Some(tx),
        });
        let done = rx
            .recv_timeout(deadline.saturating_duration_since(now))
            .ok()?;
        match done.result {
            Ok(Response::Redis(v)) => Some(v),
            _ => None,
        }
    }
}
