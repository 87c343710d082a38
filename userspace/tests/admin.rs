//! The admin port and the operations built on it, against a real faed: the token and Origin checks on every
//! action, the protected-mode refusal, a bounded HTTP server (trickling clients, size limits), degrade and
//! restore, flow control (rate per client IP, calls in flight per method), drain, and hot reload (SIGHUP, the
//! file watcher, a refused restart key, an invalid file, back-end pools changed under load).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::stores::Store;
use common::*;
use fae::client::fun_rpc::TMemcacheData;
use fae::client::{self, TFunServantSyncClient};

const TOKEN: &str = "admin-test-token-0123456789";
const FAE: &str = env!("CARGO_BIN_EXE_fae");

fn token_keys() -> String {
    format!("token = \"{TOKEN}\"\n")
}

fn ctx() -> fae::client::Context {
    fae::client::Context::new(7, "admin-test".into(), 1, None)
}

/// An action with the token.
fn act(port: u16, path: &str, body: &str) -> (u16, String) {
    let auth = format!("Bearer {TOKEN}");
    http(port, "POST", path, &[("Authorization", &auth)], body)
}

fn json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = http(port, "GET", path, &[], "");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn generation(port: u16) -> u64 {
    json(port, "/api/config")["generation"].as_u64().unwrap()
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {within:?}");
}

fn app_error_message(r: thrift::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(thrift::Error::Application(e)) => e.message,
        other => panic!("expected an application error, got {other:?}"),
    }
}

const ACTIONS: [&str; 7] = [
    "/api/degrade",
    "/api/restore",
    "/api/limits",
    "/api/drain",
    "/api/cluster/leave",
    "/api/reload",
    "/api/rebalance",
];

