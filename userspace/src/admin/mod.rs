//! The admin port: the dashboard at `/`, Prometheus text at `/metrics`, JSON under `/api/`, and the admin
//! actions (degrade and restore, limits, drain, leave, reload).
//!
//! Reading is open to whoever reaches the port (by default only this host: faed refuses a non-loopback admin
//! address without a token, as Redis's protected mode does). Every action changes state, so it is POST only,
//! needs `Authorization: Bearer <admin.token>` (no token configured: actions are off), and is refused when the
//! request carries an `Origin` other than the admin port itself (so a web page cannot act through a browser
//! on the host).

pub(crate) mod api;
mod history;
pub mod http;
pub mod metrics;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, RwLock, Weak};

use crate::config::Config;
use crate::engine::kernel::Gate;
use crate::engine::metrics::LoopMetrics;
use crate::engine::session::Env;
use crate::engine::{EngineError, Stopper};
use crate::filter::Chain;
use crate::servant::Servants;

pub use history::{rss_kib, History, Point};
pub use metrics::{prometheus, stats_json};

/// Applies a new configuration (a reload): what it changed, or why it refused.
pub type Reload = dyn Fn() -> Result<String, String> + Send + Sync;

/// What the admin endpoint reads and acts on.
pub struct AdminState {
    pub metrics: Vec<Arc<LoopMetrics>>,
    pub servants: Arc<Servants>,
    pub gate: Arc<Gate>,
    /// The XDP program, when the XDP path runs.
    pub xdp: Option<crate::engine::xdp::SharedProgram>,
    /// The XDP queues' socket counters and loop metrics.
    pub xdp_queues: Vec<(Arc<crate::engine::xdp::QueueStats>, Arc<LoopMetrics>)>,
    /// The cluster membership, when this node is in one (weak: shutdown takes it back).
    pub cluster: Option<Weak<fae_cluster::Cluster>>,
    pub filters: Arc<Chain>,
    pub env: Arc<Env>,
    /// The configuration in force and its generation (1 at start, +1 per applied reload).
    pub config: Arc<RwLock<(Config, u64)>>,
    /// The token actions need; `None`: actions are off.
    pub token: Option<String>,
    pub stopper: Stopper,
    pub history: Arc<History>,
    /// This port's own address (for the Origin check and links).
    pub addr: SocketAddr,
    pub reload: Option<Arc<Reload>>,
}

/// Binds the admin address (before faed joins a cluster: a taken port stops it first).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, EngineError> {
    TcpListener::bind(addr).map_err(|source| EngineError::Admin { addr, source })
}

/// Starts the history sampler and serves the bound admin port on threads of its own.
pub fn spawn(state: AdminState, listener: TcpListener) -> Result<(), EngineError> {
    let addr = state.addr;
    let (limits, _) = {
        let g = state.config.read().unwrap_or_else(|p| p.into_inner());
        let a = &g.0.admin;
        (
            http::Limits {
                max_connections: a.max_connections,
                request_timeout: std::time::Duration::from_millis(a.request_timeout_ms),
                max_body: a.max_body_bytes,
            },
            (),
        )
    };
    let state = Arc::new(state);
    history::spawn(state.clone()).map_err(|source| EngineError::Admin { addr, source })?;
    let handler: Arc<dyn Fn(http::Request) -> http::Response + Send + Sync> = {
        let state = state.clone();
        Arc::new(move |req| api::handle(&state, req))
    };
    http::serve(listener, limits, handler).map_err(|source| EngineError::Admin { addr, source })?;
    tracing::info!(%addr, actions = state.token.is_some(), "admin HTTP");
    Ok(())
}
