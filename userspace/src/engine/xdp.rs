//! The kernel-bypass path: one thread per AF_XDP queue runs a smoltcp stack (fae-netstack) and feeds its
//! connections to the same `Session`s, through the same connection lifecycle (engine/driver.rs), as the
//! kernel path. What differs is the transport's: the byte pumping, accepting (an accept queue of
//! established connections), which connections a turn looks at, and how a close completes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fae_netstack::stack::{ConnId, Port, Stack, StackConfig};
use fae_netstack::xdp::{AttachMode, XdpCounters, XdpProgram};
use fae_netstack::NetError;

use super::driver::{self, ByteStream, Close, Recv, Transport};
use super::kernel::Gate;
use super::metrics::LoopMetrics;
use super::session::Env;
use super::Completion;
use crate::backend::{Doorbell, SessionId};
use crate::config::{Config, XdpMode};
use crossbeam_channel::Receiver;

/// The attached program, shared with the admin endpoint for its counters.
pub type SharedProgram = Arc<Mutex<XdpProgram>>;

/// Everything the XDP path needs to start.
pub struct XdpPath {
    pub program: SharedProgram,
    pub stacks: Vec<(u32, Stack)>,
}

/// Attaches the program and binds one AF_XDP socket per queue.
pub fn prepare(cfg: &Config) -> Result<XdpPath, NetError> {
    let l = &cfg.listener;
    let port = l.xdp_port(&cfg.server);
    let mode = match l.xdp_mode {
        XdpMode::Auto => AttachMode::Auto,
        XdpMode::Native => AttachMode::Native,
        XdpMode::Generic => AttachMode::Generic,
    };
    let available = fae_netstack::sys::rx_queues(&l.interface)?;
    let queues = if l.queues == 0 {
        available
    } else {
        l.queues.min(available)
    };
    let mut program = XdpProgram::attach(&l.interface, &[port], mode)?;
    let mut stacks = Vec::new();
    let shared = Arc::new(fae_netstack::admission::Connections::default());
    for q in 0..queues {
        let stack = Stack::new(StackConfig {
            iface: l.interface.clone(),
            queue: q,
            ports: vec![port],
            backlog: l.xdp_backlog,
            max_half_open: l.xdp_max_half_open,
            half_open_timeout: Duration::from_millis(l.xdp_half_open_timeout_ms),
            buffer: l.xdp_buffer_bytes,
            zero_copy: l.zero_copy,
            frames: l.xdp_frames,
            shared: shared.clone(),
            groups: l.xdp_socket_groups,
        })?;
        program.register(q, stack.fd())?;
        stacks.push((q, stack));
    }
    tracing::info!(interface = %l.interface, port, queues, "serving FunServant over XDP/AF_XDP");
    Ok(XdpPath {
        program: Arc::new(Mutex::new(program)),
        stacks,
    })
}

