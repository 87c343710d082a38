//! A back-end I/O thread: one mio loop owning the connections of its servers.
//!
//! Per server, at most `max_conns` connections, opened on demand (non-blocking connect, bounded by
//! `connect_timeout_ms`), closed after `idle_timeout_ms` without calls, and health-checked (memcached
//! `version`, Redis `PING`) before one idle for `health_check_idle_ms` is used again: calls wait behind the
//! check, and go on a new connection if it fails. A call goes on connection `affinity % max_conns`, behind
//! the calls already in flight there; answers come back in order. A connection that errors (broken, late,
//! protocol garbage) is closed and never reused: the calls in flight on it fail with that error, each one
//! counted by the breaker. A call still unanswered at its deadline fails as late and closes its connection,
//! so its late answer can never be taken for another call's.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::breaker::Outcome;
use super::{
    memcache, redis, BackendError, Done, Doorbell, Expect, FailureKind, Job, Protocol, Response,
    Server, Sink,
};

const WAKER: Token = Token(usize::MAX);
const READ_CHUNK: usize = 64 << 10;
/// The longest a loop sleeps with nothing due (it wakes for jobs and socket events anyway).
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// In-buffer capacity kept between answers; a larger one (after a big value) is given back.
const KEEP_CAPACITY: usize = 256 << 10;

/// Starts I/O thread `index` for `servers` (each with its index among all servers); returns its job
/// channel and doorbell.
pub(super) fn spawn(
    index: usize,
    servers: Vec<(usize, Arc<Server>)>,
    total: usize,
    sink: Arc<OnceLock<Arc<dyn Sink>>>,
    limits: (usize, usize),
    retired: Arc<std::sync::atomic::AtomicBool>,
) -> io::Result<(Sender<Job>, Arc<Doorbell>)> {
    let poll = Poll::new()?;
    let bell = Arc::new(Doorbell::new(Waker::new(poll.registry(), WAKER)?));
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut local = vec![usize::MAX; total];
    let mut srvs = Vec::with_capacity(servers.len());
    for (g, s) in servers {
        local[g] = srvs.len();
        let max = s.settings.max_conns;
        srvs.push(Srv {
            shared: s,
            conns: (0..max).map(|_| None).collect(),
            queued: 0,
            sessions: HashMap::default(),
        });
    }
    let mut w = Worker {
        poll,
        rx,
        bell: bell.clone(),
        sink,
        servers: srvs,
        local,
        tokens: Slab::new(),
        scratch: vec![0; READ_CHUNK],
        dirty: Vec::new(),
        max_value: limits.0,
        max_count: limits.1,
        retired,
    };
    std::thread::Builder::new()
        .name(format!("fae-backend-{index}"))
        .spawn(move || w.run())?;
    Ok((tx, bell))
}

/// A call written (or to be written) on a connection, waiting for its answer.
struct Meta {
    /// Its session's key, and the connection slot it was given (`UNASSIGNED` before it was).
    affinity: u64,
    slot: usize,
    /// Where the answer goes if not to the session's loop.
    reply: Option<Sender<Done>>,
    ticket: super::Ticket,
    submitted: Instant,
    deadline: Instant,
    permit: super::breaker::Permit,
    /// When it went on the wire: the store's time is measured from here.
    sent: Instant,
}

enum Waiting {
    Call(Meta, Expect),
    /// A health check or a setup command (AUTH, SELECT) of the connection itself.
    Internal(Expect, Instant),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    /// Setup commands or a health check are out: calls wait in `held`.
    Checking,
    Ready,
}

struct Conn {
    stream: TcpStream,
    token: usize,
    state: State,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    waiting: VecDeque<Waiting>,
    /// Calls not yet written: the connection is connecting or being checked.
    held: VecDeque<Job>,
    last_used: Instant,
    connect_deadline: Instant,
    scan: redis::Scan,
    /// A health check is out (as opposed to setup after connecting): if it fails, the held calls go on a
    /// new connection instead of failing.
    health: bool,
}

const UNASSIGNED: usize = usize::MAX;