/// Every action is POST only, needs the token and refuses a foreign Origin; reads need nothing; the token
/// never shows in /api/config.
#[test]
fn actions_need_the_token_and_refuse_a_foreign_origin() {
    let f = Faed::start_admin("", &token_keys(), "");
    let p = f.admin_port;
    let (status, page) = http(p, "GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(
        page.contains("uPlot") && page.contains("vbuckets"),
        "{page}"
    );
    let (status, js) = http(p, "GET", "/assets/uPlot.iife.min.js", &[], "");
    assert!(status == 200 && js.len() > 10_000, "{status}");
    let good = format!("Bearer {TOKEN}");
    for path in ACTIONS {
        let (s, body) = http(p, "POST", path, &[], "{}");
        assert_eq!(s, 401, "{path} without a token: {body}");
        let (s, _) = http(
            p,
            "POST",
            path,
            &[("Authorization", "Bearer wrong-token-0123456789")],
            "{}",
        );
        assert_eq!(s, 401, "{path} with a wrong token");
        let (s, _) = http(p, "POST", path, &[("Authorization", TOKEN)], "{}");
        assert_eq!(s, 401, "{path} with the token but not as a bearer");
        let (s, body) = http(
            p,
            "POST",
            path,
            &[("Authorization", &good), ("Origin", "http://evil.example")],
            "{}",
        );
        assert_eq!(s, 403, "{path} from a foreign origin: {body}");
        let (s, _) = http(p, "GET", path, &[("Authorization", &good)], "");
        assert_eq!(s, 405, "GET {path}");
    }
    f.assert_alive();
    // The token and the same origin (the dashboard's own page): done.
    let origin = format!("http://127.0.0.1:{p}");
    let (s, body) = http(
        p,
        "POST",
        "/api/degrade",
        &[("Authorization", &good), ("Origin", &origin)],
        r#"{"method": "lc_get"}"#,
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        json(p, "/api/filters")["degraded"],
        serde_json::json!(["lc_get"])
    );
    let (s, body) = act(p, "/api/limits", r#"{"nope": 1}"#);
    assert!(s == 400 && body.contains("nope"), "{s} {body}");
    let (s, body) = act(p, "/api/limits", r#"{"client_calls_per_sec": "many"}"#);
    assert_eq!(s, 400, "{body}");
    let (s, body) = act(p, "/api/limits", r#"{"client_calls_per_sec": 100000}"#);
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        json(p, "/api/filters")["limits"]["client_calls_per_sec"],
        100000
    );
    let (s, body) = act(p, "/api/rebalance", "");
    assert_eq!(s, 404, "not in a cluster: {body}");
    let (s, body) = act(p, "/api/reload", "");
    assert_eq!(s, 200, "{body}");
    // Reads: the config without its secret, with its generation.
    let cfg = http(p, "GET", "/api/config", &[], "").1;
    assert!(!cfg.contains(TOKEN), "the token leaked: {cfg}");
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert!(v["generation"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(v["config"]["admin"]["token"], "(redacted)", "{v}");
    let stats = json(p, "/api/stats");
    assert!(stats["rejected"].is_object(), "{stats}");
    let hist = json(p, "/api/history?since=0");
    assert!(hist["points"].is_array(), "{hist}");
    assert!(!f.log().contains(TOKEN), "the token reached the log");
}

/// Without a token, actions are off, whoever asks.
#[test]
fn without_a_token_every_action_is_refused() {
    let f = Faed::start("");
    for path in ACTIONS {
        let (s, body) = http(
            f.admin_port,
            "POST",
            path,
            &[("Authorization", "Bearer anything-at-all-0123")],
            "{}",
        );
        assert_eq!(s, 401, "{path}: {body}");
        assert!(body.contains("admin.token"), "{body}");
    }
    f.assert_alive();
}

/// `faed --check-config` on a file holding `text`: its exit code and what it printed on stderr.
fn check_config(dir: &std::path::Path, text: &str) -> (Option<i32>, String) {
    let path = dir.join("faed.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(FAED)
        .arg("--check-config")
        .arg(&path)
        .output()
        .expect("run faed --check-config");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The same for the cluster port: on a public address it needs `cluster.secret_file`, one that can be read
/// and holds at least 16 bytes.
#[test]
fn a_public_cluster_port_without_a_secret_is_refused() {
    let dir = TempDir::new();
    let check = |cluster: &str| {
        check_config(
            dir.path(),
            &format!("[cluster]\nenabled = true\nbootstrap = true\n{cluster}\n"),
        )
    };
    let (code, err) = check("listen = \"0.0.0.0:9201\"");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cluster.secret_file"), "{err}");
    let (code, err) = check("listen = \"127.0.0.1:9201\"");
    assert_eq!(code, Some(0), "{err}");
    let short = dir.path().join("short.secret");
    std::fs::write(&short, "too short\n").unwrap();
    let good = dir.path().join("good.secret");
    std::fs::write(&good, "a secret of at least sixteen bytes\n").unwrap();
    for (file, want) in [
        (dir.path().join("missing.secret"), Some(2)),
        (short, Some(2)),
        (good, Some(0)),
    ] {
        let (code, err) = check(&format!(
            "listen = \"0.0.0.0:9201\"\nsecret_file = \"{}\"",
            file.display()
        ));
        assert_eq!(code, want, "{}: {err}", file.display());
    }
}

/// Like Redis's protected mode: an admin port on a public address needs a token, and a token file that
/// cannot be read stops faed before it starts.
#[test]
fn a_public_admin_port_without_a_token_is_refused() {
    let dir = TempDir::new();
    let check = |admin: &str| {
        check_config(
            dir.path(),
            &format!(
                "[server]\nlisten = \"127.0.0.1:{}\"\n\n[admin]\n{admin}\n",
                free_port()
            ),
        )
    };
    let (code, err) = check("listen = \"0.0.0.0:9101\"");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("admin.listen") && err.contains("token"),
        "{err}"
    );
    let (code, err) = check("listen = \"[::]:9101\"\ntoken = \"\"");
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = check("listen = \"0.0.0.0:9101\"\ntoken = \"short\"");
    assert_eq!(code, Some(2), "{err}");
    let missing = dir.path().join("no-such-token");
    let (code, err) = check(&format!(
        "listen = \"0.0.0.0:9101\"\ntoken_file = \"{}\"",
        missing.display()
    ));
    assert_eq!(code, Some(2), "{err}");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (code, err) = check(&format!(
        "listen = \"0.0.0.0:9101\"\ntoken_file = \"{}\"",
        token_file.display()
    ));
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = check(&format!("listen = \"0.0.0.0:9101\"\ntoken = \"{TOKEN}\""));
    assert_eq!(code, Some(0), "{err}");
    // And faed itself, not only the check.
    let path = dir.path().join("public.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\n\n[admin]\nlisten = \"0.0.0.0:{}\"\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let out = Command::new(FAED)
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run faed");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// The token from a file works for actions, and is not shown.
#[test]
fn the_token_can_come_from_a_file() {
    let dir = TempDir::new();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let f = Faed::start_admin(
        "",
        &format!("token_file = \"{}\"\n", token_file.display()),
        "",
    );
    let (s, body) = act(f.admin_port, "/api/degrade", r#"{"servant": "idgen"}"#);
    assert_eq!(s, 200, "{body}");
    let cfg = http(f.admin_port, "GET", "/api/config", &[], "").1;
    assert!(!cfg.contains(TOKEN) && cfg.contains("admin.token"), "{cfg}");
}

/// 50 clients sending a byte a second hold only their own connections: /metrics answers meanwhile, and each
/// of them is cut off with a 408 at the request deadline.
#[test]
fn metrics_answer_while_fifty_clients_trickle() {
    let f = Faed::start_admin("", "request_timeout_ms = 2500\n", "");
    let port = f.admin_port;
    let stop = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<_> = (0..50)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || -> String {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(900)))
                    .unwrap();
                let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ";
                let mut got = Vec::new();
                for &b in request.iter().chain(std::iter::repeat(&b'a')).take(12) {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                        break;
                    }
                    // Waits a second for the next byte; reads what the server said meanwhile.
                    let mut buf = [0u8; 1024];
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) if is_timeout(&e) => {}
                        Err(_) => break,
                    }
                }
                String::from_utf8_lossy(&got).into_owned()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let (s, body) = http(port, "GET", "/metrics", &[], "");
        assert_eq!(s, 200);
        assert!(body.contains("# TYPE fae_calls_total counter"), "{body}");
        std::thread::sleep(Duration::from_millis(400));
    }
    let answers: Vec<String> = tricklers.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    for a in &answers {
        assert!(
            a.starts_with("HTTP/1.1 408"),
            "a trickling client got {a:?}"
        );
    }
}

/// Heads, bodies and header counts are bounded; malformed requests get a 400; a full house gets a 503.
#[test]
fn admin_requests_are_bounded() {
    let f = Faed::start_admin(
        "",
        &format!(
            "{}max_connections = 4\nmax_body_bytes = 1024\n",
            token_keys()
        ),
        "",
    );
    let p = f.admin_port;
    let raw = |bytes: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = s.write_all(bytes);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        parse_response(&out)
    };
    let long_path = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(20_000));
    assert_eq!(raw(long_path.as_bytes()).0, 431);
    let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(100));
    assert_eq!(raw(many.as_bytes()).0, 431);
    let big = format!(
        "POST /api/limits HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000000\r\n\r\n"
    );
    let (s, body) = raw(big.as_bytes());
    assert!(
        s == 413 && body.contains("admin.max_body_bytes"),
        "{s} {body}"
    );
    assert_eq!(
        raw(b"POST /api/limits HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").0,
        411
    );
    assert_eq!(raw(b"GET / HTTP/1.1\r\nContent-Length: -3\r\n\r\n").0, 400);
    assert_eq!(raw(b"\x00\x01\x02 garbage\r\n\r\n").0, 400);
    let (s, body) = act(p, "/api/limits", "{not json");
    assert!(s == 400 && body.contains("JSON"), "{s} {body}");
    // Four connections held open: the fifth is told so at once.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
            s.write_all(b"GET").unwrap();
            s
        })
        .collect();
    // Once the four are accepted (bounded wait: the accept thread may lag under load), the fifth is 503.
    eventually(
        "a fifth connection refused with 503",
        Duration::from_secs(10),
        || raw(b"GET /metrics HTTP/1.1\r\n\r\n").0 == 503,
    );
    drop(held);
    eventually(
        "the admin port serves again",
        Duration::from_secs(5),
        || raw(b"GET /metrics HTTP/1.1\r\n\r\n").0 == 200,
    );
    f.assert_alive();
}

