//! faed's configuration: typed, strict (an unknown key is an error that names it), with every default built
//! in so that faed runs with no file at all. `etc/faed.toml` lists every key with its default.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::wire::Limits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub node: NodeConfig,
    pub metrics: MetricsConfig,
    pub idgen: IdgenConfig,
    pub lcache: LcacheConfig,
    pub lock: LockConfig,
    pub registry: RegistryConfig,
    pub cluster: ClusterConfig,
    pub backend: BackendConfig,
    pub memcache: MemcacheConfig,
    pub redis: RedisConfig,
    pub mysql: MysqlConfig,
    pub limits: LimitsConfig,
    pub degrade: DegradeConfig,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    pub max_sessions: usize,
    pub backlog: i32,
    pub idle_timeout_ms: u64,
    pub message_timeout_ms: u64,
    pub call_timeout_ms: u64,
    pub max_message_bytes: usize,
    pub max_depth: usize,
    pub max_container: usize,
    pub max_pending_reply_bytes: usize,
    pub max_deferred_per_session: usize,
    pub shutdown_timeout_ms: u64,
    /// A unix-domain socket served beside TCP by the same loops (`None`: TCP only).
    pub unix_socket: Option<std::path::PathBuf>,
    /// The socket file's permission bits (e.g. `0o660`).
    pub unix_socket_mode: u32,
    /// The socket file's owner, as `user`, `user:group` or `:group` (`None`: faed's own).
    pub unix_socket_owner: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:9001".parse().expect("literal"),
            threads: 0,
            max_sessions: 10_000,
            backlog: 1024,
            idle_timeout_ms: 300_000,
            message_timeout_ms: 30_000,
            call_timeout_ms: 5_000,
            max_message_bytes: 16 << 20,
            max_depth: 64,
            max_container: 1 << 20,
            max_pending_reply_bytes: 32 << 20,
            max_deferred_per_session: 128,
            shutdown_timeout_ms: 10_000,
            unix_socket: None,
            unix_socket_mode: 0o660,
            unix_socket_owner: None,
        }
    }
}

impl ServerConfig {
    pub fn limits(&self) -> Limits {
        Limits {
            max_message: self.max_message_bytes,
            max_depth: self.max_depth,
            max_container: self.max_container,
        }
    }

    /// Event loops to run: `threads`, or one per core.
    pub fn loops(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Which data path serves the RPC port.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Kernel TCP sockets (runs anywhere).
    Kernel,
    /// XDP + AF_XDP + a userspace TCP stack on `listener.interface`.
    Xdp,
    /// Both: XDP on the interface, kernel sockets for everything else (loopback, other interfaces).
    Both,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native where the driver supports it, else generic.
    Auto,
    /// In the driver (fails where the driver has no XDP support).
    Native,
    /// In the kernel's generic path (works everywhere, slower).
    Generic,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    pub mode: ListenerMode,
    pub interface: String,
    pub queues: u32,
    pub xdp_mode: XdpMode,
    pub zero_copy: bool,
    pub xdp_port: u16,
    pub xdp_backlog: usize,
    pub xdp_buffer_bytes: usize,
    /// Connections in their TCP handshake at most, per XDP queue; past it the oldest is dropped.
    pub xdp_max_half_open: usize,
    /// How long an XDP-path handshake may take.
    pub xdp_half_open_timeout_ms: u64,
    /// An XDP loop that found work keeps polling this long before it sleeps (0: sleep at once).
    pub busy_poll_us: u64,
    /// smoltcp interfaces each XDP queue spreads its connections over (by client address and port), so
    /// that a packet costs a walk of one group's sockets, not of all of them.
    pub xdp_socket_groups: usize,
    /// UMEM frames (2 KiB) of each queue's AF_XDP socket, half for receiving, half for sending.
    pub xdp_frames: u32,
}

impl ListenerConfig {
    /// The TCP port the XDP path serves.
    pub fn xdp_port(&self, server: &ServerConfig) -> u16 {
        if self.xdp_port == 0 {
            server.listen.port()
        } else {
            self.xdp_port
        }
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            mode: ListenerMode::Kernel,
            interface: String::new(),
            queues: 0,
            xdp_mode: XdpMode::Auto,
            zero_copy: false,
            xdp_port: 0,
            xdp_backlog: 64,
            xdp_buffer_bytes: 256 << 10,
            xdp_max_half_open: 256,
            xdp_half_open_timeout_ms: 10_000,
            busy_poll_us: 0,
            xdp_socket_groups: 16,
            xdp_frames: fae_netstack::xsk::DEFAULT_FRAMES,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Bearer token every admin action (POST) needs; empty: actions are refused.
    pub token: String,
    /// A file holding the token (keeps it out of the config).
    pub token_file: String,
    /// Admin connections served at once.
    pub max_connections: usize,
    /// A whole request (head and body) must arrive within this long.
    pub request_timeout_ms: u64,
    /// Largest request body (actions carry small JSON bodies).
    pub max_body_bytes: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:9101".parse().expect("literal"),
            token: String::new(),
            token_file: String::new(),
            max_connections: 256,
            request_timeout_ms: 5_000,
            max_body_bytes: 64 << 10,
        }
    }
}

