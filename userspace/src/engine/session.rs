//! A session: one client's byte stream in, its replies out. It knows nothing of sockets, so the kernel path
//! and the kernel-bypass path drive the same code.
//!
//! Most calls are answered on the spot into `out`. A call that waits (on a back-end store, a peer, raft) is
//! deferred to a worker and leaves a [`Slot`] in `inflight`; the calls after it keep being served, their
//! replies kept in `later` until every deferred reply before them is in, so that pipelined replies leave
//! in the order the calls came. Calls forwarded to a peer and registry calls are barriers: nothing after
//! them is served until they are answered (a lock and its unlock must reach the owner in order).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::metrics::{LoopMetrics, UNKNOWN_SLOT};
use super::Completion;
use crate::backend::{SessionId, Ticket};
use crate::cluster::forward::{Forwarder, Router};
use crate::cluster::route::Routed;
use crate::filter::{CallInfo, Chain, Ending};
use crate::servant::{CallEnv, Method, Outcome, Servants};
use crate::wire::{
    self, mtype, AppErrorKind, Args, Call, Dialect, Limits, Progress, Reply, Transport,
};
use std::net::IpAddr;

/// What every session of a node shares.
pub struct Env {
    pub servants: Arc<Servants>,
    pub limits: Limits,
    pub call_timeout: Duration,
    /// `metrics.slow_call_ms` in nanoseconds (a reload changes it).
    pub slow_call_ns: std::sync::atomic::AtomicU64,
    /// The filter chain every call passes.
    pub filters: Arc<Chain>,
    pub message_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_pending_reply: usize,
    /// Deferred calls one session may have out at once; past it, its next calls wait.
    pub max_deferred: usize,
    /// Cluster routing of keyed calls; `None` on a single node (everything is local).
    pub router: Option<Arc<dyn Router>>,
    pub forwarder: Option<Arc<Forwarder>>,
}

impl Env {
    /// The sessions' settings from `cfg`, with no cluster routing.
    pub fn new(cfg: &crate::config::Config, servants: Arc<Servants>) -> Env {
        let filters = Arc::new(
            Chain::new(crate::filter::Settings::of(cfg))
                .expect("limits and degrade were checked with the config"),
        );
        Self::with_filters(cfg, servants, filters)
    }

    /// As [`Env::new`], with the node's filter chain (shared with the admin API).
    pub fn with_filters(
        cfg: &crate::config::Config,
        servants: Arc<Servants>,
        filters: Arc<Chain>,
    ) -> Env {
        let s = &cfg.server;
        Env {
            servants,
            limits: s.limits(),
            call_timeout: Duration::from_millis(s.call_timeout_ms),
            slow_call_ns: std::sync::atomic::AtomicU64::new(
                cfg.metrics.slow_call_ms.saturating_mul(1_000_000),
            ),
            filters,
            message_timeout: Duration::from_millis(s.message_timeout_ms),
            idle_timeout: Duration::from_millis(s.idle_timeout_ms),
            max_pending_reply: s.max_pending_reply_bytes,
            max_deferred: s.max_deferred_per_session,
            router: None,
            forwarder: None,
        }
    }
}

/// Inbound buffer capacity kept between messages; a larger one (after a big message) is given back.
const KEEP_CAPACITY: usize = 64 << 10;
/// How long past its deadline a deferred call may stay unanswered before the loop answers it itself (the
/// worker answers at the deadline; this only guards against a worker that never answers).
const DEFERRED_GRACE: Duration = Duration::from_secs(2);

/// A deferred call, in the order of the stream.
struct Slot {
    tag: u64,
    method: Method,
    seqid: i32,
    /// How the call was written: its reply is written the same way.
    dialect: Dialect,
    deadline: Instant,
    /// Answered, its reply at `later[start..end]`, waiting for the slots before it.
    ready: Option<(usize, usize)>,
    /// A forwarded or registry call: nothing after it was served.
    barrier: bool,
    /// A oneway call: its outcome is counted, but no reply is sent.
    oneway: bool,
    /// The filters admitted it: they hear when it ends.
    admitted: Option<CallInfo>,
}

