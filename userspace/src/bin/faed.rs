//! faed: the fae daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock, RwLock};

use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use fae::admin::{self, AdminState};
use fae::config::Config;
use fae::engine::Server;

/// faed serves the FunServant Thrift API. With no flags it runs on built-in defaults: RPC on 127.0.0.1:9001,
/// admin HTTP on 127.0.0.1:9101.
#[derive(Parser, Debug)]
#[command(name = "faed", version = concat!(env!("CARGO_PKG_VERSION"), " (build ", env!("FAE_BUILD_ID_OR_DEV"), ")"))]
struct Cli {
    /// Configuration file (TOML); see etc/faed.toml for every key and its default.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Check a configuration file and exit: 0 if valid, 2 with the reason if not.
    #[arg(long = "check-config", value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// RPC address (overrides server.listen).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Admin HTTP address (overrides admin.listen).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    /// Data path (overrides listener.mode): kernel, xdp or both.
    #[arg(long, value_enum)]
    listener: Option<fae::config::ListenerMode>,
    /// Interface for the XDP path (overrides listener.interface).
    #[arg(long)]
    interface: Option<String>,
    /// Cluster address to listen on for raft and cluster RPC (enables the cluster; cluster.listen).
    #[arg(long = "cluster-listen")]
    cluster_listen: Option<String>,
    /// Directory for the raft log, hard state and snapshots (cluster.data_dir).
    #[arg(long = "data-dir")]
    data_dir: Option<String>,
    /// Start a new cluster with this node (cluster.bootstrap).
    #[arg(long)]
    bootstrap: bool,
    /// Join the cluster through this member's cluster address (repeatable; cluster.seeds).
    #[arg(long = "join")]
    join: Vec<String>,
    /// Log filter (overrides log.level): error, warn, info, debug, trace.
    #[arg(long = "log-level")]
    log_level: Option<String>,
}

