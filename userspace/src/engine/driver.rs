//! One connection lifecycle for every transport. The kernel path (mio sockets) and the XDP path (smoltcp
//! sockets over AF_XDP) differ only in how bytes move and how they learn that something happened; what a
//! connection goes through is written here once:
//!
//! - opening: its session id, its session slot (the caller took it from the [`super::kernel::Gate`]), the
//!   metrics;
//! - pumping: received bytes → session → replies → send, pausing the reads while replies are backlogged
//!   (or deferred calls are many) and taking them up again once they drain;
//! - deferred replies (forwarded calls, back-end calls) back into their session;
//! - the sweep: deferred calls past their deadline, idle and stalled sessions;
//! - draining at shutdown, and closing: the session abandoned, its slot given back.
//!
//! A transport gives the driver a [`ByteStream`] per connection for the time of a pump, and its table of
//! connections as a [`Transport`]: the steps a loop takes on its connections ([`pump`], [`completions`],
//! [`sweep`], [`drain`]) are written here against that trait, so that both loops run the same code. What
//! stays with each loop is what only its transport has: accepting (a listener's backlog, smoltcp's
//! accept queue of established connections), readiness (epoll events, the sockets a packet reached) and
//! how a close completes.

use std::io;
use std::time::{Duration, Instant};

use super::kernel::Gate;
use super::metrics::LoopMetrics;
use super::session::{Env, Session};
use super::Completion;
use crate::backend::SessionId;
use crossbeam_channel::Receiver;

/// What one read from a transport gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// Bytes were handed to the session; `more`: the transport may have more right away (a short read
    /// from a socket means it is drained: the next readiness event brings more).
    Data { more: bool },
    /// Nothing to read now.
    Empty,
    /// The peer closed its sending side, and everything it sent was read.
    Eof,
}

/// A connection's byte stream, as a transport presents it to the driver.
pub trait ByteStream {
    /// Reads what has arrived (one piece) and hands it to `feed`, which takes it whole.
    fn recv(&mut self, feed: &mut dyn FnMut(&[u8])) -> io::Result<Recv>;
    /// Queues bytes to send; how many the transport took (0 while it is full).
    fn send(&mut self, data: &[u8]) -> io::Result<usize>;
}

/// How long a connection closed by faed may wait for the peer to finish before it is reset (a peer gone
/// mid-close would otherwise hold its session slot).
pub const CLOSE_LINGER: Duration = Duration::from_secs(10);

/// A connection's state in the driver.
pub struct Conn {
    pub session: Session,
    pub last_active: Instant,
    /// Reading stopped because replies are backlogged; resumes once they drain.
    pub read_paused: bool,
    /// The peer closed its sending side.
    pub eof: bool,
    /// When faed closed the connection (the transport finishes it), if it has.
    pub closing: Option<Instant>,
}

impl Conn {
    /// A connection just accepted: its session, counted as opened. `slot` and `generation` identify the
    /// session for the deferred replies that come back to this loop (`index`).
    pub fn open(
        index: u32,
        slot: u64,
        generation: u64,
        peer: std::net::IpAddr,
        metrics: &LoopMetrics,
        now: Instant,
    ) -> Conn {
        metrics.session_opened();
        let id = SessionId {
            lp: index,
            slot,
            generation,
        };
        Conn {
            session: Session::with_id(id, peer),
            last_active: now,
            read_paused: false,
            eof: false,
            closing: None,
        }
    }

    /// Moves bytes: what arrived → session → replies → the transport, and again while replies drained
    /// and reads were paused. `readable`: the transport may have bytes (the kernel path reads on readiness
    /// only). True if anything moved; `Err` when the connection is broken.
    pub fn pump<S: ByteStream + ?Sized>(
        &mut self,
        s: &mut S,
        readable: bool,
        env: &Env,
        metrics: &LoopMetrics,
        now: Instant,
    ) -> io::Result<bool> {
        if self.closing.is_some() {
            return Ok(false);
        }
        let mut work = false;
        if readable && !self.read_paused {
            work |= self.read(s, env, metrics, now)?;
        }
        // Bounded: each round sends replies and serves what the client sent meanwhile.
        for _ in 0..16 {
            work |= self.write(s, metrics)?;
            if !self.read_paused || self.session.paused(env) {
                break;
            }
            // Replies drained: serve the calls held back, then take up the requests left unread.
            self.read_paused = false;
            self.session.resume(env, metrics, now);
            work = true;
            self.read(s, env, metrics, now)?;
        }
        Ok(work)
    }

    /// Whether everything is said: no reply left to send, no deferred call out, and the session ends (a
    /// protocol error) or the peer has closed its side.
    pub fn done(&self) -> bool {
        self.session.out.is_empty()
            && !self.session.awaiting()
            && (self.session.closing() || self.eof)
    }

