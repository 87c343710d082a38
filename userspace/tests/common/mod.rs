//! Shared harness for faed integration tests: start the real `faed` binary on free loopback ports, talk raw
//! Thrift (TBinaryProtocol, buffered or framed) to it, and stop it on drop — even when a test panics.
//!
//! Requests are built with the crate's own `fae::wire::Encoder`; replies are decoded by the small, independent
//! decoder below (not by the server's own parser), so a bug in the server's wire layer cannot hide itself.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use fae::wire::{mtype, ttype, Encoder, Transport};

/// Path of the daemon under test, built by cargo for this test crate.
pub const FAED: &str = env!("CARGO_BIN_EXE_faed");
/// Bound on faed becoming ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on faed exiting after SIGTERM (on drop), before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default read/write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest value the reply decoder accepts (protects the test process itself).
const MAX_DECODE: usize = 64 << 20;

/// `TApplicationException` types.
pub const UNKNOWN_METHOD: i32 = 1;
pub const INTERNAL_ERROR: i32 = 6;
pub const PROTOCOL_ERROR: i32 = 7;

// ---- ports and temp dirs ----------------------------------------------------------------------------------

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A loopback port that was free a moment ago and that no other test of this process was given (faed binds
/// with SO_REUSEPORT, so two faeds on one port would silently share it).
pub fn free_port() -> u16 {
    let mut used = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let used = used.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if used.insert(port) {
            return port;
        }
    }
    panic!("no fresh free port in 100 tries");
}

pub fn unique_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "fae-it-{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        nanos
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A fresh temp directory, removed (with everything in it) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        TempDir(unique_dir())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raises this process's soft RLIMIT_NOFILE to at least `want` (up to the hard limit); children inherit it.
/// Returns the soft limit in force afterwards.
pub fn raise_nofile(want: libc::rlim_t) -> libc::rlim_t {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 0;
    }
    let mut cur = rl.rlim_cur;
    if cur < want {
        let new = libc::rlimit {
            rlim_cur: want.min(rl.rlim_max),
            rlim_max: rl.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct passed by pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            cur = new.rlim_cur;
        }
    }
    cur
}

// ---- the daemon -------------------------------------------------------------------------------------------

/// A running faed. Dropping it stops it: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`], then reaps it.
pub struct Faed {
    child: Child,
    /// The address faed listens on (loopback unless it runs in a network namespace).
    pub ip: std::net::Ipv4Addr,
    pub port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
    log: PathBuf,
    /// Whether `dir` belongs to this Faed (removed on drop) or to the caller ([`Faed::spawn`]).
    owns_dir: bool,
}