/// Whether `addr` ("host:port") is on loopback: an IP address, or `localhost`.
fn loopback_addr(addr: &str) -> bool {
    if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
        return a.ip().is_loopback();
    }
    addr.rsplit_once(':')
        .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

impl RegistryConfig {
    pub fn limits(&self) -> fae_cluster::RegistryLimits {
        fae_cluster::RegistryLimits {
            max_nodes: self.max_nodes as u64,
            max_path_bytes: self.max_path_bytes as u64,
            max_data_bytes: self.max_data_bytes as u64,
            max_total_bytes: self.max_total_bytes,
        }
    }
}

impl ClusterConfig {
    /// The cluster secret, read from `secret_file`; `None` when none is set.
    pub fn secret(&self) -> Result<Option<fae_cluster::ClusterSecret>, ConfigError> {
        if self.secret_file.is_empty() {
            return Ok(None);
        }
        fae_cluster::ClusterSecret::from_file(&self.secret_file)
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                key: "cluster.secret_file",
                reason: e.to_string(),
            })
    }
}

impl AdminConfig {
    /// The token actions need: `token`, or the first line of `token_file`; `None` when neither is set.
    pub fn resolved_token(&self) -> Result<Option<String>, ConfigError> {
        if !self.token.is_empty() {
            return Ok(Some(self.token.clone()));
        }
        if self.token_file.is_empty() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&self.token_file).map_err(|source| ConfigError::Read {
                path: self.token_file.clone(),
                source,
            })?;
        let t = text.lines().next().unwrap_or("").trim().to_owned();
        Ok((!t.is_empty()).then_some(t))
    }
}

/// Flow control: every key can also be changed at runtime (`POST /api/limits`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls per second one client IP may make (GCRA: a steady rate with bursts); 0 = unlimited.
    pub client_calls_per_sec: u64,
    /// Calls a client may make at once above its rate (0: the rate, one second's worth).
    pub client_burst: u64,
    /// Calls of a method in flight at once, by method name.
    pub method_inflight: std::collections::BTreeMap<String, u64>,
    /// An adaptive concurrency limit for all calls (the gradient of Netflix's concurrency-limits): sheds
    /// with "overloaded" once latency rises above its recent minimum.
    pub adaptive: bool,
    /// Bounds of the adaptive limit.
    pub adaptive_min: u64,
    pub adaptive_max: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            client_calls_per_sec: 0,
            client_burst: 0,
            method_inflight: Default::default(),
            adaptive: false,
            adaptive_min: 8,
            adaptive_max: 10_000,
        }
    }
}

/// Graceful degrade: methods (by name) and servants (misc, idgen, lcache, lock, memcache, redis, mysql,
/// registry) answered at once with a "degraded" error, without touching their back ends.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DegradeConfig {
    pub methods: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub id: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig { id: 1 }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub slow_call_ms: u64,
    /// Calls logged (method, client, duration, outcome) per 10,000: FAE's profiler_rate.
    pub sample_per_10000: u32,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            slow_call_ms: 100,
            sample_per_10000: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdgenConfig {
    pub worker_id: u8,
    pub max_clock_backwards_ms: u64,
}

impl Default for IdgenConfig {
    fn default() -> Self {
        IdgenConfig {
            worker_id: 0,
            max_clock_backwards_ms: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LcacheConfig {
    pub max_items: usize,
    pub max_bytes: usize,
    pub shards: usize,
}

impl Default for LcacheConfig {
    fn default() -> Self {
        LcacheConfig {
            max_items: 1_000_000,
            max_bytes: 256 << 20,
            shards: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LockConfig {
    pub ttl_ms: u64,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig { ttl_ms: 30_000 }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    pub max_nodes: usize,
    pub max_data_bytes: usize,
    pub max_path_bytes: usize,
    /// Paths, data and 48 bytes per node, all nodes together. In a cluster the whole registry travels in
    /// every snapshot, so it must stay well below the cluster port's 64 MiB frame.
    pub max_total_bytes: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_nodes: 100_000,
            max_data_bytes: 1 << 20,
            max_path_bytes: 1024,
            max_total_bytes: 32 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub enabled: bool,
    pub listen: String,
    pub data_dir: String,
    pub bootstrap: bool,
    pub seeds: Vec<String>,
    pub failover_timeout_ms: u64,
    /// A failed member silent this long is removed from the cluster (0: never).
    pub remove_after_ms: u64,
    pub forward_timeout_ms: u64,
    pub forward_workers: usize,
    pub leave_on_shutdown: bool,
    /// A file holding the cluster secret every member shares (at least 16 bytes; trailing whitespace is
    /// not part of it). Every connection on the cluster port proves it; a node without it cannot join.
    pub secret_file: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            listen: "127.0.0.1:9201".into(),
            data_dir: "/var/lib/fae".into(),
            bootstrap: false,
            seeds: Vec::new(),
            failover_timeout_ms: 2_500,
            remove_after_ms: 3_600_000,
            forward_timeout_ms: 2_000,
            forward_workers: 16,
            leave_on_shutdown: false,
            secret_file: String::new(),
        }
    }
}

/// Pool and breaker defaults shared by every back end (memcache, Redis, MySQL); a pool may override each.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub threads: usize,
    pub max_conns: usize,
    pub pipeline_depth: usize,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub health_check_idle_ms: u64,
    pub max_queue: usize,
    pub breaker: BreakerConfig,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            threads: 1,
            max_conns: 4,
            pipeline_depth: 1024,
            connect_timeout_ms: 200,
            idle_timeout_ms: 60_000,
            health_check_idle_ms: 5_000,
            max_queue: 10_000,
            breaker: BreakerConfig::default(),
        }
    }
}

/// A circuit breaker per back-end server.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub window_ms: u64,
    pub min_calls: u32,
    pub slow_call_ms: u64,
    pub open_ms: u64,
    pub max_open_ms: u64,
    pub half_open_probes: u32,
    pub close_after: u32,
    pub eject: bool,
    pub max_ejected_percent: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window_ms: 10_000,
            min_calls: 20,
            slow_call_ms: 1_000,
            open_ms: 1_000,
            max_open_ms: 30_000,
            half_open_probes: 3,
            close_after: 3,
            eject: false,
            max_ejected_percent: 50,
        }
    }
}

