//! A smoltcp TCP/IP stack over one AF_XDP socket, serving one or more TCP ports.
//!
//! smoltcp's listening socket accepts one connection and then is that connection, so the stack keeps a
//! pool of listening sockets per port and tops it up as connections are accepted. Connections have Nagle
//! off (an RPC reply must leave at once), a received segment's ACK delayed until the reply carries it (at
//! most 10 ms; one frame per call, not two), and buffers larger than 64 KiB, so that window scaling is
//! on.
//!
//! A socket's life: listening (the pool) → half-open (SYN received, SYN-ACK sent) → a connection handed to
//! the application once established → closed → kept as a spare that listens again. Half-open sockets are
//! capped (`max_half_open`) and time out (`half_open_timeout`). At the cap, the oldest half-open socket
//! older than 100 ms is dropped silently to make room, and a SYN with no room is dropped at the device
//! (no SYN cookies: smoltcp has none); under a flood of N SYNs/s a client's handshake has about cap/N
//! seconds, at least 100 ms, to complete. A SYN that finds no listening socket left in the pool during
//! one poll gets a listening socket added for it before its group is polled (a spare's, or a new one), so
//! the backlog follows the load within the half-open cap; the pool's size between polls then doubles (up
//! to half the cap). (Until 2026-12-02 such a SYN was dropped and the client retransmitted it 1 s later:
//! ~75 per queue in a bench-xdp run, each a connection's 1 s connect time.)
//!
//! Connection groups: smoltcp finds the socket of a received packet by walking its whole socket set, and
//! every poll walks it again to send (at 5,000 connections that walk took 17.5% of faed's CPU). The stack
//! therefore spreads its connections over `groups` smoltcp interfaces, each with its own socket set and
//! listening pool, by a hash of the client's address and port: a received packet is handed to its
//! group's interface only, and only the groups with packets, with data queued or with a timer due are
//! polled. The cost per packet is that of one group, about connections / groups sockets.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use crate::admission::{is_syn, tuple_of, Admission, Connections, RepeatedSyn, Tuple, Waker};
use crate::xsk::{PortStats, XskPort};
use crate::NetError;

/// TSval: milliseconds since the first connection of the process, the same clock for every connection
/// (monotonic, as RFC 7323's PAWS on the client needs across a port's successive connections).
fn tsval() -> u32 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u32
}

/// How the stack is set up.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub iface: String,
    pub queue: u32,
    pub ports: Vec<u16>,
    /// Listening sockets kept ready per port (connections that can arrive at once); the pool grows under
    /// load up to `max_half_open`.
    pub backlog: usize,
    /// Connections in their handshake (SYN received, not yet established) at most, per stack.
    pub max_half_open: usize,
    /// How long a handshake may take before its socket is dropped.
    pub half_open_timeout: Duration,
    /// Receive and send buffer of each connection.
    pub buffer: usize,
    pub zero_copy: bool,
    /// UMEM frames of the queue's AF_XDP socket (see [`XskPort::bind`]).
    pub frames: u32,
    /// The connections of all the stacks serving one interface (one per queue).
    pub shared: std::sync::Arc<Connections>,
    /// smoltcp interfaces the connections are spread over by their 4-tuple (see the module's doc).
    pub groups: usize,
}

/// A connection handed to the application: its group and its socket there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId {
    group: u16,
    handle: SocketHandle,
}