/// Gives up every capability but CAP_NET_BIND_SERVICE (if held: the kernel path's further loops and the
/// cluster port bind later, possibly below 1024), once the first listeners are bound and the XDP path is
/// attached: what runs from then on (AF_XDP rings and wake-ups, reading the program's counters through
/// its map descriptor, the program's detach when its link descriptor closes) needs none. Capabilities
/// are per thread: this runs before faed starts its other threads, which inherit the reduced sets.
pub fn drop_capabilities() -> Result<(), String> {
    use caps::{CapSet, Capability};
    let err =
        |set: CapSet, e: caps::errors::CapsError| format!("dropping {set:?} capabilities: {e}");
    let mut keep = caps::CapsHashSet::new();
    if caps::has_cap(None, CapSet::Permitted, Capability::CAP_NET_BIND_SERVICE).unwrap_or(false) {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    // The ambient set first (it may hold only what is both permitted and inheritable), then the effective
    // set before the permitted one (effective must stay within permitted).
    caps::clear(None, CapSet::Ambient).map_err(|e| err(CapSet::Ambient, e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| err(CapSet::Inheritable, e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| err(CapSet::Effective, e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| err(CapSet::Permitted, e))?;
    Ok(())
}

pub fn counters(p: &SharedProgram) -> XdpCounters {
    p.lock()
        .unwrap_or_else(|e| e.into_inner())
        .counters()
        .unwrap_or_default()
}

/// Where an XDP loop sleeps: on its AF_XDP socket and its doorbell together, so that a deferred reply wakes
/// it at once.
pub struct Waiter {
    poll: mio::Poll,
    events: mio::Events,
    bell: Arc<Doorbell>,
}

const XSK: mio::Token = mio::Token(0);
const BELL: mio::Token = mio::Token(1);

impl Waiter {
    pub fn new<P: Port>(stack: &mut Stack<P>) -> std::io::Result<(Waiter, Arc<Doorbell>)> {
        let poll = mio::Poll::new()?;
        let fd = stack.fd();
        poll.registry()
            .register(&mut mio::unix::SourceFd(&fd), XSK, mio::Interest::READABLE)?;
        let bell = Arc::new(Doorbell::new(mio::Waker::new(poll.registry(), BELL)?));
        // Frames of this loop's connections that arrived on another queue ring the same bell.
        let ring = bell.clone();
        stack.set_waker(Arc::new(move || ring.ring()));
        let w = Waiter {
            poll,
            events: mio::Events::with_capacity(4),
            bell: bell.clone(),
        };
        Ok((w, bell))
    }

    /// Sleeps until a packet, a deferred reply or the stack's next timer, at most `max`.
    fn wait<P: Port>(
        &mut self,
        stack: &mut Stack<P>,
        returns: &Receiver<Completion>,
        max: Duration,
    ) {
        let delay = stack.delay(max);
        if delay.is_zero()
            || !self
                .bell
                .sleep(|| !returns.is_empty() || stack.has_forwarded())
        {
            self.bell.awake();
            return;
        }
        // The socket is level-triggered for this purpose: re-arm it, so a packet already waiting wakes us.
        let fd = stack.fd();
        let _ = self.poll.registry().reregister(
            &mut mio::unix::SourceFd(&fd),
            XSK,
            mio::Interest::READABLE,
        );
        let _ = self
            .poll
            .poll(&mut self.events, Some(delay.max(Duration::from_millis(1))));
        self.bell.awake();
    }
}

/// A smoltcp connection as the driver's byte stream, for one pump.
struct SocketStream<'a, P: Port> {
    stack: &'a mut Stack<P>,
    id: ConnId,
}

impl<P: Port> ByteStream for SocketStream<'_, P> {
    fn recv(&mut self, feed: &mut dyn FnMut(&[u8])) -> std::io::Result<Recv> {
        if self.stack.recv(self.id, feed) > 0 {
            let more = self.stack.can_recv(self.id);
            return Ok(Recv::Data { more });
        }
        Ok(if self.stack.peer_done(self.id) {
            Recv::Eof
        } else {
            Recv::Empty
        })
    }

    fn send(&mut self, data: &[u8]) -> std::io::Result<usize> {
        Ok(self.stack.send(self.id, data))
    }
}

/// One AF_XDP queue's socket counters, published by its loop every second for the admin port.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub queue: u32,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_no_neighbour: AtomicU64,
    pub tx_no_frame: AtomicU64,
    pub tx_device_dropped: AtomicU64,
    pub tx_resent: AtomicU64,
    pub syn_dropped: AtomicU64,
    /// Listening sockets added in a poll for SYNs that found their group's pool empty.
    pub listen_added: AtomicU64,
    pub syn_duplicate: AtomicU64,
    /// Of those: SYN-ACKs sent again (the same SYN in a handshake), challenge ACKs (the others).
    pub syn_ack_resent: AtomicU64,
    pub challenge_acks: AtomicU64,
    /// SYNs admitted once the connection they hit was gone.
    pub syn_retried: AtomicU64,
    pub rx_foreign: AtomicU64,
    /// The kernel's drops before faed saw the frame (RX ring full, fill ring empty, other).
    pub rx_ring_full: AtomicU64,
    pub rx_fill_empty: AtomicU64,
    pub rx_kernel_dropped: AtomicU64,
    /// Handshakes: in progress now (a gauge), completed, timed out, dropped past the cap.
    pub half_open: AtomicU64,
    pub established: AtomicU64,
    pub half_open_timed_out: AtomicU64,
    pub half_open_evicted: AtomicU64,
    /// The accept queue: established connections waiting for a session slot now (a gauge), and those
    /// reset from it (past `listener.xdp_backlog`, past the idle timeout, or at shutdown).
    pub accept_waiting: AtomicU64,
    pub accept_refused: AtomicU64,
}

impl QueueStats {
    pub fn new(queue: u32) -> QueueStats {
        QueueStats {
            queue,
            ..Default::default()
        }
    }

    fn publish(&self, s: &fae_netstack::xsk::PortStats, h: &fae_netstack::stack::HandshakeStats) {
        for (to, v) in [
            (&self.rx_packets, s.rx_packets),
            (&self.tx_packets, s.tx_packets),
            (&self.rx_dropped, s.rx_dropped),
            (&self.tx_no_neighbour, s.tx_no_neighbour),
            (&self.tx_no_frame, s.tx_no_frame),
            (&self.tx_device_dropped, s.tx_device_dropped),
            (&self.tx_resent, s.tx_resent),
            (&self.syn_dropped, h.syn_dropped),
            (&self.listen_added, h.pool_added),
            (&self.syn_duplicate, s.syn_duplicate),
            (&self.syn_ack_resent, h.syn_ack_resent),
            (&self.challenge_acks, h.challenge_acks),
            (&self.syn_retried, h.syn_retried),
            (&self.rx_foreign, s.rx_foreign),
            (&self.rx_ring_full, s.rx_ring_full),
            (&self.rx_fill_empty, s.rx_fill_empty),
            (&self.rx_kernel_dropped, s.rx_kernel_dropped),
            (&self.half_open, h.half_open),
            (&self.established, h.established),
            (&self.half_open_timed_out, h.timed_out),
            (&self.half_open_evicted, h.evicted),
        ] {
            to.store(v, Ordering::Relaxed);
        }
    }
}

/// One AF_XDP queue's loop (or, in the tests that run without root, one over an in-memory wire).
pub struct XdpLoop<P: Port = fae_netstack::xsk::XskPort> {
    pub index: u32,
    pub queue_stats: Arc<QueueStats>,
    pub returns: Receiver<Completion>,
    pub waiter: Waiter,
    pub stack: Stack<P>,
    pub env: Arc<Env>,
    pub metrics: Arc<LoopMetrics>,
    pub gate: Arc<Gate>,
    pub stopping: Arc<AtomicBool>,
    pub shutdown_timeout: Duration,
    /// After work, keep polling this long before sleeping (`listener.busy_poll_us`).
    pub busy_poll: Duration,
    /// Established connections that may wait for a session slot (`listener.xdp_backlog`, as the kernel
    /// path's listeners hold theirs in their accept queue, up to `server.backlog`: fewer here, each holds
    /// its two socket buffers); past it, or waiting past the idle timeout, they are reset.
    pub accept_queue: usize,
}

/// The XDP loop's connections: the driver's state of each, by smoltcp connection.
#[derive(Default)]
struct Live {
    conns: HashMap<ConnId, driver::Conn>,
    /// Deferred replies find their connection by its slot, a number that is never reused.
    slots: HashMap<u64, ConnId>,
    next_slot: u64,
    /// Connections to pump again next turn (replies left to send), and those faed closed or refused, whose
    /// sockets are looked at until they are gone. Each turn pumps only these, the connections that
    /// received packets and those whose deferred replies came: not every connection.
    again: Vec<ConnId>,
    closing: Vec<ConnId>,
    /// Established connections waiting for a session slot (faed at `server.max_sessions`), oldest first,
    /// with when they came: the XDP path's accept queue.
    waiting: VecDeque<(ConnId, Instant)>,
}

/// The connections with their stack: the driver's [`Transport`] for one step.
struct Table<'a, P: Port> {
    stack: &'a mut Stack<P>,
    live: &'a mut Live,
}

