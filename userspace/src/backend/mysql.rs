//! MySQL/MariaDB: pools of servers (global pools and sharded pools with FAE's lookup tables), a bounded
//! connection pool and the circuit breaker of every back end per server, a result cache, and the workers that
//! run the calls.
//!
//! The driver (the `mysql` crate, pure Rust) blocks, so MySQL calls run on `mysql.workers` threads fed by a
//! crossbeam channel; the event loops never wait on them. A connection carries one statement at a time (the
//! MySQL protocol does not pipeline), so a call holds one pooled connection of its server while it runs. A
//! reaper thread answers a call whose deadline passes first, naming where it was late; the worker's answer,
//! when it comes, is then dropped (and the connection, if the statement did not end, is closed).
//!
//! Statements are always prepared, their arguments bound as parameters, never spliced into the SQL text; the
//! identifiers `my_merge` must write into SQL (table, column, where-column) are checked to be plain names
//! and quoted. Each connection keeps up to `mysql.stmt_cache_size` prepared statements.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use lru::LruCache;
use mysql::prelude::Queryable;
use mysql::{Conn, Opts, OptsBuilder, TxOpts, Value};

use super::breaker::{Outcome, Permit};
use super::{redis, BackendError, Done, FailureKind, Response, Server, Sink, Ticket};
use crate::config::{MysqlCacheStore, MysqlConfig};

/// A statement's result, every value a string (SQL NULL as "NULL", as FAE answered).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MyResult {
    pub rows_affected: i64,
    pub last_insert_id: i64,
    pub cols: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl MyResult {
    fn bytes(&self) -> usize {
        64 + self.cols.iter().map(|c| c.len() + 24).sum::<usize>()
            + self
                .rows
                .iter()
                .map(|r| 24 + r.iter().map(|v| v.len() + 24).sum::<usize>())
                .sum::<usize>()
    }
}

/// What a MySQL call answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MyAnswer {
    Result(Arc<MyResult>),
    Affected(i64),
    Merged {
        ok: bool,
        value: String,
    },
    Evicted,
    /// MySQL (or fae, for a call it cannot run) refused: an application error, the server is well.
    Refused(String),
}

/// One statement of a call: where it goes and what it runs.
#[derive(Debug, Clone)]
pub struct Statement {
    pub pool: String,
    pub table: String,
    pub hint_id: i64,
    pub sql: String,
    pub args: Vec<String>,
    pub cache_key: String,
}

#[derive(Debug, Clone)]
pub enum MyCall {
    Query(Statement),
    BulkExec(Vec<Statement>),
    QueryShards(Statement),
    Merge {
        at: Statement,
        where_col: String,
        key: String,
        column: String,
        json: String,
    },
    Evict(String),
}

/// Whether a statement reads (its result is rows): SELECT, SHOW, DESCRIBE/DESC, EXPLAIN, WITH, VALUES,
/// TABLE, or a parenthesised query, after leading whitespace and comments, in any case.
pub fn is_read(sql: &str) -> bool {
    let mut s = sql;
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("/*") {
            s = rest.find("*/").map_or("", |i| &rest[i + 2..]);
        } else if s.starts_with("--") || s.starts_with('#') {
            s = s.find('\n').map_or("", |i| &s[i + 1..]);
        } else {
            break;
        }
    }
    if s.starts_with('(') {
        return true;
    }
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(s.len());
    let word = &s[..end];
    [
        "SELECT", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "WITH", "VALUES", "TABLE",
    ]
    .iter()
    .any(|w| word.eq_ignore_ascii_case(w))
}

/// A plain SQL identifier (letters, digits, `_`; not starting with a digit; at most 64 bytes): the only
/// names fae writes into SQL text, always quoted with backticks.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// Merges `patch` into `base`: objects key by key, recursively; any other value replaces.
pub fn deep_merge(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(&k) {
                    Some(slot) => deep_merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, p) => *b = p,
    }
}

// ---- connection pools ---------------------------------------------------------------------------------------

struct PoolState {
    idle: Vec<(Conn, Instant)>,
    open: usize,
}

/// A server with its connections.
pub struct MyServer {
    pub server: Arc<Server>,
    opts: Opts,
    state: Mutex<PoolState>,
    freed: Condvar,
}

impl MyServer {
    fn error(&self, kind: FailureKind, msg: impl Into<String>) -> BackendError {
        self.server.error(kind, msg)
    }