/// What the stack needs from the device under it, beyond smoltcp's `Device`: the AF_XDP socket
/// ([`XskPort`]) in faed; an in-memory pipe ([`crate::pipe`]) in the tests that run without root. The
/// defaults suit a device with no XDP program in front (no SYN budget, no neighbour table, one queue).
pub trait Port: smoltcp::phy::Device {
    /// Takes what arrived (true if anything did).
    fn pull(&mut self) -> bool;
    /// Sends what was written.
    fn push(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// A descriptor that is readable when something arrived (for poll(2)).
    fn fd(&self) -> i32;
    fn stats(&self) -> PortStats {
        PortStats::default()
    }
    /// What the device lets through to smoltcp.
    fn admission(&mut self) -> &mut Admission;
    /// An established connection (its 4-tuple): keep its next hop (true if pinned: then `unpin` when it
    /// goes).
    fn pin(&mut self, _t: Tuple) -> bool {
        false
    }
    fn unpin(&mut self, _t: Tuple) {}
    fn set_waker(&mut self, _wake: Waker) {}
    fn has_forwarded(&self) -> bool {
        false
    }
    /// Frames written and waiting to be sent by the next [`Port::push`].
    fn tx_pending(&mut self) -> bool {
        false
    }
}

impl Port for XskPort {
    fn pull(&mut self) -> bool {
        XskPort::pull(self)
    }
    fn push(&mut self) -> std::io::Result<()> {
        XskPort::push(self)
    }
    fn fd(&self) -> i32 {
        XskPort::fd(self)
    }
    fn stats(&self) -> PortStats {
        XskPort::stats(self)
    }
    fn admission(&mut self) -> &mut Admission {
        XskPort::admission(self)
    }
    fn pin(&mut self, t: Tuple) -> bool {
        XskPort::pin(self, t)
    }
    fn unpin(&mut self, t: Tuple) {
        XskPort::unpin(self, t)
    }
    fn set_waker(&mut self, wake: Waker) {
        XskPort::set_waker(self, wake)
    }
    fn has_forwarded(&self) -> bool {
        XskPort::has_forwarded(self)
    }
    fn tx_pending(&mut self) -> bool {
        XskPort::tx_pending(self)
    }
}

/// One group: a smoltcp interface and its sockets.
struct Group {
    iface: Interface,
    sockets: SocketSet<'static>,
    listening: Vec<(u16, SocketHandle)>,
    /// Listening sockets kept per port: `backlog / groups`, doubled when a poll ran out.
    pool_target: usize,
    /// Received packets for this group, waiting for its poll.
    inbox: VecDeque<Vec<u8>>,
    /// Something was queued to send, or a socket changed: poll it.
    dirty: bool,
    /// A SYN found no listening socket in this group during the last poll.
    ran_out: bool,
    /// Listening sockets still free in the poll under way (the group's SYN budget).
    free: usize,
}

pub struct Stack<P: Port = XskPort> {
    port: P,
    groups: Vec<Group>,
    /// Sockets in their handshake, oldest first, with when they left the pool.
    half_open: VecDeque<(ConnId, std::time::Instant)>,
    /// Connections, with the 4-tuple whose MAC they pinned.
    conns: HashMap<ConnId, Option<Tuple>>,
    /// The 4-tuple of every socket past Listen, also known to the device (see `admission::Connections`):
    /// it keeps a bare SYN for one of them from smoltcp (which would let another listening socket take
    /// it: two sockets on one 4-tuple), for the stack to answer; and it hands a packet of a connection
    /// another queue's stack holds to that stack.
    tuples: HashMap<ConnId, Tuple>,
    /// The other way round: the connection of a received packet, and its last segment sent.
    by_tuple: HashMap<Tuple, Known>,
    /// Connections that received packets since the application last asked.
    touched: Vec<ConnId>,
    counters: HandshakeStats,
    /// Sockets of closed connections, kept to listen again: a new socket's two buffers are allocated and
    /// zeroed (half a megabyte by default), which took a quarter of the CPU with short-lived connections.
    spare: Vec<tcp::Socket<'static>>,
    cfg: StackConfig,
    epoch: std::time::Instant,
    /// Packet buffers of the groups' inboxes, kept for reuse (no allocation per packet).
    bufs: Vec<Vec<u8>>,
    /// When every group was last polled for its timers.
    last_tick: Instant,
    /// (group, port) of the SYNs of one poll that found their group's listening pool empty (kept for
    /// reuse: no allocation per poll).
    extra: Vec<(usize, u16)>,
    /// The stack's address.
    addr: Ipv4Addr,
    /// The last SYN-ACK sent for each handshake, to send again (see [`Stack::answer_repeated`]).
    syn_acks: HashMap<Tuple, SentSynAck>,
    /// Bare SYNs for connections the stack holds, taken from the device (kept for reuse).
    repeated: Vec<RepeatedSyn>,
    /// The others (a SYN with another sequence number than the one that opened the connection, answered
    /// or not), with when they came, to admit once their connection is gone (see
    /// [`Stack::answer_repeated`]).
    retry: Vec<(Vec<u8>, std::time::Instant)>,
    /// Those of them to admit in the poll under way (kept for reuse).
    ready: Vec<Vec<u8>>,
}

/// A connection's socket, and the numbers of the last segment smoltcp sent on it (smoltcp does not tell
/// them, and a challenge ACK needs them).
#[derive(Debug, Clone, Copy)]
struct Known {
    id: ConnId,
    sent: Option<Numbers>,
    /// The client's initial sequence number + 1 (once established): a copy of its own SYN, late, is
    /// not a new connection.
    syn_next: Option<u32>,
    /// When a challenge ACK last went to the client (at most one per CHALLENGE_AGAIN).
    challenged: Option<std::time::Instant>,
}

impl Known {
    fn new(id: ConnId) -> Known {
        Known {
            id,
            sent: None,
            syn_next: None,
            challenged: None,
        }
    }
}

/// Of a segment the stack sent: the sequence number just past it (SND.NXT), its acknowledgement number
/// (RCV.NXT) and its window field (as sent: scaled, except on a SYN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Numbers {
    pub(crate) next: u32,
    pub(crate) ack: u32,
    pub(crate) window: u16,
}

/// Of a TCP segment the stack sends (an IPv4 packet; not a reset): its connection (client address,
/// client port, local port), its flags and its numbers.
pub(crate) fn sent_segment(p: &[u8]) -> Option<(Tuple, u8, Numbers)> {
    if p.len() < 20 || p[9] != 6 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let tcp = p.get(ihl..ihl.checked_add(20)?)?;
    let flags = tcp[13];
    if ihl < 20 || flags & 0x04 != 0 {
        return None;
    }
    let t = (
        Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
        u16::from_be_bytes([tcp[0], tcp[1]]),
    );
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let payload = total.saturating_sub(ihl + usize::from(tcp[12] >> 4) * 4);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    // SYN and FIN take one sequence number each.
    let next = seq
        .wrapping_add(payload as u32)
        .wrapping_add(u32::from(flags & 0x03).count_ones());
    let n = Numbers {
        next,
        ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        window: u16::from_be_bytes([tcp[14], tcp[15]]),
    };
    Some((t, flags, n))
}

/// A SYN-ACK as sent (the IPv4 packet), when it (or a challenge ACK in its handshake) was last sent, and
/// its numbers (the acknowledgement number is the client's initial sequence number + 1).
#[derive(Debug)]
struct SentSynAck {
    packet: Vec<u8>,
    at: std::time::Instant,
    numbers: Numbers,
}

/// A client's SYN sent again this long after the last SYN-ACK draws that SYN-ACK again; sooner, the
/// SYN was duplicated on the way or crossed a SYN-ACK (a client retransmits after 1 s at the earliest).
const SYN_ACK_AGAIN: Duration = Duration::from_millis(250);

/// SYNs kept to admit once their connection is gone, at most, and for how long (see
/// [`Stack::answer_repeated`]).
const MAX_RETRY: usize = 256;
const RETRY_FOR: Duration = Duration::from_millis(100);

