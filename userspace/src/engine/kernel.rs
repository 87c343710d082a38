//! The kernel-socket path: one mio event loop per core, each with its own `SO_REUSEPORT` listener, serving
//! sessions to completion on its own thread.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::metrics::LoopMetrics;
use super::session::{Env, Session};
use super::Completion;
use crate::backend::{Doorbell, SessionId};
use crossbeam_channel::Receiver;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// How often a loop wakes with no traffic to enforce timeouts and retry a paused accept.
const TICK: Duration = Duration::from_millis(250);
/// Bytes read from a socket per `read` call, into the loop's one scratch buffer.
const READ_CHUNK: usize = 64 << 10;

/// The session cap shared by all loops: a loop accepts only while it can take a ticket.
pub struct Gate {
    open: AtomicUsize,
    max: usize,
}

impl Gate {
    pub fn new(max: usize) -> Self {
        Gate {
            open: AtomicUsize::new(0),
            max,
        }
    }
    pub fn try_enter(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }
    pub fn leave(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
    pub fn max(&self) -> usize {
        self.max
    }
    pub fn open_sessions(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A listening socket with `SO_REUSEPORT`, so that every loop accepts on the same port.
pub fn reuseport_listener(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}

struct Conn {
    stream: TcpStream,
    session: Session,
    last_active: Instant,
    /// Reading stopped because replies are backlogged; resumes once they drain.
    read_paused: bool,
    /// The peer closed its sending side.
    eof: bool,
    /// epoll reported the peer's FIN: read to the end, a short read does not mean the socket is drained.
    read_closed: bool,
}

pub struct KernelLoop {
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    scratch: Vec<u8>,
    env: Arc<Env>,
    metrics: Arc<LoopMetrics>,
    gate: Arc<Gate>,
    stopping: Arc<AtomicBool>,
    accept_paused: bool,
    shutdown_timeout: Duration,
    /// This loop's index among all loops, and the generation of the next session (slab slots are reused).
    index: u32,
    generation: u64,
    /// Replies of deferred calls, from forwarding workers and back-end threads.
    returns: Receiver<Completion>,
    bell: Arc<Doorbell>,
}

impl KernelLoop {
    /// Builds a loop around its listener; returns the loop and the doorbell that wakes it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u32,
        listener: std::net::TcpListener,
        env: Arc<Env>,
        metrics: Arc<LoopMetrics>,
        gate: Arc<Gate>,
        stopping: Arc<AtomicBool>,
        shutdown_timeout: Duration,
        returns: Receiver<Completion>,
    ) -> io::Result<(Self, Arc<Doorbell>)> {
        let poll = Poll::new()?;
        let bell = Arc::new(Doorbell::new(Waker::new(poll.registry(), WAKER)?));
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok((
            KernelLoop {
                poll,
                listener: Some(listener),
                conns: Slab::new(),
                scratch: vec![0; READ_CHUNK],
                env,
                metrics,
                gate,
                stopping,
                accept_paused: false,
                shutdown_timeout,
                index,
                generation: 0,
                returns,
                bell: bell.clone(),
            },
            bell,
        ))
    }

    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        let mut drain_deadline: Option<Instant> = None;
        loop {
            // Sleep only if no deferred reply came in meanwhile (the doorbell rings only a sleeping loop).
            let returns = &self.returns;
            let timeout = if self.bell.sleep(|| !returns.is_empty()) {
                TICK
            } else {
                Duration::ZERO
            };
            let polled = self.poll.poll(&mut events, Some(timeout));
            self.bell.awake();
            if let Err(e) = polled {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.on_completions();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(key) => {
                        if ev.is_read_closed() {
                            if let Some(c) = self.conns.get_mut(key) {
                                c.read_closed = true;
                            }
                        }
                        self.on_conn_event(key, ev.is_readable(), ev.is_writable())
                    }
                }
            }
            let now = Instant::now();
            if self.stopping.load(Ordering::Acquire) {
                let deadline = *drain_deadline.get_or_insert_with(|| {
                    self.begin_drain();
                    now + self.shutdown_timeout
                });
                self.close_drained();
                if self.conns.is_empty() || now >= deadline {
                    let left = self.conns.len();
                    if left > 0 {
                        tracing::warn!(
                            sessions = left,
                            "shutdown timeout: closing sessions with unsent replies"
                        );
                    }
                    return Ok(());
                }
                continue;
            }
            if self.accept_paused {
                self.accept();
            }
            if now.saturating_duration_since(last_sweep) >= Duration::from_secs(1) {
                last_sweep = now;
                self.sweep(now);
            }
        }
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        self.accept_paused = false;
        loop {
            if !self.gate.try_enter() {
                // Connections wait in the kernel's accept queue until a session closes.
                self.accept_paused = true;
                return;
            }
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY");
                    }
                    let entry = self.conns.vacant_entry();
                    let token = Token(entry.key());
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) = self.poll.registry().register(&mut stream, token, interest) {
                        tracing::warn!(error = %e, "cannot register a session");
                        self.gate.leave();
                        continue;
                    }
                    self.generation += 1;
                    let id = SessionId {
                        lp: self.index,
                        slot: token.0 as u64,
                        generation: self.generation,
                    };
                    entry.insert(Conn {
                        stream,
                        session: Session::with_id(id, peer.ip()),
                        last_active: Instant::now(),
                        read_paused: false,
                        eof: false,
                        read_closed: false,
                    });
                    self.metrics.session_opened();
                    if super::injected_panic("kernel") {
                        panic!("FAED_TEST_PANIC: a kernel loop panics on accepting a connection");
                    }
                }
                Err(e) => {
                    self.gate.leave();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, "accept failed");
                    }
                    return;
                }
            }
        }
    }

    fn on_conn_event(&mut self, key: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let mut alive = true;
        if readable && !conn.read_paused {
            alive = read(conn, &mut self.scratch, &self.env, &self.metrics);
        }
        if alive && (writable || !conn.session.out.is_empty()) {
            alive = write(conn, &self.metrics);
            // Replies drained: serve the calls held back, then take up the requests left unread.
            while alive && conn.read_paused && !conn.session.paused(&self.env) {
                conn.read_paused = false;
                conn.session
                    .resume(&self.env, &self.metrics, Instant::now());
                alive = read(conn, &mut self.scratch, &self.env, &self.metrics)
                    && write(conn, &self.metrics);
            }
        }
        let done = conn.session.out.is_empty()
            && !conn.session.awaiting()
            && (conn.session.closing() || conn.eof);
        if !alive || done {
            self.close(key);
        }
    }

    /// Deferred calls answered: each goes into its session's stream, which then carries on.
    fn on_completions(&mut self) {
        let mut touched: Vec<usize> = Vec::new();
        while let Ok(done) = self.returns.try_recv() {
            let session = match &done {
                Completion::Forward(f) => f.ticket.session,
                Completion::Backend(b) => b.ticket.session,
            };
            let key = session.slot as usize;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.session.id != session {
                continue; // the session closed meanwhile; its slot serves another
            }
            conn.session.complete(done, &self.env, &self.metrics);
            if touched.last() != Some(&key) {
                touched.push(key);
            }
        }
        // Each session once per batch: serve what waited, then one write for all its replies.
        touched.sort_unstable();
        touched.dedup();
        let now = Instant::now();
        for key in touched {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.session.resume(&self.env, &self.metrics, now);
                self.on_conn_event(key, false, true);
            }
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            conn.session.abandon(&self.env);
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if conn.session.closing() {
                // Closing a socket with unread input sends a reset, which can destroy the error reply
                // still in flight: end our side first and discard what the client has already sent.
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                let mut sink = [0u8; 4096];
                for _ in 0..16 {
                    match conn.stream.read(&mut sink) {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
            }
            self.gate.leave();
            self.metrics.session_closed();
        }
        if self.accept_paused {
            self.accept();
        }
    }

    /// Closes sessions idle past the idle timeout or stuck in the middle of a message.
    fn sweep(&mut self, now: Instant) {
        let stuck: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.session.awaiting())
            .map(|(k, _)| k)
            .collect();
        for key in stuck {
            if let Some(c) = self.conns.get_mut(key) {
                c.session.expire_deferred(now, &self.env, &self.metrics);
                c.session.resume(&self.env, &self.metrics, now);
                c.last_active = now;
            }
            self.on_conn_event(key, false, true);
        }
        let idle = self.env.idle_timeout;
        let stale: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.session.stalled(&self.env, now)
                    || now.saturating_duration_since(c.last_active) > idle
            })
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            self.metrics.add(&self.metrics.timed_out_sessions, 1);
            tracing::debug!(session = key, "session timed out");
            self.close(key);
        }
    }

    /// Stops accepting: the listener closes, its queued connections are refused, other loops' listeners on
    /// the port are closing too.
    fn begin_drain(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_paused = false;
    }

    /// While draining: every session without unsent replies is done.
    fn close_drained(&mut self) {
        let done: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.session.out.is_empty() && !c.session.awaiting())
            .map(|(k, _)| k)
            .collect();
        for key in done {
            self.close(key);
        }
    }
}