/// A faed on ports and in a directory chosen by the caller, so that it can be stopped and started again on the
/// same ports with the same data (cluster tests). See [`Faed::spawn`].
#[derive(Clone, Debug)]
pub struct FaedSpec {
    pub port: u16,
    pub admin_port: u16,
    /// Where faed.toml and faed.log are written (the log is appended to across restarts). Owned by the caller:
    /// never removed by [`Faed`].
    pub dir: PathBuf,
    /// TOML lines added to the `[server]` table.
    pub server_keys: String,
    /// TOML lines added to the `[admin]` table.
    pub admin_keys: String,
    /// Whole TOML tables appended to the configuration.
    pub sections: String,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// `--log-level` (an EnvFilter string).
    pub log_level: String,
    /// The address of the RPC and admin listeners (127.0.0.1 unless in a network namespace; anything else
    /// needs an admin token in `admin_keys`).
    pub ip: std::net::Ipv4Addr,
    /// Run faed in this network namespace (`ip netns exec`, which execs it: the pid is faed's).
    pub netns: Option<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl FaedSpec {
    /// Fresh free ports, `dir` for the config and the log (created if missing), log level warn.
    pub fn new(dir: impl Into<PathBuf>) -> FaedSpec {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).expect("create faed dir");
        FaedSpec {
            port: free_port(),
            admin_port: free_port(),
            dir,
            server_keys: String::new(),
            admin_keys: String::new(),
            sections: String::new(),
            args: Vec::new(),
            log_level: "warn".into(),
            ip: std::net::Ipv4Addr::LOCALHOST,
            netns: None,
            env: Vec::new(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }
}

/// The config faed gets: `server_keys` and `admin_keys` added to their tables, `sections` appended.
pub fn config_text(
    port: u16,
    admin_port: u16,
    server_keys: &str,
    admin_keys: &str,
    sections: &str,
) -> String {
    config_text_on(
        std::net::Ipv4Addr::LOCALHOST,
        port,
        admin_port,
        server_keys,
        admin_keys,
        sections,
    )
}

/// As [`config_text`], the listeners on `ip`.
pub fn config_text_on(
    ip: std::net::Ipv4Addr,
    port: u16,
    admin_port: u16,
    server_keys: &str,
    admin_keys: &str,
    sections: &str,
) -> String {
    format!(
        "[server]\nlisten = \"{ip}:{port}\"\n{server_keys}\n\n[admin]\nlisten = \"{ip}:{admin_port}\"\n{admin_keys}\n\n[log]\nlevel = \"warn\"\n\n{sections}\n"
    )
}

impl Faed {
    /// faed with `server_keys` (TOML lines) added to its `[server]` table.
    pub fn start(server_keys: &str) -> Faed {
        Self::start_with(server_keys, "")
    }

    /// faed with `server_keys` added to `[server]` and `sections` (whole TOML tables) appended.
    pub fn start_with(server_keys: &str, sections: &str) -> Faed {
        Self::start_admin(server_keys, "", sections)
    }

    /// faed with `admin_keys` added to `[admin]` too (a token, limits of the admin port).
    pub fn start_admin(server_keys: &str, admin_keys: &str, sections: &str) -> Faed {
        let mut last_log = String::new();
        for _attempt in 0..3 {
            match Self::try_start(server_keys, admin_keys, sections) {
                Ok(f) => return f,
                // A port taken between probing and binding: try other ports.
                Err(log) if log.contains("cannot listen") || log.contains("in use") => {
                    last_log = log
                }
                Err(log) => panic!("faed did not start:\n{log}"),
            }
        }
        panic!("faed did not start after 3 tries:\n{last_log}");
    }

    fn try_start(server_keys: &str, admin_keys: &str, sections: &str) -> Result<Faed, String> {
        let port = free_port();
        let admin_port = free_port();
        let dir = unique_dir();
        let config = dir.join("faed.toml");
        let text = config_text(port, admin_port, server_keys, admin_keys, sections);
        std::fs::write(&config, text).expect("write config");
        let log = dir.join("faed.log");
        let child = Command::new(FAED)
            .arg("-c")
            .arg(&config)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create log"))
            .spawn()
            .expect("spawn faed");
        let mut f = Faed {
            child,
            ip: std::net::Ipv4Addr::LOCALHOST,
            port,
            admin_port,
            dir,
            log,
            owns_dir: true,
        };
        f.wait_ready(START_TIMEOUT)?;
        Ok(f)
    }

    /// Starts faed as `spec` says and returns at once, without waiting for it to be ready (see
    /// [`Faed::wait_ready`]): several cluster nodes can then start side by side. Writes `spec.dir/faed.toml`
    /// and appends faed's stderr to `spec.dir/faed.log`. Dropping the Faed stops it but leaves `spec.dir`.
    pub fn spawn(spec: &FaedSpec) -> Faed {
        std::fs::create_dir_all(&spec.dir).expect("create faed dir");
        let config = spec.dir.join("faed.toml");
        let text = config_text_on(
            spec.ip,
            spec.port,
            spec.admin_port,
            &spec.server_keys,
            &spec.admin_keys,
            &spec.sections,
        );
        std::fs::write(&config, text).expect("write config");
        Self::spawn_config(spec, &config)
    }

    /// As [`Faed::spawn`], with the config file the caller wrote at `config` (the ports of `spec` in it).
    pub fn spawn_config(spec: &FaedSpec, config: &Path) -> Faed {
        let log = spec.dir.join("faed.log");
        let mut stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log");
        let _ = writeln!(stderr, "==== faed {} ====", spec.args.join(" "));
        let mut cmd = match &spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, FAED]);
                c
            }
            None => Command::new(FAED),
        };
        let child = cmd
            .arg("-c")
            .arg(config)
            .args(["--log-level", &spec.log_level])
            .args(&spec.args)
            .envs(spec.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn faed");
        Faed {
            child,
            ip: spec.ip,
            port: spec.port,
            admin_port: spec.admin_port,
            dir: spec.dir.clone(),
            log,
            owns_dir: false,
        }
    }

    /// Waits up to `within` until both the RPC and the admin port accept connections (and faed is still
    /// running); `Err` with faed's log if it exits or does not get there in time.
    pub fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let (ip, port, admin_port) = (self.ip, self.port, self.admin_port);
        let deadline = Instant::now() + within;
        let mut ready = [false, false];
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "faed exited during startup ({status}):\n{}",
                    self.log()
                ));
            }
            for (i, p) in [port, admin_port].into_iter().enumerate() {
                if !ready[i] {
                    let addr = SocketAddr::from((ip, p));
                    ready[i] =
                        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
                }
            }
            if ready == [true, true] {
                // Still alive after both ports answered: it is ours.
                std::thread::sleep(Duration::from_millis(20));
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(format!(
                        "faed exited during startup ({status}):\n{}",
                        self.log()
                    ));
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "faed did not accept on {ip}:{port} within {within:?}:\n{}",
            self.log()
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    /// faed's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` to faed, unless it has already been reaped.
    pub fn signal(&mut self, sig: libc::c_int) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own unreaped child's pid; the pid cannot have been reused.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }

    /// Waits up to `within` for faed to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// faed's resident set size in KiB (VmRSS of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// A new connection to faed with [`IO_TIMEOUT`] on reads and writes.
    pub fn connect(&self, transport: Transport) -> Conn {
        Conn::open(self.addr(), transport)
    }

    /// A `ping` on a new connection must be answered with "ver:..." (buffered and framed both).
    pub fn assert_alive(&self) {
        assert_ping(self.addr(), Transport::Buffered);
        assert_ping(self.addr(), Transport::Framed);
    }
}

