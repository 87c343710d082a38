//! faed: the fae daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.check_config {
        return match Config::load(path) {
            Ok(_) => {
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
    if let Some(a) = cli.listen {
        cfg.server.listen = a;
    }
    if let Some(a) = cli.admin {
        cfg.admin.listen = a;
    }
    if let Some(m) = cli.listener {
        cfg.listener.mode = m;
    }
    if let Some(i) = cli.interface {
        cfg.listener.interface = i;
    }
    if let Some(a) = cli.cluster_listen {
        cfg.cluster.enabled = true;
        cfg.cluster.listen = a;
    }
    if let Some(d) = cli.data_dir {
        cfg.cluster.enabled = true;
        cfg.cluster.data_dir = d;
    }
    if cli.bootstrap {
        cfg.cluster.enabled = true;
        cfg.cluster.bootstrap = true;
    }
    if !cli.join.is_empty() {
        cfg.cluster.enabled = true;
        cfg.cluster.seeds = cli.join;
    }
    if let Some(l) = cli.log_level {
        cfg.log.level = l;
    }
    if let Err(e) = cfg.validate() {
        eprintln!("faed: {e}");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cfg.log.level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("faed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &Config) -> Result<(), Box<dyn std::error::Error>> {
    // Signals are blocked into an iterator before any thread starts, so every thread inherits the handler.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    // Until the server runs (joining a cluster can take a while), a signal ends faed at once.
    let stopper: Arc<OnceLock<fae::engine::Stopper>> = Arc::new(OnceLock::new());
    let st = stopper.clone();
    std::thread::Builder::new()
        .name("fae-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
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
    let mut cfg = cfg.clone();
    let cluster = if cfg.cluster.enabled {
        let c = Arc::new(fae::cluster::start(&cfg)?);
        let view = c.view();
        // Ids are unique across the cluster: each member has its own worker id (at most 32 members).
        cfg.idgen.worker_id = view
            .my_worker_id()
            .ok_or("the cluster assigned this node no worker id")?;
        cfg.node.id = view.my_id;
        tracing::info!(
            node = view.my_id,
            worker_id = cfg.idgen.worker_id,
            raft = c.raft_addr(),
            "cluster member"
        );
        Some(c)
    } else {
        None
    };
    let cfg = &cfg;
    let servants = Arc::new(fae::servant::Servants::new(cfg)?);
    let router = cluster.as_ref().map(|c| {
        fae::cluster::spawn_handoff(c, servants.clone());
        Arc::new(fae::cluster::ClusterRouter { cluster: c.clone() }) as Arc<dyn fae::proxy::Router>
    });
    let server = Server::start_with(cfg, servants, router)?;
    if cfg.admin.enabled {
        admin::spawn(
            cfg.admin.listen,
            AdminState {
                metrics: server.metrics.clone(),
                servants: server.servants.clone(),
                gate: server.gate.clone(),
                xdp: server.xdp.clone(),
                cluster: cluster.as_ref().map(Arc::downgrade),
            },
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
