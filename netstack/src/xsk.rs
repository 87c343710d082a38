//! One AF_XDP socket (xsk-rs) with its UMEM and four rings, seen by smoltcp as an IP `Device`.
//!
//! smoltcp runs with `Medium::Ip`: this device takes the Ethernet header off received frames and puts one
//! on transmitted packets. The kernel keeps answering ARP (the XDP program passes it on), so the stack
//! cannot resolve neighbours itself. A TCP packet it sends goes to the MAC its 4-tuple's frames came from:
//! a connection's is pinned once the handshake completes (the MAC of the handshake's last frame) and kept
//! for the connection's life, so a frame can neither redirect an established connection's replies nor
//! grow the table past its bound; before that (and for a reset answering a stray segment), the MAC last
//! seen in a frame of that 4-tuple (a bounded table of candidates, the least recently seen evicted first:
//! a SYN-ACK goes back where its SYN came from, and a frame forged from another port of the client's
//! address, a SYN of a flood, concerns only its own 4-tuple). Frames other queues hand over count as
//! seen. Per connection, not per address: when an address moves to another host (a DHCP lease, a VM
//! moved) while a connection from the old one is open, the new host's connections are answered at the
//! new host's MAC. The kernel's resolved neighbours (read at start) are the last resort. A connection's
//! pinned MAC goes back among the candidates when it goes, unless a bare SYN of the same 4-tuple came
//! meanwhile (kept by the stack until the connection is released): that SYN's MAC answers it.
//!
//! Frames: half of the UMEM is lent to the kernel through the fill ring for receiving, half is kept for
//! transmitting. The fill ring is twice the receive share, and received frames go back to it in batches
//! (the kernel reports consumed fill entries lazily; see ../shared/TOOLCHAIN.md pitfall 3).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig, XdpFlags,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use crate::admission::{is_syn, tuple_of, Admission, Connections, Inbox, Tuple, Verdict, Waker};
use crate::NetError;

const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
/// UMEM frames by default: 8192 × 2 KiB = 16 MiB, pinned (past the default memlock limit of 8 MiB: faed
/// has CAP_IPC_LOCK, or systemd's LimitMEMLOCK=infinity). Half receive: a queue serving N connections
/// at depth 1 can get N requests at once, and with 2,048 receive frames 5,000 connections over two
/// queues made the kernel drop ~3,200 frames per bench run for want of a free frame (the fill ring
/// empty), each a client's retransmission 200 ms or more later.
pub const DEFAULT_FRAMES: u32 = 8192;
const FRAME_SIZE: u32 = 2048;
const BATCH: usize = 64;
/// Pinned MACs at most: one per established connection, which only a completed handshake makes (a flood
/// cannot), so the bound is a safety net far above any session cap a queue serves; a connection past it
/// is answered through its candidate (and the kernel's table), not refused.
const MAX_PINNED: usize = 1 << 20;
/// The kernel's neighbours kept at most.
const MAX_NEIGHBOURS: usize = 65536;
/// Candidate MACs (from frames of 4-tuples with no established connection) at most: four times the
/// default receive share (4,096 frames), so that a SYN's MAC outlives a full RX ring of other 4-tuples'
/// frames before its SYN-ACK goes.
const MAX_CANDIDATES: usize = 16384;

/// Counters of one socket.
#[derive(Debug, Default, Clone, Copy)]
pub struct PortStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Frames received that were not IPv4 over Ethernet (the XDP program should never send them).
    pub rx_dropped: u64,
    /// Packets smoltcp wanted to send to a peer whose MAC is unknown.
    pub tx_no_neighbour: u64,
    /// Packets smoltcp wanted to send while every transmit frame was in flight.
    pub tx_no_frame: u64,
    /// Wake-ups after which the device had dropped a frame (copy mode: EBUSY from sendto; veth drops a
    /// frame when its peer's ring is full, where a NIC's driver makes the kernel retry).
    pub tx_device_dropped: u64,
    /// Of those, frames sent again at once (else smoltcp retransmits after its minimum RTO, 1 s).
    pub tx_resent: u64,
    /// Bare SYNs for connections the stack holds (a client's SYN sent again), kept from smoltcp and
    /// answered by the stack (see [`crate::admission`]).
    pub syn_duplicate: u64,
    /// Packets of connections another queue holds, handed to it.
    pub rx_foreign: u64,
    /// The kernel's counters of the socket (`XDP_STATISTICS`): frames the XDP program redirected that
    /// were dropped because the RX ring was full (faed not keeping up), because the fill ring had no free
    /// frame, and all the kernel's drops (`rx_dropped`, which counts the fill-ring ones too).
    pub rx_ring_full: u64,
    pub rx_fill_empty: u64,
    pub rx_kernel_dropped: u64,
}