impl<P: Port> Transport for Table<'_, P> {
    type Key = ConnId;
    const READ_ALWAYS: bool = true;

    fn link(&mut self, key: ConnId) -> Option<&mut driver::Conn> {
        self.live.conns.get_mut(&key)
    }

    fn find(&self, session: SessionId) -> Option<ConnId> {
        self.live.slots.get(&session.slot).copied()
    }

    fn keys(&self) -> Vec<ConnId> {
        self.live.conns.keys().copied().collect()
    }

    fn is_empty(&self) -> bool {
        self.live.conns.is_empty()
    }

    fn with_stream<R>(
        &mut self,
        key: ConnId,
        f: impl FnOnce(&mut driver::Conn, &mut dyn ByteStream) -> R,
    ) -> Option<R> {
        let c = self.live.conns.get_mut(&key)?;
        let mut stream = SocketStream {
            stack: self.stack,
            id: key,
        };
        Some(f(c, &mut stream))
    }

    /// smoltcp finishes the close (sends what is queued, then a FIN; or a reset); the connection stays in
    /// the table, and keeps its session slot, until its socket is gone.
    fn close(&mut self, key: ConnId, how: Close, now: Instant) {
        if let Some(c) = self.live.conns.get_mut(&key) {
            c.closing.get_or_insert(now);
        }
        match how {
            Close::Finish => self.stack.close(key),
            Close::Reset => self.stack.abort(key),
        }
        self.live.closing.push(key);
    }

    fn replied(&mut self, key: ConnId) -> bool {
        self.live.again.push(key);
        true
    }

    fn pumped(&mut self, key: ConnId, pending: bool) {
        if pending {
            self.live.again.push(key);
        }
    }
}

