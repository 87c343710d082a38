//! Real data stores for the back-end tests: memcached and redis-server from Debian's packages, each started
//! on a free loopback port as a process of its own, stopped by PID on drop (also when a test panics).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, TempDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memcached,
    Redis,
}

/// A MariaDB server with the tests' schema (tests/mysql/schema.sql), started and stopped by
/// tests/mysql/mariadb in a directory of its own.
pub struct Mariadb {
    pub port: u16,
    dir: TempDir,
    pid: u32,
}

const MARIADB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/mysql/mariadb");

impl Mariadb {
    pub fn start() -> Mariadb {
        let mut m = Mariadb {
            port: free_port(),
            dir: TempDir::new(),
            pid: 0,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let out = Command::new(MARIADB)
            .arg("start")
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .output()
            .expect("run tests/mysql/mariadb");
        assert!(
            out.status.success(),
            "MariaDB did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.pid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("mariadbd's pid");
    }

    /// faed's `[mysql]` tables for this server (pools global, lookup, user1..user4).
    pub fn config(&self) -> String {
        let out = Command::new(MARIADB)
            .arg("config")
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .output()
            .expect("run tests/mysql/mariadb config");
        String::from_utf8(out.stdout).expect("utf-8 config")
    }

    /// Runs SQL as root with the `mariadb` client.
    pub fn sql(&self, statement: &str) -> String {
        let out = Command::new("mariadb")
            .args([
                "--no-defaults",
                "--protocol=tcp",
                "-h127.0.0.1",
                "-uroot",
                "-N",
                "-B",
            ])
            .arg(format!("-P{}", self.port))
            .arg("-e")
            .arg(statement)
            .output()
            .expect("run mariadb");
        assert!(
            out.status.success(),
            "{statement}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill sends a signal to the MariaDB this test started.
        unsafe { libc::kill(self.pid as libc::pid_t, sig) };
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        for _ in 0..100 {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(self.pid as libc::pid_t, 0) } != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = Command::new(MARIADB)
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

pub struct Store {
    pub kind: Kind,
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl Store {
    pub fn memcached() -> Store {
        Self::start(Kind::Memcached, free_port())
    }

    pub fn redis() -> Store {
        Self::start(Kind::Redis, free_port())
    }

    fn start(kind: Kind, port: u16) -> Store {
        let mut s = Store {
            kind,
            port,
            child: None,
            dir: TempDir::new(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Memcached => {
                let mut c = Command::new("memcached");
                c.args([
                    "-l",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "0",
                    "-u",
                    "root",
                    "-m",
                    "64",
                    "-t",
                    "1",
                ]);
                c
            }
            Kind::Redis => {
                let mut c = Command::new("redis-server");
                c.args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--daemonize", "no", "--logfile", ""])
                .arg("--dir")
                .arg(self.dir.path());
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?} (scripts/setup installs it): {e}",
                    self.kind
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let probe = match self.kind {
                Kind::Memcached => self.ask(b"version\r\n", b"\r\n"),
                Kind::Redis => self.ask(b"PING\r\n", b"\r\n"),
            };
            if probe.is_ok_and(|r| r.starts_with("VERSION") || r.starts_with("+PONG")) {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{:?} on port {} exited at start: {st}",
                    self.kind, self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "{:?} on port {} not ready in 10 s",
                self.kind,
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends `request` on a new connection and reads until the reply ends with `end`.
    pub fn ask(&self, request: &[u8], end: &[u8]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while !got.ends_with(end) {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    }

    /// Connections the store has from clients other than this one probe: memcached's `curr_connections`
    /// (which counts the probe and its listener), Redis's `CLIENT LIST` lines (which count the probe).
    pub fn client_connections(&self) -> usize {
        match self.kind {
            Kind::Memcached => {
                let stats = self.ask(b"stats\r\n", b"END\r\n").expect("memcached stats");
                let n: usize = stats
                    .lines()
                    .find_map(|l| l.strip_prefix("STAT curr_connections "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("curr_connections");
                // memcached 1.6 counts this probe too.
                n.saturating_sub(1)
            }
            Kind::Redis => {
                let list = self.redis_bulk(b"CLIENT LIST\r\n").expect("CLIENT LIST");
                // One line per client; this probe is one of them.
                list.lines()
                    .filter(|l| l.starts_with("id="))
                    .count()
                    .saturating_sub(1)
            }
        }
    }

    /// A Redis command whose reply is a bulk string: the string.
    pub fn redis_bulk(&self, request: &[u8]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            if let Some(i) = got.windows(2).position(|w| w == b"\r\n") {
                let head = String::from_utf8_lossy(&got[..i]).into_owned();
                let len: usize = head
                    .strip_prefix('$')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| std::io::Error::other(format!("not a bulk string: {head}")))?;
                if got.len() >= i + 2 + len + 2 {
                    return Ok(String::from_utf8_lossy(&got[i + 2..i + 2 + len]).into_owned());
                }
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::other("closed before the reply ended"));
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill sends a signal to our own child.
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    /// SIGKILL and reap: the store is gone until [`Store::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the store again on the same port (empty).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SAFETY: continue our own child in case a test left it stopped, so that it can die.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.kill();
    }
}