pub struct Session {
    /// Bytes of a message that has not fully arrived.
    pending: Vec<u8>,
    /// Replies not yet sent.
    pub out: Vec<u8>,
    /// Replies of calls that came after a deferred call still out (see `inflight`).
    later: Vec<u8>,
    /// Bytes of `later` that belong to slots still in `inflight` (the rest were moved to `out`).
    later_live: usize,
    transport: Option<Transport>,
    /// When the first byte of the pending message arrived.
    partial_since: Option<Instant>,
    /// A protocol violation was answered: send what is in `out`, then close.
    closing: bool,
    /// Whole calls wait in `pending`, unserved while the client is not reading its replies or too many
    /// deferred calls are out.
    held_back: bool,
    /// How far the walk of a partly arrived unframed message has come.
    progress: Progress,
    /// This session across loops, for deferred replies to find it.
    pub id: SessionId,
    /// Deferred calls not yet sent, oldest first; ready ones wait for those before them.
    inflight: VecDeque<Slot>,
    next_tag: u64,
    /// A barrier call is out.
    barrier: bool,
    /// The client's address.
    pub peer: IpAddr,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            pending: Vec::new(),
            out: Vec::new(),
            later: Vec::new(),
            later_live: 0,
            transport: None,
            partial_since: None,
            closing: false,
            held_back: false,
            progress: Progress::default(),
            id: SessionId::default(),
            inflight: VecDeque::new(),
            next_tag: 0,
            barrier: false,
            peer: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        }
    }
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_id(id: SessionId, peer: IpAddr) -> Self {
        Session {
            id,
            peer,
            ..Self::default()
        }
    }

    /// The session closes with deferred calls still out: the filters that admitted them hear they ended.
    pub fn abandon(&mut self, env: &Env) {
        for slot in self.inflight.iter_mut() {
            if let Some(info) = slot.admitted.take() {
                let took = info.admitted.elapsed();
                env.filters.done(&info, Ending { took, ok: false });
            }
        }
    }

    /// Whether deferred calls are out (the session must not close before their replies are sent).
    pub fn awaiting(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// A deferred call's outcome: its reply goes in its place in the stream. Late or unknown answers (the
    /// session answered the call itself meanwhile) are dropped.
    pub fn complete(&mut self, c: Completion, env: &Env, metrics: &LoopMetrics) {
        let (tag, submitted) = match &c {
            Completion::Forward(f) => (f.ticket.tag, f.submitted),
            Completion::Backend(b) => (b.ticket.tag, b.submitted),
        };
        let Some(i) = self
            .inflight
            .iter()
            .position(|s| s.tag == tag && s.ready.is_none())
        else {
            return;
        };
        let (method, seqid) = (self.inflight[i].method, self.inflight[i].seqid);
        let dialect = self.inflight[i].dialect;
        let name = method.name().as_bytes();
        let buf = if i == 0 {
            &mut self.out
        } else {
            &mut self.later
        };
        let start = buf.len();
        let error = match c {
            Completion::Forward(f) => match f.reply {
                Ok(body) => {
                    dialect.wrap(buf, &body);
                    metrics.add(&metrics.forwarded, 1);
                    false
                }
                Err(why) => {
                    metrics.add(&metrics.forwarded, 1);
                    Reply::app_error(buf, dialect, name, seqid, AppErrorKind::InternalError, &why);
                    true
                }
            },
            Completion::Backend(b) => {
                if matches!(&b.result, Err(e) if e.kind == crate::backend::FailureKind::Timeout) {
                    // Its back end did not answer by the call's deadline.
                    metrics.add(&metrics.deadline_exceeded, 1);
                }
                let mut reply = Reply::begin(buf, dialect, name, seqid);
                match env.servants.finish(method, b.result, &mut reply) {
                    Ok(()) => {
                        reply.finish();
                        false
                    }
                    Err(e) => {
                        reply.abort();
                        let msg = format!("{}: {}", method.name(), e.message);
                        Reply::app_error(buf, dialect, name, seqid, e.kind, &msg);
                        true
                    }
                }
            }
        };
        if self.inflight[i].oneway {
            buf.truncate(start);
        }
        let end = buf.len();
        let took = submitted.elapsed();
        metrics.call(method as usize, took.as_nanos() as u64, error);
        if let Some(info) = self.inflight[i].admitted.take() {
            env.filters.done(&info, Ending { took, ok: !error });
        }
        slow(env, metrics, method, self.peer, took, !error);
        if self.inflight[i].barrier {
            self.barrier = false;
        }
        self.inflight[i].ready = Some((start, end));
        if i == 0 {
            self.inflight.pop_front();
            self.release_ready();
        } else {
            self.later_live += end - start;
        }
    }

    /// Moves the replies that no longer wait for an earlier deferred call into `out`.
    fn release_ready(&mut self) {
        while let Some((a, b)) = self.inflight.front().and_then(|s| s.ready) {
            self.out.extend_from_slice(&self.later[a..b]);
            self.later_live -= b - a;
            self.inflight.pop_front();
        }
        if self.inflight.is_empty() {
            self.later.clear();
            self.later_live = 0;
            if self.later.capacity() > KEEP_CAPACITY {
                self.later = Vec::new();
            }
        } else if self.later.len() - self.later_live > KEEP_CAPACITY.max(self.later.len() / 2) {
            // Under steady pipelining `inflight` may never empty: drop the bytes already sent on.
            let mut kept = Vec::with_capacity(self.later_live);
            for slot in self.inflight.iter_mut() {
                if let Some((a, b)) = slot.ready {
                    let at = kept.len();
                    kept.extend_from_slice(&self.later[a..b]);
                    slot.ready = Some((at, kept.len()));
                }
            }
            self.later = kept;
        }
    }

    /// Answers, with an error, deferred calls whose worker never answered (past their deadline and a grace).
    pub fn expire_deferred(&mut self, now: Instant, env: &Env, metrics: &LoopMetrics) {
        let mut any = false;
        for i in 0..self.inflight.len() {
            let s = &self.inflight[i];
            if s.ready.is_some() || s.barrier || now < s.deadline + DEFERRED_GRACE {
                continue;
            }
            let (method, seqid, dialect) = (s.method, s.seqid, s.dialect);
            let buf = if i == 0 {
                &mut self.out
            } else {
                &mut self.later
            };
            let start = buf.len();
            let msg = format!(
                "{}: no answer from the back-end worker past the call's deadline",
                method.name()
            );
            Reply::app_error(
                buf,
                dialect,
                method.name().as_bytes(),
                seqid,
                AppErrorKind::InternalError,
                &msg,
            );
            if self.inflight[i].oneway {
                buf.truncate(start);
            }
            let end = buf.len();
            if i > 0 {
                self.later_live += end - start;
            }
            metrics.add(&metrics.deadline_exceeded, 1);
            metrics.call(method as usize, 0, true);
            if let Some(info) = self.inflight[i].admitted.take() {
                env.filters.done(
                    &info,
                    Ending {
                        took: info.admitted.elapsed(),
                        ok: false,
                    },
                );
            }
            self.inflight[i].ready = Some((start, end));
            any = true;
        }
        if any {
            // Slot 0's reply went straight into `out`.
            if self.inflight.front().is_some_and(|s| s.ready.is_some()) {
                self.inflight.pop_front();
            }
            self.release_ready();
        }
    }

    /// The session must be closed once `out` is sent.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Replies are waiting past the limit: stop reading requests until the client reads its replies.
    pub fn backlogged(&self, env: &Env) -> bool {
        self.out.len() + self.later_live >= env.max_pending_reply
    }

    /// Whether the loop should stop reading this session's socket for now: its replies are backlogged, or
    /// its calls wait for deferred ones and a whole read's worth of requests is already kept (a client
    /// streaming calls behind a slow back end would otherwise grow `pending` without bound).
    pub fn paused(&self, env: &Env) -> bool {
        self.backlogged(env) || (self.held_back && self.pending.len() >= KEEP_CAPACITY)
    }

    /// A message begun longer ago than the message timeout (a client trickling bytes or gone silent
    /// mid-message).
    pub fn stalled(&self, env: &Env, now: Instant) -> bool {
        !self.held_back
            && self.inflight.is_empty()
            && self
                .partial_since
                .is_some_and(|t| now.saturating_duration_since(t) > env.message_timeout)
    }

    /// Serves calls held back (replies were backlogged, a barrier call was out, or too many deferred calls
    /// were); for the loop once the client read its replies or deferred replies came.
    pub fn resume(&mut self, env: &Env, metrics: &LoopMetrics, now: Instant) {
        if !self.pending.is_empty() && !self.blocked(env) {
            self.on_bytes(&[], env, metrics, now);
        }
    }

    /// Whether no further call may be served now.
    fn blocked(&self, env: &Env) -> bool {
        self.barrier || self.inflight.len() >= env.max_deferred
    }

    /// Takes bytes that arrived and answers every whole message among them into `out`.
    pub fn on_bytes(&mut self, data: &[u8], env: &Env, metrics: &LoopMetrics, now: Instant) {
        if self.closing {
            return;
        }
        if self.pending.is_empty() {
            let used = serve(data, self, env, metrics, now);
            if used < data.len() && !self.closing {
                self.pending.extend_from_slice(&data[used..]);
                self.partial_since = Some(now);
            }
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(data);
            let used = serve(&pending, self, env, metrics, now);
            pending.drain(..used);
            if pending.is_empty() {
                self.partial_since = None;
                if pending.capacity() > KEEP_CAPACITY {
                    pending = Vec::new();
                }
            } else if used > 0 {
                self.partial_since = Some(now);
            }
            if !self.closing {
                self.pending = pending;
            }
        }
    }

    /// After `out` was sent in part or whole.
    pub fn sent(&mut self, n: usize) {
        if n >= self.out.len() {
            self.out.clear();
            if self.out.capacity() > KEEP_CAPACITY {
                self.out = Vec::new();
            }
        } else {
            self.out.drain(..n);
        }
    }

    /// Whether a message has begun to arrive and is not complete.
    pub fn mid_message(&self) -> bool {
        !self.pending.is_empty()
    }
}