struct TxState {
    /// Frames owned by us, free to transmit.
    free: Vec<FrameDesc>,
    /// Frames written, to be put on the TX ring.
    queued: Vec<FrameDesc>,
    /// Frames on the TX ring, not yet completed.
    in_flight: usize,
    /// Established connections (4-tuple) → the MAC of their handshake (bounded).
    pinned: HashMap<Tuple, [u8; 6]>,
    /// 4-tuple → MAC last seen in a frame of it, for those not pinned (bounded), with when it was seen (a
    /// sequence number); `seen` holds the same in the order they were seen (and stale entries, skipped),
    /// so the least recently seen is evicted first.
    candidates: HashMap<Tuple, ([u8; 6], u64)>,
    seen: VecDeque<(Tuple, u64)>,
    next_seen: u64,
    /// The kernel's resolved neighbours (read at start): for a 4-tuple with neither.
    kernel: HashMap<Ipv4Addr, [u8; 6]>,
    mac: [u8; 6],
    stats: PortStats,
    /// The length of the frame last written in each UMEM frame (by index), to send it again, with
    /// [`RESENT`] once it was.
    lens: Vec<u16>,
}

impl TxState {
    /// An established connection: the MAC its frames came from (its candidate's) is kept for its replies
    /// until `unpin`. False if it could not be (no MAC seen, or the table full): no `unpin` then.
    fn pin(&mut self, t: Tuple) -> bool {
        if self.pinned.len() >= MAX_PINNED {
            return false;
        }
        let Some(mac) = self
            .candidates
            .remove(&t)
            .map(|(mac, _)| mac)
            .or_else(|| self.kernel.get(&t.0).copied())
        else {
            return false;
        };
        self.pinned.insert(t, mac);
        true
    }

    /// The connection went; its MAC stays a candidate of its 4-tuple, unless a bare SYN of that 4-tuple
    /// came while it was pinned (kept by the stack until the old connection is released): that SYN's MAC
    /// answers it.
    fn unpin(&mut self, t: Tuple) {
        if let Some(mac) = self.pinned.remove(&t) {
            // (Seen again now, either way: it is about to be needed.)
            let mac = self.candidates.get(&t).map_or(mac, |&(m, _)| m);
            self.candidate(t, mac);
        }
    }

    /// A received frame (Ethernet): the MAC it came from becomes its 4-tuple's candidate, unless the
    /// 4-tuple is pinned (a bare SYN of a pinned 4-tuple counts: a client connecting again).
    fn learn(&mut self, frame: &[u8]) {
        let Some(t) = frame.get(ETH_HLEN..).and_then(tuple_of) else {
            return;
        };
        if self.pinned.contains_key(&t) && !is_syn(&frame[ETH_HLEN..]) {
            return;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&frame[6..12]);
        self.candidate(t, mac);
    }

    /// Remembers the MAC last seen in a frame of a 4-tuple (bounded: the least recently seen goes first).
    fn candidate(&mut self, t: Tuple, mac: [u8; 6]) {
        self.next_seen += 1;
        let n = self.next_seen;
        self.candidates.insert(t, (mac, n));
        self.seen.push_back((t, n));
        while self.candidates.len() > MAX_CANDIDATES {
            let Some((old, at)) = self.seen.pop_front() else {
                break;
            };
            if self.candidates.get(&old).is_some_and(|&(_, m)| m == at) {
                self.candidates.remove(&old);
            }
        }
        // Each sighting adds to `seen`: drop the stale entries once they are most of it.
        if self.seen.len() > 2 * MAX_CANDIDATES {
            let live = &self.candidates;
            self.seen
                .retain(|(t, at)| live.get(t).is_some_and(|&(_, m)| m == *at));
        }
    }

