//! Peer stubs: forwarding keyed calls to the node that owns their vbucket.
//!
//! A keyed call whose vbucket another node owns is re-encoded with `sticky = true` in its Context and handed
//! to a forwarding worker over a channel; the worker sends it over a pooled connection to the owner (framed
//! binary protocol), reads the owner's reply and hands it back to the event loop that owns the session,
//! waking it. The loop never blocks on a peer: a slow or dead peer delays only the calls routed to it. The
//! session waits for the forwarded reply before it serves its next pipelined call, so replies stay in order.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::backend::Ticket;
use crate::engine::{Completion, Returns};
use crate::wire::{Context, Encoder, Protocol};

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
    /// Whether `addr` is a member's RPC address (where a forwarded call may be re-routed).
    fn is_member_rpc_addr(&self, _addr: &str) -> bool {
        false
    }
    /// Whether a call forwarded here (sticky) may run here: this node owns the key's vbucket and no move
    /// of it has begun (a pending owner receives the vbucket's entries on the cluster port, not as calls).
    fn accepts_forwarded(&self, key: &[u8]) -> bool;
    /// Why a keyed call this node would run itself must be refused, if it must (no lease; a lock grant on a
    /// fenced vbucket).
    fn refuse_local(&self, _method: crate::servant::Method, _key: &[u8]) -> Option<String> {
        None
    }
    /// The registry kept by the cluster, when there is one: zk_* calls wait on raft, so they run on a
    /// worker, never on an event loop.
    fn registry(&self) -> Option<Arc<dyn RegistryBackend>> {
        None
    }
}

/// The cluster's replicated registry (zk_* semantics).
pub trait RegistryBackend: Send + Sync {
    /// `limits`: the node's `[registry]` limits, checked before proposing and again at apply.
    fn create(
        &self,
        path: &str,
        data: &[u8],
        limits: &fae_cluster::RegistryLimits,
    ) -> Result<bool, String>;
    fn children(&self, path: &str) -> Result<Vec<String>, String>;
    fn delete(&self, path: &str) -> Result<bool, String>;
}

pub use crate::backend::SessionId;

pub struct ForwardJob {
    pub ticket: Ticket,
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
    pub ticket: Ticket,
    /// The owner's reply message (no frame header), or why there is none.
    pub reply: Result<Vec<u8>, String>,
    pub submitted: Instant,
}

/// The forwarding workers and the loops' return channels.
pub struct Forwarder {
    jobs: Sender<ForwardJob>,
    returns: Returns,
}

impl Forwarder {
    /// Starts `workers` threads; `timeout` bounds connect, send and receive of one forward. Replies go back
    /// through `returns` (filled once the loops exist). `member` says whether an address is a member's RPC
    /// address: a call is re-routed only to one.
    pub fn start(
        workers: usize,
        timeout: Duration,
        returns: Returns,
        member: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> Forwarder {
        let (jobs, rx) = crossbeam_channel::unbounded::<ForwardJob>();
        for i in 0..workers.max(1) {
            let rx: Receiver<ForwardJob> = rx.clone();
            let returns = returns.clone();
            let member = member.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fae-fwd-{i}"))
                .spawn(move || worker(rx, returns, timeout, &*member));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a forwarding worker");
            }
        }
        Forwarder { jobs, returns }
    }

    pub fn submit(&self, job: ForwardJob) {
        let ticket = job.ticket;
        let submitted = job.submitted;
        if let Err(e) = self.jobs.send(job) {
            deliver(
                &self.returns,
                ForwardDone {
                    ticket,
                    reply: Err(format!("forwarding stopped: {e}")),
                    submitted,
                },
            );
        }
    }
}

fn deliver(returns: &Returns, done: ForwardDone) {
    returns.send(done.ticket.session.lp, Completion::Forward(done));
}

/// Calls queued for one owner: its node id, its address, and each call's session, start and request.
type OwnerBatch = (u64, String, Vec<(Ticket, Instant, Vec<u8>)>);

