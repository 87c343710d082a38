//! A session: one client's byte stream in, its replies out. It knows nothing of sockets, so the kernel path
//! and the kernel-bypass path drive the same code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::metrics::{LoopMetrics, UNKNOWN_SLOT};
use crate::proxy::{
    ForwardDone, ForwardJob, Forwarder, RegistryBackend, Route, Router, SessionId, Work,
};
use crate::servant::{Method, Servants};
use crate::wire::{self, mtype, AppErrorKind, Args, Call, Limits, Progress, Reply, Transport};

/// What every session of a node shares.
pub struct Env {
    pub servants: Arc<Servants>,
    pub limits: Limits,
    pub call_timeout: Duration,
    pub slow_call: Duration,
    pub message_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_pending_reply: usize,
    /// Cluster routing of keyed calls; `None` on a single node (everything is local).
    pub router: Option<Arc<dyn Router>>,
    pub forwarder: Option<Arc<Forwarder>>,
}

/// Inbound buffer capacity kept between messages; a larger one (after a big message) is given back.
const KEEP_CAPACITY: usize = 64 << 10;

#[derive(Default)]
pub struct Session {
    /// Bytes of a message that has not fully arrived.
    pending: Vec<u8>,
    /// Replies not yet sent.
    pub out: Vec<u8>,
    transport: Option<Transport>,
    /// When the first byte of the pending message arrived.
    partial_since: Option<Instant>,
    /// A protocol violation was answered: send what is in `out`, then close.
    closing: bool,
    /// Whole calls wait in `pending`, unserved while the client is not reading its replies.
    held_back: bool,
    /// How far the walk of a partly arrived unframed message has come.
    progress: Progress,
    /// This session across loops, for forwarded replies to find it.
    pub id: SessionId,
    /// A call forwarded to its owner, whose reply comes before anything else this session answers.
    awaiting: Option<(Method, i32)>,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_id(id: SessionId) -> Self {
        Session {
            id,
            ..Self::default()
        }
    }

    /// Whether a forwarded call's reply is awaited.
    pub fn awaiting(&self) -> bool {
        self.awaiting.is_some()
    }

    /// A forwarded call's reply (or why there is none): answered in its place in the stream.
    pub fn forward_done(&mut self, done: ForwardDone, metrics: &LoopMetrics) {
        let Some((method, seqid)) = self.awaiting.take() else {
            return;
        };
        let transport = self.transport.unwrap_or(Transport::Buffered);
        let error = match done.reply {
            Ok(body) => {
                if transport == Transport::Framed {
                    self.out
                        .extend_from_slice(&(body.len() as u32).to_be_bytes());
                }
                self.out.extend_from_slice(&body);
                false
            }
            Err(why) => {
                let name = method.name().as_bytes();
                Reply::app_error(
                    &mut self.out,
                    transport,
                    name,
                    seqid,
                    AppErrorKind::InternalError,
                    &why,
                );
                true
            }
        };
        metrics.add(&metrics.forwarded, 1);
        let ns = done.submitted.elapsed().as_nanos() as u64;
        metrics.call(method as usize, ns, error);
    }

    /// The session must be closed once `out` is sent.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Replies are waiting past the limit: stop reading requests until the client reads its replies.
    pub fn backlogged(&self, env: &Env) -> bool {
        self.out.len() >= env.max_pending_reply
    }

    /// A message begun longer ago than the message timeout (a client trickling bytes or gone silent
    /// mid-message).
    pub fn stalled(&self, env: &Env, now: Instant) -> bool {
        !self.held_back
            && self.awaiting.is_none()
            && self
                .partial_since
                .is_some_and(|t| now.saturating_duration_since(t) > env.message_timeout)
    }

