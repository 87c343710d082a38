//! Peer stubs: forwarding keyed calls to the node that owns their vbucket.
//!
//! A keyed call whose vbucket another node owns is re-encoded with `sticky = true` in its Context and handed
//! to a forwarding worker over a channel; the worker sends it over a pooled connection to the owner (framed
//! binary protocol), reads the owner's reply and hands it back to the event loop that owns the session,
//! waking it. The loop never blocks on a peer: a slow or dead peer delays only the calls routed to it. The
//! session waits for the forwarded reply before it serves its next pipelined call, so replies stay in order.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::wire::{Context, Encoder};

/// Where a keyed call runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node owns the key's vbucket.
    Local,
    /// Another node does: forward to its RPC address.
    Remote { node: u64, addr: String },
    /// Nobody can serve it now (owner failed and not yet failed over, no map yet): the reason.
    Unavailable(String),
}

/// Maps keys to owners; the daemon implements it over the cluster's vbucket map.
pub trait Router: Send + Sync {
    fn route(&self, key: &[u8]) -> Route;
    /// Whether a call forwarded here (sticky) may run here: this node owns the key's vbucket, or is taking
    /// it over (the old owner hands its entries over with sticky calls).
    fn accepts_forwarded(&self, key: &[u8]) -> bool;
    /// The registry kept by the cluster, when there is one: zk_* calls wait on raft, so they run on a
    /// worker, never on an event loop.
    fn registry(&self) -> Option<Arc<dyn RegistryBackend>> {
        None
    }
}

/// The cluster's replicated registry (zk_* semantics).
pub trait RegistryBackend: Send + Sync {
    fn create(&self, path: &str, data: &[u8]) -> Result<bool, String>;
    fn children(&self, path: &str) -> Result<Vec<String>, String>;
    fn delete(&self, path: &str) -> Result<bool, String>;
}

/// A session, across loops: which loop, which slot, which generation of that slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SessionId {
    pub lp: u32,
    pub slot: u64,
    pub generation: u64,
}

pub struct ForwardJob {
    pub session: SessionId,
    pub work: Work,
    pub submitted: Instant,
}

/// What a worker does for a session.
pub enum Work {
    /// Send the call to its owner: `request` is the call re-encoded with `sticky = true`, as one frame.
    Forward {
        node: u64,
        addr: String,
        request: Vec<u8>,
    },
    /// Run something that may wait (a raft proposal), producing the reply message or why there is none.
    Run(Box<dyn FnOnce() -> Result<Vec<u8>, String> + Send>),
}

pub struct ForwardDone {
    pub session: SessionId,
    /// The owner's reply message (no frame header), or why there is none.
    pub reply: Result<Vec<u8>, String>,
    pub submitted: Instant,
}

/// A loop's way back: its channel and how to wake it.
pub struct Return {
    pub tx: Sender<ForwardDone>,
    pub wake: Box<dyn Fn() + Send + Sync>,
}

/// The forwarding workers and the loops' return channels.
pub struct Forwarder {
    jobs: Sender<ForwardJob>,
    returns: Arc<OnceLock<Vec<Return>>>,
}

impl Forwarder {
    /// Starts `workers` threads; `timeout` bounds connect, send and receive of one forward.
    pub fn start(workers: usize, timeout: Duration) -> Forwarder {
        let (jobs, rx) = crossbeam_channel::unbounded::<ForwardJob>();
        let returns: Arc<OnceLock<Vec<Return>>> = Arc::new(OnceLock::new());
        for i in 0..workers.max(1) {
            let rx: Receiver<ForwardJob> = rx.clone();
            let returns = returns.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fae-fwd-{i}"))
                .spawn(move || worker(rx, returns, timeout));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a forwarding worker");
            }
        }
        Forwarder { jobs, returns }
    }

    /// Registers the loops' return channels, in loop order (once, after the loops exist).
    pub fn set_returns(&self, returns: Vec<Return>) {
        let _ = self.returns.set(returns);
    }

    pub fn submit(&self, job: ForwardJob) {
        let session = job.session;
        let submitted = job.submitted;
        if let Err(e) = self.jobs.send(job) {
            deliver(
                &self.returns,
                ForwardDone {
                    session,
                    reply: Err(format!("forwarding stopped: {e}")),
                    submitted,
                },
            );
        }
    }
}

fn deliver(returns: &OnceLock<Vec<Return>>, done: ForwardDone) {
    if let Some(r) = returns.get().and_then(|r| r.get(done.session.lp as usize)) {
        if r.tx.send(done).is_ok() {
            (r.wake)();
        }
    }
}

fn worker(rx: Receiver<ForwardJob>, returns: Arc<OnceLock<Vec<Return>>>, timeout: Duration) {
    // Each worker keeps its own connection per peer: no lock between workers.
    let mut pool: HashMap<String, TcpStream> = HashMap::new();
    while let Ok(job) = rx.recv() {
        let reply = match job.work {
            Work::Run(f) => f(),
            Work::Forward {
                node,
                addr,
                request,
            } => {
                let mut reply = exchange(&mut pool, &addr, &request, timeout);
                // A pooled connection may have been closed by the peer since: one retry on a new one. Not
                // after a timeout: the owner may have run the call (a lock taken twice), and the caller
                // would wait twice as long.
                let stale = reply.as_ref().is_err_and(|e| {
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                });
                if stale {
                    pool.remove(&addr);
                    reply = exchange(&mut pool, &addr, &request, timeout);
                }
                reply.map_err(|e| {
                    pool.remove(&addr);
                    format!("forwarding to node {node} at {addr} failed: {e}")
                })
            }
        };
        deliver(
            &returns,
            ForwardDone {
                session: job.session,
                reply,
                submitted: job.submitted,
            },
        );
    }
}

fn exchange(
    pool: &mut HashMap<String, TcpStream>,
    addr: &str,
    request: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    if !pool.contains_key(addr) {
        let s = crate::client::connect_stream(addr, timeout)?;
        pool.insert(addr.to_owned(), s);
    }
    let s = pool.get_mut(addr).expect("inserted above");
    s.write_all(request)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > 64 << 20 {
        return Err(std::io::Error::other(format!(
            "peer sent a frame of {len} bytes"
        )));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// The call `message` as one frame, with its Context (`ctx`, a sub-slice of `message`: the struct's fields
/// and STOP) replaced by the same Context with `sticky = true`.
pub fn sticky_request(message: &[u8], ctx_bytes: &[u8], ctx: &Context<'_>) -> Vec<u8> {
    let start = ctx_bytes.as_ptr() as usize - message.as_ptr() as usize;
    let end = start + ctx_bytes.len();
    let mut out = Vec::with_capacity(message.len() + 8);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&message[..start]);
    let mut e = Encoder::new(&mut out);
    e.field_i64(1, ctx.rid);
    e.field_bytes(2, ctx.reason);
    e.field_i64(3, ctx.uid);
    e.field_bool(4, true);
    e.stop();
    out.extend_from_slice(&message[end..]);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}