    /// A connection, waiting at most until `deadline` for one of the `max_conns` to be free.
    fn take(&self, deadline: Instant) -> Result<Conn, BackendError> {
        let settings = &self.server.settings;
        let idle_timeout = Duration::from_millis(settings.idle_timeout_ms);
        let check_after = Duration::from_millis(settings.health_check_idle_ms);
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((mut conn, since)) = g.idle.pop() {
                self.busy(&g);
                let idle = since.elapsed();
                if idle > idle_timeout {
                    g.open -= 1;
                    continue;
                }
                if idle > check_after {
                    // Checked before reuse: the server may have gone while the connection sat idle.
                    drop(g);
                    if conn.ping().is_ok() {
                        return Ok(conn);
                    }
                    g = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    g.open -= 1;
                    continue;
                }
                return Ok(conn);
            }
            if g.open < settings.max_conns {
                g.open += 1;
                self.busy(&g);
                drop(g);
                self.server.metrics.connects.fetch_add(1, Ordering::Relaxed);
                return match Conn::new(self.opts.clone()) {
                    Ok(c) => {
                        self.server
                            .metrics
                            .conns_open
                            .fetch_add(1, Ordering::Relaxed);
                        Ok(c)
                    }
                    Err(e) => {
                        self.give_back(None);
                        Err(self.error(
                            FailureKind::Connect,
                            format!("cannot connect: {}", clean(&e)),
                        ))
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.error(
                    FailureKind::Timeout,
                    format!(
                        "late: all {} connections stayed busy until the call's deadline",
                        settings.max_conns
                    ),
                ));
            }
            g = self
                .freed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn busy(&self, g: &PoolState) {
        let n = g.open.saturating_sub(g.idle.len()) as u64;
        self.server.metrics.conns_busy.store(n, Ordering::Relaxed);
    }

    /// Returns a connection to the pool (`None`: it was closed, its place is free).
    fn give_back(&self, conn: Option<Conn>) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match conn {
            Some(c) => g.idle.push((c, Instant::now())),
            None => {
                g.open -= 1;
                self.server
                    .metrics
                    .conns_open
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.busy(&g);
        drop(g);
        self.freed.notify_one();
    }
}

/// The driver's error without the parts that could carry a secret (the connection options).
fn clean(e: &mysql::Error) -> String {
    match e {
        mysql::Error::MySqlError(m) => {
            format!("MySQL error {} ({}): {}", m.code, m.state, m.message)
        }
        mysql::Error::IoError(io) => format!("{io}"),
        mysql::Error::DriverError(d) => format!("{d}"),
        mysql::Error::CodecError(c) => format!("{c}"),
        other => format!("{other}"),
    }
}

/// An error of a statement: MySQL's refusal (an answer), or a failure of the server or connection.
enum StmtError {
    Refused(String),
    Failed(BackendError),
}

// ---- the reaper: answers at the deadline --------------------------------------------------------------------

/// A call in flight, answered once: by its worker, or by the reaper at its deadline.
pub struct CallState {
    answered: AtomicBool,
    ticket: Ticket,
    submitted: Instant,
    /// The call's pool, and the server it is on now (for the reaper's message).
    pool: Arc<str>,
    at: Mutex<Option<Arc<Server>>>,
}

impl CallState {
    fn claim(&self) -> bool {
        !self.answered.swap(true, Ordering::AcqRel)
    }

    fn late(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    fn set_at(&self, server: &Arc<Server>) {
        *self.at.lock().unwrap_or_else(|p| p.into_inner()) = Some(server.clone());
    }

    /// The error for a call whose deadline passed: on which server it was late, or that it never got one.
    fn late_error(&self) -> BackendError {
        let late = "late: no answer before the call's deadline (server.call_timeout_ms)";
        match &*self.at.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(s) => s.error(FailureKind::Timeout, late),
            None => BackendError {
                kind: FailureKind::Timeout,
                protocol: super::Protocol::Mysql,
                server: "(none yet)".into(),
                pool: self.pool.clone(),
                message: "late: the call waited for a free MySQL worker (mysql.workers) past its deadline".into(),
            },
        }
    }
}

/// Calls in flight by deadline; the reaper answers those still there when their deadline passes, and a worker
/// takes its call out when it answers. The reaper sleeps until the earliest deadline, or `call_timeout` with
/// nothing in flight; a new call is woken for only if its deadline comes before that (with one call timeout
/// for all, never in steady state: the first profile had the reaper woken for every call, a third of faed's
/// context switches).
struct Reaper {
    state: Mutex<ReaperState>,
    wake: Condvar,
    idle_sleep: Duration,
    retired: AtomicBool,
}

struct ReaperState {
    due: BTreeMap<(Instant, u64), Arc<CallState>>,
    seq: u64,
    /// When the reaper will next look, at the latest.
    next_look: Instant,
}

impl Reaper {
    /// Watches a call: returns its key, for [`Reaper::done`].
    fn watch(&self, deadline: Instant, state: Arc<CallState>) -> (Instant, u64) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.seq += 1;
        let key = (deadline, g.seq);
        g.due.insert(key, state);
        let early = deadline < g.next_look;
        if early {
            g.next_look = deadline;
        }
        drop(g);
        if early {
            self.wake.notify_one();
        }
        key
    }

    /// The call answered: stop watching it.
    fn done(&self, key: (Instant, u64)) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due
            .remove(&key);
    }

    fn run(&self, sink: &OnceLock<Arc<dyn Sink>>) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            while let Some(entry) = g.due.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let st = entry.remove();
                if st.claim() {
                    if let Some(sink) = sink.get() {
                        sink.deliver(Done {
                            ticket: st.ticket,
                            submitted: st.submitted,
                            result: Err(st.late_error()),
                        });
                    }
                }
            }
            if g.due.is_empty() && self.retired.load(Ordering::Acquire) {
                return;
            }
            let next = g.due.keys().next().map_or(now + self.idle_sleep, |k| k.0);
            g.next_look = next;
            g = self
                .wake
                .wait_timeout(g, next.saturating_duration_since(now))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

// ---- result cache -------------------------------------------------------------------------------------------

struct MemoryCache {
    lru: LruCache<String, Arc<MyResult>>,
    bytes: usize,
    max: usize,
}

/// Cache and lookup counters, for metrics.
#[derive(Default)]
pub struct MysqlStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_evictions: AtomicU64,
    pub lookup_hits: AtomicU64,
    pub lookup_misses: AtomicU64,
}