impl Drop for Faed {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            // A faed stopped with SIGSTOP acts on the SIGTERM only once continued.
            self.signal(libc::SIGCONT);
            if self.wait_exit(STOP_TIMEOUT).is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = log
                .chars()
                .rev()
                .take(4000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!(
                "---- faed 127.0.0.1:{} stderr (tail) ----\n{tail}\n---- end ----",
                self.port
            );
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// VmRSS of process `pid` in KiB; 0 when it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---- requests ---------------------------------------------------------------------------------------------

/// A whole binary-protocol message: header, the fields written by `body`, and the struct's STOP.
pub fn message(name: &str, kind: u8, seqid: i32, body: impl FnOnce(&mut Encoder<'_>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out);
    e.message_begin(name.as_bytes(), kind, seqid);
    body(&mut e);
    e.stop();
    out
}

/// A CALL message.
pub fn call(name: &str, seqid: i32, body: impl FnOnce(&mut Encoder<'_>)) -> Vec<u8> {
    message(name, mtype::CALL, seqid, body)
}

/// Argument 1: a valid Context {1: rid = 1, 2: reason = "t", 3: uid = 0}.
pub fn ctx_arg(e: &mut Encoder<'_>) {
    e.field_begin(ttype::STRUCT, 1);
    e.field_i64(1, 1);
    e.field_bytes(2, b"t");
    e.field_i64(3, 0);
    e.stop();
}

pub fn ping_call(seqid: i32) -> Vec<u8> {
    call("ping", seqid, ctx_arg)
}

pub fn noop_call(seqid: i32, x: i32) -> Vec<u8> {
    call("noop", seqid, |e| e.field_i32(1, x))
}

pub fn lc_set_call(seqid: i32, key: &[u8], value: &[u8]) -> Vec<u8> {
    call("lc_set", seqid, |e| {
        ctx_arg(e);
        e.field_bytes(2, key);
        e.field_bytes(3, value);
    })
}

pub fn lc_get_call(seqid: i32, key: &[u8]) -> Vec<u8> {
    call("lc_get", seqid, |e| {
        ctx_arg(e);
        e.field_bytes(2, key);
    })
}

/// `msg` with a framed transport's 4-byte big-endian length in front.
pub fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

/// `msg` as sent on `transport`.
pub fn on(transport: Transport, msg: &[u8]) -> Vec<u8> {
    match transport {
        Transport::Buffered => msg.to_vec(),
        Transport::Framed => framed(msg),
        Transport::Header(kind) => {
            let mut out = Vec::new();
            let info: &[(&[u8], &[u8])] = &[(b"caller", b"fae-tests")];
            fae::wire::header::request(&mut out, kind, 1, fae::wire::Protocol::Binary, info, msg);
            out
        }
    }
}

// ---- replies: an independent decoder ----------------------------------------------------------------------

/// A decoded Thrift value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Bool(bool),
    Byte(i8),
    I16(i16),
    I32(i32),
    I64(i64),
    Double(f64),
    Bin(Vec<u8>),
    Struct(Vec<(i16, Val)>),
    List(u8, Vec<Val>),
    Map(u8, u8, Vec<(Val, Val)>),
}

impl Val {
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Val::Bin(b) => Some(b),
            _ => None,
        }
    }
    pub fn i32(&self) -> Option<i32> {
        match self {
            Val::I32(v) => Some(*v),
            _ => None,
        }
    }
    /// Field `id` of a struct.
    pub fn field(&self, id: i16) -> Option<&Val> {
        match self {
            Val::Struct(f) => f.iter().find(|(i, _)| *i == id).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub name: String,
    pub mtype: u8,
    pub seqid: i32,
    pub fields: Vec<(i16, Val)>,
}

impl Msg {
    pub fn field(&self, id: i16) -> Option<&Val> {
        self.fields.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    /// `(message, type)` when this is a well-formed TApplicationException.
    pub fn app_error(&self) -> Option<(String, i32)> {
        if self.mtype != mtype::EXCEPTION {
            return None;
        }
        let msg = match self.field(1)? {
            Val::Bin(b) => String::from_utf8_lossy(b).into_owned(),
            _ => return None,
        };
        let kind = match self.field(2)? {
            Val::I32(k) => *k,
            _ => return None,
        };
        Some((msg, kind))
    }

    /// The success value (result field 0) of a REPLY to `name` with `seqid`; panics on anything else.
    pub fn success(&self, name: &str, seqid: i32) -> &Val {
        assert_eq!(
            (self.mtype, self.name.as_str(), self.seqid),
            (mtype::REPLY, name, seqid),
            "expected a REPLY to {name} #{seqid}, got {self:?}"
        );
        self.field(0)
            .unwrap_or_else(|| panic!("reply to {name} #{seqid} has no success field: {self:?}"))
    }
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn rd<const N: usize>(r: &mut dyn Read) -> io::Result<[u8; N]> {
    let mut a = [0u8; N];
    r.read_exact(&mut a)?;
    Ok(a)
}

fn rd_i32(r: &mut dyn Read) -> io::Result<i32> {
    Ok(i32::from_be_bytes(rd(r)?))
}

fn rd_bin(r: &mut dyn Read) -> io::Result<Vec<u8>> {
    let n = rd_i32(r)?;
    if n < 0 || n as usize > MAX_DECODE {
        return Err(bad(format!("string length {n}")));
    }
    let mut v = vec![0u8; n as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn rd_count(r: &mut dyn Read) -> io::Result<usize> {
    let n = rd_i32(r)?;
    if n < 0 || n as usize > MAX_DECODE {
        return Err(bad(format!("container size {n}")));
    }
    Ok(n as usize)
}

fn rd_val(r: &mut dyn Read, t: u8, depth: usize) -> io::Result<Val> {
    if depth > 32 {
        return Err(bad("reply nested too deep"));
    }
    Ok(match t {
        ttype::BOOL => Val::Bool(rd::<1>(r)?[0] != 0),
        ttype::BYTE => Val::Byte(rd::<1>(r)?[0] as i8),
        ttype::I16 => Val::I16(i16::from_be_bytes(rd(r)?)),
        ttype::I32 => Val::I32(rd_i32(r)?),
        ttype::I64 => Val::I64(i64::from_be_bytes(rd(r)?)),
        ttype::DOUBLE => Val::Double(f64::from_bits(u64::from_be_bytes(rd(r)?))),
        ttype::STRING => Val::Bin(rd_bin(r)?),
        ttype::STRUCT => Val::Struct(rd_struct(r, depth + 1)?),
        ttype::LIST | ttype::SET => {
            let elem = rd::<1>(r)?[0];
            let n = rd_count(r)?;
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                v.push(rd_val(r, elem, depth + 1)?);
            }
            Val::List(elem, v)
        }
        ttype::MAP => {
            let [k, v] = rd::<2>(r)?;
            let n = rd_count(r)?;
            let mut m = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let key = rd_val(r, k, depth + 1)?;
                m.push((key, rd_val(r, v, depth + 1)?));
            }
            Val::Map(k, v, m)
        }
        other => return Err(bad(format!("unknown type {other}"))),
    })
}

fn rd_struct(r: &mut dyn Read, depth: usize) -> io::Result<Vec<(i16, Val)>> {
    let mut fields = Vec::new();
    loop {
        let t = rd::<1>(r)?[0];
        if t == ttype::STOP {
            return Ok(fields);
        }
        let id = i16::from_be_bytes(rd(r)?);
        fields.push((id, rd_val(r, t, depth)?));
    }
}

fn rd_message(r: &mut dyn Read) -> io::Result<Msg> {
    let word = rd_i32(r)? as u32;
    if word & 0xffff_0000 != 0x8001_0000 {
        return Err(bad(format!("reply version word {word:#010x}")));
    }
    let name = String::from_utf8_lossy(&rd_bin(r)?).into_owned();
    let seqid = rd_i32(r)?;
    let fields = rd_struct(r, 0)?;
    Ok(Msg {
        name,
        mtype: (word & 0xff) as u8,
        seqid,
        fields,
    })
}

/// Reads one message sent on `transport`.
pub fn read_message(r: &mut dyn Read, transport: Transport) -> io::Result<Msg> {
    match transport {
        Transport::Buffered => rd_message(r),
        Transport::Framed => {
            let len = rd_i32(r)?;
            if len <= 0 || len as usize > MAX_DECODE {
                return Err(bad(format!("reply frame length {len}")));
            }
            let mut body = vec![0u8; len as usize];
            r.read_exact(&mut body)?;
            let mut cur = io::Cursor::new(&body[..]);
            let m = rd_message(&mut cur)?;
            if cur.position() as usize != body.len() {
                return Err(bad(format!(
                    "reply frame of {} bytes holds a message of {}",
                    body.len(),
                    cur.position()
                )));
            }
            Ok(m)
        }
        Transport::Header(kind) => {
            let len = rd_i32(r)?;
            if len <= 0 || len as usize > MAX_DECODE {
                return Err(bad(format!("reply frame length {len}")));
            }
            let mut frame = (len as u32).to_be_bytes().to_vec();
            frame.resize(4 + len as usize, 0);
            r.read_exact(&mut frame[4..])?;
            // The header's fields, read here rather than by fae's parser: magic, header size, protocol 0.
            if frame[4..6] != kind.magic() {
                return Err(bad(format!("reply magic {:02x?}", &frame[4..6])));
            }
            let words = u16::from_be_bytes([frame[12], frame[13]]) as usize;
            let payload = frame
                .get(14 + 4 * words..)
                .ok_or_else(|| bad("reply header size past its frame".to_string()))?;
            if frame.get(14) != Some(&0) {
                return Err(bad("reply header's protocol is not binary".to_string()));
            }
            let mut cur = io::Cursor::new(payload);
            rd_message(&mut cur)
        }
    }
}

// ---- connections ------------------------------------------------------------------------------------------

/// Whether an I/O error means the peer closed or reset the connection.
pub fn is_closed_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// Whether an I/O error is a socket timeout.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One client connection: a buffered reader and a writer over the same socket.
pub struct Conn {
    pub r: BufReader<TcpStream>,
    pub w: TcpStream,
    pub transport: Transport,
}

impl Conn {
    pub fn open(addr: SocketAddr, transport: Transport) -> Conn {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Self::from_stream(s, transport)
    }

    pub fn from_stream(s: TcpStream, transport: Transport) -> Conn {
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        s.set_nodelay(true).expect("nodelay");
        let w = s.try_clone().expect("clone socket");
        Conn {
            r: BufReader::with_capacity(64 << 10, s),
            w,
            transport,
        }
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.w.set_read_timeout(Some(t)).expect("read timeout");
    }

    /// Writes raw bytes (no framing added).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("write to faed");
    }

    /// Writes raw bytes, tolerating the server closing the connection part way (it may refuse a message
    /// before it has all arrived). Returns whether everything was written.
    pub fn send_lossy(&mut self, bytes: &[u8]) -> bool {
        match self.w.write_all(bytes) {
            Ok(()) => true,
            Err(e) if is_closed_error(&e) => false,
            Err(e) => panic!("write to faed: {e}"),
        }
    }

    /// Sends one message, framed if this connection is framed.
    pub fn send(&mut self, msg: &[u8]) {
        let bytes = on(self.transport, msg);
        self.send_raw(&bytes);
    }

    /// Reads one message.
    pub fn recv(&mut self) -> io::Result<Msg> {
        read_message(&mut self.r, self.transport)
    }

    /// Sends one message and reads one.
    pub fn call(&mut self, msg: &[u8]) -> Msg {
        self.send(msg);
        self.recv().expect("read reply")
    }

    /// Reads one message that must be a TApplicationException of `kind`; returns its message text.
    pub fn expect_app_error(&mut self, kind: i32) -> Msg {
        let m = self.recv().expect("read the application error");
        let (text, got) = m
            .app_error()
            .unwrap_or_else(|| panic!("expected a TApplicationException, got {m:?}"));
        assert_eq!(got, kind, "TApplicationException type (message {text:?})");
        assert!(
            !text.is_empty(),
            "TApplicationException with an empty message"
        );
        m
    }

    /// The server must close this connection within `within`, sending nothing more.
    pub fn expect_closed(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the server did not close the connection within {within:?}"
            );
            self.set_read_timeout(left);
            match self.r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => panic!(
                    "{n} unexpected bytes before close: {:02x?}",
                    &buf[..n.min(64)]
                ),
                Err(e) if is_closed_error(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    panic!("the server did not close the connection within {within:?}")
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Nothing must arrive for `quiet` (and the connection must stay open).
    pub fn expect_silence(&mut self, quiet: Duration) {
        self.set_read_timeout(quiet);
        let mut b = [0u8; 1];
        match self.r.read(&mut b) {
            Err(e) if is_timeout(&e) => {}
            Ok(0) => panic!("connection closed where silence was expected"),
            Ok(_) => panic!("data arrived where silence was expected"),
            Err(e) => panic!("read: {e} where silence was expected"),
        }
        self.set_read_timeout(IO_TIMEOUT);
    }

    pub fn shutdown_write(&self) {
        let _ = self.w.shutdown(Shutdown::Write);
    }
}

/// Pings on a new connection and asserts the answer is "ver:..."; returns the answer.
pub fn assert_ping(addr: SocketAddr, transport: Transport) -> String {
    let mut c = Conn::open(addr, transport);
    let m = c.call(&ping_call(4242));
    match m.success("ping", 4242) {
        Val::Bin(b) => {
            let s = String::from_utf8_lossy(b).into_owned();
            assert!(s.starts_with("ver:"), "ping answered {s:?}");
            s
        }
        other => panic!("ping returned {other:?}"),
    }
}

/// How long a ping on a new connection takes (it must succeed within [`IO_TIMEOUT`]).
pub fn timed_ping(addr: SocketAddr) -> Duration {
    let t = Instant::now();
    assert_ping(addr, Transport::Buffered);
    t.elapsed()
}

/// How long a ping on a new connection takes, waiting up to `limit` for the answer.
pub fn timed_ping_within(addr: SocketAddr, limit: Duration) -> Duration {
    let t = Instant::now();
    let mut c = Conn::open(addr, Transport::Buffered);
    c.set_read_timeout(limit);
    c.send(&ping_call(4243));
    let m = c
        .recv()
        .unwrap_or_else(|e| panic!("no ping answer within {limit:?}: {e}"));
    m.success("ping", 4243);
    t.elapsed()
}
pub mod stores;

/// The body of `GET path` on faed's admin port.
pub fn admin_get(port: u16, path: &str) -> String {
    http(port, "GET", path, &[], "").1
}

// ---- admin HTTP -------------------------------------------------------------------------------------------

/// One request to the admin port: (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin port");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    parse_response(&out)
}

pub fn parse_response(out: &str) -> (u16, String) {
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}