/// A degraded method answers at once without its back end (memcached is stopped), others carry on, and
/// restoring it brings it back; a servant can be degraded as a whole; refusals are counted.
#[test]
fn degrade_answers_at_once_without_the_back_end_and_restore_brings_it_back() {
    let m = Store::memcached();
    let pools = format!(
        "[[memcache.pools]]\nname = \"default\"\nservers = [\"{}\"]\n\n[degrade]\nmethods = [\"mc_get\"]\n",
        m.addr()
    );
    let f = Faed::start_admin("", &token_keys(), &pools);
    let p = f.admin_port;
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    let data = TMemcacheData::new(b"v1".to_vec(), 0);
    assert!(c
        .mc_set(ctx(), "default".into(), "dg".into(), data, 0)
        .unwrap());
    m.signal(libc::SIGSTOP);
    for _ in 0..20 {
        let msg = app_error_message(c.mc_get(ctx(), "default".into(), "dg".into()));
        assert!(msg.contains(": degraded: mc_get"), "{msg}");
    }
    m.signal(libc::SIGCONT);
    assert!(c.ping(ctx()).is_ok());
    let (s, body) = act(p, "/api/restore", r#"{"method": "mc_get"}"#);
    assert_eq!(s, 200, "{body}");
    let got = c.mc_get(ctx(), "default".into(), "dg".into()).unwrap();
    assert_eq!(got.data, b"v1");
    // A whole servant.
    let (s, body) = act(p, "/api/degrade", r#"{"servant": "lcache"}"#);
    assert_eq!(s, 200, "{body}");
    let msg = app_error_message(c.lc_get(ctx(), "k".into()));
    assert!(msg.contains(": degraded: lc_get"), "{msg}");
    let msg = app_error_message(c.lc_set(ctx(), "k".into(), b"v".to_vec()));
    assert!(msg.contains(": degraded: lc_set"), "{msg}");
    assert!(c.mc_get(ctx(), "default".into(), "dg".into()).is_ok());
    let (s, _) = act(p, "/api/degrade", r#"{"servant": "nosuch"}"#);
    assert_eq!(s, 400, "an unknown name is refused");
    let (s, _) = act(p, "/api/restore", "{}");
    assert_eq!(s, 200);
    c.lc_set(ctx(), "k".into(), b"v".to_vec()).unwrap();
    let metrics = http(p, "GET", "/metrics", &[], "").1;
    let degraded: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fae_rejected_total{reason=\"degraded\"} "))
        .and_then(|v| v.parse().ok())
        .expect("fae_rejected_total{reason=\"degraded\"}");
    assert_eq!(degraded, 22, "{metrics}");
}

/// `fae bench` far above client_calls_per_sec from 127.0.0.1 gets that rate (within 10%) and fast refusals;
/// a client on 127.0.0.2 meanwhile has every call answered.
#[test]
fn a_client_over_its_rate_gets_the_rate_and_another_ip_is_unaffected() {
    const RATE: u64 = 2000;
    let f = Faed::start_with("", &format!("[limits]\nclient_calls_per_sec = {RATE}\n"));
    let addr = f.addr().to_string();
    let other = {
        let addr = f.addr();
        std::thread::spawn(move || -> (u64, Vec<String>) {
            // 400 calls at ~200/s from another address on loopback.
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into())
                .unwrap();
            sock.connect(&addr.into()).unwrap();
            let mut conn = Conn::from_stream(sock.into(), Transport::Buffered);
            conn.set_read_timeout(IO_TIMEOUT);
            let (mut ok, mut errors) = (0, Vec::new());
            std::thread::sleep(Duration::from_millis(1000));
            for i in 0..400 {
                let reply = conn.call(&ping_call(i));
                match reply.app_error() {
                    None => ok += 1,
                    Some((m, _)) => errors.push(m),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (ok, errors)
        })
    };
    let out = Command::new(FAE)
        .args([
            "bench", &addr, "-c", "8", "-d", "8", "-t", "4", "--warmup", "1", "--json",
        ])
        .output()
        .expect("run fae bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ok = r["ok_per_sec"].as_f64().unwrap();
    let offered = r["calls_per_sec"].as_f64().unwrap();
    assert!(
        (ok - RATE as f64).abs() <= RATE as f64 * 0.1,
        "admitted {ok:.0} calls/s, want {RATE} ± 10%: {r}"
    );
    assert!(
        offered > RATE as f64 * 5.0,
        "the bench was not far above the rate: {r}"
    );
    let (other_ok, other_errors) = other.join().unwrap();
    assert_eq!(
        (other_ok, other_errors.len()),
        (400, 0),
        "127.0.0.2: {other_errors:?}"
    );
    // The refusals say why, and are counted.
    let mut c = f.connect(Transport::Buffered);
    let msg = loop {
        if let Some((m, _)) = c.call(&ping_call(1)).app_error() {
            break m;
        }
    };
    assert!(
        msg.starts_with("ping: rate limited: client 127.0.0.1"),
        "{msg}"
    );
    let metrics = admin_get(f.admin_port, "/metrics");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("fae_rejected_total{reason=\"rate_limited\"} ") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
}

/// At most `method_inflight` calls of a method run at once (memcached is stopped: calls stay in flight);
/// past it calls are refused at once, other methods carry on, and the limit frees as calls end.
#[test]
fn calls_in_flight_per_method_are_bounded() {
    let m = Store::memcached();
    let sections = format!(
        "[[memcache.pools]]\nname = \"default\"\nservers = [\"{}\"]\n\n[limits.method_inflight]\nmc_get = 2\n",
        m.addr()
    );
    let f = Faed::start_with("", &sections);
    m.signal(libc::SIGSTOP);
    let hung: Vec<_> = (0..2)
        .map(|_| {
            let addr = f.addr().to_string();
            std::thread::spawn(move || {
                let mut c =
                    client::connect(&addr, Transport::Framed, Duration::from_secs(10)).unwrap();
                c.mc_get(ctx(), "default".into(), "x".into()).map(|_| ())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    let msg = app_error_message(c.mc_get(ctx(), "default".into(), "y".into()));
    assert!(msg.contains("2 mc_get calls are in flight"), "{msg}");
    assert!(c.ping(ctx()).is_ok());
    m.signal(libc::SIGCONT);
    for h in hung {
        let _ = h.join().unwrap();
    }
    let data = TMemcacheData::new(b"y".to_vec(), 0);
    assert!(c
        .mc_set(ctx(), "default".into(), "y".into(), data, 0)
        .unwrap());
    assert_eq!(
        c.mc_get(ctx(), "default".into(), "y".into()).unwrap().data,
        b"y"
    );
}

/// Drain on a single node: it stops accepting, finishes the call in flight (behind a stopped memcached) and
/// exits 0.
#[test]
fn drain_finishes_in_flight_calls_and_exits_zero() {
    let m = Store::memcached();
    let sections = format!(
        "[[memcache.pools]]\nname = \"default\"\nservers = [\"{}\"]\n",
        m.addr()
    );
    let mut f = Faed::start_admin("", &token_keys(), &sections);
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    let data = TMemcacheData::new(b"kept".to_vec(), 0);
    assert!(c
        .mc_set(ctx(), "default".into(), "dr".into(), data, 0)
        .unwrap());
    m.signal(libc::SIGSTOP);
    let addr = f.addr().to_string();
    let in_flight = std::thread::spawn(move || c.mc_get(ctx(), "default".into(), "dr".into()));
    std::thread::sleep(Duration::from_millis(200));
    let (s, body) = act(f.admin_port, "/api/drain", "");
    assert_eq!(s, 202, "{body}");
    eventually("faed stops accepting", Duration::from_secs(5), || {
        TcpStream::connect(&addr).is_err()
    });
    m.signal(libc::SIGCONT);
    let got = in_flight
        .join()
        .unwrap()
        .expect("the call in flight was answered");
    assert_eq!(got.data, b"kept");
    let status = f.wait_exit(Duration::from_secs(10)).expect("faed exited");
    assert_eq!(status.code(), Some(0), "{}", f.log());
}

/// faed whose config file is a symlink in `link_dir`: the watcher watches the target's directory, so a new
/// target reached by changing the link is seen only on SIGHUP.
fn faed_on_symlink(dir: &Path, text: &str) -> (Faed, FaedSpec) {
    let spec = FaedSpec::new(dir.join("node"));
    let target = dir.join("a.toml");
    std::fs::write(
        &target,
        text.replace("ADMIN", &spec.admin_port.to_string())
            .replace("PORT", &spec.port.to_string()),
    )
    .unwrap();
    let link = dir.join("link").join("faed.toml");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut f = Faed::spawn_config(&spec, &link);
    f.wait_ready(START_TIMEOUT).unwrap();
    (f, spec)
}

const RELOAD_BASE: &str = "[server]\nlisten = \"127.0.0.1:PORT\"\n\n[admin]\nlisten = \"127.0.0.1:ADMIN\"\ntoken = \"admin-test-token-0123456789\"\n\n[log]\nlevel = \"warn\"\n";

/// SIGHUP applies a changed limit and log level; a change of a listen address is refused naming the key;
/// an invalid file keeps the running config and says why.
#[test]
fn sighup_applies_what_changed_and_refuses_what_needs_a_restart() {
    let dir = TempDir::new();
    let (mut f, spec) = faed_on_symlink(dir.path(), RELOAD_BASE);
    let p = f.admin_port;
    let g0 = generation(p);
    let fill = |t: &str| {
        t.replace("ADMIN", &spec.admin_port.to_string())
            .replace("PORT", &spec.port.to_string())
    };
    // A new file, reached through the link: the watcher does not see it, SIGHUP does.
    let next = dir.path().join("b.toml");
    std::fs::write(
        &next,
        fill(&format!(
            "{RELOAD_BASE}\n[limits]\nclient_calls_per_sec = 777\n[metrics]\nslow_call_ms = 5\n"
        ))
        .replace("level = \"warn\"", "level = \"info\""),
    )
    .unwrap();
    let link = dir.path().join("link").join("faed.toml");
    let tmp = dir.path().join("link").join("new");
    std::os::unix::fs::symlink(&next, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(generation(p), g0, "reloaded before SIGHUP");
    f.signal(libc::SIGHUP);
    eventually("SIGHUP reloads", Duration::from_secs(5), || {
        generation(p) == g0 + 1
    });
    assert_eq!(
        json(p, "/api/filters")["limits"]["client_calls_per_sec"],
        777
    );
    assert_eq!(
        json(p, "/api/config")["config"]["metrics"]["slow_call_ms"],
        5
    );
    assert!(f.log().contains("configuration reloaded"), "{}", f.log());
    // A listen address: refused, named.
    std::fs::write(
        &next,
        fill(RELOAD_BASE).replace(&format!(":{}\"", spec.port), ":1\""),
    )
    .unwrap();
    let (s, body) = act(p, "/api/reload", "");
    assert_eq!(s, 409, "{body}");
    assert!(
        body.contains("server.listen") && body.contains("restart"),
        "{body}"
    );
    assert!(f.log().contains("server.listen"), "{}", f.log());
    // Garbage: refused, why.
    std::fs::write(&next, "[server\nlisten = ").unwrap();
    f.signal(libc::SIGHUP);
    eventually("the refusal is logged", Duration::from_secs(5), || {
        f.log().matches("reload refused").count() >= 2
    });
    assert_eq!(generation(p), g0 + 1, "a refused reload applied something");
    assert_eq!(
        json(p, "/api/filters")["limits"]["client_calls_per_sec"],
        777
    );
    // A value out of range: refused too.
    std::fs::write(
        &next,
        fill(&format!("{RELOAD_BASE}\n[idgen]\nworker_id = 99\n")),
    )
    .unwrap();
    let (s, body) = act(p, "/api/reload", "");
    assert!(s == 409 && body.contains("worker_id"), "{s} {body}");
    let mut c = f.connect(Transport::Buffered);
    assert!(c.call(&ping_call(1)).app_error().is_none());
}

/// Writing the file is enough: the watcher (debounced) reloads it.
#[test]
fn the_file_watcher_reloads_a_changed_file() {
    let f = Faed::start_admin("", &token_keys(), "");
    let p = f.admin_port;
    let g0 = generation(p);
    let path = f.dir.join("faed.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n[degrade]\nmethods = [\"id_next\"]\n"),
    )
    .unwrap();
    eventually("the watcher reloads", Duration::from_secs(10), || {
        generation(p) > g0
    });
    assert_eq!(
        json(p, "/api/filters")["degraded"],
        serde_json::json!(["id_next"])
    );
    // An editor's way: a new file renamed over the old one.
    let tmp = f.dir.join(".faed.toml.swp");
    std::fs::write(&tmp, &text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    eventually("the watcher reloads again", Duration::from_secs(10), || {
        json(p, "/api/filters")["degraded"] == serde_json::json!([])
    });
}

/// Reading the file is not changing it: inotify reports the open, and a reload reads the file, so counting
/// opens made one `cat` of the config start a reload every 300 ms, for good.
#[test]
fn reading_the_config_file_does_not_reload_it() {
    let f = Faed::start_admin("", &token_keys(), "");
    let p = f.admin_port;
    let g0 = generation(p);
    let path = f.dir.join("faed.toml");
    for _ in 0..3 {
        let _ = std::fs::read_to_string(&path).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(generation(p), g0, "reloaded without a change\n{}", f.log());
    assert!(!f.log().contains("configuration reloaded"), "{}", f.log());
}

/// Under load on pool a, the local cache and pool b, pool b's servers and a limit are changed by a reload:
/// no call outside pool b fails, and pool b's calls go to its new server afterwards.
#[test]
fn hot_reload_under_load_fails_no_call_outside_the_changed_pool() {
    let (a, b1, b2) = (Store::memcached(), Store::memcached(), Store::memcached());
    let pools = |b: &Store, extra: &str| {
        format!(
            "[[memcache.pools]]\nname = \"a\"\nservers = [\"{}\"]\n\n[[memcache.pools]]\nname = \"b\"\nservers = [\"{}\"]\n\n{extra}",
            a.addr(),
            b.addr()
        )
    };
    let f = Faed::start_admin("", &token_keys(), &pools(&b1, ""));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, b_calls) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load: Vec<_> = (0..4)
        .map(|t| {
            let addr = f.addr().to_string();
            let (stop, ok, failed, b_calls) =
                (stop.clone(), ok.clone(), failed.clone(), b_calls.clone());
            std::thread::spawn(move || -> Vec<String> {
                let mut c = client::connect(&addr, Transport::Framed, IO_TIMEOUT).unwrap();
                let mut errors = Vec::new();
                let mut i = 0u64;
                let until = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    i += 1;
                    let key = format!("hr:{t}:{}", i % 50);
                    let r = match t {
                        0 | 1 => {
                            let data = TMemcacheData::new(i.to_string().into_bytes(), 0);
                            c.mc_set(ctx(), "a".into(), key.clone(), data, 0)
                                .and_then(|_| c.mc_get(ctx(), "a".into(), key).map(drop))
                        }
                        2 => c
                            .lc_set(ctx(), key.clone(), i.to_string().into_bytes())
                            .and_then(|_| c.lc_get(ctx(), key).map(drop)),
                        _ => {
                            // Pool b: may fail while it changes; counted apart.
                            let data = TMemcacheData::new(b"b".to_vec(), 0);
                            let _ = c.mc_set(ctx(), "b".into(), key, data, 0);
                            b_calls.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    match r {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(e.to_string());
                        }
                    }
                }
                errors
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let before = ok.load(Ordering::Relaxed);
    let p = f.admin_port;
    let g0 = generation(p);
    let path = f.dir.join("faed.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let next = text.replace(&b1.addr(), &b2.addr())
        + "\n[limits]\nclient_calls_per_sec = 1000000\n\n[limits.method_inflight]\nlc_get = 1000\n";
    std::fs::write(&path, next).unwrap();
    eventually("the reload is applied", Duration::from_secs(10), || {
        generation(p) > g0
    });
    let at_reload = ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let after = ok.load(Ordering::Relaxed) - at_reload;
    assert!(errors.is_empty(), "calls outside pool b failed: {errors:?}");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        before > 100 && after > 100,
        "too little load: {before} before, {after} after"
    );
    assert!(b_calls.load(Ordering::Relaxed) > 0);
    assert_eq!(
        json(p, "/api/filters")["limits"]["method_inflight"]["lc_get"],
        1000
    );
    // Pool b now writes to b2.
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    let data = TMemcacheData::new(b"moved".to_vec(), 0);
    assert!(c
        .mc_set(ctx(), "b".into(), "after".into(), data, 0)
        .unwrap());
    let got = b2.ask(b"get after\r\n", b"END\r\n").unwrap();
    assert!(got.contains("moved"), "{got}");
    let got = b1.ask(b"get after\r\n", b"END\r\n").unwrap();
    assert!(!got.contains("moved"), "{got}");
    let backends = json(p, "/api/backends").to_string();
    assert!(
        backends.contains(&b2.addr()) && !backends.contains(&b1.addr()),
        "{backends}"
    );
}

/// The sampled call log (`metrics.sample_per_10000`, here every call) and the slow-call log: one structured
/// line per call with its method, client, duration and outcome, even with the log level at warn.
#[test]
fn sampled_and_slow_calls_are_logged_one_line_each() {
    let m = Store::memcached();
    let sections = format!(
        "[metrics]\nsample_per_10000 = 10000\nslow_call_ms = 150\n\n[[memcache.pools]]\nname = \"default\"\nservers = [\"{}\"]\n",
        m.addr()
    );
    let f = Faed::start_with("", &sections);
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    for _ in 0..3 {
        c.ping(ctx()).unwrap();
    }
    assert!(c
        .ping(fae::client::Context::new(0, "bad".into(), 1, None))
        .is_err());
    m.signal(libc::SIGSTOP);
    let stopped = std::thread::spawn({
        let pid = m.pid();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: kill sends a signal to our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        }
    });
    let _ = c.mc_get(ctx(), "default".into(), "slow".into());
    stopped.join().unwrap();
    eventually("the call lines are logged", Duration::from_secs(5), || {
        f.log().matches("sampled call").count() >= 5
    });
    let log = f.log();
    let pings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sampled call") && l.contains("method=\"ping\""))
        .collect();
    assert_eq!(pings.len(), 4, "{log}");
    assert!(
        pings
            .iter()
            .all(|l| l.contains("client=127.0.0.1") && l.contains("took_us=")),
        "{log}"
    );
    assert_eq!(
        pings.iter().filter(|l| l.contains("ok=false")).count(),
        1,
        "{log}"
    );
    let slow: Vec<&str> = log.lines().filter(|l| l.contains("slow call")).collect();
    assert_eq!(slow.len(), 1, "{log}");
    assert!(
        slow[0].contains("method=\"mc_get\"") && slow[0].contains("client=127.0.0.1"),
        "{log}"
    );
}