    /// Where a packet of this 4-tuple goes: its connection's MAC, else the last seen in its frames, else
    /// the kernel's neighbour's.
    fn next_hop(&self, t: Tuple) -> Option<[u8; 6]> {
        self.pinned
            .get(&t)
            .or_else(|| self.candidates.get(&t).map(|(mac, _)| mac))
            .or_else(|| self.kernel.get(&t.0))
            .copied()
    }
}

/// In [`TxState::lens`]: the frame was already sent again once (a frame is length ≤ 2 KiB).
const RESENT: u16 = 0x8000;

/// An AF_XDP socket bound to one queue of one interface.
pub struct XskPort {
    umem: Umem,
    rx: RxQueue,
    tx: TxQueue,
    fill: FillQueue,
    comp: CompQueue,
    /// Received frames not yet handed to smoltcp.
    received: VecDeque<FrameDesc>,
    /// Frames smoltcp has consumed, waiting to go back on the fill ring.
    refill: RefCell<Vec<FrameDesc>>,
    txs: RefCell<TxState>,
    /// Descriptors the TX ring holds.
    tx_ring: u32,
    zero_copy: bool,
    scratch: Vec<FrameDesc>,
    mtu: usize,
    /// What gets past the device to smoltcp (SYN budget, connections of this and the other queues).
    admission: Admission,
    queue: u32,
    /// Frames of this stack's connections that arrived on other queues.
    inbox: std::sync::Arc<Inbox>,
    forwarded: VecDeque<Vec<u8>>,
}

fn socket_error(iface: &str, queue: u32, reason: impl std::fmt::Display) -> NetError {
    NetError::Socket {
        iface: iface.into(),
        queue,
        reason: reason.to_string(),
    }
}

