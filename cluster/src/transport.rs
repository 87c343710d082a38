//! The cluster port: raft messages and a small request/response RPC between nodes, over TCP.
//!
//! A frame is `len: u32 BE | kind: u8 | payload`, `len` counting kind and payload. Raft traffic is one-way:
//! every node keeps one outbound connection per peer, fed by a bounded queue (a full queue drops the message;
//! raft retransmits), reconnecting with exponential backoff. Inbound connections get a thread each (a cluster
//! has at most 32 members) that hands raft messages to the node and answers RPC frames on the same
//! connection. The RPC payload is opaque here (the node defines it), so this module knows only frames and
//! `eraftpb::Message`.
//!
//! With a cluster secret every connection opens with `auth`'s handshake, and an inbound connection is
//! bound to the id its peer proved: a raft message on it from another sender is dropped and counted.
//! Whatever the peer: at most [`MAX_INBOUND`] inbound connections at once (more are closed at accept),
//! a frame once begun must arrive whole within [`FRAME_DEADLINE`], and a frame's length is checked against
//! its kind's bound before anything is allocated (an RPC request 1 MiB, a raft message 64 MiB).

use std::collections::HashMap;
use std::io::{self, BufWriter, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use protobuf::Message as PbMessage;
use raft::prelude::{Message, MessageType};

use crate::auth::{self, ClusterSecret, Refusal};
use crate::ClusterError;

pub(crate) const KIND_RAFT: u8 = 1;
pub(crate) const KIND_RPC_REQUEST: u8 = 2;
pub(crate) const KIND_RPC_RESPONSE: u8 = 3;
/// The daemon's own requests between members (a vbucket's entries handed over), opaque here; answered
/// with `KIND_RPC_RESPONSE`.
pub(crate) const KIND_APP_REQUEST: u8 = 7;
/// Snapshots carry the whole state machine (registry included); anything larger is taken as garbage.
const MAX_FRAME: usize = 64 << 20;
/// Join, leave and status requests are small.
const MAX_RPC_REQUEST: usize = 1 << 20;
/// The daemon's requests (a handoff batch).
pub const MAX_APP_REQUEST: usize = 16 << 20;
/// Inbound connections at once: two per possible member, and room for tools.
pub(crate) const MAX_INBOUND: usize = 2 * crate::MAX_MEMBERS + 16;
/// Of those, connections still in their handshake (with a secret): from one address, and in all. Someone
/// who reaches the port without the secret holds at most these (each for at most the handshake's 2 s), so
/// members' connections always find room.
const MAX_HANDSHAKING_PER_IP: usize = 8;
const MAX_HANDSHAKING: usize = 32;
/// A frame whose first byte has arrived must be whole within this (64 MiB at 2 MiB/s).
pub(crate) const FRAME_DEADLINE: Duration = Duration::from_secs(30);
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What the node is told about its outbound traffic, so raft can react (probe again, resend a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    Unreachable(u64),
    Snapshot { to: u64, sent: bool },
}

/// What the transport refused, for the node's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A connection closed at accept (over the cap) or in its handshake, or one that sent garbage.
    Connection,
    /// A raft message whose sender is not the member the connection authenticated as.
    Message,
}

/// The node's side of inbound traffic.
pub(crate) trait Handler: Send + Sync + 'static {
    fn raft_message(&self, msg: Message);
    /// `peer`: the id the connection authenticated as (`None` without a cluster secret).
    fn rpc(&self, request: &[u8], peer: Option<u64>) -> Vec<u8>;
    /// The daemon's request (see `Cluster::set_app_handler`).
    fn app(&self, request: &[u8], peer: Option<u64>) -> Vec<u8>;
    fn report(&self, report: Report);
    fn refused(&self, what: Refused);
}

/// How a node (or a tool) opens connections: the secret, if the cluster has one, and who it is.
#[derive(Clone, Debug)]
pub(crate) struct Auth {
    pub secret: Option<ClusterSecret>,
    pub me: u64,
}