/// Forwards queued jobs. Jobs that arrive together for the same owner go out in one `write` and their
/// replies are read back in order on the same connection (pipelined), which saves a system call and a
/// wake-up per call under load.
fn worker(
    rx: Receiver<ForwardJob>,
    returns: Returns,
    timeout: Duration,
    member: &(dyn Fn(&str) -> bool + Send + Sync),
) {
    // Each worker keeps its own connection per peer: no lock between workers.
    let mut pool: HashMap<String, BufReader<TcpStream>> = HashMap::new();
    const BATCH: usize = 64;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter().take(BATCH - 1));
        // Deferred work runs as it comes; forwards are grouped by owner, in arrival order.
        let mut groups: Vec<OwnerBatch> = Vec::new();
        for job in jobs {
            match job.work {
                Work::Run(f) => deliver(
                    &returns,
                    ForwardDone {
                        ticket: job.ticket,
                        reply: f(),
                        submitted: job.submitted,
                    },
                ),
                Work::Forward {
                    node,
                    addr,
                    request,
                } => {
                    let item = (job.ticket, job.submitted, request);
                    match groups.iter_mut().find(|g| g.1 == addr) {
                        Some(g) => g.2.push(item),
                        None => groups.push((node, addr, vec![item])),
                    }
                }
            }
        }
        for (node, addr, items) in groups {
            let requests: Vec<&[u8]> = items.iter().map(|i| i.2.as_slice()).collect();
            let mut replies = exchange(&mut pool, &addr, &requests, timeout);
            // A pooled connection may have been closed by the peer since: one retry on a new one, if no
            // reply came back yet. Not after a timeout: the owner may have run the calls (a lock taken
            // twice), and the callers would wait twice as long.
            let stale = matches!(&replies, (got, Some(e)) if got.is_empty()
                && !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
            if stale {
                pool.remove(&addr);
                replies = exchange(&mut pool, &addr, &requests, timeout);
            }
            let (mut got, err) = replies;
            if err.is_some() {
                pool.remove(&addr);
            }
            follow_redirects(&mut pool, &addr, &requests, &mut got, timeout, member);
            let why = err.map(|e| format!("forwarding to node {node} at {addr} failed: {e}"));
            let mut got = got.into_iter();
            for (ticket, submitted, _) in items {
                let reply = match got.next() {
                    Some(body) => Ok(body),
                    None => Err(why.clone().unwrap_or_else(|| "no reply".into())),
                };
                deliver(
                    &returns,
                    ForwardDone {
                        ticket,
                        reply,
                        submitted,
                    },
                );
            }
        }
    }
}

/// The marker a node puts in its refusal of a forwarded call for a vbucket it does not own: the owner's
/// address by its own (newer) map.
pub const OWNER_HINT: &str = "[owner ";

/// The address a refusal names with [`OWNER_HINT`], if `reply` is such a refusal (a TApplicationException).
fn redirect_target(reply: &[u8]) -> Option<&str> {
    // Message type EXCEPTION: strict binary protocol, or compact (version 1, type 3 in the top bits).
    let binary = reply.get(..4) == Some(&[0x80, 0x01, 0x00, 0x03][..]);
    let compact = reply.get(..2) == Some(&[0x82, 0x61][..]);
    if !binary && !compact {
        return None;
    }
    let hint = OWNER_HINT.as_bytes();
    let at = reply.windows(hint.len()).rposition(|w| w == hint)? + hint.len();
    let len = reply[at..].iter().position(|&b| b == b']')?;
    std::str::from_utf8(&reply[at..at + len]).ok()
}

/// A forwarded call refused because the sender's map was stale is sent once more, to the owner the
/// receiver named by its newer map (DESIGN: "re-routed once with the receiver's newer map"). The receiver
/// itself never forwards a sticky call again (API.md): the sender re-routes. A second refusal stands. Only
/// to an address `member` knows: a refusal cannot send a call anywhere else.
fn follow_redirects(
    pool: &mut HashMap<String, BufReader<TcpStream>>,
    addr: &str,
    requests: &[&[u8]],
    got: &mut [Vec<u8>],
    timeout: Duration,
    member: &(dyn Fn(&str) -> bool + Send + Sync),
) {
    for (reply, request) in got.iter_mut().zip(requests) {
        let Some(to) = redirect_target(reply)
            .filter(|to| *to != addr && member(to))
            .map(str::to_owned)
        else {
            continue;
        };
        match exchange(pool, &to, &[request], timeout) {
            (mut r, _) if !r.is_empty() => *reply = r.swap_remove(0),
            (_, err) => {
                pool.remove(&to);
                tracing::debug!(to, error = ?err, "re-routing a forwarded call failed");
            }
        }
    }
}

