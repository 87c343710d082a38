//! The cluster port: raft messages and a small request/response RPC between nodes, over TCP.
//!
//! A frame is `len: u32 BE | kind: u8 | payload`, `len` counting kind and payload. Raft traffic is one-way:
//! every node keeps one outbound connection per peer, fed by a bounded queue (a full queue drops the message;
//! raft retransmits), reconnecting with exponential backoff. Inbound connections get a thread each (a cluster
//! has at most 32 members) that hands raft messages to the node and answers RPC frames on the same
//! connection. The RPC payload is opaque here (the node defines it), so this module knows only frames and
//! `eraftpb::Message`.

use std::collections::HashMap;
use std::io::{self, BufWriter, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use protobuf::Message as PbMessage;
use raft::prelude::{Message, MessageType};

use crate::ClusterError;

pub(crate) const KIND_RAFT: u8 = 1;
pub(crate) const KIND_RPC_REQUEST: u8 = 2;
pub(crate) const KIND_RPC_RESPONSE: u8 = 3;
/// Snapshots carry the whole state machine (registry included); anything larger is taken as garbage.
const MAX_FRAME: usize = 64 << 20;
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

/// The node's side of inbound traffic.
pub(crate) trait Handler: Send + Sync + 'static {
    fn raft_message(&self, msg: Message);
    fn rpc(&self, request: &[u8]) -> Vec<u8>;
    fn report(&self, report: Report);
}

pub(crate) fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

/// Fills `buf`, tolerating read timeouts (used to look at `stop`). `Ok(false)`: clean EOF before any byte,
/// or stopped.
fn fill(r: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match r.read(&mut buf[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
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

/// Reads one frame; `None` at a clean end of stream or when stopped.
pub(crate) fn read_frame(
    r: &mut TcpStream,
    stop: &AtomicBool,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 4];
    if !fill(r, &mut head, stop)? {
        return Ok(None);
    }
    let len = u32::from_be_bytes(head) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    if !fill(r, &mut body, stop)? {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    let kind = body[0];
    body.remove(0);
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
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClusterError> {
    let err = |source| ClusterError::Transport {
        addr: addr.to_owned(),
        source,
    };
    let mut s =
        TcpStream::connect_timeout(&resolve(addr).map_err(err)?, CONNECT_TIMEOUT).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    write_frame(&mut s, KIND_RPC_REQUEST, request).map_err(err)?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).map_err(err)?;
    let len = u32::from_be_bytes(head) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(err(io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        )));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(err)?;
    match body[0] {
        KIND_RPC_RESPONSE => Ok(body.split_off(1)),
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
    ) -> Result<Arc<Self>, ClusterError> {
        let lerr = |source| ClusterError::Listen {
            addr: listen.to_owned(),
            source,
        };
        let listener = TcpListener::bind(resolve(listen).map_err(lerr)?).map_err(lerr)?;
        listener.set_nonblocking(true).map_err(lerr)?;
        let local_addr = listener.local_addr().map_err(lerr)?;
        let stop = Arc::new(AtomicBool::new(false));
        let t = Arc::new(Transport {
            me,
            local_addr,
            peers: Mutex::new(HashMap::new()),
            handler: handler.clone(),
            stop: stop.clone(),
            listener: Mutex::new(None),
            queue_len,
        });
        let h = thread::Builder::new()
            .name(format!("cluster-listen-{me}"))
            .spawn(move || accept_loop(listener, handler, stop))
            .map_err(lerr)?;
        *t.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(t)
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
            let (addr2, handler, stop, to) =
                (addr.clone(), self.handler.clone(), self.stop.clone(), *id);
            match thread::Builder::new()
                .name(format!("cluster-peer-{to}"))
                .spawn(move || peer_loop(to, addr2, rx, handler, stop))
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

fn accept_loop(listener: TcpListener, handler: Arc<dyn Handler>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, from)) => {
                let (handler, stop) = (handler.clone(), stop.clone());
                let spawned =
                    thread::Builder::new()
                        .name("cluster-inbound".into())
                        .spawn(move || {
                            if let Err(e) = serve(stream, &*handler, &stop) {
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

fn serve(mut s: TcpStream, handler: &dyn Handler, stop: &AtomicBool) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(POLL))?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    while let Some((kind, body)) = read_frame(&mut s, stop)? {
        match kind {
            KIND_RAFT => match Message::parse_from_bytes(&body) {
                Ok(m) => handler.raft_message(m),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e)),
            },
            KIND_RPC_REQUEST => {
                let answer = handler.rpc(&body);
                write_frame(&mut s, KIND_RPC_RESPONSE, &answer)?;
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
                .and_then(|s| {
                    s.set_nodelay(true)?;
                    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
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
                        tracing::info!(peer = to, %addr, error = %e, "cannot reach cluster peer; retrying with backoff");
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