/// A pool's overrides of `[backend]` (every key optional).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolOverrides {
    pub max_conns: Option<usize>,
    pub pipeline_depth: Option<usize>,
    pub connect_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub health_check_idle_ms: Option<u64>,
    pub max_queue: Option<usize>,
    pub breaker: BreakerOverrides,
}

/// A pool's overrides of `[backend.breaker]`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerOverrides {
    pub consecutive_failures: Option<u32>,
    pub failure_rate: Option<f64>,
    pub window_ms: Option<u64>,
    pub min_calls: Option<u32>,
    pub slow_call_ms: Option<u64>,
    pub open_ms: Option<u64>,
    pub max_open_ms: Option<u64>,
    pub half_open_probes: Option<u32>,
    pub close_after: Option<u32>,
    pub eject: Option<bool>,
    pub max_ejected_percent: Option<u32>,
}

/// The settings one pool runs with: `[backend]` with the pool's overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub max_conns: usize,
    pub pipeline_depth: usize,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub health_check_idle_ms: u64,
    pub max_queue: usize,
    pub breaker: BreakerConfig,
}

impl BackendConfig {
    /// These defaults with a pool's overrides applied.
    pub fn settings(&self, o: &PoolOverrides) -> PoolSettings {
        let (b, ob) = (&self.breaker, &o.breaker);
        PoolSettings {
            max_conns: o.max_conns.unwrap_or(self.max_conns),
            pipeline_depth: o.pipeline_depth.unwrap_or(self.pipeline_depth),
            connect_timeout_ms: o.connect_timeout_ms.unwrap_or(self.connect_timeout_ms),
            idle_timeout_ms: o.idle_timeout_ms.unwrap_or(self.idle_timeout_ms),
            health_check_idle_ms: o.health_check_idle_ms.unwrap_or(self.health_check_idle_ms),
            max_queue: o.max_queue.unwrap_or(self.max_queue),
            breaker: BreakerConfig {
                consecutive_failures: ob.consecutive_failures.unwrap_or(b.consecutive_failures),
                failure_rate: ob.failure_rate.unwrap_or(b.failure_rate),
                window_ms: ob.window_ms.unwrap_or(b.window_ms),
                min_calls: ob.min_calls.unwrap_or(b.min_calls),
                slow_call_ms: ob.slow_call_ms.unwrap_or(b.slow_call_ms),
                open_ms: ob.open_ms.unwrap_or(b.open_ms),
                max_open_ms: ob.max_open_ms.unwrap_or(b.max_open_ms),
                half_open_probes: ob.half_open_probes.unwrap_or(b.half_open_probes),
                close_after: ob.close_after.unwrap_or(b.close_after),
                eject: ob.eject.unwrap_or(b.eject),
                max_ejected_percent: ob.max_ejected_percent.unwrap_or(b.max_ejected_percent),
            },
        }
    }
}