struct Srv {
    shared: Arc<Server>,
    conns: Vec<Option<Conn>>,
    /// Calls queued or in flight, against `max_queue`.
    queued: usize,
    /// Sessions with calls in flight on this server: the connection they use and how many calls. A session's
    /// calls stay on one connection while any is in flight, so that they reach the store in order.
    sessions: HashMap<u64, (usize, u32), BuildHasherDefault<KeyHasher>>,
}

impl Srv {
    /// The connection slot for a call of session `affinity`: the one its calls in flight use; else the open
    /// connection with the fewest calls, unless all have `depth` or more and a slot is free (then a new
    /// one). Few connections carry deep pipelines, so a store reads and answers in large batches: at 1,024
    /// GETs in flight, one connection to memcached instead of four gave 181k instead of 144k calls/s, at
    /// 4.3 instead of 5.9 us of fae's CPU per call (docs/PERFORMANCE.md). More open only under load.
    fn assign(&mut self, affinity: u64, depth: usize) -> usize {
        let slot = match self.sessions.get(&affinity) {
            Some(&(slot, _)) => slot,
            None => {
                let best = self
                    .conns
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.as_ref().map(|c| (i, c.waiting.len() + c.held.len())))
                    .min_by_key(|&(_, load)| load);
                let free = self.conns.iter().position(Option::is_none);
                match (best, free) {
                    (Some((i, load)), _) if load < depth => i,
                    (_, Some(f)) => f,
                    (Some((i, _)), None) => i,
                    (None, None) => 0,
                }
            }
        };
        self.sessions.entry(affinity).or_insert((slot, 0)).1 += 1;
        slot
    }

    /// A call of session `affinity` given slot `slot` is done (or given back to be assigned again).
    fn unassign(&mut self, affinity: u64, slot: usize) {
        if slot == UNASSIGNED {
            return;
        }
        if let Some(e) = self.sessions.get_mut(&affinity) {
            e.1 -= 1;
            if e.1 == 0 {
                self.sessions.remove(&affinity);
            }
        }
    }
}

/// Session keys are already well mixed (loop index and a counter): hash them as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

