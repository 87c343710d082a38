//! An in-memory wire between two smoltcp devices (IP packets, `Medium::Ip`), for the tests that run the
//! XDP path's stack and sessions without root, AF_XDP or a network namespace. Each end is a
//! [`crate::stack::Port`] whose descriptor (an eventfd) turns readable when the other end sent it a
//! packet. The wire can reorder what its first end sends: each packet is held back, with the given
//! chance, and sent after the next one (or at the end of the sender's poll). Loss and corruption come from smoltcp's own
//! `FaultInjector`, wrapped around either end.
//!
//! (smoltcp's `Loopback` device has a single queue, so one interface would hold both the server's and the
//! client's sockets; the XDP path's `Stack` owns its interface, hence a wire between two.)

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

type Queue = Arc<Mutex<VecDeque<Vec<u8>>>>;

/// One end of the wire.
pub struct PipeEnd {
    rx: Queue,
    tx: Queue,
    /// Readable when `rx` has packets.
    own: Arc<OwnedFd>,
    peer: Arc<OwnedFd>,
    reorder_pct: u8,
    rng: u32,
    held: Option<Vec<u8>>,
    mtu: usize,
    admission: crate::admission::Admission,
    /// Packets this end has put on the wire.
    sent: Arc<AtomicU64>,
}

fn eventfd() -> Arc<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor (or -1, checked) that nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a valid descriptor owned by no one else.
    Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer from a non-blocking eventfd we own.
    unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
}

/// Two ends of one wire; `reorder_pct` (0..=100) of the packets the first end sends are reordered (it
/// must be polled through [`crate::stack::Port::push`], which sends what it held back).
pub fn pair(mtu: usize, reorder_pct: u8, seed: u32) -> (PipeEnd, PipeEnd) {
    let (ab, ba): (Queue, Queue) = (Arc::default(), Arc::default());
    let (fa, fb) = (eventfd(), eventfd());
    let end =
        |rx: &Queue, tx: &Queue, own: &Arc<OwnedFd>, peer: &Arc<OwnedFd>, pct: u8, seed: u32| {
            PipeEnd {
                rx: rx.clone(),
                tx: tx.clone(),
                own: own.clone(),
                peer: peer.clone(),
                reorder_pct: pct.min(100),
                rng: seed | 1,
                held: None,
                mtu,
                admission: crate::admission::Admission::new(0),
                sent: Arc::default(),
            }
        };
    (
        end(&ba, &ab, &fa, &fb, reorder_pct, seed),
        end(&ab, &ba, &fb, &fa, 0, seed.wrapping_mul(2_654_435_761)),
    )
}

impl PipeEnd {
    fn chance(&mut self, pct: u8) -> bool {
        // xorshift32
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        (self.rng % 100) < u32::from(pct)
    }

    fn deliver(&mut self, packet: Vec<u8>) {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(packet);
        self.sent.fetch_add(1, Ordering::Relaxed);
        signal(&self.peer);
    }

    fn transmit_packet(&mut self, packet: Vec<u8>) {
        if self.held.is_none() && self.chance(self.reorder_pct) {
            self.held = Some(packet);
            return;
        }
        self.deliver(packet);
        if let Some(h) = self.held.take() {
            self.deliver(h);
        }
    }

    /// Sends a packet held back for reordering (at the end of a poll: nothing is held for long).
    pub fn flush(&mut self) {
        if let Some(h) = self.held.take() {
            self.deliver(h);
        }
    }

    /// A counter of the packets this end sends (its own, not an injector's), readable after the end has
    /// moved into a stack.
    pub fn sent_counter(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }

    /// Copies of the packets this end sent that the other end has not received yet.
    pub fn in_flight(&self) -> Vec<Vec<u8>> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.iter().cloned().collect()
    }

    /// Loses the packets waiting to be received by this end; returns how many.
    pub fn discard(&mut self) -> usize {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *rx).len()
    }

    /// Loses the packets this end sent that the other end has not received yet; returns how many.
    pub fn discard_sent(&mut self) -> usize {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *tx).len()
    }

    /// Packets waiting to be received.
    pub fn pending(&self) -> usize {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A handle that sends raw packets from this end (a test's flood of forged packets), beside what
    /// the end's own interface sends.
    pub fn injector(&self) -> Injector {
        Injector {
            tx: self.tx.clone(),
            peer: self.peer.clone(),
        }
    }

    /// The descriptor that turns readable when a packet arrives.
    pub fn raw_fd(&self) -> i32 {
        self.own.as_raw_fd()
    }
}

/// Sends raw packets into the wire (see [`PipeEnd::injector`]).
pub struct Injector {
    tx: Queue,
    peer: Arc<OwnedFd>,
}

impl Injector {
    pub fn send(&self, packet: Vec<u8>) {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(packet);
        signal(&self.peer);
    }
}

pub struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct TxToken<'a>(&'a mut PipeEnd);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.transmit_packet(buf);
        r
    }
}

impl Device for PipeEnd {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        loop {
            let packet = self
                .rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()?;
            // As the AF_XDP device does: a bare SYN for a connection the stack holds is kept from
            // smoltcp (and noted, for the stack to answer).
            if self.admission.classify(&packet) == crate::admission::Verdict::Pass {
                return Some((RxToken(packet), TxToken(self)));
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

impl crate::stack::Port for PipeEnd {
    fn pull(&mut self) -> bool {
        drain(&self.own);
        self.pending() > 0
    }

    fn push(&mut self) -> std::io::Result<()> {
        self.flush();
        // pull() emptied the descriptor: keep it readable while packets wait.
        if self.pending() > 0 {
            signal(&self.own);
        }
        Ok(())
    }

    fn fd(&self) -> i32 {
        self.raw_fd()
    }

    fn admission(&mut self) -> &mut crate::admission::Admission {
        &mut self.admission
    }
}
