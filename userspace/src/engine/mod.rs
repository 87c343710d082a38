//! Listeners, sessions, dispatch, flow control and shutdown. The engine owns no business logic: it reaches
//! the servants through one dispatch table, and it never knows which transport gave it bytes.

pub mod driver;
pub mod kernel;
pub mod metrics;
pub mod session;
pub mod xdp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::backend::{self, Doorbell};
use crate::cluster::forward::{ForwardDone, Forwarder, Router};
use crate::config::{Config, ListenerMode};
use crate::servant::Servants;
use kernel::{Gate, KernelLoop};
use metrics::LoopMetrics;
use session::Env;

/// A fault for the tests to inject: `FAED_TEST_PANIC=kernel` or `=xdp` makes a loop of that kind panic
/// when it accepts a connection (tests/robustness.rs and the XDP lab check that faed then exits non-zero,
/// whichever build they are given).
pub fn injected_panic(kind: &str) -> bool {
    static KIND: OnceLock<Option<String>> = OnceLock::new();
    KIND.get_or_init(|| std::env::var("FAED_TEST_PANIC").ok())
        .as_deref()
        == Some(kind)
}

/// A deferred call's outcome, on its way back to the loop that owns its session.
pub enum Completion {
    /// From a forwarding worker: a peer's reply, or a registry call's.
    Forward(ForwardDone),
    /// From a back-end I/O thread.
    Backend(backend::Done),
}

/// One loop's way back: its channel, and the doorbell that wakes it.
pub struct Return {
    pub tx: Sender<Completion>,
    pub bell: Arc<Doorbell>,
}

/// Every loop's way back, by loop index; filled once the loops exist. Workers and back-end threads send
/// deferred replies through it.
#[derive(Clone, Default)]
pub struct Returns(Arc<OnceLock<Vec<Return>>>);

impl Returns {
    fn set(&self, returns: Vec<Return>) {
        let _ = self.0.set(returns);
    }

    /// Hands `c` to loop `lp` and wakes it if it sleeps.
    pub fn send(&self, lp: u32, c: Completion) {
        if let Some(r) = self.0.get().and_then(|r| r.get(lp as usize)) {
            if r.tx.send(c).is_ok() {
                r.bell.ring();
            }
        }
    }
}