/// Sends `requests` (frames) in one write and reads their replies in order: the replies read, and the
/// error that stopped it, if any.
fn exchange(
    pool: &mut HashMap<String, BufReader<TcpStream>>,
    addr: &str,
    requests: &[&[u8]],
    timeout: Duration,
) -> (Vec<Vec<u8>>, Option<std::io::Error>) {
    let mut got = Vec::with_capacity(requests.len());
    if !pool.contains_key(addr) {
        match crate::client::connect_stream(addr, timeout) {
            Ok(s) => {
                pool.insert(addr.to_owned(), BufReader::with_capacity(64 << 10, s));
            }
            Err(e) => return (got, Some(e)),
        }
    }
    let conn = pool.get_mut(addr).expect("inserted above");
    let out: Vec<u8> = requests.concat();
    if let Err(e) = conn.get_mut().write_all(&out) {
        return (got, Some(e));
    }
    for _ in requests {
        let mut len = [0u8; 4];
        if let Err(e) = conn.read_exact(&mut len) {
            return (got, Some(e));
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > 64 << 20 {
            let e = std::io::Error::other(format!("peer sent a frame of {len} bytes"));
            return (got, Some(e));
        }
        let mut body = vec![0u8; len];
        if let Err(e) = conn.read_exact(&mut body) {
            return (got, Some(e));
        }
        got.push(body);
    }
    (got, None)
}

/// The call `message` as one frame, with its Context (`ctx`, a sub-slice of `message`: the struct's fields
/// and STOP) replaced by the same Context with `sticky = true`, in the call's own protocol (the owner
/// answers in it, and its reply goes back to the client as it came).
pub fn sticky_request(
    message: &[u8],
    ctx_bytes: &[u8],
    ctx: &Context<'_>,
    proto: Protocol,
) -> Vec<u8> {
    let start = ctx_bytes.as_ptr() as usize - message.as_ptr() as usize;
    let end = start + ctx_bytes.len();
    let mut out = Vec::with_capacity(message.len() + 8);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&message[..start]);
    let mut e = Encoder::of(proto, &mut out);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A peer that answers every frame it reads with `reply(request)` (a frame each), until closed.
    fn peer(reply: impl Fn(&[u8]) -> Vec<u8> + Send + 'static) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut len = [0u8; 4];
                while s.read_exact(&mut len).is_ok() {
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    if s.read_exact(&mut body).is_err() {
                        break;
                    }
                    let out = reply(&body);
                    let mut frame = (out.len() as u32).to_be_bytes().to_vec();
                    frame.extend_from_slice(&out);
                    if s.write_all(&frame).is_err() {
                        break;
                    }
                }
            }
        });
        addr
    }

    fn refusal(text: &str) -> Vec<u8> {
        let mut m = vec![0x80, 0x01, 0x00, 0x03, 0, 0, 0, 1, b'x', 0, 0, 0, 1];
        m.extend_from_slice(&[11, 0, 1]);
        m.extend_from_slice(&(text.len() as u32).to_be_bytes());
        m.extend_from_slice(text.as_bytes());
        m.extend_from_slice(&[8, 0, 2, 0, 0, 0, 1, 0]);
        m
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn a_refusal_naming_the_owner_is_re_routed_once() {
        let owner = peer(|req| [b"served:", req].concat());
        let hint = format!("not mine; retry {OWNER_HINT}{owner}]");
        let stale = peer(move |_| refusal(&hint));
        // The owner itself refuses, naming the stale node: the second refusal stands (no ping-pong).
        let looping_owner = {
            let stale = stale.clone();
            peer(move |_| refusal(&format!("not mine either {OWNER_HINT}{stale}]")))
        };
        let t = Duration::from_secs(5);
        let mut pool = HashMap::new();
        let reqs = [frame(b"a"), frame(b"b")];
        let requests: Vec<&[u8]> = reqs.iter().map(Vec::as_slice).collect();
        let (mut got, err) = exchange(&mut pool, &stale, &requests, t);
        assert!(err.is_none());
        assert_eq!(redirect_target(&got[0]), Some(owner.as_str()));
        let anyone = |_: &str| true;
        follow_redirects(&mut pool, &stale, &requests, &mut got, t, &anyone);
        assert_eq!(got, vec![b"served:a".to_vec(), b"served:b".to_vec()]);

        let hint = format!("retry {OWNER_HINT}{looping_owner}]");
        let stale2 = peer(move |_| refusal(&hint));
        let (mut got, _) = exchange(&mut pool, &stale2, &requests[..1], t);
        follow_redirects(&mut pool, &stale2, &requests[..1], &mut got, t, &anyone);
        assert!(String::from_utf8_lossy(&got[0]).contains("not mine either"));
        // An address that is no member's is not followed: the refusal stands.
        let (mut got, _) = exchange(&mut pool, &stale, &requests[..1], t);
        follow_redirects(
            &mut pool,
            &stale,
            &requests[..1],
            &mut got,
            t,
            &|_: &str| false,
        );
        assert!(String::from_utf8_lossy(&got[0]).contains("not mine; retry"));
        // A normal reply, or an error without the hint, is left alone.
        assert_eq!(redirect_target(b"\x80\x01\x00\x02..."), None);
        assert_eq!(redirect_target(&refusal("moving; retry")), None);
    }
}