impl Session {
    /// Writes a reply with `write`, in its place: straight into `out`, or after the deferred calls still
    /// out. Returns what `write` returned.
    fn answer<R>(
        &mut self,
        method: Method,
        seqid: i32,
        dialect: Dialect,
        write: impl FnOnce(&mut Vec<u8>) -> R,
    ) -> R {
        if self.inflight.is_empty() {
            return write(&mut self.out);
        }
        let start = self.later.len();
        let r = write(&mut self.later);
        let end = self.later.len();
        if end > start {
            self.later_live += end - start;
            self.inflight.push_back(Slot {
                tag: u64::MAX,
                method,
                seqid,
                dialect,
                // Never looked at: the slot is ready.
                deadline: self
                    .inflight
                    .back()
                    .map_or_else(Instant::now, |s| s.deadline),
                ready: Some((start, end)),
                barrier: false,
                oneway: false,
                admitted: None,
            });
        }
        r
    }

    /// The ticket the next deferred call will carry.
    fn ticket(&self) -> Ticket {
        Ticket {
            session: self.id,
            tag: self.next_tag,
        }
    }

    /// Records a deferred call (issued with [`Session::ticket`]) in its place in the stream.
    #[allow(clippy::too_many_arguments)]
    fn deferred(
        &mut self,
        method: Method,
        seqid: i32,
        dialect: Dialect,
        deadline: Instant,
        barrier: bool,
        oneway: bool,
        admitted: Option<CallInfo>,
    ) {
        self.inflight.push_back(Slot {
            tag: self.next_tag,
            method,
            seqid,
            dialect,
            deadline,
            ready: None,
            barrier,
            oneway,
            admitted,
        });
        self.next_tag += 1;
        self.barrier |= barrier;
    }
}

