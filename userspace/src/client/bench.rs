//! `fae bench`: a closed-loop load generator. Every connection keeps `depth` calls in flight (pipelined in
//! order), replaces each answered call at once, and times each call from the moment it was written.
//!
//! It encodes with fae's own `wire` encoder and finds replies with `wire::scan`, so the client costs little
//! next to the server it measures; it drives all its connections from mio event loops (`threads` of them).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::engine::metrics::{LoopMetrics, MethodSnapshot, Snapshot, BUCKETS};
use crate::servant::Method;
use crate::wire::{mtype, ttype, Encoder, Limits, MessageHeader, Reader, Transport};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub addr: String,
    pub connections: usize,
    pub depth: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Methods with weights.
    pub mix: Vec<(Method, u32)>,
    pub value_size: usize,
    pub keys: usize,
    pub transport: Transport,
    pub threads: usize,
    /// The server's pid, to read its CPU time from /proc.
    pub server_pid: Option<u32>,
    pub progress: bool,
}

/// Parses a mix such as `noop` or `noop:3,lc_get:1`.
pub fn parse_mix(s: &str) -> Result<Vec<(Method, u32)>, String> {
    let supported = [
        Method::Noop,
        Method::Ping,
        Method::IdNext,
        Method::LcGet,
        Method::LcSet,
    ];
    s.split(',')
        .map(|part| {
            let (name, w) = part.split_once(':').unwrap_or((part, "1"));
            let m = Method::from_name(name.trim().as_bytes())
                .filter(|m| supported.contains(m))
                .ok_or_else(|| {
                    format!("bench method {name:?}: one of noop, ping, id_next, lc_get, lc_set")
                })?;
            let w: u32 = w
                .parse()
                .map_err(|_| format!("weight {w:?} is not a number"))?;
            Ok((m, w))
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
    /// Server CPU (user + system) per call, when the server's pid was given.
    pub server_cpu_us_per_call: Option<f64>,
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
        if let Some(cpu) = self.server_cpu_us_per_call {
            write!(f, ", server cpu={cpu:.2}us/call")?;
        }
        Ok(())
    }
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

struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    inflight: VecDeque<(Instant, i32, Method)>,
    seq: i32,
    pick: usize,
}

struct Shared {
    calls: AtomicU64,
    errors: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

fn encode_call(
    out: &mut Vec<u8>,
    transport: Transport,
    m: Method,
    seq: i32,
    key: &[u8],
    value: &[u8],
) {
    let start = out.len();
    if transport == Transport::Framed {
        out.extend_from_slice(&[0; 4]);
    }
    let mut e = Encoder::new(out);
    e.message_begin(m.name().as_bytes(), mtype::CALL, seq);
    if m == Method::Noop {
        e.field_i32(1, seq);
    } else {
        e.field_begin(ttype::STRUCT, 1);
        e.field_i64(1, i64::from(seq).max(1));
        e.field_bytes(2, b"bench");
        e.field_i64(3, 0);
        e.stop();
        if matches!(m, Method::LcGet | Method::LcSet) {
            e.field_bytes(2, key);
        }
        if m == Method::LcSet {
            e.field_bytes(3, value);
        }
    }
    e.stop();
    if transport == Transport::Framed {
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

fn key_for(i: usize) -> Vec<u8> {
    format!("bench:{i}").into_bytes()
}

/// Stores the keys lc_get will read, pipelined on one blocking connection.
fn populate(cfg: &BenchConfig, addr: SocketAddr) -> io::Result<()> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let value = vec![b'v'; cfg.value_size];
    for chunk in (0..cfg.keys).collect::<Vec<_>>().chunks(256) {
        let mut out = Vec::new();
        for &i in chunk {
            encode_call(
                &mut out,
                cfg.transport,
                Method::LcSet,
                i as i32 + 1,
                &key_for(i),
                &value,
            );
        }
        s.write_all(&out)?;
        let mut inbuf = Vec::new();
        let mut got = 0;
        let mut buf = vec![0; 64 << 10];
        while got < chunk.len() {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::other(
                    "server closed the connection while populating",
                ));
            }
            inbuf.extend_from_slice(&buf[..n]);
            while let Ok(Some(f)) =
                crate::wire::scan(&inbuf, Some(cfg.transport), &Limits::default())
            {
                let used = f.consumed;
                inbuf.drain(..used);
                got += 1;
            }
        }
    }
    Ok(())
}

/// Runs the benchmark and returns its report.
pub fn run(cfg: &BenchConfig) -> io::Result<BenchReport> {
    let addr = cfg
        .addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("{}: no address", cfg.addr)))?;
    if cfg.mix.iter().any(|(m, _)| *m == Method::LcGet) {
        populate(cfg, addr)?;
    }
    let shared = Arc::new(Shared {
        calls: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let threads = cfg.threads.clamp(1, cfg.connections.max(1));
    let mut handles = Vec::new();
    let mut hists = Vec::new();
    for t in 0..threads {
        let n = cfg.connections / threads + usize::from(t < cfg.connections % threads);
        let hist = Arc::new(LoopMetrics::default());
        hists.push(hist.clone());
        let (cfg, shared) = (cfg.clone(), shared.clone());
        handles.push(std::thread::spawn(move || {
            drive(&cfg, addr, n, &shared, &hist)
        }));
    }
    std::thread::sleep(cfg.warmup);
    let cpu0 = cfg.server_pid.map(process_cpu_us).transpose()?;
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
    let cpu1 = cfg.server_pid.map(process_cpu_us).transpose()?;
    shared.stop.store(true, Ordering::Release);
    for h in handles {
        h.join()
            .map_err(|_| io::Error::other("bench thread panicked"))??;
    }
    let calls = shared.calls.load(Ordering::Relaxed);
    let snap = Snapshot::merge(&hists);
    let mut all = MethodSnapshot {
        calls: 0,
        errors: 0,
        latency: vec![0; BUCKETS],
    };
    for m in &snap.methods {
        for (a, b) in all.latency.iter_mut().zip(&m.latency) {
            *a += b;
        }
    }
    let mix = cfg
        .mix
        .iter()
        .map(|(m, w)| format!("{}:{w}", m.name()))
        .collect::<Vec<_>>()
        .join(",");
    Ok(BenchReport {
        addr: cfg.addr.clone(),
        transport: format!("{:?}", cfg.transport).to_lowercase(),
        connections: cfg.connections,
        depth: cfg.depth,
        mix,
        seconds: secs,
        calls,
        errors: shared.errors.load(Ordering::Relaxed),
        calls_per_sec: calls as f64 / secs,
        p50_us: all.quantile_us(0.5),
        p99_us: all.quantile_us(0.99),
        p999_us: all.quantile_us(0.999),
        server_cpu_us_per_call: match (cpu0, cpu1) {
            (Some(a), Some(b)) if calls > 0 => Some((b - a) as f64 / calls as f64),
            _ => None,
        },
    })
}

fn drive(
    cfg: &BenchConfig,
    addr: SocketAddr,
    n: usize,
    shared: &Shared,
    hist: &LoopMetrics,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(n);
    let value = vec![b'v'; cfg.value_size];
    let weights: Vec<Method> = cfg
        .mix
        .iter()
        .flat_map(|(m, w)| std::iter::repeat_n(*m, *w as usize))
        .collect();
    if weights.is_empty() {
        return Err(io::Error::other("empty method mix"));
    }
    let keys = cfg.keys.max(1);
    for i in 0..n {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(s);
        poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut c = Conn {
            stream,
            out: Vec::new(),
            inbuf: Vec::new(),
            inflight: VecDeque::new(),
            seq: 0,
            pick: i,
        };
        for _ in 0..cfg.depth {
            send(&mut c, cfg, &weights, keys, &value);
        }
        conns.push(c);
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 << 10];
    let limits = Limits::default();
    while !shared.stop.load(Ordering::Acquire) {
        poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
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
            while let Some(f) = crate::wire::scan(&c.inbuf[used..], Some(cfg.transport), &limits)
                .map_err(|e| io::Error::other(format!("bad reply: {}", e.error)))?
            {
                used += f.consumed;
                let (sent, seq, m) = c
                    .inflight
                    .pop_front()
                    .ok_or_else(|| io::Error::other("reply with no call in flight"))?;
                let h = MessageHeader::read(&mut Reader::new(f.message))
                    .map_err(|e| io::Error::other(format!("bad reply header: {e}")))?;
                // A reply is an error if it is an exception message or carries a declared exception (field 1).
                let error = h.seqid != seq || h.mtype != mtype::REPLY || !success(f.message);
                if measuring {
                    let ns = now.duration_since(sent).as_nanos() as u64;
                    hist.call(m as usize, ns, error);
                    shared.calls.fetch_add(1, Ordering::Relaxed);
                    if error {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                answered += 1;
            }
            c.inbuf.drain(..used);
            for _ in 0..answered {
                send(c, cfg, &weights, keys, &value);
            }
            flush(c)?;
        }
    }
    Ok(())
}

/// Whether a reply's result struct holds field 0 (success) or nothing (void).
fn success(message: &[u8]) -> bool {
    let mut r = Reader::new(message);
    if MessageHeader::read(&mut r).is_err() {
        return false;
    }
    matches!(r.field(), Ok(None) | Ok(Some((0, _))))
}

fn send(c: &mut Conn, cfg: &BenchConfig, weights: &[Method], keys: usize, value: &[u8]) {
    c.seq = c.seq.wrapping_add(1);
    c.pick = c.pick.wrapping_add(1);
    let m = weights[c.pick % weights.len()];
    let key = key_for(c.pick % keys);
    encode_call(&mut c.out, cfg.transport, m, c.seq, &key, value);
    c.inflight.push_back((Instant::now(), c.seq, m));
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