    /// Serves calls held back (replies were backlogged, or a forwarded reply was awaited); for the loop once
    /// the client read its replies or the forwarded reply came.
    pub fn resume(&mut self, env: &Env, metrics: &LoopMetrics, now: Instant) {
        if !self.pending.is_empty() && self.awaiting.is_none() {
            self.on_bytes(&[], env, metrics, now);
        }
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
        if s.awaiting.is_some() {
            return used;
        }
        // Replies are piling up unread: keep the remaining calls for later rather than answer them all
        // into memory (a 64 KiB read of small calls for a large value could otherwise take gigabytes).
        s.held_back = s.out.len() >= env.max_pending_reply;
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
                s.transport = Some(c.transport);
                used += c.consumed;
                started = call(&c, &args, s, env, metrics, received, started);
            }
            Err(bad) => {
                metrics.add(&metrics.protocol_errors, 1);
                let (name, seqid) = bad.header.map_or((&b""[..], 0), |h| (h.name, h.seqid));
                tracing::debug!(error = %bad.error, "malformed message; closing the session");
                Reply::app_error(
                    &mut s.out,
                    bad.transport.unwrap_or(Transport::Buffered),
                    name,
                    seqid,
                    AppErrorKind::ProtocolError,
                    &bad.error.to_string(),
                );
                s.closing = true;
                return used;
            }
        }
    }
}

/// The argument holding the key that routes a call to its vbucket's owner (API.md, Routing).
fn routed_key(m: Method) -> Option<i16> {
    match m {
        Method::LcSet | Method::LcGet | Method::LcDel | Method::MyEvict => Some(2),
        Method::Lock | Method::Unlock => Some(3),
        _ => None,
    }
}

/// Routes a keyed call: `None` to run it here; `Some(Ok)` when it was forwarded to its owner;
/// `Some(Err)` when it must be refused.
fn route(
    c: &Call<'_>,
    args: &Args<'_>,
    method: Method,
    router: &dyn Router,
    s: &mut Session,
    env: &Env,
) -> Option<Result<(), String>> {
    // (Asked only for zk_* calls: `registry()` hands out a new handle.)
    if matches!(
        method,
        Method::ZkCreate | Method::ZkChildren | Method::ZkDel
    ) {
        if let Some(reg) = router.registry() {
            return registry_call(c, args, method, reg, s, env);
        }
    }
    let key_id = routed_key(method)?;
    // Malformed arguments and invalid contexts are refused by the local call, as for any other call.
    let key = args.bytes(key_id, "key").ok()?;
    let ctx = args.context().ok()?;
    if ctx.rid == 0 || ctx.reason.is_empty() {
        return None;
    }
    if ctx.sticky {
        // Forwarded here by a peer: run here, never forward again; refuse if the sender's map is stale.
        return if router.accepts_forwarded(key) {
            None
        } else {
            Some(Err(format!(
                "{}: forwarded here, but this node does not own the key's vbucket (the sender's map is \
                 stale); retry",
                method.name()
            )))
        };
    }
    match router.route(key) {
        Route::Local => None,
        Route::Unavailable(why) => Some(Err(format!("{}: {why}", method.name()))),
        Route::Remote { node, addr } => {
            let Some(fwd) = &env.forwarder else {
                return Some(Err(format!(
                    "{}: owned by node {node}, and forwarding is off",
                    method.name()
                )));
            };
            let ctx_bytes = args.structure(1, "ctx").ok()?;
            let request = crate::proxy::sticky_request(c.message, ctx_bytes, &ctx);
            let work = Work::Forward {
                node,
                addr,
                request,
            };
            defer(s, fwd, method, c.header.seqid, work);
            Some(Ok(()))
        }
    }
}

/// A zk_* call on the cluster's registry: validated here, run on a worker (it waits on raft), answered in
/// its place in the stream.
fn registry_call(
    c: &Call<'_>,
    args: &Args<'_>,
    method: Method,
    reg: Arc<dyn RegistryBackend>,
    s: &mut Session,
    env: &Env,
) -> Option<Result<(), String>> {
    let ctx = args.context().ok()?;
    if ctx.rid == 0 || ctx.reason.is_empty() {
        return None; // the local call refuses it with the usual message
    }
    let fwd = env.forwarder.as_ref()?;
    let path = match args.bytes(2, "path").map(|p| String::from_utf8(p.to_vec())) {
        Ok(Ok(p)) => p,
        _ => return None,
    };
    let data = if method == Method::ZkCreate {
        args.bytes(3, "data").ok()?.to_vec()
    } else {
        Vec::new()
    };
    let (name, seqid) = (method.name(), c.header.seqid);
    let work = Work::Run(Box::new(move || {
        let mut out = Vec::new();
        let mut reply = Reply::begin(&mut out, Transport::Buffered, name.as_bytes(), seqid);
        let e = reply.enc();
        match method {
            Method::ZkCreate => e.field_bool(0, reg.create(&path, &data)?),
            Method::ZkDel => e.field_bool(0, reg.delete(&path)?),
            _ => crate::servant::registry::encode_children(e, &reg.children(&path)?),
        }
        reply.finish();
        Ok(out)
    }));
    defer(s, fwd, method, seqid, work);
    Some(Ok(()))
}