/// Challenge ACKs go to one connection's client at most this often (RFC 5961 7; a client retransmits its
/// SYN after 1 s).
const CHALLENGE_AGAIN: Duration = Duration::from_millis(500);

/// Handshakes' SYN-ACKs kept beyond those of the half-open list (sockets reset back to Listen before
/// they were accepted leave theirs; dropped when this many are).
const SYN_ACKS_SLACK: usize = 64;

/// How long an ACK may wait for data to ride on (the kernel's delayed ACK is 40 ms at least).
const ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(10);

/// How long the loop may sleep while frames wait to be sent (see [`Stack::delay`]).
const TX_RETRY: Duration = Duration::from_millis(1);

/// Every group is polled at least this often, for its timers (retransmission, close): smoltcp's own
/// timers are coarser, and asking each group when it next wants a poll walks all its sockets.
const TICK: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(10);

impl Stack<XskPort> {
    /// The stack of one queue of `cfg.iface`, on the interface's IPv4 address.
    pub fn new(cfg: StackConfig) -> Result<Stack, NetError> {
        let (addr, prefix) = crate::sys::ipv4(&cfg.iface)?;
        let mut port = XskPort::bind(&cfg.iface, cfg.queue, cfg.zero_copy, cfg.frames)?;
        port.share(cfg.shared.clone());
        Stack::over(port, addr, prefix, cfg)
    }
}

/// The group of a received IPv4 packet: by the client's address and TCP port (0 for anything else).
fn group_of(p: &[u8], groups: usize) -> usize {
    if groups <= 1 || p.len() < 20 || p[9] != 6 {
        return 0;
    }
    let tcp = usize::from(p[0] & 0x0f) * 4;
    if p.len() < tcp + 2 {
        return 0;
    }
    let key = u64::from(u32::from_be_bytes([p[12], p[13], p[14], p[15]])) << 16
        | u64::from(u16::from_be_bytes([p[tcp], p[tcp + 1]]));
    ((key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % groups as u64) as usize
}

/// One group's view of the device: its own received packets, the device's transmit.
struct GroupDev<'a, P: Port> {
    port: &'a mut P,
    inbox: &'a mut VecDeque<Vec<u8>>,
    bufs: &'a mut Vec<Vec<u8>>,
    syn_acks: &'a mut HashMap<Tuple, SentSynAck>,
    by_tuple: &'a mut HashMap<Tuple, Known>,
}

/// The window scale a SYN-ACK (an IPv4 packet) announces, 0 without the option (RFC 7323 2.2; at most
/// 14).
pub(crate) fn window_scale(p: &[u8]) -> u16 {
    let ihl = usize::from(p.first().map_or(0, |b| b & 0x0f)) * 4;
    let Some(&off) = p.get(ihl + 12) else {
        return 0;
    };
    let opts = p
        .get(ihl + 20..ihl + usize::from(off >> 4) * 4)
        .unwrap_or(&[]);
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = usize::from(opts.get(i + 1).copied().unwrap_or(0));
                if len < 2 {
                    break;
                }
                if kind == 3 && len == 3 {
                    return opts.get(i + 2).map_or(0, |&s| u16::from(s.min(14)));
                }
                i += len;
            }
        }
    }
    0
}

/// The device's transmit token, keeping a copy of each SYN-ACK it sends and the numbers of each other
/// segment of a known connection.
struct Tx<'a, T> {
    inner: T,
    syn_acks: &'a mut HashMap<Tuple, SentSynAck>,
    by_tuple: &'a mut HashMap<Tuple, Known>,
}

impl<T: phy::TxToken> phy::TxToken for Tx<'_, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let (syn_acks, by_tuple) = (self.syn_acks, self.by_tuple);
        self.inner.consume(len, |p| {
            let r = f(p);
            match sent_segment(p) {
                Some((t, flags, numbers)) if flags & 0x12 == 0x12 => {
                    let at = std::time::Instant::now();
                    match syn_acks.get_mut(&t) {
                        Some(s) => {
                            s.packet.clear();
                            s.packet.extend_from_slice(p);
                            (s.at, s.numbers) = (at, numbers);
                        }
                        None => {
                            let packet = p.to_vec();
                            syn_acks.insert(
                                t,
                                SentSynAck {
                                    packet,
                                    at,
                                    numbers,
                                },
                            );
                        }
                    }
                }
                Some((t, _, numbers)) => {
                    if let Some(k) = by_tuple.get_mut(&t) {
                        // A retransmission starts again from the client's last ACK: SND.NXT stays the
                        // furthest sent.
                        let next = match k.sent {
                            Some(o) if (numbers.next.wrapping_sub(o.next) as i32) < 0 => o.next,
                            _ => numbers.next,
                        };
                        k.sent = Some(Numbers { next, ..numbers });
                    }
                }
                None => {}
            }
            r
        })
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.inner.set_meta(meta)
    }
}

struct Packet<'a> {
    data: Vec<u8>,
    bufs: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for Packet<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.data);
        let mut data = self.data;
        data.clear();
        self.bufs.push(data);
        r
    }
}

impl<P: Port> Device for GroupDev<'_, P> {
    type RxToken<'a>
        = Packet<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a, P::TxToken<'a>>
    where
        Self: 'a;

    fn receive(&mut self, now: Instant) -> Option<(Packet<'_>, Self::TxToken<'_>)> {
        if self.inbox.is_empty() {
            return None;
        }
        let inner = self.port.transmit(now)?;
        let data = self.inbox.pop_front()?;
        let packet = Packet {
            data,
            bufs: self.bufs,
        };
        let tx = Tx {
            inner,
            syn_acks: self.syn_acks,
            by_tuple: self.by_tuple,
        };
        Some((packet, tx))
    }

    fn transmit(&mut self, now: Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            inner: self.port.transmit(now)?,
            syn_acks: self.syn_acks,
            by_tuple: self.by_tuple,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.port.capabilities()
    }
}