// ---- the back end -------------------------------------------------------------------------------------------

struct Job {
    call: MyCall,
    state: Arc<CallState>,
    deadline: Instant,
    /// Its key in the reaper's watch list.
    watched: (Instant, u64),
}

/// The MySQL servers of the node, their pools, caches and workers.
pub struct Mysql {
    /// Servers by name (`user1`, `global`, ...).
    servers: HashMap<String, Arc<MyServer>>,
    /// Sharded pools: shard id → server.
    sharded: HashMap<String, BTreeMap<u32, Arc<MyServer>>>,
    cfg: MysqlConfig,
    lookup_cache: Mutex<LruCache<(String, i64), u32>>,
    memory: Mutex<MemoryCache>,
    /// The Redis pool of the result cache (`cache_store = "redis"`), as an index into the back ends' pools.
    redis_cache: Option<RedisCache>,
    pub stats: MysqlStats,
    jobs: Sender<Job>,
    reaper: Arc<Reaper>,
    max_result: usize,
    /// A reload replaced these pools: workers end once the queue is empty.
    retired: AtomicBool,
}

/// The result cache's way to Redis: the pool of `mysql.cache_redis_pool`, through its I/O threads.
struct RedisCache {
    backends: Arc<OnceLock<super::RedisReach>>,
}

