//! The kernel-socket path: one mio event loop per core, each with its own `SO_REUSEPORT` listener, serving
//! sessions to completion on its own thread. A unix-domain socket (`server.unix_socket`), when configured,
//! is served by the same loops: each registers the one listening socket and accepts from it (a unix socket
//! has no `SO_REUSEPORT`; the loops that lose the race for a connection see `WouldBlock`).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, UnixListener};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::driver::{self, ByteStream, Close, Recv, Transport};
use super::metrics::LoopMetrics;
use super::session::Env;
use super::Completion;
use crate::backend::{Doorbell, SessionId};
use crate::sock::Stream;
use crossbeam_channel::Receiver;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const UNIX_LISTENER: Token = Token(usize::MAX - 3);
/// The address sessions on the unix socket count as (per-client limits, logs): the local host.
const UNIX_PEER: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
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

/// Binds `server.unix_socket`: a stale socket file (connecting to it is refused: nobody listens) is
/// replaced; a live one, one that cannot be probed, or another kind of file is an error. The mode and owner
/// are set before `listen`, so that no client can connect while the file is still open to others. Returns
/// the listener and the file's identity (device, inode), so that only this file is removed at exit.
pub fn unix_listener(
    s: &crate::config::ServerConfig,
) -> io::Result<Option<(std::os::unix::net::UnixListener, (u64, u64))>> {
    use socket2::{Domain, SockAddr, Socket, Type};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let Some(path) = &s.unix_socket else {
        return Ok(None);
    };
    let addr = SockAddr::unix(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        // A non-blocking probe: a server with a full backlog answers EAGAIN rather than hanging us.
        let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        probe.set_nonblocking(true)?;
        match probe.connect(&addr) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
            Ok(()) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another server accepts on {}", path.display()),
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another server accepts on {} (its backlog is full)",
                        path.display()
                    ),
                ))
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{} exists and cannot be probed ({e}); remove it if no server uses it",
                        path.display()
                    ),
                ))
            }
        }
    }
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr)?;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::other(format!(
            "{} was replaced while faed bound it",
            path.display()
        )));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(s.unix_socket_mode))?;
    if let Some(owner) = &s.unix_socket_owner {
        let (user, group) = owner.split_once(':').unwrap_or((owner, ""));
        let uid = (!user.is_empty())
            .then(|| lookup_id(user, "/etc/passwd"))
            .transpose()?;
        let gid = (!group.is_empty())
            .then(|| lookup_id(group, "/etc/group"))
            .transpose()?;
        std::os::unix::fs::lchown(path, uid, gid)?;
    }
    sock.listen(s.backlog)?;
    Ok(Some((sock.into(), (meta.dev(), meta.ino()))))
}

/// A user's or group's id: a number, or a name looked up in /etc/passwd or /etc/group (local accounts,
/// as systemd's `User=` is; a directory service's names can be given as numbers).
fn lookup_id(name: &str, file: &str) -> io::Result<u32> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    let text = std::fs::read_to_string(file)?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(n, _)| *n == name)
        .and_then(|(_, id)| id.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no {name:?} in {file}")))
}

struct Conn {
    stream: Stream,
    /// The connection's lifecycle (session, pauses, timeouts): the driver's, shared with the XDP path.
    link: driver::Conn,
    /// epoll reported the peer's FIN: read to the end, a short read does not mean the socket is drained.
    read_closed: bool,
}

/// A kernel socket as the driver's byte stream, for one pump.
struct SocketStream<'a> {
    stream: &'a mut Stream,
    /// The loop's one read buffer.
    scratch: &'a mut [u8],
    read_closed: bool,
}