impl<P: Port> Stack<P> {
    /// A stack over `port`, serving `cfg.ports` on `addr`/`prefix` (`cfg.iface`, `queue` and `zero_copy`
    /// are the caller's business).
    pub fn over(
        mut port: P,
        addr: Ipv4Addr,
        prefix: u8,
        cfg: StackConfig,
    ) -> Result<Stack<P>, NetError> {
        port.admission().set_ports(&cfg.ports);
        let epoch = std::time::Instant::now();
        let n = cfg.groups.clamp(1, usize::from(u16::MAX));
        let per_group = cfg.backlog.div_ceil(n).max(1);
        let groups = (0..n)
            .map(|g| {
                let mut icfg = Config::new(HardwareAddress::Ip);
                icfg.random_seed = (epoch.elapsed().as_nanos() as u64
                    ^ u64::from(std::process::id()) << 32)
                    .wrapping_add(g as u64 * 0x9e37_79b9);
                let mut iface = Interface::new(icfg, &mut port, Instant::from_micros(0));
                iface.update_ip_addrs(|a| {
                    let _ = a.push(IpCidr::new(IpAddress::Ipv4(to_smol(addr)), prefix));
                });
                Group {
                    iface,
                    sockets: SocketSet::new(Vec::new()),
                    listening: Vec::new(),
                    pool_target: per_group,
                    inbox: VecDeque::new(),
                    dirty: true,
                    ran_out: false,
                    free: 0,
                }
            })
            .collect();
        let mut stack = Stack {
            port,
            groups,
            half_open: VecDeque::new(),
            conns: HashMap::new(),
            tuples: HashMap::new(),
            by_tuple: HashMap::new(),
            touched: Vec::new(),
            counters: HandshakeStats::default(),
            spare: Vec::new(),
            cfg,
            epoch,
            bufs: Vec::new(),
            last_tick: Instant::from_micros(0),
            extra: Vec::new(),
            addr,
            syn_acks: HashMap::new(),
            repeated: Vec::new(),
            retry: Vec::new(),
            ready: Vec::new(),
        };
        for g in 0..stack.groups.len() {
            for p in stack.cfg.ports.clone() {
                for _ in 0..per_group {
                    stack.listen(g, p)?;
                }
            }
        }
        Ok(stack)
    }