impl backend::Sink for Returns {
    fn deliver(&self, done: backend::Done) {
        self.send(done.ticket.session.lp, Completion::Backend(done));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on unix socket {path}: {source}")]
    ListenUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start an event loop: {0}")]
    Loop(std::io::Error),
    #[error("cannot serve the admin HTTP on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("back ends: {0}")]
    Backend(#[from] crate::backend::BackendStartError),
    #[error("XDP path: {0}")]
    Xdp(#[from] fae_netstack::NetError),
}

/// A running node: its loops, its shared state, and the switch that stops it.
pub struct Server {
    pub servants: Arc<Servants>,
    pub metrics: Vec<Arc<LoopMetrics>>,
    pub gate: Arc<Gate>,
    /// The attached XDP program, when the XDP path runs.
    pub xdp: Option<xdp::SharedProgram>,
    /// The XDP queues' socket counters and loop metrics, by queue.
    pub xdp_queues: Vec<(Arc<xdp::QueueStats>, Arc<LoopMetrics>)>,
    /// The filter chain every call passes (the admin API changes it).
    pub filters: Arc<crate::filter::Chain>,
    /// What the sessions share (a reload changes its slow-call threshold).
    pub env: Arc<Env>,
    /// The loops' ways back, for back ends put in service later (a reload).
    pub returns: Returns,
    stopping: Arc<AtomicBool>,
    wakers: Vec<Arc<Doorbell>>,
    loops: Vec<JoinHandle<std::io::Result<()>>>,
    /// The unix socket's file and its identity (device, inode), removed once the loops are done if it is
    /// still the file this server bound (a newer faed may have replaced it while this one drained).
    unix_file: Option<(std::path::PathBuf, (u64, u64))>,
}

/// What [`Server::bind_first`] binds before a node joins a cluster.
#[derive(Default)]
pub struct Bound {
    first: Option<std::net::TcpListener>,
    unix: Option<UnixBound>,
    xdp: Option<xdp::XdpPath>,
}

/// The unix socket's listener and its file's identity.
type UnixBound = (std::os::unix::net::UnixListener, (u64, u64));

fn bind_unix(cfg: &Config) -> Result<Option<UnixBound>, EngineError> {
    kernel::unix_listener(&cfg.server).map_err(|source| EngineError::ListenUnix {
        path: cfg.server.unix_socket.clone().unwrap_or_default(),
        source,
    })
}

impl Server {
    /// Binds every listener first (so that a taken port is reported before anything runs), then starts one
    /// loop thread per listener.
    pub fn start(cfg: &Config) -> Result<Server, EngineError> {
        let servants = Servants::new(cfg).map_err(EngineError::Backend)?;
        Self::start_with(cfg, Arc::new(servants), None, Bound::default())
    }

    /// Binds the first loop's RPC listener (kernel path) and attaches the XDP path (program and AF_XDP
    /// sockets), so that a taken address or an XDP path that cannot attach stops faed before it joins a
    /// cluster; hand the result to [`Server::start_with`]. (Packets that arrive before the loops start wait
    /// in the listener's backlog and the sockets' rings.)
    pub fn bind_first(cfg: &Config) -> Result<Bound, EngineError> {
        let s = &cfg.server;
        let first = if cfg.listener.mode == ListenerMode::Xdp {
            None
        } else {
            Some(
                kernel::reuseport_listener(s.listen, s.backlog).map_err(|source| {
                    EngineError::Listen {
                        addr: s.listen,
                        source,
                    }
                })?,
            )
        };
        let unix = bind_unix(cfg)?;
        // The XDP path: attaching fails early and clearly (no program, no interface, no rights).
        let xdp = if cfg.listener.mode == ListenerMode::Kernel {
            None
        } else {
            Some(xdp::prepare(cfg)?)
        };
        Ok(Bound { first, unix, xdp })
    }

    /// As [`Server::start`], with the node's servants, in a cluster the router of keyed calls, and what
    /// [`Server::bind_first`] bound (or `Bound::default()`: it binds here).
    pub fn start_with(
        cfg: &Config,
        servants: Arc<Servants>,
        router: Option<Arc<dyn Router>>,
        bound: Bound,
    ) -> Result<Server, EngineError> {
        let Bound {
            mut first,
            unix,
            xdp,
        } = bound;
        let unix = match unix {
            Some(u) => Some(u),
            None => bind_unix(cfg)?,
        };
        let s = &cfg.server;
        let returns = Returns::default();
        let forwarder = router.as_ref().map(|r| {
            let r = r.clone();
            Arc::new(Forwarder::start(
                cfg.cluster.forward_workers,
                Duration::from_millis(cfg.cluster.forward_timeout_ms),
                returns.clone(),
                Arc::new(move |addr: &str| r.is_member_rpc_addr(addr)),
            ))
        });
        let filters = Arc::new(
            crate::filter::Chain::new(crate::filter::Settings::of(cfg)).map_err(|why| {
                EngineError::Loop(std::io::Error::other(format!("limits or degrade: {why}")))
            })?,
        );
        let mut env = Env::with_filters(cfg, servants.clone(), filters.clone());
        env.router = router;
        env.forwarder = forwarder.clone();
        let env = Arc::new(env);
        let mut ways_back: Vec<Return> = Vec::new();
        let gate = Arc::new(Gate::new(s.max_sessions));
        let stopping = Arc::new(AtomicBool::new(false));
        let kernel = cfg.listener.mode != ListenerMode::Xdp;
        let xdp_path = match xdp {
            Some(path) => Some(path),
            None if cfg.listener.mode != ListenerMode::Kernel => Some(xdp::prepare(cfg)?),
            None => None,
        };
        // XDP only: one kernel loop still serves the unix socket, if there is one.
        let n = match (kernel, &unix) {
            (true, _) => s.loops(),
            (false, Some(_)) => 1,
            (false, None) => 0,
        };
        let mut built = Vec::with_capacity(n);
        let mut metrics = Vec::with_capacity(n);
        let mut wakers = Vec::with_capacity(n);
        for i in 0..n {
            let listener = match first.take() {
                Some(l) => Some(l),
                None if kernel => Some(kernel::reuseport_listener(s.listen, s.backlog).map_err(
                    |source| EngineError::Listen {
                        addr: s.listen,
                        source,
                    },
                )?),
                None => None,
            };
            let unix = unix
                .as_ref()
                .map(|(u, _)| u.try_clone())
                .transpose()
                .map_err(EngineError::Loop)?;
            let m = Arc::new(LoopMetrics::default());
            let (tx, rx) = crossbeam_channel::unbounded();
            let (lp, bell) = KernelLoop::new(
                i as u32,
                listener,
                unix,
                env.clone(),
                m.clone(),
                gate.clone(),
                stopping.clone(),
                Duration::from_millis(s.shutdown_timeout_ms),
                rx,
            )
            .map_err(EngineError::Loop)?;
            ways_back.push(Return {
                tx,
                bell: bell.clone(),
            });
            built.push(lp);
            metrics.push(m);
            wakers.push(bell);
        }
        let mut loops = built
            .into_iter()
            .enumerate()
            .map(|(i, lp)| {
                std::thread::Builder::new()
                    .name(format!("fae-loop-{i}"))
                    .spawn(move || lp.run())
                    .map_err(EngineError::Loop)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if kernel {
            tracing::info!(listen = %s.listen, loops = n, "serving FunServant over kernel TCP");
        }
        if let Some(path) = &s.unix_socket {
            tracing::info!(path = %path.display(), loops = n, "serving FunServant on a unix socket");
        }
        let mut program = None;
        let mut xdp_queues = Vec::new();
        if let Some(path) = xdp_path {
            program = Some(path.program.clone());
            for (q, mut stack) in path.stacks {
                let m = Arc::new(LoopMetrics::default());
                metrics.push(m.clone());
                let (tx, rx) = crossbeam_channel::unbounded();
                let index = ways_back.len() as u32;
                let (waiter, bell) = xdp::Waiter::new(&mut stack).map_err(EngineError::Loop)?;
                ways_back.push(Return {
                    tx,
                    bell: bell.clone(),
                });
                wakers.push(bell);
                let queue_stats = Arc::new(xdp::QueueStats::new(q));
                xdp_queues.push((queue_stats.clone(), m.clone()));
                let lp = xdp::XdpLoop {
                    index,
                    queue_stats,
                    returns: rx,
                    waiter,
                    stack,
                    env: env.clone(),
                    metrics: m,
                    gate: gate.clone(),
                    stopping: stopping.clone(),
                    shutdown_timeout: Duration::from_millis(s.shutdown_timeout_ms),
                    busy_poll: Duration::from_micros(cfg.listener.busy_poll_us),
                    accept_queue: cfg.listener.xdp_backlog,
                };
                let h = std::thread::Builder::new()
                    .name(format!("fae-xdp-q{q}"))
                    .spawn(move || {
                        lp.run();
                        Ok(())
                    })
                    .map_err(EngineError::Loop)?;
                loops.push(h);
            }
        }
        returns.set(ways_back);
        servants.backends().set_sink(Arc::new(returns.clone()));
        Ok(Server {
            servants,
            metrics,
            gate,
            xdp: program,
            xdp_queues,
            filters,
            env,
            returns,
            stopping,
            wakers,
            loops,
            unix_file: s.unix_socket.clone().zip(unix.as_ref().map(|(_, id)| *id)),
        })
    }

    /// A handle that stops the server from another thread (a signal handler thread, a test).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            stopping: self.stopping.clone(),
            wakers: self.wakers.clone(),
        }
    }

    /// Waits for every loop to finish draining.
    pub fn join(self) -> std::io::Result<()> {
        let mut result = Ok(());
        for h in self.loops {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(std::io::Error::other("an event loop panicked")),
            }
        }
        if let Some((path, id)) = &self.unix_file {
            use std::os::unix::fs::MetadataExt;
            let same = std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id);
            if same {
                let _ = std::fs::remove_file(path);
            }
        }
        result
    }
}

#[derive(Clone)]
pub struct Stopper {
    stopping: Arc<AtomicBool>,
    wakers: Vec<Arc<Doorbell>>,
}

impl Stopper {
    /// Stop accepting, finish in-flight calls and unsent replies, then let the loops end.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for w in &self.wakers {
            w.wake_now();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}