impl Auth {
    /// Runs the client handshake on a new connection, if there is a secret.
    fn connect(&self, s: &mut TcpStream) -> io::Result<()> {
        if let Some(secret) = &self.secret {
            auth::client(s, secret, self.me).map_err(|e| match e {
                Refusal::Io(e) => e,
                e => io::Error::new(ErrorKind::PermissionDenied, e.to_string()),
            })?;
        }
        Ok(())
    }
}

pub(crate) fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

/// Fills `buf`, tolerating read timeouts (used to look at `stop`). `Ok(false)`: clean EOF before any byte,
/// or stopped. `deadline` starts at the first byte (if not already running); past it, an error.
fn fill(
    r: &mut TcpStream,
    buf: &mut [u8],
    stop: &AtomicBool,
    deadline: &mut Option<Instant>,
    within: Duration,
) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                format!("a frame took longer than {within:?} to arrive"),
            ));
        }
        match r.read(&mut buf[at..]) {
            Ok(0) if at == 0 && deadline.is_none() => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                at += n;
                deadline.get_or_insert_with(|| Instant::now() + within);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The largest payload a frame of `kind` may carry.
fn max_payload(kind: u8) -> usize {
    match kind {
        KIND_RAFT | KIND_RPC_RESPONSE => MAX_FRAME,
        KIND_RPC_REQUEST => MAX_RPC_REQUEST,
        KIND_APP_REQUEST => MAX_APP_REQUEST,
        _ => auth::MAX_HANDSHAKE_FRAME,
    }
}

/// A frame's kind and payload length from its 5-byte head, checked against the kind's bound.
pub(crate) fn frame_head(head: &[u8; 5]) -> io::Result<(u8, usize)> {
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let kind = head[4];
    if len == 0 || len - 1 > max_payload(kind) {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes for kind {kind}"),
        ));
    }
    Ok((kind, len - 1))
}

/// Reads one frame; `None` at a clean end of stream or when stopped. The length is checked against the
/// kind's bound before the payload is allocated, and the frame must be whole within [`FRAME_DEADLINE`]
/// of its first byte.
pub(crate) fn read_frame(
    r: &mut TcpStream,
    stop: &AtomicBool,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    read_frame_within(r, stop, FRAME_DEADLINE)
}

fn read_frame_within(
    r: &mut TcpStream,
    stop: &AtomicBool,
    within: Duration,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut deadline = None;
    if !fill(r, &mut head, stop, &mut deadline, within)? {
        return Ok(None);
    }
    let (kind, len) = frame_head(&head)?;
    // Only the other side of an RPC reads answers: on an inbound connection one is garbage, refused
    // before its payload (up to 64 MiB for a status) is read.
    if kind == KIND_RPC_RESPONSE {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            "an answer frame on an inbound connection",
        ));
    }
    let mut body = vec![0u8; len];
    if !fill(r, &mut body, stop, &mut deadline, within)? {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    Ok(Some((kind, body)))
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(ErrorKind::NotFound, format!("{addr} resolves to nothing")))
}

/// One request/response exchange with the node at `addr`.
pub(crate) fn rpc_call(
    addr: &str,
    kind: u8,
    request: &[u8],
    timeout: Duration,
    auth: &Auth,
) -> Result<Vec<u8>, ClusterError> {
    let err = |source| ClusterError::Transport {
        addr: addr.to_owned(),
        source,
    };
    let mut s =
        TcpStream::connect_timeout(&resolve(addr).map_err(err)?, CONNECT_TIMEOUT).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(err)?;
    auth.connect(&mut s).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    write_frame(&mut s, kind, request).map_err(err)?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).map_err(err)?;
    let (kind, len) = frame_head(&head).map_err(err)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(err)?;
    match kind {
        KIND_RPC_RESPONSE => Ok(body),
        auth::KIND_REFUSED => Err(err(io::Error::new(
            ErrorKind::PermissionDenied,
            format!("refused: {}", String::from_utf8_lossy(&body)),
        ))),
        k => Err(err(io::Error::new(
            ErrorKind::InvalidData,
            format!("frame kind {k} in answer"),
        ))),
    }
}

