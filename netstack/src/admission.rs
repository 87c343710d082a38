//! What a device lets through to smoltcp, the same for every device under a [`crate::stack::Stack`]
//! (the AF_XDP socket, and the in-memory wire of the tests that run without root):
//!
//! - a bare SYN for a connection the stack already holds (a handshake under way, or an established
//!   connection) never reaches smoltcp: a second listening socket would take it, and two sockets would
//!   then share one 4-tuple (in a handshake, the second one resets the client's connection). It is
//!   noted ([`Admission::take_repeated`]) for the stack to answer as Linux does: the same SYN in a
//!   handshake draws its SYN-ACK again (the client's SYN came again because the SYN-ACK was lost); a SYN
//!   with another sequence number in a handshake, or on an established connection, draws a challenge
//!   ACK (RFC 5961 4.2: a client that lost its connection or handshake answers it with a reset, which
//!   frees the 4-tuple for its new connection);
//! - a packet of a connection another queue's stack holds goes to that stack (see [`Connections`]), a
//!   bare SYN too (that stack notes it).

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// A connection's (remote address, remote port, local port).
pub type Tuple = (Ipv4Addr, u16, u16);

/// (source address, source port, destination port) of an IPv4 TCP packet: a received packet's 4-tuple.
/// None unless it is TCP, not a later fragment, and long enough to carry its ports.
pub(crate) fn tuple_of(p: &[u8]) -> Option<Tuple> {
    if p.len() < 20
        || p[9] != 6
        || p[0] & 0x0f < 5
        || u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0
    {
        return None;
    }
    let tcp = usize::from(p[0] & 0x0f) * 4;
    let ports = p.get(tcp..tcp + 4)?;
    Some((
        Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}

/// Whether an IPv4 packet is a bare TCP SYN (no ACK, no RST): a client opening a connection.
pub(crate) fn is_syn(p: &[u8]) -> bool {
    if p.len() < 20 || p[9] != 6 {
        return false;
    }
    let tcp = usize::from(p[0] & 0x0f) * 4;
    p.len() >= tcp + 14 && p[tcp + 13] & 0x16 == 0x02
}

/// The connections of every queue's stack: which queue holds each one's socket. A client's packets
/// normally all arrive on one RX queue (a NIC hashes the 4-tuple), but some devices pick the queue
/// otherwise: veth uses the sender's TX queue, which Linux changes when it retransmits or answers from
/// TIME-WAIT. A packet of another queue's connection is handed to that
/// queue's stack (a copy, through its inbox, waking its thread) instead of being answered with a reset
/// by a stack that does not know the connection.
#[derive(Debug, Default)]
pub struct Connections {
    map: std::sync::Mutex<HashMap<Tuple, u32>>,
    pub(crate) inboxes: std::sync::Mutex<HashMap<u32, std::sync::Arc<Inbox>>>,
}

/// Frames handed to one queue's stack by the others.
#[derive(Default)]
pub struct Inbox {
    frames: std::sync::Mutex<Vec<Vec<u8>>>,
    pub(crate) wake: std::sync::Mutex<Option<Waker>>,
}

/// Wakes a queue's thread.
pub type Waker = std::sync::Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    pub(crate) fn frames(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn deliver(&self, frame: Vec<u8>) {
        self.frames().push(frame);
        let wake = self.wake.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = wake {
            w();
        }
    }
}

impl Connections {
    pub(crate) fn inbox(&self, queue: u32) -> Option<std::sync::Arc<Inbox>> {
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&queue)
            .cloned()
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Tuple, u32>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What becomes of a received packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// A bare SYN for a connection this stack holds (noted, see [`Admission::take_repeated`]).
    Duplicate,
    /// A packet of a connection another queue holds.
    Foreign(u32),
}

/// One stack's admission: its ports, its connections, and every queue's. (The SYN budget is the
/// stack's: it is per connection group.)
#[derive(Debug, Default)]
pub struct Admission {
    /// The TCP ports the stack serves.
    ports: Vec<u16>,
    /// This stack's connections (past Listen), true while in the handshake.
    local: HashMap<Tuple, bool>,
    /// Every queue's.
    shared: std::sync::Arc<Connections>,
    queue: u32,
    /// Bare SYNs for this stack's connections since the stack last took them.
    repeated: Vec<RepeatedSyn>,
}

/// A bare SYN received for a connection the stack already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepeatedSyn {
    pub tuple: Tuple,
    /// The SYN's sequence number (the client's initial one).
    pub seq: u32,
    /// The connection is in its handshake (else established, or closing).
    pub half_open: bool,
    /// The SYN (the IPv4 packet).
    pub packet: Vec<u8>,
}

/// Repeated SYNs kept between two polls at most (a poll takes them all; more in one poll are dropped
/// unanswered, as they were before).
const MAX_REPEATED: usize = 1024;

impl Admission {
    pub fn new(queue: u32) -> Admission {
        Admission {
            queue,
            ..Admission::default()
        }
    }

    /// Shares one table of connections with the other queues' stacks.
    pub fn share(&mut self, shared: std::sync::Arc<Connections>) {
        self.shared = shared;
    }

    /// Another queue's inbox.
    pub(crate) fn inbox(&self, queue: u32) -> Option<std::sync::Arc<Inbox>> {
        self.shared.inbox(queue)
    }

    /// A connection has a socket here (in its handshake, or established).
    pub fn track(&mut self, t: Tuple, half_open: bool) {
        self.local.insert(t, half_open);
        self.shared.lock().insert(t, self.queue);
    }

    /// The connection's socket is gone.
    pub fn untrack(&mut self, t: Tuple) {
        if self.local.remove(&t).is_some() {
            let mut m = self.shared.lock();
            if m.get(&t) == Some(&self.queue) {
                m.remove(&t);
            }
        }
    }

    /// The TCP ports the stack serves (packets to others pass untouched).
    pub fn set_ports(&mut self, ports: &[u16]) {
        self.ports = ports.to_vec();
    }

    /// Moves the bare SYNs received for this stack's connections since the last call to `into`.
    pub fn take_repeated(&mut self, into: &mut Vec<RepeatedSyn>) {
        into.append(&mut self.repeated);
    }

    /// What to do with a received IPv4 packet before smoltcp sees it: a bare SYN for a connection this
    /// stack holds is dropped (and noted), and a packet of a connection another queue holds goes to that
    /// queue.
    pub fn classify(&mut self, f: &[u8]) -> Verdict {
        if f.len() < 20 || f[9] != 6 || f[0] & 0x0f < 5 {
            return Verdict::Pass;
        }
        let tcp = usize::from(f[0] & 0x0f) * 4;
        if f.len() < tcp + 14 {
            return Verdict::Pass;
        }
        let port = u16::from_be_bytes([f[tcp + 2], f[tcp + 3]]);
        if !self.ports.contains(&port) {
            return Verdict::Pass;
        }
        let src = Ipv4Addr::new(f[12], f[13], f[14], f[15]);
        let t = (src, u16::from_be_bytes([f[tcp], f[tcp + 1]]), port);
        let flags = f[tcp + 13];
        const SYN: u8 = 0x02;
        const RST: u8 = 0x04;
        const ACK: u8 = 0x10;
        match self.local.get(&t) {
            Some(&half_open) if flags & (SYN | ACK | RST) == SYN => {
                if self.repeated.len() < MAX_REPEATED {
                    let seq = u32::from_be_bytes([f[tcp + 4], f[tcp + 5], f[tcp + 6], f[tcp + 7]]);
                    self.repeated.push(RepeatedSyn {
                        tuple: t,
                        seq,
                        half_open,
                        packet: f.to_vec(),
                    });
                }
                Verdict::Duplicate
            }
            Some(_) => Verdict::Pass,
            // A connection another queue holds: its packets go there, a bare SYN too (that queue
            // answers it). Anything else is new.
            None => match self.shared.lock().get(&t) {
                Some(&q) if q != self.queue => Verdict::Foreign(q),
                _ => Verdict::Pass,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_of_a_packet() {
        let mut p = [0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[192, 0, 2, 2]);
        p[20..24].copy_from_slice(&[0x9c, 0x40, 0x23, 0x2a]);
        assert_eq!(
            tuple_of(&p),
            Some((Ipv4Addr::new(192, 0, 2, 2), 40000, 9002))
        );
        assert_eq!(tuple_of(&p[..22]), None, "too short");
        p[9] = 17;
        assert_eq!(tuple_of(&p), None, "not TCP");
        p[9] = 6;
        p[7] = 1;
        assert_eq!(tuple_of(&p), None, "a later fragment: no ports");
        p[7] = 0;
        p[0] = 0x44;
        assert_eq!(tuple_of(&p), None, "a header length under 20");
    }
}
