//! `fae bench`: a closed-loop load generator. Every connection keeps `depth` calls in flight (pipelined in
//! order), replaces each answered call at once, and times each call from the moment it was written.
//!
//! It encodes with fae's own `wire` encoder and finds replies with `wire::scan`, so the client costs little
//! next to the server it measures; it drives all its connections from mio event loops (`threads` of them).
//!
//! With `direct`, the same loop speaks memcached's text protocol or Redis's RESP instead of Thrift, to the
//! store itself or to a proxy in front of it (twemproxy): the baseline fae's back-end calls are compared
//! with, measured by the same client.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sock::Stream;
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};

use crate::backend::{memcache, redis};
use crate::engine::metrics::{LoopMetrics, MethodSnapshot, Snapshot, BUCKETS};
use crate::servant::Method;
use crate::wire::{
    mtype, ttype, Dialect, Encoder, Limits, MessageHeader, Protocol, Reader, Transport,
};

/// One kind of call the benchmark makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Noop,
    Ping,
    IdNext,
    LcGet,
    LcSet,
    McGet,
    McSet,
    /// rd_call GET (or a Redis GET, direct).
    RdGet,
    /// rd_call SET (or a Redis SET, direct).
    RdSet,
    /// my_query of one row by primary key: `SELECT k, v FROM kv WHERE k = ?` on pool `pool` (or a MySQL
    /// client's prepared statement, direct).
    MyGet,
    /// The same with a cacheKey (the row's key): answered from fae's result cache once cached.
    MyGetCached,
    /// `lock` of a key (granted while free, false while held; nobody unlocks).
    Lock,
}

/// The statement of `my_get`: a point read by primary key (tests/mysql/schema.sql's `kv`).
pub const MY_GET_SQL: &str = "SELECT k, v FROM kv WHERE k = ?";

impl Op {
    const ALL: [Op; 12] = [
        Op::Noop,
        Op::Ping,
        Op::IdNext,
        Op::LcGet,
        Op::LcSet,
        Op::McGet,
        Op::McSet,
        Op::RdGet,
        Op::RdSet,
        Op::MyGet,
        Op::MyGetCached,
        Op::Lock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Noop => "noop",
            Op::Ping => "ping",
            Op::IdNext => "id_next",
            Op::LcGet => "lc_get",
            Op::LcSet => "lc_set",
            Op::McGet => "mc_get",
            Op::McSet => "mc_set",
            Op::RdGet => "rd_get",
            Op::RdSet => "rd_set",
            Op::MyGet => "my_get",
            Op::MyGetCached => "my_get_cached",
            Op::Lock => "lock",
        }
    }

    /// The FunServant method it calls (its metrics slot).
    fn method(self) -> Method {
        match self {
            Op::Noop => Method::Noop,
            Op::Ping => Method::Ping,
            Op::IdNext => Method::IdNext,
            Op::LcGet => Method::LcGet,
            Op::LcSet => Method::LcSet,
            Op::McGet => Method::McGet,
            Op::McSet => Method::McSet,
            Op::RdGet | Op::RdSet => Method::RdCall,
            Op::MyGet | Op::MyGetCached => Method::MyQuery,
            Op::Lock => Method::Lock,
        }
    }

    /// The write that stores what this read reads (the keys are written before the run).
    fn writer(self) -> Option<Op> {
        match self {
            Op::LcGet => Some(Op::LcSet),
            Op::McGet => Some(Op::McSet),
            Op::RdGet => Some(Op::RdSet),
            _ => None,
        }
    }
}