/// How a memcache key picks its server (compatible with the PHP clients FAE's users run).
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum McHash {
    /// PHP `memcache` with `hash_strategy=standard`: `((crc32(key) >> 16) & 0x7fff) % n`, 0 counted as 1.
    Standard,
    /// PHP `memcache`'s consistent strategy: 160 crc32 points per server, 1,024 buckets.
    Consistent,
    /// libmemcached's ketama (PHP `memcached` with `OPT_LIBKETAMA_COMPATIBLE`): 160 md5 points per server.
    Ketama,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemcacheConfig {
    pub hash: McHash,
    pub pools: Vec<MemcachePool>,
}

impl Default for MemcacheConfig {
    fn default() -> Self {
        MemcacheConfig {
            hash: McHash::Standard,
            pools: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemcachePool {
    pub name: String,
    pub servers: Vec<String>,
    /// This pool's placement, if not `memcache.hash`.
    #[serde(default)]
    pub hash: Option<McHash>,
    #[serde(default)]
    pub backend: PoolOverrides,
}

/// Commands rd_call refuses by default: they would hurt the store, block a shared connection, keep state on
/// it, or escape the routing of keys.
pub const REDIS_DENY: &[&str] = &[
    "ACL",
    "AUTH",
    "BGREWRITEAOF",
    "BGSAVE",
    "BLMOVE",
    "BLMPOP",
    "BLPOP",
    "BRPOP",
    "BRPOPLPUSH",
    "BZMPOP",
    "BZPOPMAX",
    "BZPOPMIN",
    "CLIENT",
    "CLUSTER",
    "CONFIG",
    "DEBUG",
    "DISCARD",
    "EXEC",
    "FAILOVER",
    "FLUSHALL",
    "FLUSHDB",
    "FUNCTION",
    "HELLO",
    "KEYS",
    "MIGRATE",
    "MODULE",
    "MONITOR",
    "MOVE",
    "MULTI",
    "PSUBSCRIBE",
    "PSYNC",
    "PUBLISH",
    "PUNSUBSCRIBE",
    "QUIT",
    "RANDOMKEY",
    "READONLY",
    "READWRITE",
    "REPLICAOF",
    "RESET",
    "SAVE",
    "SCAN",
    "SCRIPT",
    "SELECT",
    "SHUTDOWN",
    "SLAVEOF",
    "SPUBLISH",
    "SSUBSCRIBE",
    "SUBSCRIBE",
    "SUNSUBSCRIBE",
    "SWAPDB",
    "SYNC",
    "UNSUBSCRIBE",
    "UNWATCH",
    "WAIT",
    "WAITAOF",
    "WATCH",
];

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub deny: Vec<String>,
    pub pools: Vec<RedisPool>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            deny: REDIS_DENY.iter().map(|s| (*s).to_owned()).collect(),
            pools: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisPool {
    pub name: String,
    pub servers: Vec<String>,
    /// Sent with AUTH on every new connection; `password_file` keeps it out of the config.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<String>,
    /// Database selected on every new connection.
    #[serde(default)]
    pub db: u32,
    #[serde(default)]
    pub backend: PoolOverrides,
}

/// Where cached `my_query` results are kept.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MysqlCacheStore {
    /// In faed's memory, bounded by `cache_max_bytes` (least recently used first out).
    Memory,
    /// In a Redis pool of `[redis]` (`cache_redis_pool`), with `cache_ttl_ms`.
    Redis,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MysqlConfig {
    /// Threads that run MySQL calls (the driver blocks; the event loops never do).
    pub workers: usize,
    /// Pools whose one server is named as the pool (every other name ending in digits is a shard).
    pub global_pools: Vec<String>,
    /// The global pool holding the lookup tables of sharded pools.
    pub lookup_pool: String,
    /// Lookup table of a sharded pool: `lookup_tables[pool]`, else this.
    pub default_lookup_table: String,
    pub lookup_tables: std::collections::BTreeMap<String, String>,
    /// Entities whose shard is kept in memory (a lookup-pool exec drops them all).
    pub lookup_cache_items: usize,
    pub cache_store: MysqlCacheStore,
    pub cache_max_bytes: usize,
    pub cache_redis_pool: String,
    pub cache_ttl_ms: u64,
    /// Prepared statements kept per connection.
    pub stmt_cache_size: usize,
    pub servers: Vec<MysqlServer>,
}

impl Default for MysqlConfig {
    fn default() -> Self {
        MysqlConfig {
            workers: 16,
            global_pools: Vec::new(),
            lookup_pool: String::new(),
            default_lookup_table: "ShardLookup".into(),
            lookup_tables: Default::default(),
            lookup_cache_items: 100_000,
            cache_store: MysqlCacheStore::Memory,
            cache_max_bytes: 64 << 20,
            cache_redis_pool: "default".into(),
            cache_ttl_ms: 600_000,
            stmt_cache_size: 64,
            servers: Vec::new(),
        }
    }
}

/// One MariaDB/MySQL server: a global pool (`pool` in `mysql.global_pools`) or a shard (`pool` = the sharded
/// pool's name and the shard id, FAE's naming: `user1`, `user2`, ... of pool `user`).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MysqlServer {
    pub pool: String,
    #[serde(default = "default_mysql_host")]
    pub host: String,
    #[serde(default = "default_mysql_port")]
    pub port: u16,
    /// A unix socket instead of host and port.
    #[serde(default)]
    pub socket: Option<String>,
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<String>,
    pub db: String,
    #[serde(default)]
    pub backend: PoolOverrides,
}

fn default_mysql_host() -> String {
    "127.0.0.1".into()
}

fn default_mysql_port() -> u16 {
    3306
}

/// A MySQL server name split into its sharded pool and shard id (`user12` → `user`, 12).
pub fn mysql_shard_of(name: &str) -> Option<(&str, u32)> {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || digits == name.len() {
        return None;
    }
    let (pool, id) = name.split_at(name.len() - digits);
    Some((pool, id.parse().ok()?))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

fn check(ok: bool, key: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: reason.into(),
        })
    }
}

impl Config {
    pub fn from_toml(text: &str, path: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_toml(&text, &shown)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        check(s.threads <= 256, "server.threads", "at most 256")?;
        check(s.max_sessions >= 1, "server.max_sessions", "at least 1")?;
        if let Some(p) = &s.unix_socket {
            check(
                p.is_absolute(),
                "server.unix_socket",
                "an absolute path (e.g. /run/fae/faed.sock)",
            )?;
            // sun_path holds 108 bytes, the terminating NUL included.
            check(
                p.as_os_str().len() < 108,
                "server.unix_socket",
                "shorter than 108 bytes (the kernel's limit for a socket path)",
            )?;
        }
        check(
            s.unix_socket_mode <= 0o777,
            "server.unix_socket_mode",
            "permission bits, at most 0o777",
        )?;
        if let Some(o) = &s.unix_socket_owner {
            check(
                !o.is_empty() && o != ":" && o.matches(':').count() <= 1,
                "server.unix_socket_owner",
                "\"user\", \"user:group\" or \":group\"",
            )?;
        }
        check(s.backlog >= 1, "server.backlog", "at least 1")?;
        check(
            (1024..=1 << 30).contains(&s.max_message_bytes),
            "server.max_message_bytes",
            "between 1 KiB and 1 GiB",
        )?;
        check(
            (2..=1024).contains(&s.max_depth),
            "server.max_depth",
            "between 2 and 1024",
        )?;
        check(s.max_container >= 1, "server.max_container", "at least 1")?;
        check(
            s.max_pending_reply_bytes >= 64 << 10,
            "server.max_pending_reply_bytes",
            "at least 64 KiB",
        )?;
        check(
            (1..=65536).contains(&s.max_deferred_per_session),
            "server.max_deferred_per_session",
            "1..65536",
        )?;
        for (key, v) in [
            ("server.idle_timeout_ms", s.idle_timeout_ms),
            ("server.message_timeout_ms", s.message_timeout_ms),
            ("server.call_timeout_ms", s.call_timeout_ms),
        ] {
            check(v >= 1, key, "at least 1 ms")?;
        }
        check(
            self.idgen.worker_id <= crate::servant::idgen::MAX_WORKER,
            "idgen.worker_id",
            "0..31 (5 bits of the snowflake id)",
        )?;
        check(self.lcache.shards >= 1, "lcache.shards", "at least 1")?;
        check(
            self.lcache.max_items >= self.lcache.shards,
            "lcache.max_items",
            "at least one per shard",
        )?;
        check(self.lock.ttl_ms >= 1, "lock.ttl_ms", "at least 1 ms")?;
        let l = &self.listener;
        check(
            l.mode == ListenerMode::Kernel || !l.interface.is_empty(),
            "listener.interface",
            "required when listener.mode is xdp or both",
        )?;
        check(
            (1..=4096).contains(&l.xdp_backlog),
            "listener.xdp_backlog",
            "1..4096",
        )?;
        check(
            (16 << 10..=64 << 20).contains(&l.xdp_buffer_bytes),
            "listener.xdp_buffer_bytes",
            "16 KiB..64 MiB",
        )?;
        check(
            (l.xdp_backlog..=65536).contains(&l.xdp_max_half_open),
            "listener.xdp_max_half_open",
            "listener.xdp_backlog..65536",
        )?;
        check(
            (100..=120_000).contains(&l.xdp_half_open_timeout_ms),
            "listener.xdp_half_open_timeout_ms",
            "100..120000",
        )?;
        check(
            (1..=1024).contains(&l.xdp_socket_groups),
            "listener.xdp_socket_groups",
            "1..1024",
        )?;
        check(
            (1024..=65536).contains(&l.xdp_frames) && l.xdp_frames.is_power_of_two(),
            "listener.xdp_frames",
            "a power of two, 1024..65536",
        )?;
        check(
            l.busy_poll_us <= 1_000_000,
            "listener.busy_poll_us",
            "0..1000000",
        )?;
        self.validate_backends()?;
        self.validate_mysql()?;
        self.validate_ops()?;
        check(
            self.cluster.remove_after_ms == 0
                || self.cluster.remove_after_ms > self.cluster.failover_timeout_ms,
            "cluster.remove_after_ms",
            "0 (never) or more than cluster.failover_timeout_ms",
        )?;
        // A snapshot carries the whole registry in one frame of at most 64 MiB.
        check(
            !self.cluster.enabled || self.registry.max_total_bytes <= 48 << 20,
            "registry.max_total_bytes",
            "at most 48 MiB in a cluster (the registry travels in every snapshot)",
        )?;
        check(
            !self.cluster.enabled || self.registry.max_data_bytes <= 4 << 20,
            "registry.max_data_bytes",
            "at most 4 MiB in a cluster (a raft entry is at most 8 MiB)",
        )?;
        // Like the admin port's protected mode: a cluster port others can reach must not take anyone in.
        let c = &self.cluster;
        check(
            !c.enabled || !c.secret_file.is_empty() || loopback_addr(&c.listen),
            "cluster.listen",
            format!(
                "{} is not a loopback address: set cluster.secret_file (without it anyone who reaches the \
                 port could join, vote and take vbuckets), or listen on 127.0.0.1",
                c.listen
            ),
        )?;
        check(
            self.log
                .level
                .parse::<tracing_subscriber::filter::EnvFilter>()
                .is_ok(),
            "log.level",
            format!("cannot parse {:?}", self.log.level),
        )?;
        Ok(())
    }
}

impl Config {
    fn validate_ops(&self) -> Result<(), ConfigError> {
        let a = &self.admin;
        check(
            a.token.is_empty() || a.token_file.is_empty(),
            "admin.token",
            "set token or token_file, not both",
        )?;
        check(
            a.token.is_empty() || a.token.len() >= 16,
            "admin.token",
            "at least 16 characters",
        )?;
        // Like Redis's protected mode: an admin port others can reach must not take actions from anyone.
        check(
            !a.enabled
                || a.listen.ip().is_loopback()
                || !a.token.is_empty()
                || !a.token_file.is_empty(),
            "admin.listen",
            format!(
                "{} is not a loopback address: set admin.token or admin.token_file, or listen on 127.0.0.1",
                a.listen
            ),
        )?;
        check(
            a.max_connections >= 1,
            "admin.max_connections",
            "at least 1",
        )?;
        check(
            a.request_timeout_ms >= 1,
            "admin.request_timeout_ms",
            "at least 1 ms",
        )?;
        check(
            a.max_body_bytes >= 1024,
            "admin.max_body_bytes",
            "at least 1 KiB",
        )?;
        check(
            self.metrics.sample_per_10000 <= 10_000,
            "metrics.sample_per_10000",
            "0..10000",
        )?;
        crate::filter::check_limits(&self.limits).map_err(|reason| ConfigError::Invalid {
            key: "limits",
            reason,
        })?;
        crate::filter::degraded_methods(&self.degrade.methods).map_err(|reason| {
            ConfigError::Invalid {
                key: "degrade.methods",
                reason,
            }
        })?;
        Ok(())
    }

    fn validate_mysql(&self) -> Result<(), ConfigError> {
        let m = &self.mysql;
        check((1..=1024).contains(&m.workers), "mysql.workers", "1..1024")?;
        check(
            m.stmt_cache_size >= 1,
            "mysql.stmt_cache_size",
            "at least 1",
        )?;
        check(
            m.cache_max_bytes >= 1,
            "mysql.cache_max_bytes",
            "at least 1",
        )?;
        check(
            m.lookup_cache_items >= 1,
            "mysql.lookup_cache_items",
            "at least 1",
        )?;
        let mut names = std::collections::HashSet::new();
        let mut sharded = std::collections::BTreeSet::new();
        for s in &m.servers {
            check(
                names.insert(s.pool.as_str()),
                "mysql.servers",
                format!("server {:?} is defined twice", s.pool),
            )?;
            let global = m.global_pools.contains(&s.pool);
            if !global {
                let Some((pool, _)) = mysql_shard_of(&s.pool) else {
                    return Err(ConfigError::Invalid {
                        key: "mysql.servers",
                        reason: format!(
                            "server {:?} is neither in mysql.global_pools nor a shard named <pool><shard id>",
                            s.pool
                        ),
                    });
                };
                sharded.insert(pool.to_owned());
            }
            check(
                !s.user.is_empty(),
                "mysql.servers",
                format!("server {:?} has no user", s.pool),
            )?;
            check(
                s.password.is_none() || s.password_file.is_none(),
                "mysql.servers",
                format!(
                    "server {:?}: set password or password_file, not both",
                    s.pool
                ),
            )?;
            check(
                s.socket.is_some() || s.port > 0,
                "mysql.servers",
                format!("server {:?} has no port", s.pool),
            )?;
            check_settings(&self.backend.settings(&s.backend)).map_err(|why| {
                ConfigError::Invalid {
                    key: "mysql.servers",
                    reason: format!("server {:?}: {why}", s.pool),
                }
            })?;
        }
        for g in &m.global_pools {
            check(
                names.contains(g.as_str()),
                "mysql.global_pools",
                format!("no server of global pool {g:?}"),
            )?;
        }
        if !sharded.is_empty() {
            check(
                m.global_pools.contains(&m.lookup_pool),
                "mysql.lookup_pool",
                format!(
                    "sharded pools ({}) need a lookup pool among mysql.global_pools",
                    sharded.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            )?;
        }
        for t in std::iter::once(&m.default_lookup_table).chain(m.lookup_tables.values()) {
            check(
                is_identifier(t),
                "mysql.lookup_tables",
                format!("{t:?} is not a table name"),
            )?;
        }
        if m.cache_store == MysqlCacheStore::Redis {
            check(
                self.redis
                    .pools
                    .iter()
                    .any(|p| p.name == m.cache_redis_pool),
                "mysql.cache_redis_pool",
                format!("no redis pool named {:?}", m.cache_redis_pool),
            )?;
        }
        Ok(())
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        let b = &self.backend;
        check(
            (1..=64).contains(&b.threads),
            "backend.threads",
            "between 1 and 64",
        )?;
        check_settings(&b.settings(&PoolOverrides::default())).map_err(|why| {
            ConfigError::Invalid {
                key: "backend",
                reason: why.into(),
            }
        })?;
        let mc = self
            .memcache
            .pools
            .iter()
            .map(|p| (&p.name, &p.servers, &p.backend));
        let rd = self
            .redis
            .pools
            .iter()
            .map(|p| (&p.name, &p.servers, &p.backend));
        for (section, pools) in [
            ("memcache.pools", mc.collect::<Vec<_>>()),
            ("redis.pools", rd.collect::<Vec<_>>()),
        ] {
            let mut seen = std::collections::HashSet::new();
            for (name, servers, overrides) in pools {
                let key: &'static str = section;
                check(!name.is_empty(), key, "every pool needs a name")?;
                check(
                    seen.insert(name.as_str()),
                    key,
                    format!("pool {name:?} is defined twice"),
                )?;
                check(
                    !servers.is_empty(),
                    key,
                    format!("pool {name:?} has no servers"),
                )?;
                for s in servers {
                    check(
                        server_address_ok(s),
                        key,
                        format!("pool {name:?}: server {s:?} is not HOST:PORT"),
                    )?;
                }
                let settings = b.settings(overrides);
                check_settings(&settings).map_err(|why| ConfigError::Invalid {
                    key,
                    reason: format!("pool {name:?}: {why}"),
                })?;
                check(
                    !settings.breaker.eject || servers.len() <= 64,
                    key,
                    format!("pool {name:?}: ejection supports pools of at most 64 servers"),
                )?;
            }
        }
        for p in &self.redis.pools {
            check(
                p.password.is_none() || p.password_file.is_none(),
                "redis.pools",
                format!("pool {:?}: set password or password_file, not both", p.name),
            )?;
        }
        for cmd in &self.redis.deny {
            check(
                !cmd.is_empty() && cmd.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'),
                "redis.deny",
                format!("{cmd:?} is not a command name"),
            )?;
        }
        Ok(())
    }
}

/// `HOST:PORT` (a name or an IPv4 address, or `[IPv6]:PORT`) with a port in 1..65535.
fn server_address_ok(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !host.contains(char::is_whitespace)
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// A pool's settings, checked: the rule broken, if any.
fn check_settings(s: &PoolSettings) -> Result<(), &'static str> {
    let b = &s.breaker;
    let rules: [(bool, &'static str); 14] = [
        ((1..=1024).contains(&s.max_conns), "max_conns: 1..1024"),
        (s.pipeline_depth >= 1, "pipeline_depth: at least 1"),
        (s.connect_timeout_ms >= 1, "connect_timeout_ms: at least 1"),
        (s.idle_timeout_ms >= 1, "idle_timeout_ms: at least 1"),
        (s.max_queue >= 1, "max_queue: at least 1"),
        (
            b.consecutive_failures >= 1,
            "breaker.consecutive_failures: at least 1",
        ),
        (
            b.failure_rate > 0.0 && b.failure_rate <= 1.0,
            "breaker.failure_rate: above 0, at most 1",
        ),
        (b.window_ms >= 100, "breaker.window_ms: at least 100"),
        (b.min_calls >= 1, "breaker.min_calls: at least 1"),
        (b.slow_call_ms >= 1, "breaker.slow_call_ms: at least 1"),
        (b.open_ms >= 1, "breaker.open_ms: at least 1"),
        (
            b.max_open_ms >= b.open_ms,
            "breaker.max_open_ms: at least open_ms",
        ),
        (
            b.half_open_probes >= 1 && b.close_after >= 1,
            "breaker.half_open_probes and breaker.close_after: at least 1",
        ),
        (
            b.max_ejected_percent <= 100,
            "breaker.max_ejected_percent: 0..100",
        ),
    ];
    match rules.iter().find(|(ok, _)| !ok) {
        Some((_, why)) => Err(why),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml(
            "[server]\nlisten = \"127.0.0.1:1\"\nthreadz = 2\n",
            "x.toml",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("threadz"), "{msg}");
        let err = Config::from_toml("[nosuch]\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("nosuch"), "{err}");
    }

    #[test]
    fn sample_config_lists_every_default() {
        let text = include_str!("../../etc/faed.toml");
        let cfg = Config::from_toml(text, "etc/faed.toml").unwrap();
        assert_eq!(
            cfg,
            Config::default(),
            "etc/faed.toml and the built-in defaults differ"
        );
        // And it names every key, so that it documents them all.
        fn keys(v: &toml::Value, at: &str, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    out.push(path.clone());
                    keys(v, &path, out);
                }
            }
        }
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys(
            &toml::Value::try_from(Config::default()).unwrap(),
            "",
            &mut want,
        );
        keys(&text.parse::<toml::Value>().unwrap(), "", &mut have);
        let missing: Vec<_> = want.iter().filter(|k| !have.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "etc/faed.toml does not list {missing:?}"
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        let err = Config::from_toml("[idgen]\nworker_id = 32\n", "x").unwrap_err();
        assert!(err.to_string().contains("idgen.worker_id"), "{err}");
        let err = Config::from_toml("[server]\nmax_message_bytes = 10\n", "x").unwrap_err();
        assert!(err.to_string().contains("max_message_bytes"), "{err}");
        for frames in [1000, 512, 131072] {
            let text = format!("[listener]\nxdp_frames = {frames}\n");
            let err = Config::from_toml(&text, "x").unwrap_err();
            assert!(err.to_string().contains("listener.xdp_frames"), "{err}");
        }
    }

    #[test]
    fn back_end_pools_are_checked() {
        let ok = "[backend]\nmax_conns = 2\n[backend.breaker]\nopen_ms = 500\n\n[[memcache.pools]]\nname = \"a\"\nservers = [\"127.0.0.1:11211\", \"mc.internal:11212\"]\nhash = \"ketama\"\n[memcache.pools.backend]\nmax_conns = 8\n[memcache.pools.backend.breaker]\neject = true\n\n[[redis.pools]]\nname = \"r\"\nservers = [\"[::1]:6379\"]\ndb = 2\n";
        let cfg = Config::from_toml(ok, "x").unwrap();
        let p = &cfg.memcache.pools[0];
        let s = cfg.backend.settings(&p.backend);
        assert_eq!(
            (s.max_conns, s.breaker.eject, s.breaker.open_ms),
            (8, true, 500)
        );
        assert_eq!(
            cfg.backend.settings(&cfg.redis.pools[0].backend).max_conns,
            2
        );
        for (text, want) in [
            ("[[memcache.pools]]\nname = \"a\"\nservers = [\"h:1\"]\n[[memcache.pools]]\nname = \"a\"\nservers = [\"h:2\"]\n", "defined twice"),
            ("[[memcache.pools]]\nname = \"a\"\nservers = []\n", "no servers"),
            ("[[memcache.pools]]\nname = \"a\"\nservers = [\"nohostport\"]\n", "not HOST:PORT"),
            ("[[memcache.pools]]\nname = \"a\"\nservers = [\"h:0\"]\n", "not HOST:PORT"),
            ("[[redis.pools]]\nname = \"\"\nservers = [\"h:1\"]\n", "needs a name"),
            ("[[memcache.pools]]\nname = \"a\"\nservers = [\"h:1\"]\nsurprise = 1\n", "surprise"),
            ("[[redis.pools]]\nname = \"r\"\nservers = [\"h:1\"]\npassword = \"p\"\npassword_file = \"f\"\n", "not both"),
            ("[backend]\nmax_conns = 0\n", "max_conns"),
            ("[backend.breaker]\nfailure_rate = 1.5\n", "failure_rate"),
            ("[backend.breaker]\nopen_ms = 5000\nmax_open_ms = 10\n", "max_open_ms"),
            ("[[memcache.pools]]\nname = \"a\"\nservers = [\"h:1\"]\n[memcache.pools.backend.breaker]\nclose_after = 0\n", "pool \"a\""),
            ("[memcache]\nhash = \"md5\"\n", "md5"),
            ("[redis]\ndeny = [\"FLUSH ALL\"]\n", "redis.deny"),
        ] {
            let err = Config::from_toml(text, "x").unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn mysql_pools_are_checked() {
        assert_eq!(mysql_shard_of("user12"), Some(("user", 12)));
        assert_eq!(mysql_shard_of("user"), None);
        assert_eq!(mysql_shard_of("12"), None);
        let server = |pool: &str| {
            format!("[[mysql.servers]]\npool = \"{pool}\"\nuser = \"app\"\ndb = \"d\"\n")
        };
        let ok = format!(
            "[mysql]\nglobal_pools = [\"lookup\"]\nlookup_pool = \"lookup\"\n{}{}{}",
            server("lookup"),
            server("user1"),
            server("user2")
        );
        let cfg = Config::from_toml(&ok, "x").unwrap();
        assert_eq!(cfg.mysql.servers.len(), 3);
        for (text, want) in [
            (
                server("global"),
                "neither in mysql.global_pools nor a shard",
            ),
            (server("user1"), "lookup pool"),
            (
                format!("[mysql]\nglobal_pools = [\"g\"]\n{}", server("x1")),
                "no server of global pool",
            ),
            (format!("{}{}", server("u1"), server("u1")), "defined twice"),
            (
                format!(
                    "[mysql]\nglobal_pools = [\"g\"]\n{}password = \"a\"\npassword_file = \"b\"\n",
                    server("g")
                ),
                "not both",
            ),
            (
                "[mysql]\ndefault_lookup_table = \"T; DROP\"\n".into(),
                "not a table name",
            ),
            ("[mysql]\ncache_store = \"redis\"\n".into(), "no redis pool"),
            ("[mysql]\nworkers = 0\n".into(), "mysql.workers"),
        ] {
            let err = Config::from_toml(&text, "x").unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