impl<P: Port> XdpLoop<P> {
    pub fn run(mut self) {
        let mut live = Live::default();
        let mut last_sweep = Instant::now();
        let mut drain_deadline: Option<Instant> = None;
        let mut last_work = Instant::now();
        let mut work: Vec<ConnId> = Vec::new();
        let mut refused = 0u64;
        let (env, metrics) = (self.env.clone(), self.metrics.clone());
        let (env, metrics) = (&*env, &*metrics);
        loop {
            let mut busy = self.stack.poll();
            let now = Instant::now();
            let stopping = self.stopping.load(Ordering::Acquire);
            // Deferred replies first: the connections they reached join this turn's pumps.
            let mut table = Table {
                stack: &mut self.stack,
                live: &mut live,
            };
            busy |= driver::completions(&mut table, &self.returns, env, metrics, now);
            work.clear();
            self.stack.take_touched(&mut work);
            work.append(&mut live.again);
            for id in self.stack.accept() {
                live.waiting.push_back((id, now));
            }
            // A connection takes a session slot in the order it came; at the session cap it waits, as in a
            // kernel listener's accept queue, until a session closes (on any loop: the cap is shared).
            while let Some(&(id, _)) = live.waiting.front() {
                if stopping || !self.gate.try_enter() {
                    break;
                }
                live.waiting.pop_front();
                work.push(id);
                let peer = self.stack.peer(id).map_or(
                    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    std::net::IpAddr::V4,
                );
                live.next_slot += 1;
                let slot = live.next_slot;
                live.slots.insert(slot, id);
                let c = driver::Conn::open(self.index, slot, slot, peer, metrics, now);
                live.conns.insert(id, c);
                if super::injected_panic("xdp") {
                    panic!("FAED_TEST_PANIC: an XDP loop panics on accepting a connection");
                }
            }
            // Refused: all of them while draining, the newest past the queue's bound, those that waited
            // past the idle timeout.
            let keep = if stopping { 0 } else { self.accept_queue };
            let expired = |&(_, since): &(ConnId, Instant)| {
                now.saturating_duration_since(since) > env.idle_timeout
            };
            loop {
                let refuse = if live.waiting.len() > keep {
                    live.waiting.pop_back()
                } else if live.waiting.front().is_some_and(expired) {
                    live.waiting.pop_front()
                } else {
                    break;
                };
                let Some((id, _)) = refuse else { break };
                self.stack.abort(id);
                live.closing.push(id);
                refused += 1;
            }
            let mut table = Table {
                stack: &mut self.stack,
                live: &mut live,
            };
            work.sort_unstable();
            work.dedup();
            for &id in &work {
                busy |= driver::pump(&mut table, id, true, env, metrics, now);
            }
            if busy {
                self.stack.poll();
            }
            // Release connections that are gone, and sockets refused above: those a packet reached or faed
            // closed, and once a second every connection (a socket smoltcp closed on a timer).
            let full = now.saturating_duration_since(last_sweep) >= Duration::from_secs(1);
            work.extend_from_slice(&live.closing);
            // (Those the second poll reached stay touched: they are pumped next turn.)
            work.extend_from_slice(self.stack.touched());
            work.sort_unstable();
            work.dedup();
            let gone = if full || stopping {
                self.stack.reap()
            } else {
                self.stack.closed_among(&work)
            };
            for id in gone {
                if let Some(mut c) = live.conns.remove(&id) {
                    c.closed(env, &self.gate, metrics);
                    live.slots.remove(&c.session.id.slot);
                    // A slot freed: a connection waiting for one is admitted next turn, not after a sleep.
                    busy |= !live.waiting.is_empty();
                } else if !live.waiting.is_empty() {
                    // Gone while it waited (the client gave up): its id may serve another connection.
                    live.waiting.retain(|&(w, _)| w != id);
                }
                self.stack.release(id);
            }
            live.closing.retain(|id| self.stack.is_connection(*id));
            live.closing.sort_unstable();
            live.closing.dedup();
            let mut table = Table {
                stack: &mut self.stack,
                live: &mut live,
            };
            if stopping {
                let deadline = *drain_deadline.get_or_insert(now + self.shutdown_timeout);
                if driver::drain(&mut table, deadline, now) {
                    for &id in live.conns.keys() {
                        self.stack.abort(id);
                    }
                    self.stack.poll();
                    return;
                }
            } else if full {
                last_sweep = now;
                driver::sweep(&mut table, env, metrics, now);
                self.queue_stats
                    .publish(&self.stack.stats(), &self.stack.handshakes());
                let q = &self.queue_stats;
                q.accept_waiting
                    .store(live.waiting.len() as u64, Ordering::Relaxed);
                q.accept_refused.store(refused, Ordering::Relaxed);
            }
            if busy {
                last_work = now;
            } else if now.saturating_duration_since(last_work) < self.busy_poll && !stopping {
                // Busy polling: no sleep (and no wake-up to pay) while traffic may come any moment.
                std::hint::spin_loop();
            } else {
                // Connections waiting for a session slot look again soon: the slot may free on any loop.
                let max = Duration::from_millis(if stopping || !live.waiting.is_empty() {
                    5
                } else {
                    100
                });
                self.waiter.wait(&mut self.stack, &self.returns, max);
            }
        }
    }
}