impl XskPort {
    /// Creates the UMEM of `frames` 2 KiB frames (a power of two, at least 64; half receive, half
    /// transmit) and binds a socket to `queue` of `iface` in copy mode with need-wakeup; the caller's XDP
    /// program (not libxdp's) must then steer packets to it through its XSKMAP.
    pub fn bind(
        iface: &str,
        queue: u32,
        zero_copy: bool,
        frames: u32,
    ) -> Result<XskPort, NetError> {
        let err = |r: &dyn std::fmt::Display| socket_error(iface, queue, r);
        if frames < 64 || !frames.is_power_of_two() {
            return Err(err(&format!(
                "{frames} UMEM frames: a power of two, at least 64"
            )));
        }
        let half = frames / 2;
        let qsize = |n: u32| QueueSize::new(n).map_err(|e| err(&e));
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE).map_err(|e| err(&e))?)
            .fill_queue_size(qsize(frames)?)
            .comp_queue_size(qsize(half)?)
            .build()
            .map_err(|e| err(&e))?;
        let count = NonZeroU32::new(frames).expect("checked above");
        let (umem, mut frames) = Umem::new(umem_cfg, count, false).map_err(|e| {
            err(&format!(
                "{e} (a UMEM of {} MiB is pinned memory: faed needs CAP_IPC_LOCK or a memlock limit \
                 above it, or a smaller listener.xdp_frames)",
                (u64::from(count.get()) * u64::from(FRAME_SIZE)) >> 20
            ))
        })?;
        let bind = if zero_copy {
            BindFlags::XDP_ZEROCOPY
        } else {
            BindFlags::XDP_COPY
        };
        let sock_cfg = SocketConfig::builder()
            .rx_queue_size(qsize(half)?)
            .tx_queue_size(qsize(half)?)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .xdp_flags(XdpFlags::empty())
            .bind_flags(bind | BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        let name: Interface = iface.parse().map_err(|e| err(&e))?;
        // SAFETY: this (interface, queue) pair is bound by no other socket of this process; a second
        // bind fails with EBUSY from the kernel.
        let (tx, rx, fq_cq) =
            unsafe { Socket::new(sock_cfg, &umem, &name, queue) }.map_err(|e| err(&e))?;
        let (mut fill, comp) =
            fq_cq.ok_or_else(|| err(&"the UMEM came without fill and completion rings"))?;
        let rx_frames = half as usize;
        let tx_frames = frames.split_off(rx_frames);
        // SAFETY: these frames belong to this UMEM and are not used elsewhere until the kernel hands
        // them back through the RX ring.
        let lent = unsafe { fill.produce(&frames) };
        if lent != frames.len() {
            return Err(err(&format!(
                "fill ring took {lent} of {} frames",
                frames.len()
            )));
        }
        let mtu = crate::sys::mtu(iface)?.min(FRAME_SIZE as usize - 256 - ETH_HLEN);
        Ok(XskPort {
            umem,
            rx,
            tx,
            fill,
            comp,
            received: VecDeque::with_capacity(rx_frames),
            refill: RefCell::new(Vec::with_capacity(rx_frames)),
            tx_ring: half,
            zero_copy,
            txs: RefCell::new(TxState {
                free: tx_frames,
                queued: Vec::with_capacity(BATCH),
                in_flight: 0,
                pinned: HashMap::new(),
                candidates: HashMap::new(),
                seen: VecDeque::new(),
                next_seen: 0,
                kernel: crate::sys::neighbours(iface)
                    .into_iter()
                    .take(MAX_NEIGHBOURS)
                    .collect(),
                mac: crate::sys::mac(iface)?,
                stats: PortStats::default(),
                lens: vec![0; count.get() as usize],
            }),
            scratch: vec![FrameDesc::default(); BATCH],
            mtu,
            admission: Admission::new(queue),
            queue,
            inbox: std::sync::Arc::default(),
            forwarded: VecDeque::new(),
        })
    }

    /// The socket's file descriptor, for the XSKMAP and for poll(2).
    pub fn fd(&self) -> i32 {
        self.rx.fd().as_raw_fd()
    }

    pub fn stats(&self) -> PortStats {
        let mut txs = self.txs.borrow_mut();
        // (Kept from the last reading if this one fails: counters never go back.)
        match self.rx.fd().xdp_statistics() {
            Ok(k) => {
                txs.stats.rx_ring_full = k.rx_ring_full();
                txs.stats.rx_fill_empty = k.rx_fill_ring_empty_descs();
                txs.stats.rx_kernel_dropped = k.rx_dropped();
            }
            Err(e) => tracing::debug!(error = %e, "XDP_STATISTICS"),
        }
        txs.stats
    }

    /// Moves received frames off the RX ring (learning the senders' MACs), and takes the frames other
    /// queues handed over; true if any arrived.
    pub fn pull(&mut self) -> bool {
        let mut got = false;
        {
            let mut inbox = self.inbox.frames();
            if !inbox.is_empty() {
                got = true;
                let before = self.forwarded.len();
                self.forwarded.extend(inbox.drain(..));
                drop(inbox);
                // (Learnt outside the inbox's lock, which the other queues take to deliver.)
                let txs = self.txs.get_mut();
                for frame in self.forwarded.iter().skip(before) {
                    txs.learn(frame);
                }
            }
        }
        loop {
            // SAFETY: the descriptors written are frames of this UMEM the kernel filled for us.
            let n = unsafe { self.rx.consume(&mut self.scratch) };
            if n == 0 {
                break;
            }
            got = true;
            let mut txs = self.txs.borrow_mut();
            for desc in &self.scratch[..n] {
                // SAFETY: the frame was just received and is ours until it goes back on the fill ring.
                let data = unsafe { self.umem.data(desc) };
                let frame = data.contents();
                if frame.len() < ETH_HLEN + 20 || frame[12..14] != ETH_P_IP {
                    txs.stats.rx_dropped += 1;
                    self.refill.borrow_mut().push(*desc);
                    continue;
                }
                txs.learn(frame);
                txs.stats.rx_packets += 1;
                self.received.push_back(*desc);
            }
            if n < self.scratch.len() {
                break;
            }
        }
        got
    }

    /// Returns consumed frames to the kernel, puts written frames on the TX ring and reclaims the frames
    /// the kernel finished sending. Wakes the kernel when the rings ask for it.
    pub fn push(&mut self) -> std::io::Result<()> {
        {
            let mut refill = self.refill.borrow_mut();
            if !refill.is_empty() {
                // SAFETY: these frames came off the RX ring and smoltcp no longer reads them.
                let n = unsafe { self.fill.produce(&refill) };
                refill.drain(..n);
            }
        }
        let mut txs = self.txs.borrow_mut();
        if !txs.queued.is_empty() {
            // SAFETY: each frame was written completely and is not touched until it completes.
            let n = unsafe { self.tx.produce(&txs.queued) };
            txs.stats.tx_packets += n as u64;
            txs.in_flight += n;
            txs.queued.drain(..n);
        }
        // In copy mode one wake-up sends at most 32 frames (the kernel's TX batch), so kick the kernel
        // again while it completes frames and some remain: otherwise a burst (thousands of SYN-ACKs)
        // leaves the TX ring full and every frame in flight. A wake-up is a sendto(2) (in copy mode the
        // kernel always asks for one): it is made only while descriptors wait on the ring (the kernel's
        // consumer index behind ours), not on every poll (8 clients making 3 calls per connection: 138,000
        // sendto calls a second before, 63,000 after, at the same call rate).
        for _ in 0..(self.tx_ring / 32 + 1) {
            let waiting = self.tx.nb_free_exact() < self.tx_ring;
            let mut dropped = false;
            if waiting && self.tx.needs_wakeup() {
                dropped = self.kick(&mut txs.stats)?;
            }
            let mut done = 0;
            loop {
                // SAFETY: completed frames are ours again.
                let n = unsafe { self.comp.consume(&mut self.scratch) };
                txs.free.extend_from_slice(&self.scratch[..n]);
                done += n;
                if n < self.scratch.len() {
                    break;
                }
            }
            txs.in_flight = txs.in_flight.saturating_sub(done);
            if dropped {
                // The device dropped the last frame this wake-up took, and the kernel completed it like
                // the others (veth completes each frame as it passes it on, in order, and drops it when
                // the peer's ring is full, where a NIC's driver would make the kernel retry): it is the
                // last completed. It goes first in the next push rather than wait for smoltcp's
                // retransmission (1 s at least). Once only: a device without carrier drops every frame,
                // and a frame going round would keep the loop awake and hold a TX frame; TCP's own
                // retransmission takes it from there. Were a device to complete out of order (not in
                // copy mode on veth), the frame sent again would be a duplicate segment, which TCP
                // ignores; in zero-copy mode completions are the driver's, so nothing is guessed.
                if done > 0 && !self.zero_copy {
                    let i = txs.free.last().map(|d| d.addr() / FRAME_SIZE as usize);
                    if let Some(i) = i.filter(|&i| txs.lens[i] & RESENT == 0) {
                        let mut desc = txs.free.pop().expect("checked above");
                        let len = usize::from(txs.lens[i]);
                        txs.lens[i] |= RESENT;
                        // SAFETY: completed, so ours; untouched since it was written.
                        unsafe { self.umem.data_mut(&mut desc) }
                            .cursor()
                            .set_pos(len);
                        txs.queued.insert(0, desc);
                        txs.stats.tx_resent += 1;
                    }
                }
                // The peer is full (or gone): let it drain until the next poll.
                break;
            }
            if done == 0 || txs.in_flight == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Frames written and not yet sent: off the TX ring (it was full, or a frame the device dropped
    /// waits to go again), or on it with no wake-up of the kernel yet (the kick loop's bound, or a
    /// drop that ended it).
    pub fn tx_pending(&mut self) -> bool {
        !self.txs.get_mut().queued.is_empty() || self.tx.nb_free_exact() < self.tx_ring
    }

    /// Wakes the kernel to send what waits on the TX ring (xsk-rs's `wakeup`, but telling EBUSY apart:
    /// in copy mode the device dropped a frame, which the kernel still completes as sent). True then.
    fn kick(&self, stats: &mut PortStats) -> std::io::Result<bool> {
        let fd = self.tx.fd().as_raw_fd();
        // SAFETY: a zero-length sendto on our own AF_XDP socket, no buffer.
        let r = unsafe {
            libc::sendto(
                fd,
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EBUSY) => {
                    stats.tx_device_dropped += 1;
                    return Ok(true);
                }
                Some(libc::EAGAIN | libc::ENOBUFS | libc::ENETDOWN) => {}
                _ => return Err(e),
            }
        }
        Ok(false)
    }

    /// An established connection (its 4-tuple): the MAC its frames came from is kept for its replies
    /// (true if pinned).
    pub fn pin(&mut self, t: Tuple) -> bool {
        self.txs.get_mut().pin(t)
    }

    /// The connection went; its MAC stays a candidate of its 4-tuple.
    pub fn unpin(&mut self, t: Tuple) {
        self.txs.get_mut().unpin(t)
    }

    /// Shares one table of connections (and inboxes) with the other queues' ports.
    pub fn share(&mut self, shared: std::sync::Arc<Connections>) {
        shared
            .inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.queue, self.inbox.clone());
        self.admission.share(shared);
    }

    /// The device's admission (what smoltcp gets to see).
    pub fn admission(&mut self) -> &mut Admission {
        &mut self.admission
    }

    /// How another queue wakes this port's thread when it hands it a frame.
    pub fn set_waker(&mut self, wake: Waker) {
        *self.inbox.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
    }

    /// Frames handed over by other queues wait.
    pub fn has_forwarded(&self) -> bool {
        !self.inbox.frames().is_empty()
    }

    /// Whether the kernel needs a poll(2) to refill the RX side.
    pub fn fill_needs_wakeup(&self) -> bool {
        self.fill.needs_wakeup()
    }
}