/// Serves whole messages from the start of `buf`; returns the bytes used.
fn serve(
    buf: &[u8],
    s: &mut Session,
    env: &Env,
    metrics: &LoopMetrics,
    received: Instant,
) -> usize {
    let mut used = 0;
    let mut started = Instant::now();
    let mut args = Args::new(&env.limits);
    loop {
        // Replies are piling up unread (keep the remaining calls for later rather than answer them all
        // into memory: a 64 KiB read of small calls for a large value could otherwise take gigabytes), or
        // the calls must wait for deferred ones.
        s.held_back = s.backlogged(env) || s.blocked(env);
        if s.held_back {
            return used;
        }
        match wire::next_call(
            &buf[used..],
            s.transport,
            &env.limits,
            &mut args,
            &mut s.progress,
        ) {
            Ok(None) => return used,
            Ok(Some(c)) => {
                s.transport = Some(c.dialect.transport);
                used += c.consumed;
                started = call(&c, &args, s, env, metrics, received, started);
            }
            Err(bad) => {
                metrics.add(&metrics.protocol_errors, 1);
                let (name, seqid) = bad.header.map_or((&b""[..], 0), |h| (h.name, h.seqid));
                tracing::debug!(error = %bad.error, "malformed message; closing the session");
                let dialect = bad.dialect.unwrap_or(Dialect::BINARY);
                let msg = bad.error.to_string();
                s.answer(Method::Noop, seqid, dialect, |out| {
                    Reply::app_error(out, dialect, name, seqid, AppErrorKind::ProtocolError, &msg)
                });
                s.closing = true;
                return used;
            }
        }
    }
}