/// Hands a call's work to a worker; the session answers nothing else until its reply is back.
fn defer(s: &mut Session, fwd: &Forwarder, method: Method, seqid: i32, work: Work) {
    s.awaiting = Some((method, seqid));
    fwd.submit(ForwardJob {
        session: s.id,
        work,
        submitted: Instant::now(),
    });
}

/// Runs one whole message and appends its reply; returns the time it finished (the next call's start).
fn call(
    c: &Call<'_>,
    args: &Args<'_>,
    s: &mut Session,
    env: &Env,
    metrics: &LoopMetrics,
    received: Instant,
    started: Instant,
) -> Instant {
    let (header, transport) = (&c.header, c.transport);
    let app_error = |out: &mut Vec<u8>, kind, msg: &str| {
        Reply::app_error(out, transport, header.name, header.seqid, kind, msg)
    };
    let Some(method) = Method::from_name(header.name) else {
        let name = String::from_utf8_lossy(header.name);
        app_error(
            &mut s.out,
            AppErrorKind::UnknownMethod,
            &format!("unknown method {name:?}"),
        );
        metrics.call(UNKNOWN_SLOT, 0, true);
        return started;
    };
    if header.mtype != mtype::CALL && header.mtype != mtype::ONEWAY {
        let msg = format!("message type {} is not a call", header.mtype);
        app_error(&mut s.out, AppErrorKind::InvalidMessageType, &msg);
        metrics.call(method as usize, 0, true);
        return started;
    }
    if let Some(router) = &env.router {
        if let Some(forwarded) = route(c, args, method, router.as_ref(), s, env) {
            if let Err(why) = forwarded {
                app_error(&mut s.out, AppErrorKind::InternalError, &why);
                metrics.call(method as usize, 0, true);
            }
            return started;
        }
    }
    if started.saturating_duration_since(received) > env.call_timeout {
        metrics.add(&metrics.deadline_exceeded, 1);
        let msg = format!(
            "{}: deadline of {:?} passed before the call could run",
            method.name(),
            env.call_timeout
        );
        app_error(&mut s.out, AppErrorKind::InternalError, &msg);
        metrics.call(method as usize, 0, true);
        return started;
    }
    let mark = s.out.len();
    let mut reply = Reply::begin(&mut s.out, transport, header.name, header.seqid);
    let result = match env.servants.call(method, args, &mut reply) {
        Ok(()) => {
            reply.finish();
            Ok(())
        }
        Err(e) => {
            reply.abort();
            Err(e)
        }
    };
    let error = result.is_err();
    if let Err(e) = result {
        s.out.truncate(mark);
        app_error(
            &mut s.out,
            e.kind,
            &format!("{}: {}", method.name(), e.message),
        );
    }
    if header.mtype == mtype::ONEWAY {
        s.out.truncate(mark);
    }
    let done = Instant::now();
    let took = done.saturating_duration_since(started);
    metrics.call(method as usize, took.as_nanos() as u64, error);
    if took > env.slow_call {
        metrics.add(&metrics.slow_calls, 1);
        tracing::warn!(
            method = method.name(),
            took_us = took.as_micros() as u64,
            "slow call"
        );
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::wire::Encoder;

    fn env(call_timeout: Duration) -> Env {
        let cfg = Config::default();
        Env {
            servants: Arc::new(Servants::new(&cfg)),
            limits: cfg.server.limits(),
            call_timeout,
            slow_call: Duration::from_secs(1),
            message_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_pending_reply: 1 << 20,
            router: None,
            forwarder: None,
        }
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
}