pub enum RxToken<'a> {
    /// A frame received on this socket.
    Frame {
        desc: FrameDesc,
        umem: &'a Umem,
        refill: &'a RefCell<Vec<FrameDesc>>,
    },
    /// A copy of a frame another queue received for one of this stack's connections.
    Copy(Vec<u8>),
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match self {
            RxToken::Frame { desc, umem, refill } => {
                // SAFETY: the frame is ours (received, not yet refilled) for the duration of this call.
                let data = unsafe { umem.data(&desc) };
                let r = f(&data.contents()[ETH_HLEN..]);
                refill.borrow_mut().push(desc);
                r
            }
            RxToken::Copy(frame) => f(&frame[ETH_HLEN..]),
        }
    }
}

pub struct TxToken<'a> {
    umem: &'a Umem,
    txs: &'a RefCell<TxState>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut txs = self.txs.borrow_mut();
        let Some(mut desc) = txs.free.pop() else {
            // `transmit` checked for a free frame; this is unreachable in practice, but smoltcp needs
            // the packet built either way, so build it in a throwaway buffer.
            txs.stats.tx_no_frame += 1;
            return f(&mut vec![0; len]);
        };
        // SAFETY: the frame is ours (free) until it goes on the TX ring.
        let mut data = unsafe { self.umem.data_mut(&mut desc) };
        data.cursor().set_pos(ETH_HLEN + len);
        let frame = data.contents_mut();
        let r = f(&mut frame[ETH_HLEN..]);
        let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
        // (A sent packet's tuple_of is (our address, our port, its port).)
        let next = match tuple_of(&frame[ETH_HLEN..]) {
            Some((_, local, remote)) => txs.next_hop((dst, remote, local)),
            None => txs.kernel.get(&dst).copied(),
        };
        match next {
            Some(dst_mac) => {
                frame[0..6].copy_from_slice(&dst_mac);
                let mac = txs.mac;
                frame[6..12].copy_from_slice(&mac);
                frame[12..14].copy_from_slice(&ETH_P_IP);
                let i = desc.addr() / FRAME_SIZE as usize;
                txs.lens[i] = (ETH_HLEN + len) as u16;
                txs.queued.push(desc);
            }
            None => {
                txs.stats.tx_no_neighbour += 1;
                txs.free.push(desc);
            }
        }
        r
    }
}