/// How a call left: answered here, or deferred (a barrier or not; admitted by the filters or not).
enum Left {
    Answered,
    Deferred {
        barrier: bool,
        admitted: Option<CallInfo>,
    },
}

/// Runs one whole message and answers it in its place (or defers it); returns the time it finished (the
/// next call's start).
fn call(
    c: &Call<'_>,
    args: &Args<'_>,
    s: &mut Session,
    env: &Env,
    metrics: &LoopMetrics,
    received: Instant,
    started: Instant,
) -> Instant {
    let seqid = c.header.seqid;
    let method = Method::from_name(c.header.name);
    let ticket = s.ticket();
    let peer = s.peer;
    let (done, left) = s.answer(method.unwrap_or(Method::Noop), seqid, c.dialect, |out| {
        run(
            c, args, method, ticket, out, env, peer, metrics, received, started,
        )
    });
    if let (Left::Deferred { barrier, admitted }, Some(m)) = (left, method) {
        let oneway = c.header.mtype == mtype::ONEWAY;
        s.deferred(
            m,
            seqid,
            c.dialect,
            received + env.call_timeout,
            barrier,
            oneway,
            admitted,
        );
    }
    done
}

/// Runs one call, writing its reply into `out` unless it was deferred.
#[allow(clippy::too_many_arguments)]
fn run(
    c: &Call<'_>,
    args: &Args<'_>,
    method: Option<Method>,
    ticket: Ticket,
    out: &mut Vec<u8>,
    env: &Env,
    peer: IpAddr,
    metrics: &LoopMetrics,
    received: Instant,
    started: Instant,
) -> (Instant, Left) {
    let (header, dialect) = (&c.header, c.dialect);
    let app_error = |out: &mut Vec<u8>, kind, msg: &str| {
        Reply::app_error(out, dialect, header.name, header.seqid, kind, msg)
    };
    let Some(method) = method else {
        // The name goes back in the reply's header (some clients, Go's, match on it before they look at
        // the message type), up to ECHOED bytes: no IDL method name comes near that, and a name of a
        // megabyte does not come back whole. The text quotes at most 64 bytes of it, escaped (an escaped
        // control byte takes up to six).
        const ECHOED: usize = 256;
        const QUOTED: usize = 64;
        let shown = String::from_utf8_lossy(&header.name[..header.name.len().min(QUOTED)]);
        let msg = if header.name.len() > QUOTED {
            format!("unknown method {shown:?}… ({} bytes)", header.name.len())
        } else {
            format!("unknown method {shown:?}")
        };
        // (Cut at a character's start: a client decoding the name as UTF-8 must not fail on it.)
        let mut cut = header.name.len().min(ECHOED);
        while cut < header.name.len() && cut > 0 && header.name[cut] & 0xc0 == 0x80 {
            cut -= 1;
        }
        let echoed = &header.name[..cut];
        Reply::app_error(
            out,
            dialect,
            echoed,
            header.seqid,
            AppErrorKind::UnknownMethod,
            &msg,
        );
        metrics.call(UNKNOWN_SLOT, 0, true);
        return (started, Left::Answered);
    };
    if header.mtype != mtype::CALL && header.mtype != mtype::ONEWAY {
        let msg = format!("message type {} is not a call", header.mtype);
        app_error(out, AppErrorKind::InvalidMessageType, &msg);
        metrics.call(method as usize, 0, true);
        return (started, Left::Answered);
    }
    // The filters (flow control, degrade, sampling), unless none is on or a peer forwarded the call (it
    // passed them where the client reached the cluster).
    let admitted = if env.filters.is_empty() || args.context().is_ok_and(|c| c.sticky) {
        None
    } else {
        let info = CallInfo {
            method,
            peer,
            admitted: started,
            caller: c
                .info
                .caller()
                .map(crate::filter::Caller::new)
                .unwrap_or_default(),
        };
        if let Err(r) = env.filters.admit(&info) {
            app_error(
                out,
                AppErrorKind::InternalError,
                &format!("{}: {}", method.name(), r.message),
            );
            metrics.call(method as usize, 0, true);
            return (started, Left::Answered);
        }
        Some(info)
    };
    let refused = |out: &mut Vec<u8>, msg: &str| {
        app_error(out, AppErrorKind::InternalError, msg);
        metrics.call(method as usize, 0, true);
        if let Some(info) = &admitted {
            env.filters.done(
                info,
                Ending {
                    took: Duration::ZERO,
                    ok: false,
                },
            );
        }
        (started, Left::Answered)
    };
    match crate::cluster::route::route(c, args, method, ticket, env) {
        Routed::Local => {}
        Routed::Deferred => {
            return (
                started,
                Left::Deferred {
                    barrier: true,
                    admitted,
                },
            )
        }
        Routed::Refused(why) => return refused(out, &why),
    }
    if started.saturating_duration_since(received) > env.call_timeout {
        metrics.add(&metrics.deadline_exceeded, 1);
        let msg = format!(
            "{}: deadline of {:?} passed before the call could run",
            method.name(),
            env.call_timeout
        );
        return refused(out, &msg);
    }
    let mark = out.len();
    let mut reply = Reply::begin(out, dialect, header.name, header.seqid);
    let cenv = CallEnv {
        ticket,
        now: started,
        deadline: received + env.call_timeout,
    };
    let result = match env.servants.call(method, args, &mut reply, &cenv) {
        Ok(Outcome::Answered) => {
            reply.finish();
            Ok(())
        }
        Ok(Outcome::Deferred) => {
            reply.abort();
            return (
                started,
                Left::Deferred {
                    barrier: false,
                    admitted,
                },
            );
        }
        Err(e) => {
            reply.abort();
            Err(e)
        }
    };
    let error = result.is_err();
    if let Err(e) = result {
        out.truncate(mark);
        app_error(out, e.kind, &format!("{}: {}", method.name(), e.message));
    }
    if header.mtype == mtype::ONEWAY {
        out.truncate(mark);
    }
    let done = Instant::now();
    let took = done.saturating_duration_since(started);
    metrics.call(method as usize, took.as_nanos() as u64, error);
    if let Some(info) = &admitted {
        env.filters.done(info, Ending { took, ok: !error });
    }
    slow(env, metrics, method, peer, took, !error);
    (done, Left::Answered)
}