struct Peer {
    addr: String,
    queue: SyncSender<Message>,
    thread: JoinHandle<()>,
}

/// Outbound connections to the peers plus the listener for inbound ones.
pub(crate) struct Transport {
    me: u64,
    auth: Auth,
    local_addr: SocketAddr,
    peers: Mutex<HashMap<u64, Peer>>,
    handler: Arc<dyn Handler>,
    stop: Arc<AtomicBool>,
    listener: Mutex<Option<JoinHandle<()>>>,
    queue_len: usize,
}

impl Transport {
    /// Binds the cluster port and starts accepting.
    pub(crate) fn start(
        me: u64,
        listen: &str,
        handler: Arc<dyn Handler>,
        queue_len: usize,
        secret: Option<ClusterSecret>,
    ) -> Result<Arc<Self>, ClusterError> {
        let lerr = |source| ClusterError::Listen {
            addr: listen.to_owned(),
            source,
        };
        let listener = TcpListener::bind(resolve(listen).map_err(lerr)?).map_err(lerr)?;
        listener.set_nonblocking(true).map_err(lerr)?;
        let local_addr = listener.local_addr().map_err(lerr)?;
        let stop = Arc::new(AtomicBool::new(false));
        let auth = Auth { secret, me };
        let t = Arc::new(Transport {
            me,
            auth: auth.clone(),
            local_addr,
            peers: Mutex::new(HashMap::new()),
            handler: handler.clone(),
            stop: stop.clone(),
            listener: Mutex::new(None),
            queue_len,
        });
        let h = thread::Builder::new()
            .name(format!("cluster-listen-{me}"))
            .spawn(move || accept_loop(listener, handler, stop, auth))
            .map_err(lerr)?;
        *t.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(t)
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How this node opens connections (for its own RPC calls).
    pub(crate) fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Makes the outbound connections match `peers` (id, cluster address); the node itself is skipped.
    pub(crate) fn set_peers(&self, peers: &[(u64, String)]) {
        let mut map = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, p| peers.iter().any(|(i, a)| i == id && *a == p.addr));
        for (id, addr) in peers {
            if *id == self.me || map.contains_key(id) {
                continue;
            }
            let (tx, rx) = mpsc::sync_channel(self.queue_len);
            let (addr2, handler, stop, to, auth) = (
                addr.clone(),
                self.handler.clone(),
                self.stop.clone(),
                *id,
                self.auth.clone(),
            );
            match thread::Builder::new()
                .name(format!("cluster-peer-{to}"))
                .spawn(move || peer_loop(to, addr2, rx, handler, stop, auth))
            {
                Ok(thread) => {
                    map.insert(
                        *id,
                        Peer {
                            addr: addr.clone(),
                            queue: tx,
                            thread,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(peer = id, error = %e, "cannot start a cluster peer thread")
                }
            }
        }
    }

    /// Queues a raft message; dropped (raft retries) if the peer is unknown or its queue is full.
    pub(crate) fn send(&self, msg: Message) {
        let map = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let to = msg.to;
        let snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
        match map.get(&to) {
            Some(p) => match p.queue.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    tracing::debug!(peer = to, "cluster send queue full; message dropped");
                    if snapshot {
                        self.handler.report(Report::Snapshot { to, sent: false });
                    }
                }
            },
            None => {
                tracing::debug!(peer = to, "no address for cluster peer; message dropped");
                if snapshot {
                    self.handler.report(Report::Snapshot { to, sent: false });
                }
            }
        }
    }

    /// Stops every thread; returns once the listener and the outbound threads have exited.
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let peers: Vec<Peer> = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in peers {
            drop(p.queue);
            let _ = p.thread.join();
        }
        if let Some(h) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }
}

/// Closes the connection slot when the connection's thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections in their handshake, by peer address.
type Handshaking = Arc<Mutex<HashMap<std::net::IpAddr, usize>>>;