impl Device for XskPort {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.txs.borrow().free.is_empty() {
            return None;
        }
        // Frames other queues handed over are judged here too: a bare SYN among them is a client's SYN
        // sent again for a connection this stack holds.
        while let Some(frame) = self.forwarded.pop_front() {
            match frame.get(ETH_HLEN..).map(|p| self.admission.classify(p)) {
                Some(Verdict::Duplicate) => self.txs.get_mut().stats.syn_duplicate += 1,
                Some(Verdict::Foreign(q)) => {
                    // (Moved on since the other queue looked.)
                    if let Some(inbox) = self.admission.inbox(q) {
                        inbox.deliver(frame);
                    }
                }
                _ => {
                    let tx = TxToken {
                        umem: &self.umem,
                        txs: &self.txs,
                    };
                    return Some((RxToken::Copy(frame), tx));
                }
            }
        }
        let desc = loop {
            let desc = self.received.pop_front()?;
            // SAFETY: the frame was received and is ours until it goes back on the fill ring.
            let verdict = match unsafe { self.umem.data(&desc) }.contents().get(ETH_HLEN..) {
                Some(packet) => self.admission.classify(packet),
                None => Verdict::Pass,
            };
            match verdict {
                Verdict::Pass => break desc,
                Verdict::Duplicate => self.txs.get_mut().stats.syn_duplicate += 1,
                Verdict::Foreign(q) => {
                    if let Some(inbox) = self.admission.inbox(q) {
                        // SAFETY: the frame is ours until it goes back on the fill ring, below.
                        let frame = unsafe { self.umem.data(&desc) }.contents().to_vec();
                        inbox.deliver(frame);
                    }
                    self.txs.get_mut().stats.rx_foreign += 1;
                }
            }
            self.refill.get_mut().push(desc);
        };
        Some((
            RxToken::Frame {
                desc,
                umem: &self.umem,
                refill: &self.refill,
            },
            TxToken {
                umem: &self.umem,
                txs: &self.txs,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.txs.borrow().free.is_empty() {
            self.txs.borrow_mut().stats.tx_no_frame += 1;
            return None;
        }
        Some(TxToken {
            umem: &self.umem,
            txs: &self.txs,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Bursts larger than what the TX ring takes at once only get dropped and retransmitted.
        caps.max_burst_size = Some(BATCH);
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txs() -> TxState {
        TxState {
            free: Vec::new(),
            queued: Vec::new(),
            in_flight: 0,
            pinned: HashMap::new(),
            candidates: HashMap::new(),
            seen: VecDeque::new(),
            next_seen: 0,
            kernel: HashMap::new(),
            mac: [0; 6],
            stats: PortStats::default(),
            lens: Vec::new(),
        }
    }

    const IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    #[test]
    fn a_connection_that_went_leaves_its_mac_as_a_candidate() {
        // Its next SYN may have come while it was pinned (the stack admits it once the old connection
        // is released, without the frame going through `pull` again): the SYN-ACK needs the MAC.
        let mut t = txs();
        let c = (IP, 40000, 9002);
        assert!(!t.pin(c), "no MAC seen: not pinned");
        t.candidate(c, A);
        assert!(t.pin(c));
        assert!(t.candidates.is_empty() && t.next_hop(c) == Some(A));
        t.unpin(c);
        assert!(t.pinned.is_empty());
        assert_eq!(t.next_hop(c), Some(A));
    }

    #[test]
    fn a_frame_forged_from_another_port_of_the_clients_address_is_not_pinned() {
        // The client's handshake from port 40000 (its last frame from the client's MAC); meanwhile a SYN
        // forged from the same address, another port, and another MAC: the connection pins its own, and
        // the forged SYN's answer goes to its own sender.
        let mut t = txs();
        let (client, forged) = ((IP, 40000, 9002), (IP, 40001, 9002));
        t.candidate(client, A);
        t.candidate(forged, B);
        assert!(t.pin(client));
        assert_eq!(t.next_hop(client), Some(A));
        assert_eq!(t.next_hop(forged), Some(B));
    }

    #[test]
    fn an_address_that_moved_to_another_host_is_answered_at_the_new_mac() {
        // A connection from the old host stays open (pinned at A); the address's new host connects from
        // B: its handshake is answered, and its connection pinned, at B.
        let mut t = txs();
        let (old, new) = ((IP, 40000, 9002), (IP, 50000, 9002));
        t.candidate(old, A);
        assert!(t.pin(old));
        t.candidate(new, B);
        assert_eq!(t.next_hop(new), Some(B), "the SYN-ACK");
        assert!(t.pin(new));
        assert_eq!((t.next_hop(old), t.next_hop(new)), (Some(A), Some(B)));
    }

    #[test]
    fn the_kernels_neighbours_are_the_last_resort() {
        let mut t = txs();
        let c = (IP, 40000, 9002);
        t.kernel.insert(IP, A);
        assert_eq!(t.next_hop(c), Some(A));
        t.candidate(c, B);
        assert_eq!(t.next_hop(c), Some(B), "a frame of the 4-tuple comes first");
        assert!(t.pin(c) && t.next_hop(c) == Some(B));
    }

    #[test]
    fn candidates_stay_bounded() {
        let mut t = txs();
        for i in 0..(MAX_CANDIDATES as u32 + 100) {
            let c = (Ipv4Addr::from(0x0a00_0000 + i), 40000, 9002);
            t.candidate(c, A);
            t.pin(c);
            t.unpin(c);
        }
        assert_eq!(t.candidates.len(), MAX_CANDIDATES);
        assert!(t.pinned.is_empty());
    }

    #[test]
    fn the_least_recently_seen_candidate_goes_first() {
        // Past the bound (a flood of spoofed sources, or many short connections), the newest candidates
        // stay: a SYN's MAC must outlive the poll that answers it, whatever came before.
        let mut t = txs();
        let tuple = |i: u32| (Ipv4Addr::from(0x0a00_0000 + i), 40000, 9002);
        let n = 100_000;
        for i in 0..n {
            t.candidate(tuple(i), A);
        }
        assert_eq!(t.candidates.len(), MAX_CANDIDATES);
        for i in n - MAX_CANDIDATES as u32..n {
            assert!(
                t.candidates.contains_key(&tuple(i)),
                "candidate {i} evicted"
            );
        }
        assert!(
            t.seen.len() <= 2 * MAX_CANDIDATES + 1,
            "{} sightings kept",
            t.seen.len()
        );
        // Seen again, the oldest becomes the newest: the next one goes instead.
        let oldest = tuple(n - MAX_CANDIDATES as u32);
        t.candidate(oldest, B);
        t.candidate(tuple(n), A);
        assert_eq!(t.next_hop(oldest), Some(B));
        assert!(!t
            .candidates
            .contains_key(&tuple(n - MAX_CANDIDATES as u32 + 1)));
    }

    /// An Ethernet frame from `mac` of a TCP segment from 192.0.2.2:`port` to port 9002 with `flags`.
    fn frame(mac: [u8; 6], port: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN + 40];
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&ETH_P_IP);
        let ip = &mut f[ETH_HLEN..];
        ip[0] = 0x45;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&IP.octets());
        ip[20..22].copy_from_slice(&port.to_be_bytes());
        ip[22..24].copy_from_slice(&9002u16.to_be_bytes());
        ip[33] = flags;
        f
    }

    #[test]
    fn a_bare_syn_of_a_pinned_connection_is_answered_at_its_own_mac() {
        // The client connects again from the same port (its old connection lost to it): the SYN is kept
        // until the old connection is released, and its SYN-ACK goes where the SYN came from.
        let mut t = txs();
        let c = (IP, 40000, 9002);
        t.learn(&frame(A, 40000, 0x02));
        assert!(t.pin(c));
        t.learn(&frame(B, 40000, 0x10));
        assert_eq!(
            t.next_hop(c),
            Some(A),
            "an ACK does not move a pinned connection"
        );
        t.learn(&frame(B, 40000, 0x02));
        assert_eq!(t.next_hop(c), Some(A), "nor does a SYN, while it is pinned");
        t.unpin(c);
        assert_eq!(
            t.next_hop(c),
            Some(B),
            "the SYN's MAC, not the old connection's"
        );
    }
}