/// Reads what the socket has and serves it; false when the session must close now.
fn read(conn: &mut Conn, scratch: &mut [u8], env: &Env, metrics: &LoopMetrics) -> bool {
    loop {
        if conn.session.paused(env) {
            conn.read_paused = true;
            return true;
        }
        if conn.session.closing() || conn.eof {
            return true;
        }
        match conn.stream.read(scratch) {
            Ok(0) => {
                conn.eof = true;
                return true;
            }
            Ok(n) => {
                let now = Instant::now();
                conn.last_active = now;
                metrics.add(&metrics.bytes_in, n as u64);
                conn.session.on_bytes(&scratch[..n], env, metrics, now);
                if conn.session.paused(env) {
                    conn.read_paused = true;
                    return true;
                }
                if n < scratch.len() && !conn.read_closed {
                    // A short read means the socket is drained; the next readiness event brings more.
                    // (Reading on to WouldBlock would let one streaming client hold the loop.)
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Sends pending replies; false when the connection is broken.
fn write(conn: &mut Conn, metrics: &LoopMetrics) -> bool {
    while !conn.session.out.is_empty() {
        match conn.stream.write(&conn.session.out) {
            Ok(0) => return false,
            Ok(n) => {
                metrics.add(&metrics.bytes_out, n as u64);
                conn.session.sent(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}