/// What the benchmark talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A faed node (Thrift).
    Fae(Transport),
    /// memcached, or a proxy speaking its text protocol.
    Memcache,
    /// Redis, or a proxy speaking RESP.
    Redis,
    /// MySQL/MariaDB through the `mysql` crate (`addr` is a `mysql://user:pass@host:port/db` URL): one
    /// blocking connection per client thread, one statement at a time (the protocol does not pipeline).
    Mysql,
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub addr: String,
    pub connections: usize,
    pub depth: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Calls with weights.
    pub mix: Vec<(Op, u32)>,
    pub value_size: usize,
    pub keys: usize,
    pub target: Target,
    /// The pool of fae's mc_*/rd_call calls.
    pub pool: String,
    pub threads: usize,
    /// The server's processes (faed, and in the XDP lab the server side's NAPI threads), to read their CPU
    /// time from /proc; none: no CPU figure.
    pub server_pids: Vec<u32>,
    /// The local address to connect from.
    pub bind: Option<std::net::IpAddr>,
    /// Short-lived connections: each connection makes this many calls, closes, and a new one is opened in
    /// its place (PHP-FPM's pattern: a connection per web request). 0: connections live for the whole run.
    pub calls_per_conn: usize,
    pub progress: bool,
    /// The protocol of fae calls (binary or compact).
    pub protocol: Protocol,
}

/// Parses a mix such as `noop` or `noop:3,lc_get:1`; direct targets take their store's calls only.
pub fn parse_mix(s: &str, target: Target) -> Result<Vec<(Op, u32)>, String> {
    let allowed: &[Op] = match target {
        Target::Fae(_) => &Op::ALL,
        Target::Memcache => &[Op::McGet, Op::McSet],
        Target::Redis => &[Op::RdGet, Op::RdSet],
        Target::Mysql => &[Op::MyGet],
    };
    let names: Vec<&str> = allowed.iter().map(|o| o.name()).collect();
    s.split(',')
        .map(|part| {
            let (name, w) = part.split_once(':').unwrap_or((part, "1"));
            let op = allowed
                .iter()
                .copied()
                .find(|o| o.name() == name.trim())
                .ok_or_else(|| format!("bench call {name:?}: one of {}", names.join(", ")))?;
            let w: u32 = w
                .parse()
                .map_err(|_| format!("weight {w:?} is not a number"))?;
            Ok((op, w))
        })
        .collect()
}

/// The result of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub addr: String,
    pub transport: String,
    pub connections: usize,
    pub depth: usize,
    pub mix: String,
    pub seconds: f64,
    pub calls: u64,
    pub errors: u64,
    pub calls_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Successful calls alone: their rate and latency (what flow control admitted).
    pub ok_per_sec: f64,
    pub ok_p50_us: f64,
    pub ok_p99_us: f64,
    /// Failed calls alone: how fast an error (a refusal) came back.
    pub error_p50_us: f64,
    pub error_p99_us: f64,
    /// Server CPU (user + system) per call, when the server's pid was given.
    pub server_cpu_us_per_call: Option<f64>,
    /// Calls per connection (0: long-lived connections).
    pub calls_per_conn: usize,
    /// Connections completed (all their calls answered, then closed) while measuring, and their rate.
    pub conns: u64,
    pub conns_per_sec: f64,
    /// Connection attempts that failed (refused, reset, timed out, no local port).
    pub connect_errors: u64,
    /// From connect(2) to the connection being writable (the handshake): of the measured seconds' connects
    /// with short-lived connections; of the connects that opened them (before the warm-up, each client
    /// thread's one after another) with long-lived ones.
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} conns={} depth={} mix={}: {:.0} calls/s over {:.1}s, p50={:.1}us p99={:.1}us p999={:.1}us, errors={}",
            self.addr,
            self.transport,
            self.connections,
            self.depth,
            self.mix,
            self.calls_per_sec,
            self.seconds,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.errors
        )?;
        if self.errors > 0 {
            write!(
                f,
                " (ok: {:.0} calls/s p50={:.1}us p99={:.1}us; errors: p50={:.1}us p99={:.1}us)",
                self.ok_per_sec,
                self.ok_p50_us,
                self.ok_p99_us,
                self.error_p50_us,
                self.error_p99_us
            )?;
        }
        if self.calls_per_conn > 0 {
            write!(
                f,
                "; {} calls per connection: {:.0} connections/s, connect p50={:.1}us p99={:.1}us, connect errors={}",
                self.calls_per_conn,
                self.conns_per_sec,
                self.connect_p50_us,
                self.connect_p99_us,
                self.connect_errors
            )?;
        }
        if self.calls_per_conn == 0 && self.connect_p99_us > 0.0 {
            write!(
                f,
                "; opening connects p50={:.1}us p99={:.1}us",
                self.connect_p50_us, self.connect_p99_us
            )?;
        }
        if let Some(cpu) = self.server_cpu_us_per_call {
            write!(f, ", server cpu={cpu:.2}us/call")?;
        }
        Ok(())
    }
}

