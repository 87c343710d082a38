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

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
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
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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
    pub shutdown_timeout_ms: u64,
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
            shutdown_timeout_ms: 10_000,
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
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
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
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native where the driver supports it, else generic.
    Auto,
    /// In the driver (fails where the driver has no XDP support).
    Native,
    /// In the kernel's generic path (works everywhere, slower).
    Generic,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:9101".parse().expect("literal"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub id: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig { id: 1 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub slow_call_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { slow_call_ms: 100 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LockConfig {
    pub ttl_ms: u64,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig { ttl_ms: 30_000 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    pub max_nodes: usize,
    pub max_data_bytes: usize,
    pub max_path_bytes: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_nodes: 100_000,
            max_data_bytes: 1 << 20,
            max_path_bytes: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub enabled: bool,
    pub listen: String,
    pub data_dir: String,
    pub bootstrap: bool,
    pub seeds: Vec<String>,
    pub failover_timeout_ms: u64,
    pub forward_timeout_ms: u64,
    pub forward_workers: usize,
    pub leave_on_shutdown: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            listen: "127.0.0.1:9201".into(),
            data_dir: "/var/lib/fae".into(),
            bootstrap: false,
            seeds: Vec::new(),
            failover_timeout_ms: 5_000,
            forward_timeout_ms: 2_000,
            forward_workers: 16,
            leave_on_shutdown: false,
        }
    }
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
    }

    #[test]
    fn invalid_values_are_refused() {
        let err = Config::from_toml("[idgen]\nworker_id = 32\n", "x").unwrap_err();
        assert!(err.to_string().contains("idgen.worker_id"), "{err}");
        let err = Config::from_toml("[server]\nmax_message_bytes = 10\n", "x").unwrap_err();
        assert!(err.to_string().contains("max_message_bytes"), "{err}");
    }
}