/// A handshake slot: taken at accept, given back when the handshake ends (or the connection does).
struct HandshakeSlot(Handshaking, std::net::IpAddr);

impl HandshakeSlot {
    fn take(all: &Handshaking, ip: std::net::IpAddr) -> Option<HandshakeSlot> {
        let mut m = all.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = m.values().sum();
        let mine = m.entry(ip).or_insert(0);
        if *mine >= MAX_HANDSHAKING_PER_IP || total >= MAX_HANDSHAKING {
            return None;
        }
        *mine += 1;
        Some(HandshakeSlot(all.clone(), ip))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    stop: Arc<AtomicBool>,
    auth: Auth,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let handshaking: Handshaking = Arc::default();
    let mut over_cap = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, from)) => {
                let hs = match &auth.secret {
                    Some(_) => match HandshakeSlot::take(&handshaking, from.ip()) {
                        Some(hs) => Some(hs),
                        None => {
                            handler.refused(Refused::Connection);
                            over_cap += 1;
                            if over_cap.is_power_of_two() {
                                tracing::warn!(%from, refused = over_cap, "cluster connection closed at accept: too many in their handshake");
                            }
                            continue;
                        }
                    },
                    None => None,
                };
                if open.fetch_add(1, Ordering::AcqRel) >= MAX_INBOUND {
                    open.fetch_sub(1, Ordering::AcqRel);
                    handler.refused(Refused::Connection);
                    over_cap += 1;
                    if over_cap.is_power_of_two() {
                        tracing::warn!(%from, refused = over_cap, "cluster connection closed at accept: {MAX_INBOUND} are open");
                    }
                    drop(stream);
                    continue;
                }
                let slot = Slot(open.clone());
                let (handler, stop, auth) = (handler.clone(), stop.clone(), auth.clone());
                let spawned =
                    thread::Builder::new()
                        .name("cluster-inbound".into())
                        .spawn(move || {
                            let _slot = slot;
                            if let Err(e) = serve(stream, &*handler, &stop, &auth, hs) {
                                tracing::debug!(%from, error = %e, "cluster connection closed");
                            }
                        });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a cluster connection thread");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!(error = %e, "cluster accept failed");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(
    mut s: TcpStream,
    handler: &dyn Handler,
    stop: &AtomicBool,
    auth: &Auth,
    handshake: Option<HandshakeSlot>,
) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let peer = match &auth.secret {
        Some(secret) => match auth::server(&mut s, secret, auth.me) {
            Ok(id) => Some(id),
            Err(why) => {
                handler.refused(Refused::Connection);
                let from = s.peer_addr().ok();
                match why {
                    Refusal::Io(e) => {
                        tracing::debug!(?from, error = %e, "cluster handshake failed")
                    }
                    why => tracing::warn!(?from, "cluster connection refused: {why}"),
                }
                return Ok(());
            }
        },
        None => None,
    };
    drop(handshake);
    s.set_read_timeout(Some(POLL))?;
    let result = serve_frames(&mut s, handler, stop, peer);
    if let Err(e) = &result {
        if e.kind() == ErrorKind::InvalidData {
            handler.refused(Refused::Connection);
        }
    }
    result
}

fn serve_frames(
    s: &mut TcpStream,
    handler: &dyn Handler,
    stop: &AtomicBool,
    peer: Option<u64>,
) -> io::Result<()> {
    while let Some((kind, body)) = read_frame(s, stop)? {
        match kind {
            KIND_RAFT => match Message::parse_from_bytes(&body) {
                Ok(m) if peer.is_some_and(|p| p != m.from) => {
                    handler.refused(Refused::Message);
                    tracing::debug!(
                        from = m.from,
                        authenticated = peer,
                        "raft message dropped: its sender is not the connection's member"
                    );
                }
                Ok(m) => handler.raft_message(m),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e)),
            },
            KIND_RPC_REQUEST => {
                let answer = handler.rpc(&body, peer);
                write_frame(s, KIND_RPC_RESPONSE, &answer)?;
            }
            KIND_APP_REQUEST => {
                let answer = handler.app(&body, peer);
                write_frame(s, KIND_RPC_RESPONSE, &answer)?;
            }
            auth::KIND_HELLO => {
                let why = "this node runs without cluster.secret_file: the other side has one";
                let _ = write_frame(s, auth::KIND_REFUSED, why.as_bytes());
                return Err(io::Error::new(ErrorKind::InvalidData, why));
            }
            k => {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("frame kind {k}"),
                ))
            }
        }
    }
    Ok(())
}