    /// While draining: whether the connection may close now.
    pub fn drained(&self) -> bool {
        self.session.out.is_empty() && !self.session.awaiting()
    }

    fn read<S: ByteStream + ?Sized>(
        &mut self,
        s: &mut S,
        env: &Env,
        metrics: &LoopMetrics,
        now: Instant,
    ) -> io::Result<bool> {
        let mut work = false;
        loop {
            if self.session.paused(env) {
                self.read_paused = true;
                return Ok(work);
            }
            if self.session.closing() || self.eof {
                return Ok(work);
            }
            let session = &mut self.session;
            let got = s.recv(&mut |data| {
                metrics.add(&metrics.bytes_in, data.len() as u64);
                session.on_bytes(data, env, metrics, now);
            })?;
            match got {
                Recv::Data { more } => {
                    self.last_active = now;
                    work = true;
                    if !more && !self.session.paused(env) {
                        return Ok(work);
                    }
                }
                Recv::Empty => return Ok(work),
                Recv::Eof => {
                    self.eof = true;
                    return Ok(work);
                }
            }
        }
    }

    fn write<S: ByteStream + ?Sized>(
        &mut self,
        s: &mut S,
        metrics: &LoopMetrics,
    ) -> io::Result<bool> {
        let mut work = false;
        while !self.session.out.is_empty() {
            let n = s.send(&self.session.out)?;
            if n == 0 {
                break;
            }
            metrics.add(&metrics.bytes_out, n as u64);
            self.session.sent(n);
            work = true;
        }
        Ok(work)
    }

    /// A deferred reply for this session: into its stream. Once a batch of them is in, the loop calls
    /// [`Conn::resume`] and pumps the connection (each session once per batch: serve what waited, then one
    /// write for all its replies).
    pub fn complete(&mut self, done: Completion, env: &Env, metrics: &LoopMetrics) {
        self.session.complete(done, env, metrics);
    }

    /// Serves the calls held back while deferred replies were out.
    pub fn resume(&mut self, env: &Env, metrics: &LoopMetrics, now: Instant) {
        self.session.resume(env, metrics, now);
    }

    /// Once a second: deferred calls past their deadline are answered (true: pump the connection), and
    /// the verdict on the connection.
    pub fn sweep(&mut self, env: &Env, metrics: &LoopMetrics, now: Instant) -> Sweep {
        if let Some(t) = self.closing {
            return if now.saturating_duration_since(t) >= CLOSE_LINGER {
                Sweep::Reset
            } else {
                Sweep::Keep
            };
        }
        let mut pump = false;
        if self.session.awaiting() {
            self.session.expire_deferred(now, env, metrics);
            self.session.resume(env, metrics, now);
            self.last_active = now;
            pump = true;
        }
        if self.session.stalled(env, now)
            || now.saturating_duration_since(self.last_active) > env.idle_timeout
        {
            metrics.add(&metrics.timed_out_sessions, 1);
            return Sweep::TimedOut;
        }
        if pump {
            Sweep::Pump
        } else {
            Sweep::Keep
        }
    }

    /// The connection is gone: its deferred calls are abandoned and its session slot given back.
    pub fn closed(&mut self, env: &Env, gate: &Gate, metrics: &LoopMetrics) {
        self.session.abandon(env);
        gate.leave();
        metrics.session_closed();
    }
}

/// The sweep's verdict on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    Keep,
    /// Deferred calls were answered: pump it.
    Pump,
    /// Idle past the idle timeout, or stalled mid-message past the message timeout: close it now.
    TimedOut,
    /// Closed by faed longer than [`CLOSE_LINGER`] ago and not finished: reset it.
    Reset,
}

/// The session a deferred reply belongs to.
pub fn session_of(done: &Completion) -> SessionId {
    match done {
        Completion::Forward(f) => f.ticket.session,
        Completion::Backend(b) => b.ticket.session,
    }
}

/// How faed ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Everything is said, or the session timed out: what the transport holds goes out, then a FIN
    /// (replies still in the session are dropped on a timeout; a peer that does not finish within
    /// [`CLOSE_LINGER`] is reset by the sweep; the kernel resets a socket with unread input).
    Finish,
    /// The connection is broken, or its close lingered too long: reset it.
    Reset,
}