/// The CPU time of all of `pids` together, in microseconds (`None` for no pid).
fn server_cpu_us(pids: &[u32]) -> io::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut sum = 0;
    for &pid in pids {
        sum += process_cpu_us(pid)?;
    }
    Ok(Some(sum))
}

/// User + system CPU time of a process, in microseconds, from /proc/PID/stat.
pub fn process_cpu_us(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("unparsable /proc stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the stat line: 12 and 13 after the name.
    let hz = clock_ticks_per_sec();
    Ok((ticks(11) + ticks(12)) * 1_000_000 / hz)
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// Where the bench connects: a TCP address, or a unix socket's path.
#[derive(Debug, Clone)]
enum Peer {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

struct Conn {
    stream: Stream,
    /// When the connect(2) of a short-lived connection started, until it completes.
    connecting: Option<Instant>,
    /// Calls written on this connection.
    sent: usize,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    inflight: VecDeque<(Instant, i32, Op)>,
    /// Where the walk of a partly arrived Redis reply stopped.
    scan: redis::Scan,
    seq: i32,
    pick: usize,
}

#[derive(Default)]
struct Shared {
    calls: AtomicU64,
    errors: AtomicU64,
    conns: AtomicU64,
    connect_errors: AtomicU64,
    /// Client threads done opening their first connections.
    ready: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

/// Appends one call of `op` in the target's protocol.
fn encode_call(out: &mut Vec<u8>, cfg: &BenchConfig, op: Op, seq: i32, key: &[u8], value: &[u8]) {
    let transport = match cfg.target {
        Target::Memcache => {
            match op {
                Op::McSet => memcache::store(out, "set", key, 0, 0, value),
                _ => memcache::get(out, key),
            }
            return;
        }
        Target::Redis => {
            match op {
                Op::RdSet => redis::command(out, [&b"SET"[..], key, value].into_iter()),
                _ => redis::command(out, [&b"GET"[..], key].into_iter()),
            }
            return;
        }
        Target::Mysql => return,
        Target::Fae(t) => t,
    };
    let dialect = Dialect {
        seq: seq as u32,
        ..Dialect::plain(transport, cfg.protocol)
    };
    let start = dialect.open(out);
    let m = op.method();
    let mut e = Encoder::of(cfg.protocol, out);
    e.message_begin(m.name().as_bytes(), mtype::CALL, seq);
    if op == Op::Noop {
        e.field_i32(1, seq);
    } else {
        e.field_begin(ttype::STRUCT, 1);
        e.field_i64(1, i64::from(seq).max(1));
        e.field_bytes(2, b"bench");
        e.field_i64(3, 0);
        e.stop();
        match op {
            Op::LcGet | Op::LcSet => {
                e.field_bytes(2, key);
                if op == Op::LcSet {
                    e.field_bytes(3, value);
                }
            }
            Op::Lock => {
                e.field_bytes(2, b"bench");
                e.field_bytes(3, key);
            }
            Op::McGet | Op::McSet => {
                e.field_bytes(2, cfg.pool.as_bytes());
                e.field_bytes(3, key);
                if op == Op::McSet {
                    e.field_begin(ttype::STRUCT, 4);
                    e.field_bytes(1, value);
                    e.field_i32(2, 0);
                    e.stop();
                    e.field_i32(5, 0);
                }
            }
            Op::MyGet | Op::MyGetCached => {
                e.field_bytes(2, cfg.pool.as_bytes());
                e.field_bytes(3, b"kv");
                e.field_i64(4, 0);
                e.field_bytes(5, MY_GET_SQL.as_bytes());
                e.field_begin(ttype::LIST, 6);
                e.list_begin(ttype::STRING, 1);
                e.bytes(key);
                e.field_begin(ttype::STRING, 7);
                if op == Op::MyGetCached {
                    e.bytes(key);
                } else {
                    e.bytes(b"");
                }
            }
            Op::RdGet | Op::RdSet => {
                let set = op == Op::RdSet;
                e.field_bytes(2, if set { b"SET" } else { b"GET" });
                e.field_bytes(3, cfg.pool.as_bytes());
                e.field_begin(ttype::LIST, 4);
                e.list_begin(ttype::STRING, if set { 2 } else { 1 });
                e.bytes(key);
                if set {
                    e.bytes(value);
                }
            }
            Op::Noop | Op::Ping | Op::IdNext => {}
        }
    }
    e.stop();
    dialect.close(out, start);
}

/// The reply to a call of `op` at the start of `buf`: the bytes it takes and whether it is an error (an
/// exception, a declared exception, a miss, a store's error), or `None` while it has not all arrived.
fn scan_reply(
    buf: &[u8],
    cfg: &BenchConfig,
    op: Op,
    seq: i32,
    scan: &mut redis::Scan,
) -> io::Result<Option<(usize, bool)>> {
    let bad = |e: String| io::Error::other(format!("bad reply: {e}"));
    match cfg.target {
        Target::Fae(t) => {
            let Some(f) = crate::wire::scan(buf, Some(t), &Limits::default())
                .map_err(|e| bad(e.error.to_string()))?
            else {
                return Ok(None);
            };
            let proto = f.dialect.protocol;
            let h = MessageHeader::read(&mut Reader::of(proto, f.message))
                .map_err(|e| bad(e.to_string()))?;
            // A reply is an error if it is an exception message or carries a declared exception (field 1).
            let error = h.seqid != seq || h.mtype != mtype::REPLY || !success(proto, f.message);
            Ok(Some((f.consumed, error)))
        }
        Target::Memcache => {
            let expect = if op == Op::McSet {
                memcache::Expect::Stored
            } else {
                memcache::Expect::Value
            };
            Ok(memcache::parse(buf, expect, 64 << 20)
                .map_err(|e| bad(e.to_string()))?
                .map(|(a, n)| {
                    (
                        n,
                        !matches!(a, memcache::Answer::Stored | memcache::Answer::Value { .. }),
                    )
                }))
        }
        Target::Redis => {
            let Some(n) = scan
                .walk(buf, 64 << 20, 1 << 20)
                .map_err(|e| bad(e.to_string()))?
            else {
                return Ok(None);
            };
            let error = matches!(buf[0], b'-') || buf.starts_with(b"$-1");
            Ok(Some((n, error)))
        }
        Target::Mysql => Err(bad("no stream to scan in the MySQL mode".into())),
    }
}

fn key_for(i: usize) -> Vec<u8> {
    format!("bench:{i}").into_bytes()
}

/// Stores the keys a read will read (with `writer`), pipelined on one blocking connection.
fn populate(cfg: &BenchConfig, writer: Op) -> io::Result<()> {
    let (mut rd, mut s) = super::connect_any(&cfg.addr, Duration::from_secs(10))?;
    let value = vec![b'v'; cfg.value_size];
    let mut scan = redis::Scan::default();
    for chunk in (0..cfg.keys).collect::<Vec<_>>().chunks(256) {
        let mut out = Vec::new();
        for &i in chunk {
            encode_call(&mut out, cfg, writer, i as i32 + 1, &key_for(i), &value);
        }
        s.write_all(&out)?;
        let mut inbuf = Vec::new();
        let mut got = 0;
        let mut buf = vec![0; 64 << 10];
        while got < chunk.len() {
            let n = rd.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::other(
                    "server closed the connection while populating",
                ));
            }
            inbuf.extend_from_slice(&buf[..n]);
            while let Some((used, error)) =
                scan_reply(&inbuf, cfg, writer, chunk[got] as i32 + 1, &mut scan)?
            {
                if error {
                    return Err(io::Error::other(format!(
                        "{} failed while populating",
                        writer.name()
                    )));
                }
                inbuf.drain(..used);
                got += 1;
                if got == chunk.len() {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Runs the benchmark and returns its report.
pub fn run(cfg: &BenchConfig) -> io::Result<BenchReport> {
    if cfg.target == Target::Mysql {
        return run_mysql(cfg);
    }
    let addr = match super::unix_path(&cfg.addr) {
        Some(path) => Peer::Unix(path.into()),
        None => Peer::Tcp(
            cfg.addr
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::other(format!("{}: no address", cfg.addr)))?,
        ),
    };
    let mut writers: Vec<Op> = cfg.mix.iter().filter_map(|(op, _)| op.writer()).collect();
    writers.dedup();
    for w in writers {
        populate(cfg, w)?;
    }
    let shared = Arc::new(Shared::default());
    let threads = cfg.threads.clamp(1, cfg.connections.max(1));
    let mut handles = Vec::new();
    let mut hists = Vec::new();
    for t in 0..threads {
        let n = cfg.connections / threads + usize::from(t < cfg.connections % threads);
        let hist = Arc::new(Hists {
            ok: Arc::default(),
            err: Arc::default(),
            connect: Arc::default(),
        });
        hists.push(hist.clone());
        let (cfg, shared, addr) = (cfg.clone(), shared.clone(), addr.clone());
        handles.push(std::thread::spawn(move || {
            drive(&cfg, &addr, n, &shared, &hist)
        }));
    }
    // The warm-up starts once every connection is open (thousands of connects take a while), or a thread
    // failed.
    let opening = Instant::now();
    while shared.ready.load(Ordering::Acquire) < threads as u64
        && !handles.iter().any(|h| h.is_finished())
        && opening.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(cfg.warmup);
    let cpu0 = server_cpu_us(&cfg.server_pids)?;
    let t0 = Instant::now();
    shared.measuring.store(true, Ordering::Release);
    let mut last = (t0, 0u64);
    while t0.elapsed() < cfg.duration {
        std::thread::sleep(Duration::from_secs(1).min(cfg.duration.saturating_sub(t0.elapsed())));
        if cfg.progress {
            let now = Instant::now();
            let c = shared.calls.load(Ordering::Relaxed);
            let rate = (c - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
            eprintln!(
                "  {:>4.1}s {:>10.0} calls/s  errors={}",
                t0.elapsed().as_secs_f64(),
                rate,
                shared.errors.load(Ordering::Relaxed)
            );
            last = (now, c);
        }
    }
    shared.measuring.store(false, Ordering::Release);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = server_cpu_us(&cfg.server_pids)?;
    shared.stop.store(true, Ordering::Release);
    for h in handles {
        h.join()
            .map_err(|_| io::Error::other("bench thread panicked"))??;
    }
    let calls = shared.calls.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let sum = |snaps: &[&Snapshot]| {
        let mut all = MethodSnapshot {
            calls: 0,
            errors: 0,
            sum_ns: 0,
            latency: vec![0; BUCKETS],
        };
        for snap in snaps {
            for m in &snap.methods {
                for (a, b) in all.latency.iter_mut().zip(&m.latency) {
                    *a += b;
                }
            }
        }
        all
    };
    let ok = Snapshot::merge(&hists.iter().map(|h| h.ok.clone()).collect::<Vec<_>>());
    let err = Snapshot::merge(&hists.iter().map(|h| h.err.clone()).collect::<Vec<_>>());
    let connect = Snapshot::merge(&hists.iter().map(|h| h.connect.clone()).collect::<Vec<_>>());
    let all = sum(&[&ok, &err]);
    let (ok, err, connect) = (sum(&[&ok]), sum(&[&err]), sum(&[&connect]));
    let conns = shared.conns.load(Ordering::Relaxed);
    let mix = cfg
        .mix
        .iter()
        .map(|(op, w)| format!("{}:{w}", op.name()))
        .collect::<Vec<_>>()
        .join(",");
    Ok(BenchReport {
        addr: cfg.addr.clone(),
        transport: match cfg.target {
            Target::Fae(_) => format!("{} {}", target_name(cfg.target), cfg.protocol.name()),
            t => target_name(t),
        },
        connections: cfg.connections,
        depth: cfg.depth,
        mix,
        seconds: secs,
        calls,
        errors,
        calls_per_sec: calls as f64 / secs,
        p50_us: all.quantile_us(0.5),
        p99_us: all.quantile_us(0.99),
        p999_us: all.quantile_us(0.999),
        ok_per_sec: (calls - errors) as f64 / secs,
        ok_p50_us: ok.quantile_us(0.5),
        ok_p99_us: ok.quantile_us(0.99),
        error_p50_us: err.quantile_us(0.5),
        error_p99_us: err.quantile_us(0.99),
        server_cpu_us_per_call: match (cpu0, cpu1) {
            (Some(a), Some(b)) if calls > 0 => Some((b - a) as f64 / calls as f64),
            _ => None,
        },
        calls_per_conn: cfg.calls_per_conn,
        conns,
        conns_per_sec: conns as f64 / secs,
        connect_errors: shared.connect_errors.load(Ordering::Relaxed),
        connect_p50_us: connect.quantile_us(0.5),
        connect_p99_us: connect.quantile_us(0.99),
    })
}

/// A connection to `peer` (from `bind` if given), made non-blocking once it is open.
fn connect(peer: &Peer, bind: Option<std::net::IpAddr>) -> io::Result<Stream> {
    match peer {
        Peer::Tcp(addr) => {
            let s = connect_tcp(*addr, bind)?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(Stream::Tcp(TcpStream::from_std(s)))
        }
        Peer::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path)?;
            s.set_nonblocking(true)?;
            Ok(Stream::Unix(UnixStream::from_std(s)))
        }
    }
}

/// A non-blocking connect to `peer` (from `bind` if given), under way.
fn connect_nonblocking(peer: &Peer, bind: Option<std::net::IpAddr>) -> io::Result<Stream> {
    match peer {
        Peer::Tcp(addr) => connect_tcp_nonblocking(*addr, bind).map(Stream::Tcp),
        Peer::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
    }
}

/// A blocking connection to `addr`, from `bind` if given.
fn connect_tcp(
    addr: SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> io::Result<std::net::TcpStream> {
    let Some(ip) = bind else {
        return std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5));
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.bind(&SocketAddr::new(ip, 0).into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {ip}: {e}")))?;
    s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// A non-blocking TCP connect to `addr` (from `bind` if given), under way.
fn connect_tcp_nonblocking(
    addr: SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    if let Some(ip) = bind {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

/// Latencies of the successful and of the failed calls, apart, and of the connects.
struct Hists {
    ok: Arc<LoopMetrics>,
    err: Arc<LoopMetrics>,
    connect: Arc<LoopMetrics>,
}

fn drive(
    cfg: &BenchConfig,
    addr: &Peer,
    n: usize,
    shared: &Shared,
    hist: &Hists,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(n);
    let value = vec![b'v'; cfg.value_size];
    let weights: Vec<Op> = cfg
        .mix
        .iter()
        .flat_map(|(m, w)| std::iter::repeat_n(*m, *w as usize))
        .collect();
    if weights.is_empty() {
        return Err(io::Error::other("empty method mix"));
    }
    let keys = cfg.keys.max(1);
    let churn = cfg.calls_per_conn > 0;
    // Short-lived connections whose connect(2) failed at once (e.g. no free local port): tried again on
    // the next turn of the loop.
    let mut retry: Vec<usize> = Vec::new();
    for i in 0..n {
        let (stream, connecting) = if churn {
            match connect_nonblocking(addr, cfg.bind) {
                Ok(s) => (s, Some(Instant::now())),
                Err(e) => return Err(io::Error::new(e.kind(), format!("connect: {e}"))),
            }
        } else {
            // The opening connects, one after another: their handshake latency, outside the measurement.
            let started = Instant::now();
            let s = connect(addr, cfg.bind)?;
            let ns = started.elapsed().as_nanos() as u64;
            hist.connect.call(Method::Ping as usize, ns, false);
            (s, None)
        };
        let mut c = Conn {
            stream,
            connecting,
            sent: 0,
            out: Vec::new(),
            inbuf: Vec::new(),
            inflight: VecDeque::new(),
            scan: redis::Scan::default(),
            seq: 0,
            pick: i,
        };
        poll.registry().register(
            &mut c.stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        if !churn {
            for _ in 0..cfg.depth {
                send(&mut c, cfg, &weights, keys, &value);
            }
        }
        conns.push(c);
    }
    shared.ready.fetch_add(1, Ordering::AcqRel);
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 << 10];
    while !shared.stop.load(Ordering::Acquire) {
        for i in std::mem::take(&mut retry) {
            reopen(&mut conns[i], i, cfg, addr, &poll, shared, &mut retry)?;
        }
        let wait = if retry.is_empty() { 50 } else { 1 };
        poll.poll(&mut events, Some(Duration::from_millis(wait)))?;
        for ev in events.iter() {
            let i = ev.token().0;
            let c = &mut conns[i];
            if let Some(started) = c.connecting {
                if ev.is_error() || c.stream.take_error()?.is_some() {
                    shared.connect_errors.fetch_add(1, Ordering::Relaxed);
                    reopen(c, i, cfg, addr, &poll, shared, &mut retry)?;
                    continue;
                }
                if !ev.is_writable() || !c.stream.connected() {
                    continue;
                }
                c.connecting = None;
                if shared.measuring.load(Ordering::Relaxed) {
                    let ns = started.elapsed().as_nanos() as u64;
                    hist.connect.call(Method::Ping as usize, ns, false);
                }
                for _ in 0..cfg.depth.min(cfg.calls_per_conn) {
                    send(c, cfg, &weights, keys, &value);
                }
                flush(c)?;
                continue;
            }
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => return Err(io::Error::other("server closed a bench connection")),
                    Ok(k) => c.inbuf.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let mut used = 0;
            let now = Instant::now();
            let measuring = shared.measuring.load(Ordering::Relaxed);
            let mut answered = 0;
            while let Some(&(sent, seq, op)) = c.inflight.front() {
                let Some((n, error)) = scan_reply(&c.inbuf[used..], cfg, op, seq, &mut c.scan)?
                else {
                    break;
                };
                used += n;
                c.inflight.pop_front();
                if measuring {
                    let ns = now.duration_since(sent).as_nanos() as u64;
                    let h = if error { &hist.err } else { &hist.ok };
                    h.call(op.method() as usize, ns, error);
                    shared.calls.fetch_add(1, Ordering::Relaxed);
                    if error {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                answered += 1;
            }
            if used < c.inbuf.len() && c.inflight.is_empty() {
                return Err(io::Error::other("reply with no call in flight"));
            }
            c.inbuf.drain(..used);
            for _ in 0..answered {
                if churn && c.sent >= cfg.calls_per_conn {
                    break;
                }
                send(c, cfg, &weights, keys, &value);
            }
            if churn && c.sent >= cfg.calls_per_conn && c.inflight.is_empty() {
                if measuring {
                    shared.conns.fetch_add(1, Ordering::Relaxed);
                }
                reopen(c, i, cfg, addr, &poll, shared, &mut retry)?;
                continue;
            }
            flush(c)?;
        }
    }
    Ok(())
}

/// Closes a short-lived connection (the client closes first, as a PHP worker does) and starts the next.
fn reopen(
    c: &mut Conn,
    i: usize,
    cfg: &BenchConfig,
    addr: &Peer,
    poll: &Poll,
    shared: &Shared,
    retry: &mut Vec<usize>,
) -> io::Result<()> {
    let _ = poll.registry().deregister(&mut c.stream);
    c.sent = 0;
    c.out.clear();
    c.inbuf.clear();
    c.inflight.clear();
    c.scan = redis::Scan::default();
    match connect_nonblocking(addr, cfg.bind) {
        Ok(s) => {
            // Dropping the old stream closes it.
            c.stream = s;
            c.connecting = Some(Instant::now());
            poll.registry().register(
                &mut c.stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            retry.push(i);
            Ok(())
        }
        Err(_) => {
            shared.connect_errors.fetch_add(1, Ordering::Relaxed);
            retry.push(i);
            Ok(())
        }
    }
}

fn target_name(t: Target) -> String {
    match t {
        Target::Fae(t) => t.name().to_lowercase(),
        Target::Memcache => "memcache".into(),
        Target::Redis => "redis".into(),
        Target::Mysql => "mysql".into(),
    }
}

/// The MySQL mode: `connections` threads, each with one blocking connection, each reading rows by primary
/// key with a prepared statement, one at a time.
fn run_mysql(cfg: &BenchConfig) -> io::Result<BenchReport> {
    use mysql::prelude::Queryable;
    let opts = mysql::Opts::from_url(&cfg.addr)
        .map_err(|e| io::Error::other(format!("{}: {e}", cfg.addr)))?;
    let shared = Arc::new(Shared::default());
    let mut handles = Vec::new();
    let mut hists = Vec::new();
    for t in 0..cfg.connections.max(1) {
        let hist = Arc::new(LoopMetrics::default());
        hists.push(hist.clone());
        let (opts, shared, keys) = (opts.clone(), shared.clone(), cfg.keys.max(1));
        handles.push(std::thread::spawn(move || -> io::Result<()> {
            let mut conn = mysql::Conn::new(opts).map_err(|e| io::Error::other(e.to_string()))?;
            let stmt = conn
                .prep(MY_GET_SQL)
                .map_err(|e| io::Error::other(e.to_string()))?;
            let mut pick = t;
            while !shared.stop.load(Ordering::Acquire) {
                pick = pick.wrapping_add(1);
                let key = String::from_utf8_lossy(&key_for(pick % keys)).into_owned();
                let t0 = Instant::now();
                let r: Result<Option<(String, String)>, _> = conn.exec_first(&stmt, (key,));
                let ns = t0.elapsed().as_nanos() as u64;
                let error = !matches!(r, Ok(Some(_)));
                if shared.measuring.load(Ordering::Relaxed) {
                    hist.call(Method::MyQuery as usize, ns, error);
                    shared.calls.fetch_add(1, Ordering::Relaxed);
                    if error {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        }));
    }
    std::thread::sleep(cfg.warmup);
    let t0 = Instant::now();
    shared.measuring.store(true, Ordering::Release);
    std::thread::sleep(cfg.duration);
    shared.measuring.store(false, Ordering::Release);
    let secs = t0.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Release);
    for h in handles {
        h.join()
            .map_err(|_| io::Error::other("bench thread panicked"))??;
    }
    let calls = shared.calls.load(Ordering::Relaxed);
    let snap = Snapshot::merge(&hists);
    let all = &snap.methods[Method::MyQuery as usize];
    let errors = shared.errors.load(Ordering::Relaxed);
    // The URL's password stays out of the report.
    let shown = cfg
        .addr
        .rsplit_once('@')
        .map_or(cfg.addr.as_str(), |(_, at)| at)
        .to_owned();
    Ok(BenchReport {
        addr: shown,
        transport: target_name(cfg.target),
        connections: cfg.connections,
        depth: 1,
        mix: "my_get:1".into(),
        seconds: secs,
        calls,
        errors,
        calls_per_sec: calls as f64 / secs,
        p50_us: all.quantile_us(0.5),
        p99_us: all.quantile_us(0.99),
        p999_us: all.quantile_us(0.999),
        // Failed reads are rare here (a dead server ends the run): one histogram for both.
        ok_per_sec: (calls - errors) as f64 / secs,
        ok_p50_us: all.quantile_us(0.5),
        ok_p99_us: all.quantile_us(0.99),
        error_p50_us: 0.0,
        error_p99_us: 0.0,
        server_cpu_us_per_call: None,
        calls_per_conn: 0,
        conns: 0,
        conns_per_sec: 0.0,
        connect_errors: 0,
        connect_p50_us: 0.0,
        connect_p99_us: 0.0,
    })
}

/// Whether a reply's result struct holds field 0 (success) or nothing (void).
fn success(proto: Protocol, message: &[u8]) -> bool {
    let mut r = Reader::of(proto, message);
    if MessageHeader::read(&mut r).is_err() {
        return false;
    }
    matches!(r.field(), Ok(None) | Ok(Some((0, _))))
}

fn send(c: &mut Conn, cfg: &BenchConfig, weights: &[Op], keys: usize, value: &[u8]) {
    c.seq = c.seq.wrapping_add(1);
    c.sent += 1;
    c.pick = c.pick.wrapping_add(1);
    let op = weights[c.pick % weights.len()];
    let key = key_for(c.pick % keys);
    encode_call(&mut c.out, cfg, op, c.seq, &key, value);
    c.inflight.push_back((Instant::now(), c.seq, op));
}

fn flush(c: &mut Conn) -> io::Result<()> {
    let mut sent = 0;
    while sent < c.out.len() {
        match c.stream.write(&c.out[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.out.drain(..sent);
    Ok(())
}