    fn listen(&mut self, g: usize, port: u16) -> Result<(), NetError> {
        let mut s = self.spare.pop().unwrap_or_else(|| {
            let b = self.cfg.buffer;
            tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; b]),
                tcp::SocketBuffer::new(vec![0; b]),
            )
        });
        // Set on every listen, a spare's too: listen() resets a closed socket's state and buffers but
        // not its options, and smoltcp turns timestamps off for good on a socket whose peer did not offer
        // them (a spare that once served such a client would never offer them again).
        s.set_nagle_enabled(false);
        // A received segment's ACK waits (at most ACK_DELAY) for the reply, which carries it: the loop polls
        // the stack, serves what arrived and polls again, and an immediate ACK would be a second frame per
        // call (measured: two frames sent per call at depth 1, each also costing the client a receive).
        // Every second full-sized segment is still ACKed at once (smoltcp, RFC 9293).
        s.set_ack_delay(Some(ACK_DELAY));
        // TCP timestamps (RFC 7323), as the kernel sends them: without them a client cannot reuse its
        // TIME-WAIT ports (`tcp_tw_reuse` needs timestamps on both sides) and a host opening a connection
        // per request runs out of ports against the XDP path. smoltcp drops them for a peer that does not
        // offer them.
        s.set_tsval_generator(Some(tsval));
        s.listen(port)
            .map_err(|e| NetError::Program(format!("smoltcp listen on port {port}: {e}")))?;
        let group = &mut self.groups[g];
        let h = group.sockets.add(s);
        group.listening.push((port, h));
        group.dirty = true;
        Ok(())
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// How another queue's stack wakes this one's thread when it hands it a frame.
    pub fn set_waker(&mut self, wake: Waker) {
        self.port.set_waker(wake);
    }

    /// Frames handed over by other queues wait to be processed.
    pub fn has_forwarded(&self) -> bool {
        self.port.has_forwarded()
    }

    /// The AF_XDP socket's descriptor (for the XSKMAP).
    pub fn fd(&self) -> i32 {
        self.port.fd()
    }

    pub fn stats(&self) -> PortStats {
        self.port.stats()
    }

    /// What the handshakes did.
    pub fn handshakes(&self) -> HandshakeStats {
        HandshakeStats {
            half_open: self.half_open.len() as u64,
            listening: self.groups.iter().map(|g| g.listening.len() as u64).sum(),
            ..self.counters
        }
    }

    fn socket(&self, id: ConnId) -> &tcp::Socket<'static> {
        self.groups[usize::from(id.group)]
            .sockets
            .get::<tcp::Socket>(id.handle)
    }

    fn socket_mut(&mut self, id: ConnId) -> &mut tcp::Socket<'static> {
        self.groups[usize::from(id.group)]
            .sockets
            .get_mut::<tcp::Socket>(id.handle)
    }

    /// The connection's group has something to send (data queued, a window opened, a close): poll it.
    /// Only then: a connection whose client does not read is looked at every turn, and marking its group
    /// each time would keep the loop from ever sleeping.
    fn touch(&mut self, id: ConnId) {
        self.groups[usize::from(id.group)].dirty = true;
    }

    /// Moves packets: RX ring → each packet's group → smoltcp → TX ring. True if anything happened.
    pub fn poll(&mut self) -> bool {
        let got = self.port.pull();
        let now = self.now();
        // SYNs kept from smoltcp in an earlier poll whose connection is gone since (reset by the client
        // that a challenge ACK reached, and released): the client's new connection. Kept while their
        // connection is over but not yet released (the loop polls twice before it releases), for at
        // most RETRY_FOR; dropped if it lives on (the SYN was a duplicate).
        let mut ready = std::mem::take(&mut self.ready);
        if !self.retry.is_empty() {
            let wall = std::time::Instant::now();
            for (p, since) in std::mem::take(&mut self.retry) {
                match tuple_of(&p).map(|t| self.by_tuple.get(&t).map(|k| k.id)) {
                    Some(None) => ready.push(p),
                    Some(Some(id))
                        if wall.duration_since(since) < RETRY_FOR
                            && matches!(
                                self.socket(id).state(),
                                tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen
                            ) =>
                    {
                        self.retry.push((p, since))
                    }
                    _ => {}
                }
            }
        }
        // The device's admission judges retransmitted SYNs and other queues' packets; the SYN budget is
        // kept here, per group: each listening socket takes one SYN, and no more SYNs than the half-open
        // cap has room for. A SYN beyond them is dropped (smoltcp would answer it with a reset, refusing
        // the client), and the client sends it again.
        // (Handshakes include the pool's sockets that took a SYN in an earlier poll and that `accept` has
        // not moved to the half-open list yet: the loop may poll twice before it accepts.)
        let mut taken = 0;
        for g in self.groups.iter_mut() {
            g.free = g
                .listening
                .iter()
                .filter(|(_, h)| g.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen)
                .count();
            taken += g.listening.len() - g.free;
        }
        let mut room = self
            .cfg
            .max_half_open
            .max(1)
            .saturating_sub(self.half_open.len() + taken);
        let n = self.groups.len();
        let mut dropped = 0u64;
        let mut extra = std::mem::take(&mut self.extra);
        let groups = &mut self.groups;
        let bufs = &mut self.bufs;
        let (by_tuple, touched) = (&self.by_tuple, &mut self.touched);
        let mut admit = |p: &[u8]| {
            let t = tuple_of(p);
            if let Some(k) = t.as_ref().and_then(|t| by_tuple.get(t)) {
                touched.push(k.id);
            }
            let g = group_of(p, n);
            if is_syn(p) {
                if room == 0 {
                    dropped += 1;
                    return false;
                }
                room -= 1;
                if groups[g].free == 0 {
                    // No listening socket left in this group for this poll: one is added before the
                    // group is polled (below), so the SYN is answered now, not after the client's
                    // 1 s retransmission.
                    groups[g].ran_out = true;
                    extra.push((g, t.map_or(0, |t| t.2)));
                } else {
                    groups[g].free -= 1;
                }
            }
            let mut b = bufs.pop().unwrap_or_default();
            b.extend_from_slice(p);
            groups[g].inbox.push_back(b);
            true
        };
        for p in ready.drain(..) {
            if self.port.admission().classify(&p) == crate::admission::Verdict::Pass && admit(&p) {
                self.counters.syn_retried += 1;
            }
        }
        while let Some((rx, _tx)) = self.port.receive(now) {
            phy::RxToken::consume(rx, &mut admit);
        }
        self.ready = ready;
        self.counters.syn_dropped += dropped;
        self.answer_repeated(now);
        for &(g, port) in &extra {
            match self.listen(g, port) {
                Ok(()) => self.counters.pool_added += 1,
                Err(e) => tracing::warn!(error = %e, "cannot add a listening socket"),
            }
        }
        extra.clear();
        self.extra = extra;
        let mut changed = false;
        let tick = now >= self.last_tick + TICK;
        if tick {
            self.last_tick = now;
        }
        for g in self.groups.iter_mut() {
            if g.inbox.is_empty() && !g.dirty && !tick {
                continue;
            }
            let mut dev = GroupDev {
                port: &mut self.port,
                inbox: &mut g.inbox,
                bufs: &mut self.bufs,
                syn_acks: &mut self.syn_acks,
                by_tuple: &mut self.by_tuple,
            };
            changed |= g.iface.poll(now, &mut dev, &mut g.sockets)
                == smoltcp::iface::PollResult::SocketStateChanged;
            g.dirty = false;
        }
        if let Err(e) = self.port.push() {
            tracing::debug!(error = %e, "AF_XDP wakeup");
        }
        got || changed
    }

    /// Answers the bare SYNs the device kept from smoltcp for connections the stack holds, as Linux does
    /// (smoltcp ignores a SYN on a socket past Listen):
    /// - in a handshake, the client sent its SYN again because the SYN-ACK was lost: the last SYN-ACK goes
    ///   again, unless one went less than SYN_ACK_AGAIN ago (smoltcp itself resends only on its timer,
    ///   1 s, 3 s, 7 s: two lost SYN-ACKs outlasted a 5 s connect timeout). The same packet, so a SYN-ACK
    ///   that crossed the SYN on the way only draws a duplicate ACK;
    /// - a SYN with another sequence number in a handshake (a client connecting again from the same port,
    ///   or a forged SYN), or on an established connection (a client that lost it, its reset lost on the
    ///   way, connecting again from its port): a challenge ACK (RFC 5961 4.2) with the numbers of the
    ///   connection's last segment. A client in SYN-SENT answers it with a reset that ends the old
    ///   handshake or connection, and sends its SYN again (Linux: at once, for its first SYN); a live
    ///   client takes it as a duplicate ACK. At most one per connection per SYN_ACK_AGAIN (handshakes)
    ///   or CHALLENGE_AGAIN.
    ///
    /// Such a SYN (answered or not; not a copy of the SYN that opened the connection) is admitted at a
    /// later poll if its connection is over and released within RETRY_FOR (else dropped): a Linux client
    /// sends its SYN again right after its reset, often in the same batch, before smoltcp has taken the
    /// reset (else the client waits a second for its next retransmission).
    fn answer_repeated(&mut self, now: Instant) {
        self.port.admission().take_repeated(&mut self.repeated);
        if self.repeated.is_empty() {
            return;
        }
        let wall = std::time::Instant::now();
        for r in self.repeated.drain(..) {
            // The SYN that opened the connection (sent again, or a late copy): not a new one.
            let isn_next = match r.half_open {
                true => self.syn_acks.get(&r.tuple).map(|s| s.numbers.ack),
                false => self.by_tuple.get(&r.tuple).and_then(|k| k.syn_next),
            };
            let same = isn_next == Some(r.seq.wrapping_add(1));
            if !same && self.retry.len() < MAX_RETRY {
                self.retry.push((r.packet, wall));
            }
            if r.half_open {
                let Some(s) = self.syn_acks.get_mut(&r.tuple) else {
                    continue;
                };
                if wall.duration_since(s.at) < SYN_ACK_AGAIN {
                    continue;
                }
                let Some(tx) = self.port.transmit(now) else {
                    continue;
                };
                s.at = wall;
                if same {
                    let packet = &s.packet;
                    phy::TxToken::consume(tx, packet.len(), |b| b.copy_from_slice(packet));
                    self.counters.syn_ack_resent += 1;
                } else {
                    challenge_ack(tx, self.addr, r.tuple, s.numbers);
                    self.counters.challenge_acks += 1;
                }
            } else {
                let Some(k) = self.by_tuple.get_mut(&r.tuple) else {
                    continue;
                };
                let Some(numbers) = k.sent else {
                    continue;
                };
                if k.challenged
                    .is_some_and(|at| wall.duration_since(at) < CHALLENGE_AGAIN)
                {
                    continue;
                }
                let Some(tx) = self.port.transmit(now) else {
                    continue;
                };
                k.challenged = Some(wall);
                challenge_ack(tx, self.addr, r.tuple, numbers);
                self.counters.challenge_acks += 1;
            }
        }
    }

    /// Connections established since the last call. Sockets that took a SYN leave the listening pool for
    /// the half-open list and are replaced; half-open sockets that completed become connections, those
    /// that failed, timed out or are past the cap (oldest first) are dropped.
    pub fn accept(&mut self) -> Vec<ConnId> {
        use tcp::State;
        let mut new = Vec::new();
        let now = std::time::Instant::now();
        for g in 0..self.groups.len() {
            let mut i = 0;
            while i < self.groups[g].listening.len() {
                let (_, h) = self.groups[g].listening[i];
                if self.groups[g].sockets.get::<tcp::Socket>(h).state() == State::Listen {
                    i += 1;
                    continue;
                }
                self.groups[g].listening.swap_remove(i);
                let id = ConnId {
                    group: g as u16,
                    handle: h,
                };
                if let Some(t) = self.tuple(id) {
                    self.track(id, t);
                }
                self.half_open.push_back((id, now));
            }
        }
        let mut k = 0;
        while k < self.half_open.len() {
            let (h, since) = self.half_open[k];
            let state = self.socket(h).state();
            if !matches!(state, State::Closed | State::Listen) {
                let t = self.tuple(h);
                if let Some(t) = t.filter(|t| self.tuples.get(&h) != Some(t)) {
                    // Reset back to Listen by its client (a challenge ACK draws such resets), the socket
                    // took another client's SYN in the same poll: a new handshake, known by its tuple.
                    self.untrack(h);
                    self.track(h, t);
                    self.half_open[k].1 = now;
                    continue;
                }
            }
            match state {
                State::SynReceived => {
                    if now.saturating_duration_since(since) >= self.cfg.half_open_timeout {
                        self.half_open.remove(k);
                        self.counters.timed_out += 1;
                        self.recycle(h);
                    } else {
                        k += 1;
                    }
                }
                State::Closed | State::Listen => {
                    // Reset by the client during its handshake.
                    self.half_open.remove(k);
                    self.recycle(h);
                }
                _ => {
                    self.half_open.remove(k);
                    if let Some(&t) = self.tuples.get(&h) {
                        self.port.admission().track(t, false);
                        // Until the connection sends a segment of its own, a challenge ACK takes the
                        // handshake's numbers.
                        if let (Some(s), Some(k)) =
                            (self.syn_acks.remove(&t), self.by_tuple.get_mut(&t))
                        {
                            // (The SYN-ACK's window is not scaled; the client scales what follows.)
                            let shift = window_scale(&s.packet);
                            k.syn_next = Some(s.numbers.ack);
                            k.sent.get_or_insert(Numbers {
                                window: s.numbers.window >> shift,
                                ..s.numbers
                            });
                        }
                    }
                    self.counters.established += 1;
                    // (Only a connection actually pinned is unpinned when it goes.)
                    let pinned = self.tuples.get(&h).copied().filter(|&t| self.port.pin(t));
                    self.conns.insert(h, pinned);
                    new.push(h);
                }
            }
        }
        // At the cap, handshakes older than EVICT_AFTER make room, oldest first: under a flood of N
        // SYNs/s a client's handshake has about cap/N seconds (at least EVICT_AFTER) to complete.
        while self.half_open.len() >= self.cfg.max_half_open.max(1) {
            match self.half_open.front() {
                Some(&(h, since)) if now.saturating_duration_since(since) >= EVICT_AFTER => {
                    self.half_open.pop_front();
                    self.counters.evicted += 1;
                    self.recycle(h);
                }
                _ => break,
            }
        }
        if self.syn_acks.len() > self.half_open.len() + SYN_ACKS_SLACK {
            let by_tuple = &self.by_tuple;
            self.syn_acks.retain(|t, _| by_tuple.contains_key(t));
        }
        let cap = self.pool_cap();
        for g in 0..self.groups.len() {
            let group = &mut self.groups[g];
            if std::mem::take(&mut group.ran_out) && group.pool_target < cap {
                self.counters.pool_grown += 1;
                group.pool_target = (group.pool_target * 2).min(cap);
            }
            for p in self.cfg.ports.clone() {
                let have = self.groups[g]
                    .listening
                    .iter()
                    .filter(|(q, _)| *q == p)
                    .count();
                for _ in have..self.groups[g].pool_target {
                    if let Err(e) = self.listen(g, p) {
                        tracing::warn!(error = %e, "cannot replace a listening socket");
                        break;
                    }
                }
            }
        }
        new
    }

    /// Listening sockets per group at most: half the half-open cap, shared by the groups (at least the
    /// configured backlog's share).
    fn pool_cap(&self) -> usize {
        let n = self.groups.len().max(1);
        (self.cfg.max_half_open / 2)
            .max(self.cfg.backlog)
            .div_ceil(n)
            .max(1)
    }

    /// The socket is past Listen with its client `t`: the device knows it (see `tuples`).
    fn track(&mut self, id: ConnId, t: Tuple) {
        self.tuples.insert(id, t);
        self.by_tuple.insert(t, Known::new(id));
        self.port.admission().track(t, true);
    }

    /// The socket no longer has the client it had.
    fn untrack(&mut self, id: ConnId) {
        if let Some(t) = self.tuples.remove(&id) {
            self.by_tuple.remove(&t);
            self.syn_acks.remove(&t);
            self.port.admission().untrack(t);
        }
    }

    /// Takes a socket out of the set (without a packet to the peer) and keeps it, while there are few
    /// spares, to listen again.
    fn recycle(&mut self, id: ConnId) {
        self.untrack(id);
        let g = &mut self.groups[usize::from(id.group)];
        let s = g.sockets.remove(id.handle);
        if self.spare.len() < self.cfg.backlog.max(64) {
            let smoltcp::socket::Socket::Tcp(mut s) = s;
            s.abort();
            self.spare.push(s);
        }
    }

    /// Hands the received bytes that lie together in the receive buffer (all of them, or those up to
    /// where it wraps) to `f`, which takes them whole. Returns how many.
    pub fn recv(&mut self, id: ConnId, f: &mut dyn FnMut(&[u8])) -> usize {
        let s = self.socket_mut(id);
        if !s.can_recv() {
            return 0;
        }
        let n = s
            .recv(|buf| {
                f(buf);
                (buf.len(), buf.len())
            })
            .unwrap_or(0);
        if n > 0 {
            self.touch(id);
        }
        n
    }

    /// Bytes received and not yet taken.
    pub fn can_recv(&self, id: ConnId) -> bool {
        self.socket(id).can_recv()
    }

    /// Queues bytes to send; returns how many fitted in the send buffer.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> usize {
        let n = self.socket_mut(id).send_slice(data).unwrap_or(0);
        if n > 0 {
            self.touch(id);
        }
        n
    }

    /// Unsent bytes still queued on the connection.
    pub fn unsent(&self, id: ConnId) -> usize {
        self.socket(id).send_queue()
    }

    /// (remote address, remote port, local port) of a socket with a peer.
    fn tuple(&self, id: ConnId) -> Option<Tuple> {
        let s = self.socket(id);
        let (remote, local) = (s.remote_endpoint()?, s.local_endpoint()?);
        let IpAddress::Ipv4(a) = remote.addr;
        Some((Ipv4Addr::from(a.octets()), remote.port, local.port))
    }

    /// The client's address (IPv4; `None` when the socket has no remote endpoint).
    pub fn peer(&self, id: ConnId) -> Option<Ipv4Addr> {
        match self.socket(id).remote_endpoint()?.addr {
            IpAddress::Ipv4(a) => Some(Ipv4Addr::from(a.octets())),
        }
    }

    /// The peer has closed its side and every byte it sent was read.
    pub fn peer_done(&self, id: ConnId) -> bool {
        use tcp::State::*;
        let s = self.socket(id);
        // (Not `!may_recv()`: that also holds before the handshake completes.)
        matches!(s.state(), CloseWait | LastAck | Closing | TimeWait | Closed) && !s.can_recv()
    }

    /// The connection is gone (closed, reset or timed out).
    pub fn is_closed(&self, id: ConnId) -> bool {
        !self.socket(id).is_open()
    }

    /// Starts a graceful close (FIN after the queued bytes).
    pub fn close(&mut self, id: ConnId) {
        self.socket_mut(id).close();
        self.touch(id);
    }

    /// Resets the connection.
    pub fn abort(&mut self, id: ConnId) {
        self.socket_mut(id).abort();
        self.touch(id);
    }

    /// Frees a connection that is closed; its socket is kept (while there are few spares) to listen
    /// again.
    pub fn release(&mut self, id: ConnId) {
        if let Some(Some(t)) = self.conns.remove(&id) {
            self.port.unpin(t);
        }
        self.recycle(id);
    }

    /// Whether `id` is a connection still holding its socket.
    pub fn is_connection(&self, id: ConnId) -> bool {
        self.conns.contains_key(&id)
    }

    /// Open connections (not counting listening sockets).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Appends to `out` the connections that received packets since the last call (perhaps twice): the
    /// application pumps these, not every connection. (Into the caller's buffer: no allocation per turn.)
    pub fn take_touched(&mut self, out: &mut Vec<ConnId>) {
        out.append(&mut self.touched);
    }

    /// Connections that received packets since [`Stack::take_touched`] (unsorted, perhaps twice).
    pub fn touched(&self) -> &[ConnId] {
        &self.touched
    }

    /// Those of `ids` that are connections whose socket is closed (see [`Stack::reap`], which looks at
    /// every connection).
    pub fn closed_among(&self, ids: &[ConnId]) -> Vec<ConnId> {
        debug_assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids sorted, each once");
        ids.iter()
            .copied()
            .filter(|id| self.conns.contains_key(id) && !self.socket(*id).is_open())
            .collect()
    }

    /// Closed connections that still hold a socket: TCP keeps a socket in TIME-WAIT and similar states
    /// until it is closed; those are released here.
    pub fn reap(&mut self) -> Vec<ConnId> {
        let closed: Vec<ConnId> = self
            .conns
            .keys()
            .copied()
            .filter(|id| !self.socket(*id).is_open())
            .collect();
        closed
    }

    /// Waits until a packet arrives or smoltcp has a timer due, at most `max`.
    pub fn wait(&mut self, max: Duration) {
        let delay = self.delay(max);
        if delay.is_zero() {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: self.port.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = delay.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    /// How long the stack may sleep: until its next timer, at most `max`. For a caller that waits on the
    /// socket's descriptor ([`Stack::fd`]) together with its own.
    pub fn delay(&mut self, max: Duration) -> Duration {
        let now = self.now();
        if self.groups.iter().any(|g| g.dirty || !g.inbox.is_empty()) {
            return Duration::ZERO;
        }
        if self.port.tx_pending() || !self.retry.is_empty() {
            // Frames wait for room (a full TX ring, or a peer that dropped one), or SYNs for their old
            // connection to be released: try again soon, not at once (the device is full).
            return TX_RETRY.min(max);
        }
        // Until the next tick, if any group has a timer at all; else up to `max`.
        let mut timers = false;
        for g in self.groups.iter_mut() {
            if g.iface.poll_at(now, &g.sockets).is_some() {
                timers = true;
                break;
            }
        }
        if !timers {
            return max;
        }
        let at = self.last_tick + TICK;
        if at <= now {
            Duration::ZERO
        } else {
            Duration::from_micros((at - now).total_micros()).min(max)
        }
    }
}

/// A half-open connection younger than this is never evicted to make room for a new one: its client's ACK
/// may be on its way.
const EVICT_AFTER: Duration = Duration::from_millis(100);

/// The handshakes of one stack: gauges and counters since it started.
#[derive(Debug, Default, Clone, Copy)]
pub struct HandshakeStats {
    /// Connections in their handshake now.
    pub half_open: u64,
    /// Listening sockets in the pool now.
    pub listening: u64,
    /// Handshakes completed.
    pub established: u64,
    /// Half-open sockets dropped after `half_open_timeout`.
    pub timed_out: u64,
    /// Half-open sockets dropped, oldest first, to stay within `max_half_open`.
    pub evicted: u64,
    /// Times a group's listening pool ran out during a poll and was doubled.
    pub pool_grown: u64,
    /// Listening sockets added during a poll for a SYN that found its group's pool empty.
    pub pool_added: u64,
    /// SYNs dropped for want of half-open room (`max_half_open`).
    pub syn_dropped: u64,
    /// SYN-ACKs sent again for a client's SYN sent again (see [`Stack::answer_repeated`]).
    pub syn_ack_resent: u64,
    /// Challenge ACKs sent for a SYN on an established connection, or with another sequence number in a
    /// handshake.
    pub challenge_acks: u64,
    /// SYNs kept from smoltcp (a connection held their 4-tuple) admitted at a later poll, that connection
    /// over and released (reset by its client after a challenge ACK, mostly).
    pub syn_retried: u64,
}

/// Sends a challenge ACK (RFC 5961 4.2) on connection `t`, with the numbers of the last segment the stack
/// sent on it (its sequence number SND.NXT, its acknowledgement number RCV.NXT, its window as sent).
fn challenge_ack<T: phy::TxToken>(tx: T, addr: Ipv4Addr, t: Tuple, n: Numbers) {
    use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber};
    let (src, dst) = (to_smol(addr), to_smol(t.0));
    let tcp = TcpRepr {
        src_port: t.2,
        dst_port: t.1,
        control: TcpControl::None,
        seq_number: TcpSeqNumber(n.next as i32),
        ack_number: Some(TcpSeqNumber(n.ack as i32)),
        window_len: n.window,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    tx.consume(ipv4_tcp_len(&tcp), |b| emit_ipv4_tcp(b, src, dst, &tcp));
}

/// The length of the IPv4 packet (no options) that carries `tcp`.
pub fn ipv4_tcp_len(tcp: &smoltcp::wire::TcpRepr) -> usize {
    20 + tcp.buffer_len()
}

/// Writes an IPv4 packet carrying `tcp` from `src` to `dst` into `buf` (of [`ipv4_tcp_len`] bytes),
/// checksums done (smoltcp checks them on receipt).
pub fn emit_ipv4_tcp(
    buf: &mut [u8],
    src: Ipv4Address,
    dst: Ipv4Address,
    tcp: &smoltcp::wire::TcpRepr,
) {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket};
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let caps = ChecksumCapabilities::default();
    let mut p = Ipv4Packet::new_unchecked(buf);
    ip.emit(&mut p, &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(p.payload_mut()),
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(dst),
        &caps,
    );
}

fn to_smol(a: Ipv4Addr) -> Ipv4Address {
    let o = a.octets();
    Ipv4Address::new(o[0], o[1], o[2], o[3])
}