/// A loop's table of connections, as the lifecycle steps below see it.
pub trait Transport {
    type Key: Copy + Ord;
    /// Whether a pump reads without a readiness event (smoltcp: reading an empty socket costs nothing, and
    /// no event says it has bytes) or only on one (a kernel socket: epoll says when).
    const READ_ALWAYS: bool;
    /// The connection's driver state, while it is in the table.
    fn link(&mut self, key: Self::Key) -> Option<&mut Conn>;
    /// The connection a deferred reply's session belongs to, if that session is still open.
    fn find(&self, session: SessionId) -> Option<Self::Key>;
    /// Every connection in the table.
    fn keys(&self) -> Vec<Self::Key>;
    /// No connection in the table.
    fn is_empty(&self) -> bool;
    /// Runs `f` on the connection's state and its byte stream.
    fn with_stream<R>(
        &mut self,
        key: Self::Key,
        f: impl FnOnce(&mut Conn, &mut dyn ByteStream) -> R,
    ) -> Option<R>;
    /// faed ends the connection; the session slot is given back ([`Conn::closed`]) when the transport
    /// lets the connection go (the kernel path at once, the XDP path once smoltcp has finished it).
    fn close(&mut self, key: Self::Key, how: Close, now: Instant);
    /// After a pump that left the connection open; `pending`: replies are left to send, or reads paused
    /// (the XDP path pumps those again next turn; the kernel path waits for the socket's readiness).
    fn pumped(&mut self, _key: Self::Key, _pending: bool) {}
    /// Deferred replies came for the connection: true if the transport pumps it itself this turn (the
    /// XDP loop, which pumps every connection a turn touched once), false to have it pumped now.
    fn replied(&mut self, _key: Self::Key) -> bool {
        false
    }
}

/// Pumps one connection and ends it when it is broken (reset) or everything is said (finished). True if
/// anything moved.
pub fn pump<T: Transport>(
    t: &mut T,
    key: T::Key,
    readable: bool,
    env: &Env,
    metrics: &LoopMetrics,
    now: Instant,
) -> bool {
    let readable = readable || T::READ_ALWAYS;
    let pumped = t.with_stream(key, |c, s| {
        if c.closing.is_some() {
            return None;
        }
        let r = c.pump(s, readable, env, metrics, now);
        let pending = !c.session.out.is_empty() || c.read_paused;
        Some((r, c.done(), pending))
    });
    match pumped.flatten() {
        None => false,
        Some((Err(_), _, _)) => {
            t.close(key, Close::Reset, now);
            true
        }
        Some((Ok(_), true, _)) => {
            t.close(key, Close::Finish, now);
            true
        }
        Some((Ok(work), false, pending)) => {
            t.pumped(key, pending);
            work
        }
    }
}

/// Deferred replies that came back (forwarded calls, back-end calls): each into its session, then each
/// session once per batch resumed (the calls held back served) and pumped (one write for all its
/// replies). True if any came.
pub fn completions<T: Transport>(
    t: &mut T,
    returns: &Receiver<Completion>,
    env: &Env,
    metrics: &LoopMetrics,
    now: Instant,
) -> bool {
    let mut touched: Vec<T::Key> = Vec::new();
    while let Ok(done) = returns.try_recv() {
        // A session closed meanwhile: its reply is dropped (the slot may serve another session).
        let Some(key) = t.find(session_of(&done)) else {
            continue;
        };
        if let Some(c) = t.link(key) {
            c.complete(done, env, metrics);
            touched.push(key);
        }
    }
    touched.sort_unstable();
    touched.dedup();
    for &key in &touched {
        // (A connection faed is closing serves nothing more: what it held back stays unserved.)
        if let Some(c) = t.link(key).filter(|c| c.closing.is_none()) {
            c.resume(env, metrics, now);
            if !t.replied(key) {
                pump(t, key, false, env, metrics, now);
            }
        }
    }
    !touched.is_empty()
}

/// Once a second, every connection: deferred calls past their deadline answered, sessions idle past the
/// idle timeout or stalled mid-message finished, closes that lingered past [`CLOSE_LINGER`] reset.
pub fn sweep<T: Transport>(t: &mut T, env: &Env, metrics: &LoopMetrics, now: Instant) {
    for key in t.keys() {
        let Some(c) = t.link(key) else {
            continue;
        };
        match c.sweep(env, metrics, now) {
            Sweep::Keep => {}
            Sweep::Pump => {
                pump(t, key, false, env, metrics, now);
            }
            Sweep::TimedOut => {
                tracing::debug!(session = c.session.id.slot, "session timed out");
                t.close(key, Close::Finish, now);
            }
            Sweep::Reset => t.close(key, Close::Reset, now),
        }
    }
}

/// One turn of a drain at shutdown: every connection with no reply left to send and no deferred call out
/// is finished. True when the loop may stop: no connection left, or the deadline passed (the loop then
/// ends what is left).
pub fn drain<T: Transport>(t: &mut T, deadline: Instant, now: Instant) -> bool {
    for key in t.keys() {
        if t.link(key)
            .is_some_and(|c| c.closing.is_none() && c.drained())
        {
            t.close(key, Close::Finish, now);
        }
    }
    now >= deadline || t.is_empty()
}