struct Worker {
    poll: Poll,
    rx: Receiver<Job>,
    bell: Arc<Doorbell>,
    sink: Arc<OnceLock<Arc<dyn Sink>>>,
    servers: Vec<Srv>,
    /// Global server index → index in `servers`.
    local: Vec<usize>,
    /// Token → (server, connection slot).
    tokens: Slab<(usize, usize)>,
    scratch: Vec<u8>,
    /// Connections with bytes to write.
    dirty: Vec<(usize, usize)>,
    max_value: usize,
    max_count: usize,
    retired: Arc<std::sync::atomic::AtomicBool>,
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                if let Some(&(s, c)) = self.tokens.get(ev.token().0) {
                    self.on_event(
                        s,
                        c,
                        ev.is_readable() || ev.is_read_closed(),
                        ev.is_read_closed(),
                        now,
                    );
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.accept(job, now);
            }
            let next = self.expire(now);
            self.flush();
            if self.retired.load(Ordering::Acquire) && self.rx.is_empty() && self.idle() {
                // Replaced by a reload, and every call it had is answered: close the connections and end.
                for s in 0..self.servers.len() {
                    for slot in 0..self.servers[s].conns.len() {
                        self.drop_conn(s, slot);
                    }
                }
                return;
            }
            let wait = next.map_or(MAX_SLEEP, |t| t.saturating_duration_since(Instant::now()));
            let rx = &self.rx;
            let sleep = self.bell.sleep(|| !rx.is_empty());
            let timeout = if sleep {
                wait.min(MAX_SLEEP)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "back-end I/O loop: poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                events.clear();
            }
            self.bell.awake();
        }
    }

    /// No call is queued or in flight on any connection.
    fn idle(&self) -> bool {
        self.servers.iter().all(|s| s.queued == 0)
    }

    /// A call arrives from an event loop.
    fn accept(&mut self, job: Job, now: Instant) {
        let s = self.local[job.server];
        let srv = &mut self.servers[s];
        let shared = srv.shared.clone();
        if srv.queued >= shared.settings.max_queue {
            let msg = format!(
                "{} calls already queued or in flight (max_queue); refused",
                srv.queued
            );
            shared.breaker.release(job.permit);
            shared.metrics.failures[FailureKind::Overloaded as usize]
                .fetch_add(1, Ordering::Relaxed);
            let result = Err(shared.error(FailureKind::Overloaded, msg));
            let done = Done {
                ticket: job.ticket,
                submitted: job.submitted,
                result,
            };
            return self.deliver(job.reply.as_ref(), done);
        }
        // Counted from here on: every path below ends in `finish`, which uncounts it.
        srv.queued += 1;
        shared
            .metrics
            .queued
            .store(srv.queued as u64, Ordering::Relaxed);
        if job.deadline <= now {
            // fae's own queueing took the time, not the server: not counted against it.
            let e = shared.error(
                FailureKind::Timeout,
                "late: the call's deadline passed while it was queued in fae for the server",
            );
            return self.fail(s, meta_of(&job, UNASSIGNED, now), e, now, false);
        }
        let slot = srv.assign(job.affinity, shared.settings.pipeline_depth);
        if srv.conns[slot].is_none() {
            if let Err(e) = self.open(s, slot, now) {
                let e = shared.error(FailureKind::Connect, format!("cannot connect: {e}"));
                return self.fail(s, meta_of(&job, slot, now), e, now, true);
            }
        }
        let health_after = Duration::from_millis(shared.settings.health_check_idle_ms);
        let conn = self.servers[s].conns[slot].as_mut().expect("opened above");
        if conn.state == State::Ready
            && conn.waiting.is_empty()
            && now.saturating_duration_since(conn.last_used) >= health_after
        {
            // Idle a while: the server may have gone since. Check before trusting it with a call.
            let expect = health_check(shared.protocol, &mut conn.out);
            let deadline = now + Duration::from_millis(shared.settings.connect_timeout_ms);
            conn.waiting.push_back(Waiting::Internal(expect, deadline));
            conn.state = State::Checking;
            conn.health = true;
            self.dirty.push((s, slot));
        }
        let conn = self.servers[s].conns[slot].as_mut().expect("opened above");
        conn.last_used = now;
        if conn.state == State::Ready {
            write_call(conn, job, slot, now);
            self.dirty.push((s, slot));
        } else {
            conn.held.push_back(job);
        }
    }

    /// Opens connection `slot` of server `s` (non-blocking: it completes on a writable event).
    fn open(&mut self, s: usize, slot: usize, now: Instant) -> io::Result<()> {
        let srv = &mut self.servers[s];
        let addr = *srv
            .shared
            .addrs
            .first()
            .ok_or_else(|| io::Error::other("its name did not resolve when faed started"))?;
        let mut stream = TcpStream::connect(addr)?;
        let entry = self.tokens.vacant_entry();
        let token = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        entry.insert((s, slot));
        let shared = &srv.shared;
        shared.metrics.connects.fetch_add(1, Ordering::Relaxed);
        shared.metrics.conns_open.fetch_add(1, Ordering::Relaxed);
        srv.conns[slot] = Some(Conn {
            stream,
            token,
            state: State::Connecting,
            out: Vec::new(),
            inbuf: Vec::new(),
            waiting: VecDeque::new(),
            held: VecDeque::new(),
            last_used: now,
            connect_deadline: now + Duration::from_millis(shared.settings.connect_timeout_ms),
            scan: redis::Scan::default(),
            health: false,
        });
        Ok(())
    }

    fn on_event(&mut self, s: usize, slot: usize, readable: bool, read_closed: bool, now: Instant) {
        let shared = self.servers[s].shared.clone();
        let Some(conn) = self.servers[s].conns[slot].as_mut() else {
            return;
        };
        if conn.state == State::Connecting {
            match conn.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    return self.close(
                        s,
                        slot,
                        FailureKind::Connect,
                        format!("cannot connect: {e}"),
                        now,
                    );
                }
            }
            match conn.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // not yet
                Err(e) => {
                    return self.close(
                        s,
                        slot,
                        FailureKind::Connect,
                        format!("cannot connect: {e}"),
                        now,
                    )
                }
            }
            let _ = conn.stream.set_nodelay(true);
            if shared.setup_count > 0 {
                conn.out.extend_from_slice(&shared.setup);
                let deadline = now + Duration::from_millis(shared.settings.connect_timeout_ms);
                for _ in 0..shared.setup_count {
                    conn.waiting
                        .push_back(Waiting::Internal(Expect::Redis, deadline));
                }
                conn.state = State::Checking;
                conn.health = false;
            } else {
                ready(conn, slot, now);
            }
            self.dirty.push((s, slot));
        }
        if readable {
            self.read(s, slot, read_closed, now);
        }
        if self.servers[s].conns[slot]
            .as_ref()
            .is_some_and(|c| !c.out.is_empty())
        {
            self.dirty.push((s, slot));
        }
    }

    /// Reads what the connection has and takes every whole answer. With `read_closed` (the server's FIN was
    /// seen) it reads to the end: a short read does not mean the socket is drained.
    fn read(&mut self, s: usize, slot: usize, read_closed: bool, now: Instant) {
        let (max_value, max_count) = (self.max_value, self.max_count);
        let mut eof = None;
        {
            let Some(conn) = self.servers[s].conns[slot].as_mut() else {
                return;
            };
            loop {
                match conn.stream.read(&mut self.scratch) {
                    Ok(0) => {
                        eof = Some("the server closed the connection".to_owned());
                        break;
                    }
                    Ok(n) => {
                        conn.inbuf.extend_from_slice(&self.scratch[..n]);
                        if n < self.scratch.len() && !read_closed {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        eof = Some(format!("connection broken: {e}"));
                        break;
                    }
                }
            }
        }
        // Answers, in order.
        let mut used = 0;
        loop {
            let srv = &mut self.servers[s];
            let protocol = srv.shared.protocol;
            let Some(conn) = srv.conns[slot].as_mut() else {
                return;
            };
            if used == conn.inbuf.len() {
                break;
            }
            let Some(front) = conn.waiting.front() else {
                let msg = "the server sent bytes no call was waiting for".to_owned();
                return self.close(s, slot, FailureKind::Protocol, msg, now);
            };
            let expect = match front {
                Waiting::Call(_, e) | Waiting::Internal(e, _) => *e,
            };
            let parsed = parse(
                &conn.inbuf[used..],
                expect,
                &mut conn.scan,
                max_value,
                max_count,
            );
            let (answer, n) = match parsed {
                Ok(Some(a)) => a,
                Ok(None) => break,
                Err(e) if e.oversized => return self.close_oversized(s, slot, e.message, now),
                Err(e) => {
                    let msg = format!("protocol garbage: {e}");
                    return self.close(s, slot, FailureKind::Protocol, msg, now);
                }
            };
            used += n;
            match conn.waiting.pop_front().expect("front seen above") {
                Waiting::Call(meta, _) => {
                    let app_error = matches!(
                        &answer,
                        Response::Memcache(memcache::Answer::Error(_))
                            | Response::Redis(redis::Value::Error(_))
                    );
                    if app_error {
                        srv.shared
                            .metrics
                            .app_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    self.succeed(s, meta, answer, now);
                }
                Waiting::Internal(..) => {
                    if let Err(why) = internal_ok(protocol, &answer) {
                        return self.close(s, slot, FailureKind::Connect, why, now);
                    }
                    let conn = self.servers[s].conns[slot].as_mut().expect("checked above");
                    let internal_left = conn
                        .waiting
                        .iter()
                        .any(|w| matches!(w, Waiting::Internal(..)));
                    if conn.state == State::Checking && !internal_left {
                        ready(conn, slot, now);
                        self.dirty.push((s, slot));
                    }
                }
            }
        }
        if let Some(conn) = self.servers[s].conns[slot].as_mut() {
            conn.inbuf.drain(..used);
            if conn.inbuf.is_empty() && conn.inbuf.capacity() > KEEP_CAPACITY {
                conn.inbuf = Vec::new();
            }
            conn.last_used = now;
        }
        if let Some(why) = eof {
            let busy = self.servers[s].conns[slot]
                .as_ref()
                .is_some_and(|c| !c.waiting.is_empty() || !c.held.is_empty());
            if busy {
                self.close(s, slot, FailureKind::Broken, why, now);
            } else {
                // An idle connection the server closed (a restart, its own idle timeout): not a failure.
                self.drop_conn(s, slot);
            }
        }
    }

    /// Writes what dirty connections have to send.
    fn flush(&mut self) {
        let now = Instant::now();
        let dirty = std::mem::take(&mut self.dirty);
        for &(s, slot) in &dirty {
            let Some(conn) = self.servers[s].conns[slot].as_mut() else {
                continue;
            };
            if conn.state == State::Connecting || conn.out.is_empty() {
                continue;
            }
            let mut sent = 0;
            let mut broken = None;
            while sent < conn.out.len() {
                match conn.stream.write(&conn.out[sent..]) {
                    Ok(0) => {
                        broken = Some("the connection took no bytes".to_owned());
                        break;
                    }
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        broken = Some(format!("connection broken: {e}"));
                        break;
                    }
                }
            }
            conn.out.drain(..sent);
            if let Some(why) = broken {
                self.close(s, slot, FailureKind::Broken, why, now);
            }
        }
        // Keep what closing pushed meanwhile; reuse the list's memory.
        let added = std::mem::replace(&mut self.dirty, dirty);
        self.dirty.clear();
        self.dirty.extend(added);
    }

    /// Fails what is late or stale; returns when something is next due.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut due = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        let mut actions: Vec<(usize, usize, Expiry)> = Vec::new();
        for (s, srv) in self.servers.iter().enumerate() {
            let idle = Duration::from_millis(srv.shared.settings.idle_timeout_ms);
            let busy = srv
                .conns
                .iter()
                .flatten()
                .filter(|c| !c.waiting.is_empty() || !c.held.is_empty())
                .count();
            srv.shared
                .metrics
                .conns_busy
                .store(busy as u64, Ordering::Relaxed);
            for (slot, c) in srv.conns.iter().enumerate() {
                let Some(c) = c else { continue };
                if c.state == State::Connecting {
                    if now >= c.connect_deadline {
                        actions.push((s, slot, Expiry::ConnectTimeout));
                        continue;
                    }
                    due(c.connect_deadline);
                }
                let front = c.waiting.front().map(|w| match w {
                    Waiting::Call(m, _) => (m.deadline, false),
                    Waiting::Internal(_, d) => (*d, true),
                });
                if let Some((deadline, internal)) = front {
                    if now >= deadline {
                        actions.push((s, slot, Expiry::Late { internal }));
                        continue;
                    }
                    due(deadline);
                }
                if let Some(j) = c.held.front() {
                    if now >= j.deadline {
                        actions.push((s, slot, Expiry::HeldLate));
                        continue;
                    }
                    due(j.deadline);
                }
                if c.state == State::Ready && c.waiting.is_empty() && c.held.is_empty() {
                    let at = c.last_used + idle;
                    if now >= at {
                        actions.push((s, slot, Expiry::Idle));
                    } else {
                        due(at);
                    }
                }
            }
        }
        for (s, slot, what) in actions {
            let srv = &self.servers[s];
            let (connect_ms, timeout_ms) = (
                srv.shared.settings.connect_timeout_ms,
                srv.shared.settings.idle_timeout_ms,
            );
            match what {
                Expiry::ConnectTimeout => {
                    let msg = format!("connect timed out after {connect_ms} ms");
                    self.close(s, slot, FailureKind::Connect, msg, now);
                }
                Expiry::Late { internal } => {
                    let msg = if internal {
                        format!("no answer to the connection's check within {connect_ms} ms")
                    } else {
                        "late: no answer before the call's deadline (server.call_timeout_ms)"
                            .to_owned()
                    };
                    self.close(s, slot, FailureKind::Timeout, msg, now);
                }
                Expiry::HeldLate => {
                    let conn = self.servers[s].conns[slot].as_mut().expect("seen above");
                    let mut late = Vec::new();
                    while conn.held.front().is_some_and(|j| now >= j.deadline) {
                        late.push(conn.held.pop_front().expect("front seen"));
                    }
                    let shared = self.servers[s].shared.clone();
                    for j in late {
                        let e = shared.error(
                            FailureKind::Timeout,
                            "late: the call's deadline passed while its connection was being opened or checked",
                        );
                        self.fail(s, meta_of(&j, slot, now), e, now, true);
                    }
                }
                Expiry::Idle => {
                    tracing::debug!(server = %self.servers[s].shared.name, idle_ms = timeout_ms, "closing an idle back-end connection");
                    self.drop_conn(s, slot);
                }
            }
        }
        next
    }

    /// Closes a connection after a failure: the calls in flight on it fail with `kind`; calls not yet
    /// written go on a new connection when a health check failed, else fail too.
    fn close(&mut self, s: usize, slot: usize, kind: FailureKind, why: String, now: Instant) {
        let Some(conn) = self.take_conn(s, slot) else {
            return;
        };
        let shared = self.servers[s].shared.clone();
        tracing::debug!(server = %shared.name, error = %why, "closing a back-end connection");
        let retry_held = conn.health;
        for w in conn.waiting {
            if let Waiting::Call(meta, _) = w {
                self.fail(s, meta, shared.error(kind, why.clone()), now, true);
            }
        }
        if retry_held && !conn.held.is_empty() {
            // The idle connection was found dead by its check: its calls were never sent, so they are safe
            // to send on a new one. (Uncounted here, counted again by `accept`.)
            for job in conn.held {
                let srv = &mut self.servers[s];
                srv.queued = srv.queued.saturating_sub(1);
                srv.unassign(job.affinity, slot);
                self.accept(job, now);
            }
            return;
        }
        for job in conn.held {
            self.fail(
                s,
                meta_of(&job, slot, now),
                shared.error(kind, why.clone()),
                now,
                true,
            );
        }
    }

    /// Closes a connection after an answer larger than fae takes: the server is well, so nothing counts
    /// against its breaker. The call that asked fails saying why; the calls behind it on the connection
    /// fail as broken (their answers would come after bytes fae will not read).
    fn close_oversized(&mut self, s: usize, slot: usize, why: String, now: Instant) {
        let Some(conn) = self.take_conn(s, slot) else {
            return;
        };
        let shared = self.servers[s].shared.clone();
        let mut first = true;
        for w in conn.waiting {
            if let Waiting::Call(meta, _) = w {
                let e = if first {
                    shared.error(FailureKind::TooLarge, why.clone())
                } else {
                    shared.error(
                        FailureKind::Broken,
                        "its connection was closed after an oversized answer to an earlier call",
                    )
                };
                first = false;
                self.fail(s, meta, e, now, false);
            }
        }
        for job in conn.held {
            let e = shared.error(
                FailureKind::Broken,
                "its connection was closed after an oversized answer",
            );
            self.fail(s, meta_of(&job, slot, now), e, now, false);
        }
    }

    /// Closes a connection with nothing on it.
    fn drop_conn(&mut self, s: usize, slot: usize) {
        let _ = self.take_conn(s, slot);
    }

    fn take_conn(&mut self, s: usize, slot: usize) -> Option<Conn> {
        let srv = &mut self.servers[s];
        let mut conn = srv.conns[slot].take()?;
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.tokens.try_remove(conn.token);
        srv.shared
            .metrics
            .conns_open
            .fetch_sub(1, Ordering::Relaxed);
        Some(conn)
    }

    fn succeed(&mut self, s: usize, meta: Meta, answer: Response, now: Instant) {
        let shared = &self.servers[s].shared;
        let took = now.saturating_duration_since(meta.sent);
        shared
            .breaker
            .record(meta.permit, Outcome::Success, took, now, "");
        shared.metrics.calls.fetch_add(1, Ordering::Relaxed);
        shared.metrics.latency(took);
        self.finish(s, &meta, Ok(answer));
    }

    /// A call that got no answer; `counted`: the server is at fault (its breaker counts it).
    fn fail(&mut self, s: usize, meta: Meta, e: BackendError, now: Instant, counted: bool) {
        let shared = &self.servers[s].shared;
        let took = now.saturating_duration_since(meta.sent);
        if counted {
            shared
                .breaker
                .record(meta.permit, Outcome::Failure, took, now, &e.message);
        } else {
            shared.breaker.release(meta.permit);
        }
        shared.metrics.calls.fetch_add(1, Ordering::Relaxed);
        shared.metrics.failures[e.kind as usize].fetch_add(1, Ordering::Relaxed);
        self.finish(s, &meta, Err(e));
    }

    fn finish(&mut self, s: usize, meta: &Meta, result: Result<Response, BackendError>) {
        let srv = &mut self.servers[s];
        srv.queued = srv.queued.saturating_sub(1);
        srv.unassign(meta.affinity, meta.slot);
        srv.shared
            .metrics
            .queued
            .store(srv.queued as u64, Ordering::Relaxed);
        let done = Done {
            ticket: meta.ticket,
            submitted: meta.submitted,
            result,
        };
        self.deliver(meta.reply.as_ref(), done);
    }

    /// An answer to its session's loop, or to whoever waits on `reply`.
    fn deliver(&self, reply: Option<&Sender<Done>>, done: Done) {
        match (reply, self.sink.get()) {
            (Some(tx), _) => {
                let _ = tx.send(done);
            }
            (None, Some(sink)) => sink.deliver(done),
            (None, None) => {}
        }
    }
}

