//! A smoltcp TCP/IP stack over one AF_XDP socket, serving one or more TCP ports.
//!
//! smoltcp's listening socket accepts one connection and then is that connection, so the stack keeps a
//! pool of listening sockets per port and tops it up as connections are accepted. Connections have Nagle
//! and delayed ACK off (an RPC reply must leave at once) and buffers larger than 64 KiB, so that window
//! scaling is on.

use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

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
    /// Listening sockets kept ready per port (connections that can arrive at once).
    pub backlog: usize,
    /// Receive and send buffer of each connection.
    pub buffer: usize,
    pub zero_copy: bool,
}

/// A connection handed to the application.
pub type ConnId = SocketHandle;

pub struct Stack {
    port: XskPort,
    iface: Interface,
    sockets: SocketSet<'static>,
    listening: Vec<(u16, SocketHandle)>,
    conns: Vec<SocketHandle>,
    /// Sockets of closed connections, kept to listen again: a new socket's two buffers are allocated and
    /// zeroed (half a megabyte by default), which took a quarter of the CPU with short-lived connections.
    spare: Vec<tcp::Socket<'static>>,
    cfg: StackConfig,
    epoch: std::time::Instant,
}

impl Stack {
    pub fn new(cfg: StackConfig) -> Result<Stack, NetError> {
        let (addr, prefix) = crate::sys::ipv4(&cfg.iface)?;
        let mut port = XskPort::bind(&cfg.iface, cfg.queue, cfg.zero_copy)?;
        let epoch = std::time::Instant::now();
        let mut icfg = Config::new(HardwareAddress::Ip);
        icfg.random_seed = epoch.elapsed().as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
        let mut iface = Interface::new(icfg, &mut port, Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(to_smol(addr)), prefix));
        });
        let mut stack = Stack {
            port,
            iface,
            sockets: SocketSet::new(Vec::new()),
            listening: Vec::new(),
            conns: Vec::new(),
            spare: Vec::new(),
            cfg,
            epoch,
        };
        for p in stack.cfg.ports.clone() {
            for _ in 0..stack.cfg.backlog.max(1) {
                stack.listen(p)?;
            }
        }
        Ok(stack)
    }

    fn listen(&mut self, port: u16) -> Result<(), NetError> {
        let mut s = match self.spare.pop() {
            // listen() resets a closed socket (its state and buffers' positions), options kept.
            Some(s) => s,
            None => {
                let b = self.cfg.buffer;
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; b]),
                    tcp::SocketBuffer::new(vec![0; b]),
                );
                s.set_nagle_enabled(false);
                s.set_ack_delay(None);
                // TCP timestamps (RFC 7323), as the kernel sends them: without them a client cannot reuse
                // its TIME-WAIT ports (`tcp_tw_reuse` needs timestamps on both sides) and a host opening a
                // connection per request runs out of ports against the XDP path. smoltcp drops them for
                // a peer that does not offer them.
                s.set_tsval_generator(Some(tsval));
                s
            }
        };
        s.listen(port)
            .map_err(|e| NetError::Program(format!("smoltcp listen on port {port}: {e}")))?;
        let h = self.sockets.add(s);
        self.listening.push((port, h));
        Ok(())
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// The AF_XDP socket's descriptor (for the XSKMAP).
    pub fn fd(&self) -> i32 {
        self.port.fd()
    }

    pub fn stats(&self) -> PortStats {
        self.port.stats()
    }

    /// Moves packets: RX ring → smoltcp → TX ring. True if anything happened.
    pub fn poll(&mut self) -> bool {
        let got = self.port.pull();
        let now = self.now();
        let changed = self.iface.poll(now, &mut self.port, &mut self.sockets);
        if let Err(e) = self.port.push() {
            tracing::debug!(error = %e, "AF_XDP wakeup");
        }
        got || changed == smoltcp::iface::PollResult::SocketStateChanged
    }

    /// Connections established since the last call; each listening socket that took one is replaced.
    pub fn accept(&mut self) -> Vec<ConnId> {
        let mut new = Vec::new();
        let mut i = 0;
        while i < self.listening.len() {
            let (port, h) = self.listening[i];
            let s = self.sockets.get::<tcp::Socket>(h);
            if s.is_listening() {
                i += 1;
                continue;
            }
            self.listening.swap_remove(i);
            self.conns.push(h);
            new.push(h);
            if let Err(e) = self.listen(port) {
                tracing::warn!(error = %e, "cannot replace a listening socket");
            }
        }
        new
    }

    /// Calls `f` with received bytes (in up to two pieces, as the receive buffer wraps); `f` returns how
    /// many it took. Returns the bytes taken.
    pub fn recv(&mut self, id: ConnId, mut f: impl FnMut(&[u8]) -> usize) -> usize {
        let s = self.sockets.get_mut::<tcp::Socket>(id);
        let mut taken = 0;
        while s.can_recv() {
            let n = s.recv(|buf| {
                let n = f(buf);
                (n, n)
            });
            match n {
                Ok(0) | Err(_) => break,
                Ok(n) => taken += n,
            }
        }
        taken
    }

    /// Queues bytes to send; returns how many fitted in the send buffer.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> usize {
        self.sockets
            .get_mut::<tcp::Socket>(id)
            .send_slice(data)
            .unwrap_or(0)
    }

    /// Unsent bytes still queued on the connection.
    pub fn unsent(&self, id: ConnId) -> usize {
        self.sockets.get::<tcp::Socket>(id).send_queue()
    }

    /// The client's address (IPv4; `None` when the socket has no remote endpoint).
    pub fn peer(&self, id: ConnId) -> Option<Ipv4Addr> {
        match self.sockets.get::<tcp::Socket>(id).remote_endpoint()?.addr {
            IpAddress::Ipv4(a) => Some(Ipv4Addr::from(a.octets())),
        }
    }

    /// The peer has closed its side and every byte it sent was read.
    pub fn peer_done(&self, id: ConnId) -> bool {
        use tcp::State::*;
        let s = self.sockets.get::<tcp::Socket>(id);
        // (Not `!may_recv()`: that also holds before the handshake completes.)
        matches!(s.state(), CloseWait | LastAck | Closing | TimeWait | Closed) && !s.can_recv()
    }

    /// The connection is gone (closed, reset or timed out).
    pub fn is_closed(&self, id: ConnId) -> bool {
        !self.sockets.get::<tcp::Socket>(id).is_open()
    }

    /// Starts a graceful close (FIN after the queued bytes).
    pub fn close(&mut self, id: ConnId) {
        self.sockets.get_mut::<tcp::Socket>(id).close();
    }

    /// Resets the connection.
    pub fn abort(&mut self, id: ConnId) {
        self.sockets.get_mut::<tcp::Socket>(id).abort();
    }

    /// Frees a connection that is closed; its socket is kept (up to the backlog) to listen again.
    pub fn release(&mut self, id: ConnId) {
        self.conns.retain(|h| *h != id);
        let s = self.sockets.remove(id);
        if self.spare.len() < self.cfg.backlog.max(1) {
            let smoltcp::socket::Socket::Tcp(mut s) = s;
            s.abort();
            self.spare.push(s);
        }
    }

    /// Open connections (not counting listening sockets).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Closed connections that still hold a socket: TCP keeps a socket in TIME-WAIT and similar states
    /// until it is closed; those are released here.
    pub fn reap(&mut self) -> Vec<ConnId> {
        let closed: Vec<ConnId> = self
            .conns
            .iter()
            .copied()
            .filter(|h| !self.sockets.get::<tcp::Socket>(*h).is_open())
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
        self.iface
            .poll_delay(now, &self.sockets)
            .map_or(max, |d| Duration::from_micros(d.total_micros()).min(max))
    }
}

fn to_smol(a: Ipv4Addr) -> Ipv4Address {
    let o = a.octets();
    Ipv4Address::new(o[0], o[1], o[2], o[3])
}