/// faed's exit status after a panic.
const PANIC_EXIT: i32 = 70;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.check_config {
        // The token and secret files too: a faed that could not read them would not start.
        let checked = Config::load(path).and_then(|c| {
            c.admin.resolved_token()?;
            if c.cluster.enabled {
                c.cluster.secret()?;
            }
            Ok(())
        });
        return match checked {
            Ok(()) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("faed: {e}");
                ExitCode::from(2)
            }
        };
    }
    let mut cfg = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("faed: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    let overrides = Overrides::of(&cli);
    overrides.apply(&mut cfg);
    if let Err(e) = cfg.validate() {
        eprintln!("faed: {e}");
        return ExitCode::from(2);
    }
    let token = match cfg.admin.resolved_token() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("faed: admin.token_file: {e}");
            return ExitCode::from(2);
        }
    };
    // The log filter can be changed by a reload.
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, log_handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::new(with_call_log(&cfg.log.level)),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    // A panic on any thread (an event loop, a back-end thread, the raft thread) ends faed with a non-zero
    // status, so that systemd restarts it: a loop that died alone would keep its sessions' slots and its
    // queue, and serve nothing.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("?"),
            "panic: {info}; faed exits"
        );
        default_hook(info);
        std::process::exit(PANIC_EXIT);
    }));
    let set_level: Box<fae::reload::SetLogLevel> = Box::new(move |level: &str| {
        let f = with_call_log(level)
            .parse::<tracing_subscriber::EnvFilter>()
            .map_err(|e| e.to_string())?;
        log_handle.reload(f).map_err(|e| e.to_string())
    });
    match run(&cfg, token, cli.config.clone(), overrides, set_level) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("faed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter with the sampled call log (`fae::calls`, asked for by `metrics.sample_per_10000`) kept on
/// whatever the level, unless the filter names that target itself.
fn with_call_log(level: &str) -> String {
    if level.contains("fae::calls") {
        level.to_owned()
    } else {
        format!("{level},fae::calls=info")
    }
}

/// The command line's settings, applied over the file at start and at every reload.
#[derive(Clone)]
struct Overrides {
    listen: Option<std::net::SocketAddr>,
    admin: Option<std::net::SocketAddr>,
    listener: Option<fae::config::ListenerMode>,
    interface: Option<String>,
    cluster_listen: Option<String>,
    data_dir: Option<String>,
    bootstrap: bool,
    join: Vec<String>,
    log_level: Option<String>,
}

impl Overrides {
    fn of(cli: &Cli) -> Overrides {
        Overrides {
            listen: cli.listen,
            admin: cli.admin,
            listener: cli.listener,
            interface: cli.interface.clone(),
            cluster_listen: cli.cluster_listen.clone(),
            data_dir: cli.data_dir.clone(),
            bootstrap: cli.bootstrap,
            join: cli.join.clone(),
            log_level: cli.log_level.clone(),
        }
    }

    fn apply(&self, cfg: &mut Config) {
        if let Some(a) = self.listen {
            cfg.server.listen = a;
        }
        if let Some(a) = self.admin {
            cfg.admin.listen = a;
        }
        if let Some(m) = self.listener {
            cfg.listener.mode = m;
        }
        if let Some(i) = &self.interface {
            cfg.listener.interface = i.clone();
        }
        if let Some(a) = &self.cluster_listen {
            cfg.cluster.enabled = true;
            cfg.cluster.listen = a.clone();
        }
        if let Some(d) = &self.data_dir {
            cfg.cluster.enabled = true;
            cfg.cluster.data_dir = d.clone();
        }
        if self.bootstrap {
            cfg.cluster.enabled = true;
            cfg.cluster.bootstrap = true;
        }
        if !self.join.is_empty() {
            cfg.cluster.enabled = true;
            cfg.cluster.seeds = self.join.clone();
        }
        if let Some(l) = &self.log_level {
            cfg.log.level = l.clone();
        }
    }
}

fn run(
    cfg: &Config,
    token: Option<String>,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    set_level: Box<fae::reload::SetLogLevel>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Signals go to an iterator registered before any thread starts (its thread starts once the capabilities
    // are dropped; a signal that comes meanwhile waits in the iterator).
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    // Until the server runs (joining a cluster can take a while), a signal ends faed at once.
    let stopper: Arc<OnceLock<fae::engine::Stopper>> = Arc::new(OnceLock::new());
    let reload_tx: Arc<OnceLock<crossbeam_channel::Sender<fae::reload::Trigger>>> =
        Arc::new(OnceLock::new());
    // Every listener is bound before joining a cluster: a node that could not serve must not become a voter.
    let admin_listener = if cfg.admin.enabled {
        Some(admin::bind(cfg.admin.listen)?)
    } else {
        None
    };
    let bound = Server::bind_first(cfg)?;
    // Everything that needed a capability is done (binding, attaching XDP, the AF_XDP sockets): faed
    // gives them all up before it starts any other thread (capabilities are per thread; new threads
    // inherit the caller's).
    if let Err(e) = fae::engine::xdp::drop_capabilities() {
        tracing::warn!("{e}");
    }
    let (st, rt) = (stopper.clone(), reload_tx.clone());
    std::thread::Builder::new()
        .name("fae-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    match rt.get() {
                        Some(tx) => {
                            tracing::info!("SIGHUP: reloading the configuration");
                            let _ = tx.send(fae::reload::Trigger::Signal);
                        }
                        None => tracing::warn!(
                            "SIGHUP ignored: faed runs on built-in defaults (no -c file)"
                        ),
                    }
                    continue;
                }
                match st.get() {
                    Some(s) => {
                        tracing::info!(
                            signal = sig,
                            "draining: no new sessions, finishing in-flight calls"
                        );
                        s.stop();
                    }
                    None => {
                        eprintln!("faed: signal {sig} while starting; exiting");
                        std::process::exit(1);
                    }
                }
            }
        })?;
    // The servants (and their back-end pools) too: a node whose servants cannot start never joins. A
    // cluster node's worker id and node id are set once it knows them.
    let servants = Arc::new(fae::servant::Servants::new(cfg)?);
    let mut cfg = cfg.clone();
    let cluster = if cfg.cluster.enabled {
        let c = Arc::new(fae::cluster::start(&cfg)?);
        let view = c.view();
        // Ids are unique across the cluster: each member has its own worker id (at most 32 members).
        cfg.idgen.worker_id = view
            .my_worker_id()
            .ok_or("the cluster assigned this node no worker id")?;
        cfg.node.id = view.my_id;
        servants.idgen.set_worker(cfg.idgen.worker_id);
        servants.misc.set_node_id(view.my_id);
        tracing::info!(
            node = view.my_id,
            worker_id = cfg.idgen.worker_id,
            raft = c.raft_addr(),
            "cluster member"
        );
        // A node whose raft thread died (its storage failed, or it panicked) has lost its lease already;
        // it exits non-zero so that its supervisor sees it and restarts it.
        let watch = c.raft_watch();
        std::thread::Builder::new()
            .name("fae-raft-watch".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if watch.failed() {
                    tracing::error!(
                        "the cluster's raft thread ended (a storage failure or a panic); exiting"
                    );
                    eprintln!("faed: the cluster's raft thread ended; exiting");
                    std::process::exit(3);
                }
            })?;
        Some(c)
    } else {
        None
    };
    let cfg = &cfg;
    let router = cluster.as_ref().map(|c| {
        fae::cluster::spawn_handoff(c, servants.clone());
        Arc::new(fae::cluster::ClusterRouter { cluster: c.clone() })
            as Arc<dyn fae::cluster::forward::Router>
    });
    let server = Server::start_with(cfg, servants, router, bound)?;
    let state = Arc::new(RwLock::new((cfg.clone(), 1u64)));
    let reloader = config_path.map(|path| {
        let o = overrides.clone();
        Arc::new(fae::reload::Reloader::new(
            path,
            Box::new(move |c: &mut Config| o.apply(c)),
            state.clone(),
            server.filters.clone(),
            server.env.clone(),
            server.servants.clone(),
            server.returns.clone(),
            set_level,
        ))
    });
    if let Some(r) = &reloader {
        match r.watch() {
            Ok(tx) => {
                let _ = reload_tx.set(tx);
            }
            Err(e) => tracing::warn!("{e}; SIGHUP and POST /api/reload still reload"),
        }
    }
    if let Some(listener) = admin_listener {
        admin::spawn(
            AdminState {
                metrics: server.metrics.clone(),
                servants: server.servants.clone(),
                gate: server.gate.clone(),
                xdp: server.xdp.clone(),
                xdp_queues: server.xdp_queues.clone(),
                cluster: cluster.as_ref().map(Arc::downgrade),
                filters: server.filters.clone(),
                env: server.env.clone(),
                config: state.clone(),
                token,
                stopper: server.stopper(),
                history: Arc::new(admin::History::new()),
                addr: cfg.admin.listen,
                reload: reloader.clone().map(|r| {
                    let f: Arc<admin::Reload> = Arc::new(move || r.reload());
                    f
                }),
            },
            listener,
        )?;
    }
    let _ = stopper.set(server.stopper());
    server.join()?;
    if let Some(c) = cluster {
        match Arc::try_unwrap(c) {
            Ok(c) => c.shutdown(cfg.cluster.leave_on_shutdown)?,
            Err(_) => tracing::warn!("cluster still in use at shutdown; not leaving"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}