enum Expiry {
    ConnectTimeout,
    Late { internal: bool },
    HeldLate,
    Idle,
}

fn meta_of(job: &Job, slot: usize, now: Instant) -> Meta {
    Meta {
        affinity: job.affinity,
        slot,
        reply: job.reply.clone(),
        ticket: job.ticket,
        submitted: job.submitted,
        deadline: job.deadline,
        permit: job.permit,
        sent: now,
    }
}

/// Puts a call on the wire (into the connection's out buffer) behind those in flight.
fn write_call(conn: &mut Conn, job: Job, slot: usize, now: Instant) {
    conn.out.extend_from_slice(&job.request);
    let meta = meta_of(&job, slot, now);
    conn.waiting.push_back(Waiting::Call(meta, job.expect));
}

/// The connection is usable: the calls held while it connected or was checked go out, in order.
fn ready(conn: &mut Conn, slot: usize, now: Instant) {
    conn.state = State::Ready;
    conn.health = false;
    while let Some(job) = conn.held.pop_front() {
        write_call(conn, job, slot, now);
    }
}

fn health_check(protocol: Protocol, out: &mut Vec<u8>) -> Expect {
    match protocol {
        Protocol::Memcache => {
            memcache::version(out);
            Expect::Memcache(memcache::Expect::Version)
        }
        // (MySQL servers never reach an I/O thread: their calls run on the MySQL workers.)
        Protocol::Redis | Protocol::Mysql => {
            let parts: [&[u8]; 1] = [b"PING"];
            redis::command(out, parts.into_iter());
            Expect::Redis
        }
    }
}

/// Whether the answer to a health check or setup command says the connection is good.
fn internal_ok(protocol: Protocol, answer: &Response) -> Result<(), String> {
    match (protocol, answer) {
        (Protocol::Memcache, Response::Memcache(memcache::Answer::Version)) => Ok(()),
        (Protocol::Redis, Response::Redis(redis::Value::Status(_))) => Ok(()),
        (Protocol::Redis, Response::Redis(redis::Value::Error(e))) => Err(format!(
            "the server refused the connection's setup (AUTH/SELECT/PING): {e}"
        )),
        _ => Err("unexpected answer to the connection's check".into()),
    }
}

fn parse(
    buf: &[u8],
    expect: Expect,
    scan: &mut redis::Scan,
    max_value: usize,
    max_count: usize,
) -> Result<Option<(Response, usize)>, super::ProtoError> {
    match expect {
        Expect::Memcache(e) => {
            Ok(memcache::parse(buf, e, max_value)?.map(|(a, n)| (Response::Memcache(a), n)))
        }
        Expect::Redis => match scan.walk(buf, max_value, max_count)? {
            Some(n) => Ok(Some((Response::Redis(redis::value(&buf[..n])?), n))),
            None => Ok(None),
        },
    }
}
