//! fae: the command-line client — ping a node, make one call, or benchmark.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use fae::client::{self, bench, Protocol, Transport};
use fae::wire::HeaderKind;

#[derive(Parser, Debug)]
#[command(name = "fae", version, about = "fae command-line client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TransportArg {
    Buffered,
    Framed,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Transport {
        match t {
            TransportArg::Buffered => Transport::Buffered,
            TransportArg::Framed => Transport::Framed,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProtocolArg {
    Binary,
    Compact,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum HeaderArg {
    /// Apache Thrift's and fbthrift's THeaderTransport (magic 0x0FFF).
    Theader,
    /// CloudWeGo's TTHeader (Kitex, Volo; magic 0x1000).
    Ttheader,
}

/// How a fae client writes its calls.
#[derive(clap::Args, Clone, Copy, Debug)]
struct WireArgs {
    #[arg(long, value_enum, default_value = "buffered")]
    transport: TransportArg,
    #[arg(long, value_enum, default_value = "binary")]
    protocol: ProtocolArg,
    /// Wrap every call in a header frame: `--header` (THeader) or `--header=ttheader`; overrides --transport.
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "theader")]
    header: Option<HeaderArg>,
}

impl WireArgs {
    fn transport(&self) -> Transport {
        match self.header {
            Some(HeaderArg::Theader) => Transport::Header(HeaderKind::THeader),
            Some(HeaderArg::Ttheader) => Transport::Header(HeaderKind::TTHeader),
            None => self.transport.into(),
        }
    }
    fn protocol(&self) -> Protocol {
        match self.protocol {
            ProtocolArg::Binary => Protocol::Binary,
            ProtocolArg::Compact => Protocol::Compact,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DirectArg {
    Memcache,
    Redis,
    /// ADDR is then a URL: mysql://USER:PASSWORD@HOST:PORT/DB
    Mysql,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Calls ping and prints the node's answer.
    Ping {
        /// host:port of a faed node, or the path of its unix socket
        addr: String,
        #[command(flatten)]
        wire: WireArgs,
        #[arg(long = "timeout-ms", default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Calls METHOD with ARGS and prints the result or the exception (exit 1).
    ///
    /// Examples: `fae call 127.0.0.1:9001 lc_set k v`, `fae call 127.0.0.1:9001 id_decode 123456789`,
    /// `fae call 127.0.0.1:9001 mc_set POOL KEY VALUE [FLAGS [EXPIRATION]]`, `mc_get POOL KEY`,
    /// `mc_increment POOL KEY DELTA`, `fae call 127.0.0.1:9001 rd_call SET POOL KEY VALUE`.
    Call {
        addr: String,
        method: String,
        #[arg(allow_hyphen_values = true)]
        args: Vec<String>,
        #[command(flatten)]
        wire: WireArgs,
        #[arg(long = "timeout-ms", default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Correctness run: every connection calls every in-memory servant and CALLS more calls, checking
    /// each answer; exit 1 on any wrong or missing answer.
    Check {
        addr: String,
        #[arg(short = 'c', long, default_value_t = 8)]
        connections: usize,
        #[arg(short = 'n', long, default_value_t = 1000)]
        calls: usize,
        /// Bytes of the values written and read back.
        #[arg(long = "value-size", default_value_t = 100)]
        value_size: usize,
        #[arg(long, value_enum, default_value = "buffered")]
        transport: TransportArg,
        #[arg(long = "timeout-ms", default_value_t = 10000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Cluster administration, through any member's cluster address (cluster.listen).
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Closed-loop load: prints calls/s, p50/p99/p999 latency and errors.
    Bench {
        addr: String,
        /// Concurrent connections.
        #[arg(short = 'c', long, default_value_t = 64)]
        connections: usize,
        /// Calls in flight per connection (pipelined).
        #[arg(short = 'd', long, default_value_t = 1)]
        depth: usize,
        /// Measured seconds.
        #[arg(short = 't', long = "duration", default_value_t = 10.0)]
        duration_secs: f64,
        /// Unmeasured seconds before the measurement.
        #[arg(long = "warmup", default_value_t = 1.0)]
        warmup_secs: f64,
        /// Calls and weights, e.g. `noop` or `noop:3,lc_get:1`: noop, ping, id_next, lc_get, lc_set, mc_get,
        /// mc_set, rd_get, rd_set (rd_call GET/SET), my_get, my_get_cached (my_query of one `kv` row by key,
        /// without and with a cacheKey), lock (granted while free, false while held).
        #[arg(short = 'm', long, default_value = "noop")]
        mix: String,
        /// The pool of mc_* and rd_call calls.
        #[arg(long, default_value = "default")]
        pool: String,
        /// Speak the store's own protocol to ADDR instead of Thrift: memcache (mc_get, mc_set) or redis
        /// (rd_get, rd_set), to the store itself or to a proxy in front of it, for a baseline.
        #[arg(long, value_enum)]
        direct: Option<DirectArg>,
        /// Value bytes for the writes and the keys the reads read.
        #[arg(long = "value-size", default_value_t = 100)]
        value_size: usize,
        /// Distinct keys.
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        #[command(flatten)]
        wire: WireArgs,
        /// Client event-loop threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// The server's pid: report its CPU time per call (from /proc). Several (repeated or separated by
        /// commas) are summed: faed and the kernel threads that do the server's packet work.
        #[arg(long = "server-pid", value_delimiter = ',')]
        server_pid: Vec<u32>,
        /// Connect from this local address (e.g. 127.0.0.2: a second client IP on loopback).
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        /// Short-lived connections: each makes this many calls, closes, and is replaced by a new one (as a
        /// PHP-FPM worker connects per request). Reports connections/s and connect latency too. 0: the
        /// connections live for the whole run.
        #[arg(long = "calls-per-conn", default_value_t = 0)]
        calls_per_conn: usize,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members, roles, leader, term, commit index, vbuckets per node, map epoch.
    Status {
        /// A member's cluster address.
        addr: String,
        #[arg(long)]
        json: bool,
        /// The cluster secret (the members' cluster.secret_file), if the cluster has one.
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
    },
    /// Removes a node from the cluster (its vbuckets move to the others). Without NODE_ID: the node at ADDR.
    Leave {
        /// A member's cluster address.
        addr: String,
        node_id: Option<u64>,
        /// The cluster secret (the members' cluster.secret_file), if the cluster has one.
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
    },
}

fn read_secret(
    path: Option<&std::path::Path>,
) -> Result<Option<fae_cluster::ClusterSecret>, ExitCode> {
    path.map(fae_cluster::ClusterSecret::from_file)
        .transpose()
        .map_err(|e| {
            eprintln!("fae cluster: {e}");
            ExitCode::FAILURE
        })
}

fn cluster_cmd(cmd: ClusterCmd) -> ExitCode {
    let timeout = Duration::from_secs(10);
    let secret = match &cmd {
        ClusterCmd::Status { secret_file, .. } | ClusterCmd::Leave { secret_file, .. } => {
            match read_secret(secret_file.as_deref()) {
                Ok(s) => s,
                Err(code) => return code,
            }
        }
    };
    let secret = secret.as_ref();
    match cmd {
        ClusterCmd::Status { addr, json, .. } => {
            match fae_cluster::remote_status(&addr, secret, timeout) {
                Ok(st) => {
                    if json {
                        println!("{}", serde_json::to_string(&st).unwrap_or_default());
                    } else {
                        let leader = st.leader_id.map_or("none".to_string(), |l| l.to_string());
                        println!(
                        "node {} ({:?}, {:?}) leader={} term={} commit={} applied={} epoch={} pending_moves={}",
                        st.my_id, st.role, st.my_state, leader, st.term, st.commit_index, st.applied_index,
                        st.epoch, st.pending_moves
                    );
                        for m in &st.members {
                            let me = &m.member;
                            println!(
                                "  {:>20} {:?} voter={} worker={} rpc={} cluster={} vbuckets={}",
                                me.id,
                                me.state,
                                me.voter,
                                me.worker_id,
                                me.rpc_addr,
                                me.raft_addr,
                                m.vbuckets
                            );
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fae cluster status: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ClusterCmd::Leave { addr, node_id, .. } => {
            let id = match node_id {
                Some(id) => id,
                None => match fae_cluster::remote_status(&addr, secret, timeout) {
                    Ok(st) => st.my_id,
                    Err(e) => {
                        eprintln!("fae cluster leave: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            match fae_cluster::remote_leave(&addr, secret, id, timeout) {
                Ok(()) => {
                    println!("node {id} left");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fae cluster leave: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Cluster { cmd } => cluster_cmd(cmd),
        Cmd::Ping {
            addr,
            wire,
            timeout_ms,
        } => one_call(&addr, "ping", &[], wire, timeout_ms),
        Cmd::Call {
            addr,
            method,
            args,
            wire,
            timeout_ms,
        } => one_call(&addr, &method, &args, wire, timeout_ms),
        Cmd::Check {
            addr,
            connections,
            calls,
            value_size,
            transport,
            timeout_ms,
            json,
        } => {
            let report = fae::client::check::run(&fae::client::check::CheckConfig {
                addr,
                connections: connections.max(1),
                calls,
                value_size,
                transport: transport.into(),
                timeout: Duration::from_millis(timeout_ms),
            });
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                for f in &report.first_failures {
                    eprintln!("FAIL {f}");
                }
                println!(
                    "check: {} connections, {} calls, {} failures, {:.1}s",
                    report.connections, report.calls, report.failures, report.seconds
                );
            }
            if report.failures == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Bench {
            addr,
            connections,
            depth,
            duration_secs,
            warmup_secs,
            mix,
            pool,
            direct,
            value_size,
            keys,
            wire,
            threads,
            server_pid,
            bind,
            calls_per_conn,
            json,
        } => {
            let target = match direct {
                None => bench::Target::Fae(wire.transport()),
                Some(DirectArg::Memcache) => bench::Target::Memcache,
                Some(DirectArg::Redis) => bench::Target::Redis,
                Some(DirectArg::Mysql) => bench::Target::Mysql,
            };
            let mix = match bench::parse_mix(&mix, target) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("fae bench: {e}");
                    return ExitCode::from(2);
                }
            };
            let cfg = bench::BenchConfig {
                addr,
                connections: connections.max(1),
                depth: depth.max(1),
                duration: Duration::from_secs_f64(duration_secs.max(0.1)),
                warmup: Duration::from_secs_f64(warmup_secs.max(0.0)),
                mix,
                value_size,
                keys: keys.max(1),
                target,
                pool,
                threads,
                server_pids: server_pid,
                bind,
                calls_per_conn,
                progress: !json,
                protocol: wire.protocol(),
            };
            match bench::run(&cfg) {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    } else {
                        println!("{report}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fae bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn one_call(
    addr: &str,
    method: &str,
    args: &[String],
    wire: WireArgs,
    timeout_ms: u64,
) -> ExitCode {
    let timeout = Duration::from_millis(timeout_ms);
    let mut c = match client::connect_as(addr, wire.transport(), wire.protocol(), timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fae: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client::call(&mut c, method, args) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e @ client::CallFailure::Usage(_)) => {
            eprintln!("fae: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