impl ByteStream for SocketStream<'_> {
    fn recv(&mut self, feed: &mut dyn FnMut(&[u8])) -> io::Result<Recv> {
        loop {
            match self.stream.read(self.scratch) {
                Ok(0) => return Ok(Recv::Eof),
                Ok(n) => {
                    feed(&self.scratch[..n]);
                    // A short read means the socket is drained; the next readiness event brings more.
                    // (Reading on to WouldBlock would let one streaming client hold the loop.)
                    let more = n == self.scratch.len() || self.read_closed;
                    return Ok(Recv::Data { more });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Recv::Empty),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            match self.stream.write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

pub struct KernelLoop {
    poll: Poll,
    listener: Option<TcpListener>,
    unix: Option<UnixListener>,
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
        listener: Option<std::net::TcpListener>,
        unix: Option<std::os::unix::net::UnixListener>,
        env: Arc<Env>,
        metrics: Arc<LoopMetrics>,
        gate: Arc<Gate>,
        stopping: Arc<AtomicBool>,
        shutdown_timeout: Duration,
        returns: Receiver<Completion>,
    ) -> io::Result<(Self, Arc<Doorbell>)> {
        let poll = Poll::new()?;
        let bell = Arc::new(Doorbell::new(Waker::new(poll.registry(), WAKER)?));
        let mut listener = listener.map(TcpListener::from_std);
        if let Some(l) = &mut listener {
            poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        let mut unix = unix.map(UnixListener::from_std);
        if let Some(l) = &mut unix {
            poll.registry()
                .register(l, UNIX_LISTENER, Interest::READABLE)?;
        }
        Ok((
            KernelLoop {
                poll,
                listener,
                unix,
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
        // Held apart from `self`, which the driver's steps take as the transport.
        let (env, metrics, returns) =
            (self.env.clone(), self.metrics.clone(), self.returns.clone());
        let (env, metrics) = (&*env, &*metrics);
        loop {
            // Sleep only if no deferred reply came in meanwhile (the doorbell rings only a sleeping loop).
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
            driver::completions(&mut self, &returns, env, metrics, Instant::now());
            for ev in events.iter() {
                match ev.token() {
                    LISTENER | UNIX_LISTENER => self.accept(),
                    WAKER => {}
                    Token(key) => {
                        if ev.is_read_closed() {
                            if let Some(c) = self.conns.get_mut(key) {
                                c.read_closed = true;
                            }
                        }
                        driver::pump(
                            &mut self,
                            key,
                            ev.is_readable(),
                            env,
                            metrics,
                            Instant::now(),
                        );
                    }
                }
            }
            let now = Instant::now();
            if self.stopping.load(Ordering::Acquire) {
                let deadline = *drain_deadline.get_or_insert_with(|| {
                    self.begin_drain();
                    now + self.shutdown_timeout
                });
                if driver::drain(&mut self, deadline, now) {
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
                driver::sweep(&mut self, env, metrics, now);
            }
        }
    }

    /// Accepts what waits on the TCP listener, then on the unix socket.
    fn accept(&mut self) {
        self.accept_paused = false;
        if self.listener.is_some() {
            self.accept_from(false);
        }
        if self.unix.is_some() && !self.accept_paused {
            self.accept_from(true);
        }
    }

    fn accept_from(&mut self, unix: bool) {
        loop {
            if !self.gate.try_enter() {
                // Connections wait in the kernel's accept queue until a session closes.
                self.accept_paused = true;
                return;
            }
            let accepted = match (unix, &self.listener, &self.unix) {
                (false, Some(l), _) => l.accept().map(|(s, peer)| {
                    if let Err(e) = s.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY");
                    }
                    (Stream::Tcp(s), peer.ip())
                }),
                (true, _, Some(l)) => l.accept().map(|(s, _)| (Stream::Unix(s), UNIX_PEER)),
                _ => {
                    self.gate.leave();
                    return;
                }
            };
            match accepted {
                Ok((mut stream, peer)) => {
                    let entry = self.conns.vacant_entry();
                    let token = Token(entry.key());
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) = self.poll.registry().register(&mut stream, token, interest) {
                        tracing::warn!(error = %e, "cannot register a session");
                        self.gate.leave();
                        continue;
                    }
                    self.generation += 1;
                    let link = driver::Conn::open(
                        self.index,
                        token.0 as u64,
                        self.generation,
                        peer,
                        &self.metrics,
                        Instant::now(),
                    );
                    entry.insert(Conn {
                        stream,
                        link,
                        read_closed: false,
                    });
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

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            conn.link.closed(&self.env, &self.gate, &self.metrics);
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if conn.link.session.closing() {
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
        }
        if self.accept_paused {
            self.accept();
        }
    }

    /// Stops accepting: the listener closes, its queued connections are refused, other loops' listeners on
    /// the port are closing too.
    fn begin_drain(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some(mut l) = self.unix.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_paused = false;
    }
}

impl Transport for KernelLoop {
    type Key = usize;
    const READ_ALWAYS: bool = false;

    fn link(&mut self, key: usize) -> Option<&mut driver::Conn> {
        self.conns.get_mut(key).map(|c| &mut c.link)
    }

    fn find(&self, session: SessionId) -> Option<usize> {
        // The slab's key is the session's slot; a slot serves one session after another (the generation).
        let key = session.slot as usize;
        self.conns
            .get(key)
            .is_some_and(|c| c.link.session.id == session)
            .then_some(key)
    }

    fn keys(&self) -> Vec<usize> {
        self.conns.iter().map(|(k, _)| k).collect()
    }

    fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    fn with_stream<R>(
        &mut self,
        key: usize,
        f: impl FnOnce(&mut driver::Conn, &mut dyn ByteStream) -> R,
    ) -> Option<R> {
        let conn = self.conns.get_mut(key)?;
        let mut stream = SocketStream {
            stream: &mut conn.stream,
            scratch: &mut self.scratch,
            read_closed: conn.read_closed,
        };
        Some(f(&mut conn.link, &mut stream))
    }

    /// The kernel finishes every close (a FIN after what is queued; a reset if the socket is broken): the
    /// socket leaves the loop, and its session slot is given back, at once.
    fn close(&mut self, key: usize, _how: Close, _now: Instant) {
        KernelLoop::close(self, key);
    }
}