/// Counts and logs a call slower than `metrics.slow_call_ms`: one structured line (for journald).
fn slow(env: &Env, metrics: &LoopMetrics, method: Method, peer: IpAddr, took: Duration, ok: bool) {
    if took.as_nanos() as u64 > env.slow_call_ns.load(std::sync::atomic::Ordering::Relaxed) {
        metrics.add(&metrics.slow_calls, 1);
        tracing::warn!(
            method = method.name(),
            client = %peer,
            took_us = took.as_micros() as u64,
            ok,
            "slow call"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::wire::Encoder;

    fn env(call_timeout: Duration) -> Env {
        let mut cfg = Config::default();
        cfg.server.max_pending_reply_bytes = 1 << 20;
        cfg.server.message_timeout_ms = 1000;
        let mut env = Env::new(&cfg, Arc::new(Servants::new(&cfg).unwrap()));
        env.call_timeout = call_timeout;
        env
    }

    fn noop(seq: i32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out);
        e.message_begin(b"noop", mtype::CALL, seq);
        e.field_i32(1, seq);
        e.stop();
        out
    }

    fn replies(out: &[u8]) -> Vec<(u8, i32)> {
        let mut rest = out;
        let mut v = Vec::new();
        while let Ok(Some(f)) = wire::scan(rest, Some(Transport::Buffered), &Limits::default()) {
            let h = wire::MessageHeader::read(&mut wire::Reader::new(f.message)).unwrap();
            v.push((h.mtype, h.seqid));
            rest = &rest[f.consumed..];
        }
        v
    }

    #[test]
    fn calls_past_their_deadline_are_answered_not_run() {
        let env = env(Duration::from_millis(1));
        let metrics = LoopMetrics::default();
        let mut s = Session::new();
        let batch: Vec<u8> = (1..=3).flat_map(noop).collect();
        // The bytes arrived 50 ms before the loop got to them.
        let arrived = Instant::now() - Duration::from_millis(50);
        s.on_bytes(&batch, &env, &metrics, arrived);
        assert_eq!(
            replies(&s.out),
            [
                (mtype::EXCEPTION, 1),
                (mtype::EXCEPTION, 2),
                (mtype::EXCEPTION, 3)
            ]
        );
        assert_eq!(
            metrics
                .deadline_exceeded
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        assert!(!s.closing(), "a missed deadline keeps the session");
        s.sent(usize::MAX);
        s.on_bytes(&noop(4), &env, &metrics, Instant::now());
        assert_eq!(replies(&s.out), [(mtype::REPLY, 4)]);
    }

    #[test]
    fn message_split_anywhere_is_answered_once() {
        let env = env(Duration::from_secs(5));
        let metrics = LoopMetrics::default();
        let batch: Vec<u8> = (1..=2).flat_map(noop).collect();
        for cut in 0..batch.len() {
            let mut s = Session::new();
            let now = Instant::now();
            s.on_bytes(&batch[..cut], &env, &metrics, now);
            assert_eq!(
                s.mid_message(),
                cut != 0 && cut != batch.len() / 2,
                "cut {cut}"
            );
            s.on_bytes(&batch[cut..], &env, &metrics, now);
            assert_eq!(
                replies(&s.out),
                [(mtype::REPLY, 1), (mtype::REPLY, 2)],
                "cut {cut}"
            );
            assert!(!s.mid_message());
        }
    }

    #[test]
    fn stalled_message_is_reported_after_the_timeout() {
        let env = env(Duration::from_secs(5));
        let metrics = LoopMetrics::default();
        let mut s = Session::new();
        let t0 = Instant::now();
        s.on_bytes(&noop(1)[..5], &env, &metrics, t0);
        assert!(!s.stalled(&env, t0 + Duration::from_millis(500)));
        assert!(s.stalled(&env, t0 + Duration::from_millis(1500)));
    }

    /// An env whose "default" memcache pool points at a port nobody serves and whose answers go nowhere:
    /// deferred calls stay out until the test completes them itself, in any order.
    fn deferring_env() -> Env {
        let mut cfg = Config::default();
        cfg.memcache.pools.push(crate::config::MemcachePool {
            name: "default".into(),
            servers: vec!["127.0.0.1:9".into()],
            ..Default::default()
        });
        // Its connects fail: keep its breaker from ever refusing.
        cfg.backend.breaker.consecutive_failures = u32::MAX;
        cfg.backend.breaker.failure_rate = 1.0;
        Env::new(&cfg, Arc::new(Servants::new(&cfg).unwrap()))
    }

    fn mc_get(seq: i32, mtype: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out);
        e.message_begin(b"mc_get", mtype, seq);
        e.field_begin(crate::wire::ttype::STRUCT, 1);
        e.field_i64(1, 1);
        e.field_bytes(2, b"test");
        e.field_i64(3, 0);
        e.stop();
        e.field_bytes(2, b"default");
        e.field_bytes(3, b"k");
        e.stop();
        out
    }

    fn answer(s: &Session, tag: u64, value: Option<&[u8]>) -> Completion {
        use crate::backend::{memcache::Answer, Done, Response, Ticket};
        let a = match value {
            Some(v) => Answer::Value {
                data: v.to_vec(),
                flags: 0,
            },
            None => Answer::Miss,
        };
        Completion::Backend(Done {
            ticket: Ticket { session: s.id, tag },
            submitted: Instant::now(),
            result: Ok(Response::Memcache(a)),
        })
    }

    #[test]
    fn deferred_replies_leave_in_call_order_whatever_order_they_come_in() {
        let env = deferring_env();
        let metrics = LoopMetrics::default();
        let mut s = Session::new();
        let batch: Vec<u8> = [
            mc_get(1, mtype::CALL),
            noop(2),
            mc_get(3, mtype::CALL),
            noop(4),
            mc_get(5, mtype::CALL),
        ]
        .concat();
        s.on_bytes(&batch, &env, &metrics, Instant::now());
        assert!(s.out.is_empty(), "nothing may leave before call 1's reply");
        assert!(s.awaiting());
        // The third deferred call (tag 2) answers first, then the second, then the first.
        s.complete(answer(&s, 2, Some(b"five")), &env, &metrics);
        s.complete(answer(&s, 1, None), &env, &metrics);
        assert!(s.out.is_empty());
        s.complete(answer(&s, 0, Some(b"one")), &env, &metrics);
        assert_eq!(
            replies(&s.out),
            [
                (mtype::REPLY, 1),
                (mtype::REPLY, 2),
                (mtype::REPLY, 3),
                (mtype::REPLY, 4),
                (mtype::REPLY, 5)
            ]
        );
        let text = String::from_utf8_lossy(&s.out).into_owned();
        assert!(text.find("one").unwrap() < text.find("five").unwrap());
        assert!(!s.awaiting());
        // A late or repeated answer is dropped.
        let len = s.out.len();
        s.complete(answer(&s, 0, Some(b"again")), &env, &metrics);
        assert_eq!(s.out.len(), len);
    }

    #[test]
    fn deferred_oneway_calls_send_nothing() {
        let env = deferring_env();
        let metrics = LoopMetrics::default();
        let mut s = Session::new();
        let batch = [mc_get(1, mtype::ONEWAY), noop(2)].concat();
        s.on_bytes(&batch, &env, &metrics, Instant::now());
        s.complete(answer(&s, 0, Some(b"v")), &env, &metrics);
        assert_eq!(replies(&s.out), [(mtype::REPLY, 2)]);
    }

    #[test]
    fn steady_pipelining_does_not_keep_sent_replies() {
        let env = deferring_env();
        let metrics = LoopMetrics::default();
        let mut s = Session::new();
        // Always one deferred call out ahead of a stream of noops: `inflight` never empties.
        s.on_bytes(&mc_get(0, mtype::CALL), &env, &metrics, Instant::now());
        for round in 1..=3000 {
            let batch = [noop(round), mc_get(round, mtype::CALL)].concat();
            s.on_bytes(&batch, &env, &metrics, Instant::now());
            // The deferred call before this batch's (tag round - 1) answers.
            s.complete(answer(&s, round as u64 - 1, Some(b"x")), &env, &metrics);
            s.sent(usize::MAX);
            assert!(s.awaiting());
        }
        assert!(
            s.later.len() <= 2 * KEEP_CAPACITY,
            "later holds {} bytes",
            s.later.len()
        );
        assert!(s.later_live < 1024);
    }
}