impl Mysql {
    /// Builds the servers (from `cfg.mysql`) and starts the workers and the reaper. `servers` receives the
    /// servers' shared parts, to be listed with every back end's.
    pub fn start(
        cfg: &crate::config::Config,
        servers_out: &mut Vec<Arc<Server>>,
        sink: Arc<OnceLock<Arc<dyn Sink>>>,
        redis: Arc<OnceLock<super::RedisReach>>,
    ) -> Result<Option<Arc<Mysql>>, super::BackendStartError> {
        let m = &cfg.mysql;
        if m.servers.is_empty() {
            return Ok(None);
        }
        let call_timeout = Duration::from_millis(cfg.server.call_timeout_ms);
        let mut servers = HashMap::new();
        let mut sharded: HashMap<String, BTreeMap<u32, Arc<MyServer>>> = HashMap::new();
        for s in &m.servers {
            let settings = cfg.backend.settings(&s.backend);
            let password = match (&s.password, &s.password_file) {
                (Some(p), _) => Some(p.clone()),
                (None, Some(path)) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|source| super::BackendStartError::PasswordFile {
                            pool: s.pool.clone(),
                            path: path.clone(),
                            source,
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                (None, None) => None,
            };
            let mut opts = OptsBuilder::new()
                .user(Some(s.user.clone()))
                .pass(password)
                .db_name(Some(s.db.clone()))
                .prefer_socket(false)
                .stmt_cache_size(m.stmt_cache_size)
                .tcp_connect_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
                // A statement still running this long after the call's deadline frees its worker (the reaper
                // has answered the client at the deadline already).
                .read_timeout(Some(call_timeout + Duration::from_secs(1)))
                .write_timeout(Some(call_timeout + Duration::from_secs(1)));
            let shown = match &s.socket {
                Some(path) => {
                    opts = opts.socket(Some(path.clone()));
                    path.clone()
                }
                None => {
                    opts = opts.ip_or_hostname(Some(s.host.clone())).tcp_port(s.port);
                    format!("{}:{}", s.host, s.port)
                }
            };
            let pool_name = if m.global_pools.contains(&s.pool) {
                s.pool.clone()
            } else {
                crate::config::mysql_shard_of(&s.pool)
                    .map(|(p, _)| p.to_owned())
                    .unwrap_or_else(|| s.pool.clone())
            };
            let shared = Arc::new(Server {
                protocol: super::Protocol::Mysql,
                name: format!("{} ({shown})", s.pool).into(),
                pool: pool_name.as_str().into(),
                settings: settings.clone(),
                breaker: super::Breaker::new(&settings.breaker),
                metrics: Default::default(),
                addrs: Vec::new(),
                setup: Vec::new(),
                setup_count: 0,
                thread: 0,
            });
            servers_out.push(shared.clone());
            let my = Arc::new(MyServer {
                server: shared,
                opts: opts.into(),
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    open: 0,
                }),
                freed: Condvar::new(),
            });
            if !m.global_pools.contains(&s.pool) {
                if let Some((p, id)) = crate::config::mysql_shard_of(&s.pool) {
                    sharded
                        .entry(p.to_owned())
                        .or_default()
                        .insert(id, my.clone());
                }
            }
            servers.insert(s.pool.clone(), my);
        }
        let (jobs, rx) = crossbeam_channel::unbounded::<Job>();
        let reaper = Arc::new(Reaper {
            state: Mutex::new(ReaperState {
                due: BTreeMap::new(),
                seq: 0,
                next_look: Instant::now(),
            }),
            wake: Condvar::new(),
            idle_sleep: call_timeout,
            retired: AtomicBool::new(false),
        });
        let items = NonZeroUsize::new(m.lookup_cache_items.max(1)).expect("at least one");
        let me = Arc::new(Mysql {
            servers,
            sharded,
            cfg: m.clone(),
            lookup_cache: Mutex::new(LruCache::new(items)),
            memory: Mutex::new(MemoryCache {
                lru: LruCache::unbounded(),
                bytes: 0,
                max: m.cache_max_bytes,
            }),
            redis_cache: (m.cache_store == MysqlCacheStore::Redis)
                .then(|| RedisCache { backends: redis }),
            stats: MysqlStats::default(),
            jobs,
            reaper: reaper.clone(),
            max_result: cfg.server.max_message_bytes,
            retired: AtomicBool::new(false),
        });
        {
            let sink = sink.clone();
            std::thread::Builder::new()
                .name("fae-mysql-reaper".into())
                .spawn(move || reaper.run(&sink))
                .map_err(super::BackendStartError::Thread)?;
        }
        for i in 0..m.workers {
            let (me, rx, sink) = (me.clone(), rx.clone(), sink.clone());
            std::thread::Builder::new()
                .name(format!("fae-mysql-{i}"))
                .spawn(move || me.work(rx, &sink))
                .map_err(super::BackendStartError::Thread)?;
        }
        Ok(Some(me))
    }

    /// Whether `pool` names a pool (global or sharded).
    pub fn has_pool(&self, pool: &str) -> bool {
        self.sharded.contains_key(pool)
            || (self.cfg.global_pools.iter().any(|g| g == pool) && self.servers.contains_key(pool))
    }

    pub fn pools(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sharded.keys().cloned().collect();
        v.extend(self.cfg.global_pools.iter().cloned());
        v.sort();
        v
    }

    /// A cached result, from memory (`None` when not cached, or when the cache is in Redis).
    pub fn cached(&self, key: &str) -> Option<Arc<MyResult>> {
        if self.redis_cache.is_some() {
            return None;
        }
        let mut g = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        let hit = g.lru.get(key).cloned();
        drop(g);
        let c = if hit.is_some() {
            &self.stats.cache_hits
        } else {
            &self.stats.cache_misses
        };
        c.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Drops a cached result from memory; false when the cache is in Redis (the caller defers the call).
    pub fn evict_memory(&self, key: &str) -> bool {
        if self.redis_cache.is_some() {
            return false;
        }
        let mut g = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.lru.pop(key) {
            g.bytes -= old.bytes() + key.len();
            self.stats.cache_evictions.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Hands a call to the workers; its answer goes to `ticket` by `deadline`, from the worker or the reaper.
    pub fn submit(&self, call: MyCall, ticket: Ticket, submitted: Instant, deadline: Instant) {
        let pool = match &call {
            MyCall::Query(st) | MyCall::QueryShards(st) | MyCall::Merge { at: st, .. } => {
                st.pool.as_str()
            }
            MyCall::BulkExec(items) => items.first().map_or("", |st| st.pool.as_str()),
            MyCall::Evict(_) => "",
        };
        let state = Arc::new(CallState {
            answered: AtomicBool::new(false),
            ticket,
            submitted,
            pool: pool.into(),
            at: Mutex::new(None),
        });
        let watched = self.reaper.watch(deadline, state.clone());
        let _ = self.jobs.send(Job {
            call,
            state,
            deadline,
            watched,
        });
    }

    /// Out of service (a reload): the workers end once no call is queued; the reaper when none is out.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.reaper.retired.store(true, Ordering::Release);
        self.reaper.wake.notify_one();
    }

    fn work(&self, rx: Receiver<Job>, sink: &OnceLock<Arc<dyn Sink>>) {
        loop {
            let job = match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(job) => job,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if self.retired.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            if job.state.late() {
                continue; // answered by the reaper while it waited
            }
            let result = self.run(&job);
            if job.state.claim() {
                self.reaper.done(job.watched);
                if let Some(sink) = sink.get() {
                    sink.deliver(Done {
                        ticket: job.state.ticket,
                        submitted: job.state.submitted,
                        result: result.map(Response::Mysql),
                    });
                }
            }
        }
    }

    fn run(&self, job: &Job) -> Result<MyAnswer, BackendError> {
        let refused = |m: String| Ok(MyAnswer::Refused(m));
        match &job.call {
            MyCall::Query(st) => match self.statement(st, job) {
                Ok(r) => Ok(MyAnswer::Result(r)),
                Err(StmtError::Refused(m)) => refused(m),
                Err(StmtError::Failed(e)) => Err(e),
            },
            MyCall::BulkExec(items) => {
                let mut total = 0i64;
                for (i, st) in items.iter().enumerate() {
                    match self.statement(st, job) {
                        Ok(r) => total += r.rows_affected,
                        Err(e) => {
                            let why = match e {
                                StmtError::Refused(m) => m,
                                StmtError::Failed(e) => e.to_string(),
                            };
                            return refused(format!(
                                "statement {i} (pool {}) failed: {why}; {total} rows were affected by the \
                                 statements before it, which stay (my_bulk_exec is not a transaction)",
                                st.pool
                            ));
                        }
                    }
                }
                Ok(MyAnswer::Affected(total))
            }
            MyCall::QueryShards(st) => self.query_shards(st, job),
            MyCall::Merge {
                at,
                where_col,
                key,
                column,
                json,
            } => self.merge(at, where_col, key, column, json, job),
            MyCall::Evict(key) => {
                self.evict(key, job.deadline);
                Ok(MyAnswer::Evicted)
            }
        }
    }

    /// The server of `pool` for entity `hint_id`: the pool's one server, or its shard from the lookup table.
    fn server_for(&self, pool: &str, hint_id: i64, job: &Job) -> Result<Arc<MyServer>, StmtError> {
        if self.cfg.global_pools.iter().any(|g| g == pool) {
            return self
                .servers
                .get(pool)
                .cloned()
                .ok_or_else(|| StmtError::Refused(format!("no server for global pool {pool:?}")));
        }
        let Some(shards) = self.sharded.get(pool) else {
            return Err(StmtError::Refused(format!(
                "unknown mysql pool {pool:?}; configured: {}",
                self.pools().join(", ")
            )));
        };
        let cache_key = (pool.to_owned(), hint_id);
        let cached = self
            .lookup_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
            .copied();
        let shard = match cached {
            Some(s) => {
                self.stats.lookup_hits.fetch_add(1, Ordering::Relaxed);
                s
            }
            None => {
                self.stats.lookup_misses.fetch_add(1, Ordering::Relaxed);
                let table = self
                    .cfg
                    .lookup_tables
                    .get(pool)
                    .unwrap_or(&self.cfg.default_lookup_table);
                let lookup = self
                    .servers
                    .get(&self.cfg.lookup_pool)
                    .cloned()
                    .ok_or_else(|| StmtError::Refused("no lookup pool configured".into()))?;
                let sql = format!("SELECT shardId, shardLock FROM `{table}` WHERE entityId = ?");
                let r = self.execute(&lookup, &sql, &[hint_id.to_string()], true, job)?;
                let Some(row) = r.rows.first() else {
                    return Err(StmtError::Refused(format!(
                        "entity {hint_id} of pool {pool} has no row in lookup table {table}"
                    )));
                };
                let shard: u32 = row[0].parse().map_err(|_| {
                    StmtError::Refused(format!(
                        "lookup table {table}: shardId {:?} is not a number",
                        row[0]
                    ))
                })?;
                let lock: i64 = row.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                if lock > 0 {
                    return Err(StmtError::Refused(format!(
                        "entity {hint_id} of pool {pool} is being locked (shardLock {lock}): it is moving \
                         between shards; retry later"
                    )));
                }
                self.lookup_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .put(cache_key, shard);
                shard
            }
        };
        shards.get(&shard).cloned().ok_or_else(|| {
            StmtError::Refused(format!(
                "entity {hint_id} of pool {pool} is on shard {shard}, which has no server ({pool}{shard})"
            ))
        })
    }

    /// Runs one statement of a call (`my_query` and each of `my_bulk_exec`): reads through the result cache,
    /// writes evicting it.
    fn statement(&self, st: &Statement, job: &Job) -> Result<Arc<MyResult>, StmtError> {
        let read = is_read(&st.sql);
        let server = self.server_for(&st.pool, st.hint_id, job)?;
        let with_cache = !st.cache_key.is_empty();
        if read && with_cache {
            if let Some(hit) = self.cache_get(&st.cache_key, job.deadline) {
                return Ok(hit);
            }
        }
        let r = Arc::new(self.execute(&server, &st.sql, &st.args, read, job)?);
        if with_cache {
            if read {
                self.cache_put(&st.cache_key, r.clone(), job.deadline);
            } else {
                self.evict(&st.cache_key, job.deadline);
            }
        }
        if !read && st.pool == self.cfg.lookup_pool {
            // The lookup tables may have changed: forget every cached shard.
            self.lookup_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        Ok(r)
    }

    /// Runs `sql` with `args` bound on a connection of `server`, under its breaker.
    fn execute(
        &self,
        server: &MyServer,
        sql: &str,
        args: &[String],
        read: bool,
        job: &Job,
    ) -> Result<MyResult, StmtError> {
        self.on(server, job, |conn| {
            let params: Vec<Value> = args
                .iter()
                .map(|a| Value::Bytes(a.as_bytes().to_vec()))
                .collect();
            let mut out = MyResult::default();
            let mut size = 0usize;
            let mut result = conn.exec_iter(sql, params)?;
            if read {
                let cols = result.columns();
                let types: Vec<_> = cols.as_ref().iter().map(|c| c.column_type()).collect();
                out.cols = cols
                    .as_ref()
                    .iter()
                    .map(|c| c.name_str().into_owned())
                    .collect();
                for row in result.by_ref() {
                    let row = row?;
                    let vals: Vec<String> = row
                        .unwrap()
                        .into_iter()
                        .zip(&types)
                        .map(|(v, t)| text_of(v, *t))
                        .collect();
                    size += vals.iter().map(|v| v.len() + 8).sum::<usize>();
                    if size > self.max_result {
                        return Err(mysql::Error::DriverError(
                            mysql::DriverError::PacketTooLarge,
                        ));
                    }
                    out.rows.push(vals);
                }
            }
            out.rows_affected = result.affected_rows() as i64;
            out.last_insert_id = result.last_insert_id().unwrap_or(0) as i64;
            drop(result);
            Ok(out)
        })
    }

    /// Runs `f` on a pooled connection of `server`, under its breaker: a MySQL error is an answer (the
    /// server is well), anything else a failure of the server; a connection that failed is closed.
    fn on<T>(
        &self,
        server: &MyServer,
        job: &Job,
        f: impl FnOnce(&mut Conn) -> Result<T, mysql::Error>,
    ) -> Result<T, StmtError> {
        let s = &server.server;
        job.state.set_at(s);
        let now = Instant::now();
        let permit: Permit = s
            .breaker
            .admit(now)
            .map_err(|r| StmtError::Refused(s.refused(&r)))?;
        let mut conn = match server.take(job.deadline) {
            Ok(c) => c,
            Err(e) => {
                s.breaker.record(
                    permit,
                    Outcome::Failure,
                    now.elapsed(),
                    Instant::now(),
                    &e.message,
                );
                s.metrics.failures[e.kind as usize].fetch_add(1, Ordering::Relaxed);
                return Err(StmtError::Failed(e));
            }
        };
        let t0 = Instant::now();
        let r = f(&mut conn);
        let took = t0.elapsed();
        let done = Instant::now();
        s.metrics.calls.fetch_add(1, Ordering::Relaxed);
        s.metrics.latency(took);
        match r {
            Ok(v) => {
                let outcome = if job.state.late() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                s.breaker.record(
                    permit,
                    outcome,
                    took,
                    done,
                    "a statement ran past its call's deadline",
                );
                server.give_back(Some(conn));
                Ok(v)
            }
            Err(mysql::Error::MySqlError(e)) => {
                s.breaker.record(permit, Outcome::Success, took, done, "");
                s.metrics.app_errors.fetch_add(1, Ordering::Relaxed);
                server.give_back(Some(conn));
                Err(StmtError::Refused(format!(
                    "MySQL error {} ({}): {}",
                    e.code, e.state, e.message
                )))
            }
            Err(mysql::Error::DriverError(mysql::DriverError::PacketTooLarge)) => {
                // Ours: the result passed server.max_message_bytes. The connection is mid-result: close it.
                s.breaker.release(permit);
                s.metrics.failures[FailureKind::TooLarge as usize].fetch_add(1, Ordering::Relaxed);
                server.give_back(None);
                Err(StmtError::Refused(format!(
                    "the result is larger than server.max_message_bytes ({} bytes)",
                    self.max_result
                )))
            }
            Err(e) => {
                let timed_out = matches!(&e, mysql::Error::IoError(io)
                    if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
                let kind = if timed_out {
                    FailureKind::Timeout
                } else {
                    FailureKind::Broken
                };
                let msg = if timed_out {
                    "late: the statement did not end within call_timeout_ms plus a second"
                        .to_owned()
                } else {
                    format!("connection broken: {}", clean(&e))
                };
                s.breaker.record(permit, Outcome::Failure, took, done, &msg);
                s.metrics.failures[kind as usize].fetch_add(1, Ordering::Relaxed);
                server.give_back(None);
                Err(StmtError::Failed(s.error(kind, msg)))
            }
        }
    }

    fn query_shards(&self, st: &Statement, job: &Job) -> Result<MyAnswer, BackendError> {
        let Some(shards) = self.sharded.get(&st.pool) else {
            let why = if self.cfg.global_pools.contains(&st.pool) {
                format!("pool {:?} is global, not sharded: use my_query", st.pool)
            } else {
                format!(
                    "unknown mysql pool {:?}; configured: {}",
                    st.pool,
                    self.pools().join(", ")
                )
            };
            return Ok(MyAnswer::Refused(why));
        };
        if !is_read(&st.sql) {
            return Ok(MyAnswer::Refused(
                "my_query_shards runs reads only (SELECT, SHOW, ...)".into(),
            ));
        }
        // Every shard at once, each on a connection of its own; rows concatenated in shard order.
        let results: Vec<(u32, Result<MyResult, StmtError>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .iter()
                .map(|(&id, server)| {
                    let h = scope.spawn(move || self.execute(server, &st.sql, &st.args, true, job));
                    (id, h)
                })
                .collect();
            handles
                .into_iter()
                .map(|(id, h)| {
                    let r = h.join().unwrap_or_else(|_| {
                        Err(StmtError::Refused("a shard's query panicked".into()))
                    });
                    (id, r)
                })
                .collect()
        });
        let mut all = MyResult::default();
        for (id, r) in results {
            match r {
                Ok(r) => {
                    if all.cols.is_empty() {
                        all.cols = r.cols;
                    }
                    all.rows.extend(r.rows);
                }
                Err(StmtError::Refused(m)) => {
                    return Ok(MyAnswer::Refused(format!("shard {}{id}: {m}", st.pool)))
                }
                Err(StmtError::Failed(e)) => return Err(e),
            }
        }
        Ok(MyAnswer::Result(Arc::new(all)))
    }

    fn merge(
        &self,
        at: &Statement,
        where_col: &str,
        key: &str,
        column: &str,
        json: &str,
        job: &Job,
    ) -> Result<MyAnswer, BackendError> {
        for (what, name) in [
            ("table", at.table.as_str()),
            ("where", where_col),
            ("column", column),
        ] {
            if !is_identifier(name) {
                return Ok(MyAnswer::Refused(format!(
                    "my_merge: {what} {name:?} is not a plain column or table name (letters, digits, _)"
                )));
            }
        }
        let patch: serde_json::Value = match serde_json::from_str(json) {
            Ok(v) => v,
            Err(e) => {
                return Ok(MyAnswer::Refused(format!(
                    "my_merge: jsonValue is not JSON: {e}"
                )))
            }
        };
        let server = match self.server_for(&at.pool, at.hint_id, job) {
            Ok(s) => s,
            Err(StmtError::Refused(m)) => return Ok(MyAnswer::Refused(m)),
            Err(StmtError::Failed(e)) => return Err(e),
        };
        let table = &at.table;
        let select = format!("SELECT `{column}` FROM `{table}` WHERE `{where_col}` = ? FOR UPDATE");
        let update = format!("UPDATE `{table}` SET `{column}` = ? WHERE `{where_col}` = ?");
        // Read under the row lock, merge, write, commit: concurrent merges of one row serialize on the lock.
        let r = self.on(&server, job, |conn| {
            let mut tx = conn.start_transaction(TxOpts::default())?;
            let current: Option<Value> = tx.exec_first(&select, (key,))?;
            let Some(current) = current else {
                tx.rollback()?;
                return Ok(Err("no row".to_owned()));
            };
            let mut base = match current {
                Value::NULL => serde_json::Value::Object(Default::default()),
                Value::Bytes(b) if b.iter().all(u8::is_ascii_whitespace) => {
                    serde_json::Value::Object(Default::default())
                }
                Value::Bytes(b) => match serde_json::from_slice(&b) {
                    Ok(v) => v,
                    Err(e) => {
                        tx.rollback()?;
                        return Ok(Err(format!("the column's value is not JSON: {e}")));
                    }
                },
                other => {
                    tx.rollback()?;
                    return Ok(Err(format!(
                        "the column's value is not JSON text: {other:?}"
                    )));
                }
            };
            deep_merge(&mut base, patch);
            let text = base.to_string();
            tx.exec_drop(&update, (&text, key))?;
            tx.commit()?;
            Ok(Ok(text))
        });
        match r {
            Ok(Ok(value)) => {
                if !at.cache_key.is_empty() {
                    self.evict(&at.cache_key, job.deadline);
                }
                Ok(MyAnswer::Merged { ok: true, value })
            }
            Ok(Err(why)) if why == "no row" => Ok(MyAnswer::Merged {
                ok: false,
                value: String::new(),
            }),
            Ok(Err(why)) => Ok(MyAnswer::Refused(format!("my_merge: {why}"))),
            Err(StmtError::Refused(m)) => Ok(MyAnswer::Refused(m)),
            Err(StmtError::Failed(e)) => Err(e),
        }
    }

    // ---- the result cache's store

    /// A cached result, for a worker: only from Redis (a read cached in memory was answered on the loop, which
    /// looked first).
    fn cache_get(&self, key: &str, deadline: Instant) -> Option<Arc<MyResult>> {
        match &self.redis_cache {
            None => None,
            Some(rc) => {
                let reply = rc.call(&[b"GET", key.as_bytes()], deadline)?;
                let hit = match reply {
                    redis::Value::Bulk(b) => {
                        serde_json::from_slice::<MyResult>(&b).ok().map(Arc::new)
                    }
                    _ => None,
                };
                let c = if hit.is_some() {
                    &self.stats.cache_hits
                } else {
                    &self.stats.cache_misses
                };
                c.fetch_add(1, Ordering::Relaxed);
                hit
            }
        }
    }

    fn cache_put(&self, key: &str, r: Arc<MyResult>, deadline: Instant) {
        match &self.redis_cache {
            None => {
                let cost = r.bytes() + key.len();
                let mut g = self.memory.lock().unwrap_or_else(|p| p.into_inner());
                if cost > g.max {
                    return;
                }
                if let Some(old) = g.lru.put(key.to_owned(), r) {
                    g.bytes -= old.bytes() + key.len();
                }
                g.bytes += cost;
                while g.bytes > g.max {
                    match g.lru.pop_lru() {
                        Some((k, v)) => {
                            g.bytes -= v.bytes() + k.len();
                            self.stats.cache_evictions.fetch_add(1, Ordering::Relaxed);
                        }
                        None => break,
                    }
                }
            }
            Some(rc) => {
                let Ok(text) = serde_json::to_vec(&*r) else {
                    return;
                };
                let ttl = self.cfg.cache_ttl_ms.max(1).to_string();
                let _ = rc.call(
                    &[b"SET", key.as_bytes(), &text, b"PX", ttl.as_bytes()],
                    deadline,
                );
            }
        }
    }

    fn evict(&self, key: &str, deadline: Instant) {
        if !self.evict_memory(key) {
            if let Some(rc) = &self.redis_cache {
                if let Some(redis::Value::Int(n)) = rc.call(&[b"DEL", key.as_bytes()], deadline) {
                    if n > 0 {
                        self.stats.cache_evictions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

impl RedisCache {
    /// One command on the cache's Redis pool, waiting for its answer until `deadline`.
    fn call(&self, parts: &[&[u8]], deadline: Instant) -> Option<redis::Value> {
        let reach = self.backends.get()?;
        reach.call(parts, deadline)
    }
}

/// A value as MySQL's text protocol shows it.
fn text_of(v: Value, t: mysql::consts::ColumnType) -> String {
    use mysql::consts::ColumnType as T;
    match v {
        Value::NULL => "NULL".into(),
        Value::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Date(y, m, d, h, mi, s, us) => {
            if matches!(t, T::MYSQL_TYPE_DATE | T::MYSQL_TYPE_NEWDATE) {
                format!("{y:04}-{m:02}-{d:02}")
            } else if us > 0 {
                format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}")
            } else {
                format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}")
            }
        }
        Value::Time(neg, days, h, mi, s, us) => {
            let hours = days * 24 + u32::from(h);
            let sign = if neg { "-" } else { "" };
            if us > 0 {
                format!("{sign}{hours:02}:{mi:02}:{s:02}.{us:06}")
            } else {
                format!("{sign}{hours:02}:{mi:02}:{s:02}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_told_from_writes() {
        for sql in [
            "SELECT 1",
            "  select * from t",
            "/* hint */ SELECT 1",
            "-- c\nSHOW TABLES",
            "# c\n describe t",
            "DESC t",
            "explain select 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "(SELECT 1) UNION (SELECT 2)",
        ] {
            assert!(is_read(sql), "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES (1)",
            "update t set a = 1",
            "DELETE FROM t",
            "/* SELECT */ UPDATE t SET a = 1",
            "-- SELECT\nREPLACE INTO t VALUES (1)",
            "SELECTX",
            "",
            "/* unterminated SELECT",
        ] {
            assert!(!is_read(sql), "{sql}");
        }
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("user_id") && is_identifier("T1") && is_identifier("_x"));
        for bad in [
            "",
            "1x",
            "a b",
            "a`b",
            "id; DROP TABLE t",
            "a-b",
            &"x".repeat(65),
        ] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn merges_objects_deeply_and_replaces_the_rest() {
        let mut base = serde_json::json!({"a": 1, "o": {"x": 1, "y": [1, 2]}, "s": "t"});
        deep_merge(
            &mut base,
            serde_json::json!({"b": 2, "o": {"y": [3], "z": {"k": true}}, "s": null}),
        );
        assert_eq!(
            base,
            serde_json::json!({"a": 1, "b": 2, "o": {"x": 1, "y": [3], "z": {"k": true}}, "s": null})
        );
        let mut base = serde_json::json!([1]);
        deep_merge(&mut base, serde_json::json!({"a": 1}));
        assert_eq!(base, serde_json::json!({"a": 1}));
    }

    #[test]
    fn values_as_text() {
        use mysql::consts::ColumnType as T;
        assert_eq!(text_of(Value::NULL, T::MYSQL_TYPE_LONG), "NULL");
        assert_eq!(text_of(Value::Int(-3), T::MYSQL_TYPE_LONG), "-3");
        assert_eq!(
            text_of(Value::Date(2024, 1, 2, 0, 0, 0, 0), T::MYSQL_TYPE_DATE),
            "2024-01-02"
        );
        assert_eq!(
            text_of(Value::Date(2024, 1, 2, 3, 4, 5, 0), T::MYSQL_TYPE_DATETIME),
            "2024-01-02 03:04:05"
        );
        assert_eq!(
            text_of(Value::Time(true, 1, 2, 3, 4, 0), T::MYSQL_TYPE_TIME),
            "-26:03:04"
        );
        assert_eq!(
            text_of(Value::Bytes(b"x".to_vec()), T::MYSQL_TYPE_VAR_STRING),
            "x"
        );
    }
}