/// Sleeps up to `d`, waking early when stopped. False if stopped.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
    }
    !stop.load(Ordering::Relaxed)
}

fn peer_loop(
    to: u64,
    addr: String,
    rx: Receiver<Message>,
    handler: Arc<dyn Handler>,
    stop: Arc<AtomicBool>,
    auth: Auth,
) {
    let mut conn: Option<BufWriter<TcpStream>> = None;
    let mut backoff = BACKOFF_MIN;
    let mut reported = false;
    loop {
        let first = match rx.recv_timeout(POLL) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if conn.is_none() {
            let c = resolve(&addr)
                .and_then(|a| TcpStream::connect_timeout(&a, CONNECT_TIMEOUT))
                .and_then(|mut s| {
                    s.set_nodelay(true)?;
                    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    auth.connect(&mut s)?;
                    Ok(s)
                });
            match c {
                Ok(s) => {
                    tracing::debug!(peer = to, %addr, "cluster peer connected");
                    conn = Some(BufWriter::with_capacity(64 << 10, s));
                    backoff = BACKOFF_MIN;
                    reported = false;
                }
                Err(e) => {
                    if !reported {
                        if e.kind() == ErrorKind::PermissionDenied {
                            tracing::warn!(peer = to, %addr, error = %e, "cluster peer refused this node; retrying with backoff");
                        } else {
                            tracing::info!(peer = to, %addr, error = %e, "cannot reach cluster peer; retrying with backoff");
                        }
                        reported = true;
                    }
                    // What was queued is stale by the time the peer is back: raft resends what matters.
                    let stale = std::iter::once(first).chain(rx.try_iter());
                    for m in stale {
                        if m.get_msg_type() == MessageType::MsgSnapshot {
                            handler.report(Report::Snapshot { to, sent: false });
                        }
                    }
                    handler.report(Report::Unreachable(to));
                    if !nap(backoff, &stop) {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let w = conn.as_mut().expect("connected above");
        let mut snapshots = Vec::new();
        let mut result = Ok(());
        for m in std::iter::once(first).chain(rx.try_iter().take(4096)) {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                snapshots.push(m.to);
            }
            let body = m.write_to_bytes().expect("raft messages always encode");
            result = write_frame(w, KIND_RAFT, &body);
            if result.is_err() {
                break;
            }
        }
        let result = result.and_then(|()| w.flush());
        for _ in &snapshots {
            handler.report(Report::Snapshot {
                to,
                sent: result.is_ok(),
            });
        }
        if let Err(e) = result {
            tracing::debug!(peer = to, %addr, error = %e, "cluster peer connection lost");
            conn = None;
            handler.report(Report::Unreachable(to));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicU64;

    #[derive(Default)]
    struct Recorder {
        from: Mutex<Vec<u64>>,
        refused_messages: AtomicU64,
        refused_connections: AtomicU64,
    }

    impl Handler for Recorder {
        fn raft_message(&self, msg: Message) {
            self.from.lock().unwrap().push(msg.from);
        }
        fn rpc(&self, request: &[u8], _peer: Option<u64>) -> Vec<u8> {
            request.to_vec()
        }
        fn app(&self, request: &[u8], _peer: Option<u64>) -> Vec<u8> {
            request.to_vec()
        }
        fn report(&self, _report: Report) {}
        fn refused(&self, what: Refused) {
            match what {
                Refused::Connection => &self.refused_connections,
                Refused::Message => &self.refused_messages,
            }
            .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn raft_from(from: u64) -> Vec<u8> {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = from;
        m.to = 1;
        m.write_to_bytes().unwrap()
    }

    fn wait(mut ok: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !ok() {
            assert!(t0.elapsed() < Duration::from_secs(10), "not within 10 s");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_connection_speaks_only_for_the_member_it_authenticated_as() {
        let secret = ClusterSecret::new(*b"0123456789abcdef").unwrap();
        let rec = Arc::new(Recorder::default());
        let t = Transport::start(1, "127.0.0.1:0", rec.clone(), 16, Some(secret.clone())).unwrap();
        let mut s = TcpStream::connect(t.local_addr()).unwrap();
        assert_eq!(auth::client(&mut s, &secret, 5).unwrap(), 1);
        write_frame(&mut s, KIND_RAFT, &raft_from(6)).unwrap();
        write_frame(&mut s, KIND_RAFT, &raft_from(5)).unwrap();
        wait(|| !rec.from.lock().unwrap().is_empty());
        assert_eq!(*rec.from.lock().unwrap(), vec![5]);
        assert_eq!(rec.refused_messages.load(Ordering::Relaxed), 1);
        t.shutdown();
    }

    #[test]
    fn a_frame_begun_must_arrive_whole_within_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let stop = AtomicBool::new(false);
        // Two bytes of a head, then nothing: the frame is late, the connection is dropped.
        c.write_all(&[0, 0]).unwrap();
        let t = Instant::now();
        let e = read_frame_within(&mut s, &stop, Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let rec = Arc::new(Recorder::default());
        let t = Transport::start(1, "127.0.0.1:0", rec.clone(), 16, None).unwrap();
        // An RPC request announced at 2 MiB (the bound is 1 MiB): the connection is closed at once.
        let mut s = TcpStream::connect(t.local_addr()).unwrap();
        s.write_all(&((2u32 << 20) + 1).to_be_bytes()).unwrap();
        s.write_all(&[KIND_RPC_REQUEST]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).map_err(|e| e.kind()), Ok(0));
        wait(|| rec.refused_connections.load(Ordering::Relaxed) == 1);
        t.shutdown();
    }

    #[test]
    fn a_stranger_holds_few_handshake_slots_and_members_still_get_in() {
        let secret = ClusterSecret::new(*b"0123456789abcdef").unwrap();
        let rec = Arc::new(Recorder::default());
        let t = Transport::start(1, "127.0.0.1:0", rec.clone(), 16, Some(secret.clone())).unwrap();
        // Silent connections from one address: past the per-address cap they are closed at once.
        let silent: Vec<TcpStream> = (0..MAX_HANDSHAKING_PER_IP + 4)
            .map(|_| TcpStream::connect(t.local_addr()).unwrap())
            .collect();
        wait(|| rec.refused_connections.load(Ordering::Relaxed) >= 4);
        drop(silent);
        // Once they are gone a member authenticates at once.
        wait(|| {
            let mut s = TcpStream::connect(t.local_addr()).unwrap();
            auth::client(&mut s, &secret, 5).is_ok()
        });
        t.shutdown();
    }

    #[test]
    fn connections_past_the_cap_are_closed_at_accept() {
        let rec = Arc::new(Recorder::default());
        let t = Transport::start(1, "127.0.0.1:0", rec.clone(), 16, None).unwrap();
        let held: Vec<TcpStream> = (0..MAX_INBOUND)
            .map(|_| TcpStream::connect(t.local_addr()).unwrap())
            .collect();
        let mut extra = TcpStream::connect(t.local_addr()).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(extra.read(&mut buf).map_err(|e| e.kind()), Ok(0));
        assert_eq!(rec.refused_connections.load(Ordering::Relaxed), 1);
        // Once one closes, a new connection is served again.
        drop(held);
        wait(|| {
            let mut s = TcpStream::connect(t.local_addr()).unwrap();
            write_frame(&mut s, KIND_RPC_REQUEST, b"echo").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut head = [0u8; 9];
            s.read_exact(&mut head).is_ok() && &head[5..] == b"echo"
        });
        t.shutdown();
    }
}
