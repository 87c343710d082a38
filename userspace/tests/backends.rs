//! The memcache and Redis servants against real memcached and redis-server processes (started on loopback
//! ports by the tests, stopped by PID): pipelining and order, pools bounded by `max_conns` under 2,000
//! sessions, circuit breakers under a killed server, deadlines under a stopped one.

mod common;

use std::time::{Duration, Instant};

use common::stores::Store;
use common::*;
use fae::client::fun_rpc::TMemcacheData;
use fae::client::{self, TFunServantSyncClient};

fn ctx() -> fae::client::Context {
    fae::client::Context::new(7, "backends-test".into(), 1, None)
}

fn pools(mc: &[&Store], rd: &[&Store], extra: &str) -> String {
    let list = |s: &[&Store]| {
        s.iter()
            .map(|s| format!("\"{}\"", s.addr()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[memcache.pools]]\nname = \"default\"\nservers = [{}]\n\n[[redis.pools]]\nname = \"default\"\nservers = [{}]\n\n{extra}\n",
        list(mc),
        list(rd)
    )
}

fn stats(f: &Faed) -> serde_json::Value {
    serde_json::from_str(&admin_get(f.admin_port, "/api/stats")).unwrap()
}

/// The /api/stats entry of back-end server `addr`.
fn server_stats(f: &Faed, addr: &str) -> serde_json::Value {
    stats(f)["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["server"] == addr)
        .cloned()
        .unwrap_or_else(|| panic!("no stats for {addr}"))
}

fn app_error(r: thrift::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(thrift::Error::Application(e)) => {
            assert_eq!(
                e.kind,
                thrift::ApplicationErrorKind::InternalError,
                "{}",
                e.message
            );
            e.message
        }
        other => panic!("expected an application error, got {other:?}"),
    }
}

/// Calls of one session pipelined across back ends and in-memory servants come back in the order sent,
/// each with its own answer.
#[test]
fn pipelined_replies_keep_their_order() {
    let (m1, m2, r1) = (Store::memcached(), Store::memcached(), Store::redis());
    let f = Faed::start_with("", &pools(&[&m1, &m2], &[&r1], ""));
    let mut c = f.connect(Transport::Framed);
    let ctx_key = |e: &mut Encoder<'_>, key: &[u8]| {
        ctx_arg(e);
        e.field_bytes(2, b"default");
        e.field_bytes(3, key);
    };
    let mc_set = |seq, key: &'static [u8], v: &'static [u8]| {
        call("mc_set", seq, |e| {
            ctx_key(e, key);
            e.field_begin(ttype::STRUCT, 4);
            e.field_bytes(1, v);
            e.field_i32(2, seq);
            e.stop();
            e.field_i32(5, 0);
        })
    };
    let mc_get = |seq, key: &'static [u8]| call("mc_get", seq, |e| ctx_key(e, key));
    let rd = |seq, args: &[&[u8]]| {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        call("rd_call", seq, move |e| {
            ctx_arg(e);
            e.field_bytes(2, &args[0]);
            e.field_bytes(3, b"default");
            e.field_begin(ttype::LIST, 4);
            e.list_begin(ttype::STRING, args.len() - 1);
            for a in &args[1..] {
                e.bytes(a);
            }
        })
    };
    let mut batch = Vec::new();
    let mut n = 0;
    for round in 0..50 {
        let key: &'static [u8] = Box::leak(
            format!("order:{}", round % 7)
                .into_bytes()
                .into_boxed_slice(),
        );
        let v1: &'static [u8] = Box::leak(format!("a{round}").into_bytes().into_boxed_slice());
        let v2: &'static [u8] = Box::leak(format!("b{round}").into_bytes().into_boxed_slice());
        for msg in [
            mc_set(n + 1, key, v1),
            mc_get(n + 2, key),
            noop_call(n + 3, n + 3),
            rd(n + 4, &[b"SET", key, v2]),
            mc_set(n + 5, key, v2),
            rd(n + 6, &[b"GET", key]),
            mc_get(n + 7, key),
            lc_get_call(n + 8, b"nothing-here"),
        ] {
            batch.extend_from_slice(&framed(&msg));
        }
        n += 8;
    }
    c.send_raw(&batch);
    for round in 0..50 {
        let base = round * 8;
        let v1 = format!("a{round}");
        let v2 = format!("b{round}");
        let m = c.recv().expect("reply");
        assert_eq!(m.seqid, base + 1, "reply order");
        let r = c.recv().unwrap();
        assert_eq!(r.seqid, base + 2);
        let got = r.success("mc_get", base + 2);
        assert_eq!(
            got.field(1).and_then(|v| v.bytes()),
            Some(v1.as_bytes()),
            "mc_get after mc_set"
        );
        let r = c.recv().unwrap();
        assert_eq!(r.seqid, base + 3);
        assert_eq!(r.success("noop", base + 3).i32(), Some(base + 3));
        assert_eq!(c.recv().unwrap().seqid, base + 4);
        assert_eq!(c.recv().unwrap().seqid, base + 5);
        let r = c.recv().unwrap();
        assert_eq!(r.success("rd_call", base + 6).bytes(), Some(v2.as_bytes()));
        let r = c.recv().unwrap();
        let got = r.success("mc_get", base + 7);
        assert_eq!(got.field(1).and_then(|v| v.bytes()), Some(v2.as_bytes()));
        assert_eq!(
            got.field(2).and_then(|v| v.i32()),
            Some(base + 5),
            "flags kept"
        );
        let r = c.recv().unwrap();
        assert_eq!(r.seqid, base + 8);
        assert!(r.field(1).is_some(), "lc_get miss: TCacheMissed");
    }
    f.assert_alive();
}

/// 2,000 sessions calling rd_call and mc_get at once reach each store over at most `max_conns`
/// connections.
#[test]
fn two_thousand_sessions_share_max_conns_connections() {
    raise_nofile(8192);
    let (m1, r1) = (Store::memcached(), Store::redis());
    let f = Faed::start_with(
        "max_sessions = 5000",
        &pools(&[&m1], &[&r1], "[backend]\nmax_conns = 3\n"),
    );
    let mut sessions: Vec<Conn> = (0..2000).map(|_| f.connect(Transport::Buffered)).collect();
    let rd_get = |seq: i32| {
        call("rd_call", seq, |e| {
            ctx_arg(e);
            e.field_bytes(2, b"INCR");
            e.field_bytes(3, b"default");
            e.field_begin(ttype::LIST, 4);
            e.list_begin(ttype::STRING, 1);
            e.bytes(b"sessions");
        })
    };
    let mc_get = |seq: i32| {
        call("mc_get", seq, |e| {
            ctx_arg(e);
            e.field_bytes(2, b"default");
            e.field_bytes(3, b"nokey");
        })
    };
    // Every session sends before any reads, so that all 2,000 calls are in flight together.
    for (i, s) in sessions.iter_mut().enumerate() {
        s.send(&on(Transport::Buffered, &rd_get(i as i32 + 1)));
        s.send(&on(Transport::Buffered, &mc_get(i as i32 + 1)));
    }
    let (mut max_rd, mut max_mc) = (0, 0);
    for (i, s) in sessions.iter_mut().enumerate() {
        let r = s.recv().expect("rd_call reply");
        assert!(r.app_error().is_none(), "session {i}: {:?}", r.app_error());
        let r = s.recv().expect("mc_get reply");
        assert!(
            r.field(1).is_some(),
            "session {i}: mc_get of a missing key: TCacheMissed"
        );
        if i % 250 == 0 {
            max_rd = max_rd.max(r1.client_connections());
            max_mc = max_mc.max(m1.client_connections());
        }
    }
    let counter = r1.ask(b"GET sessions\r\n", b"\r\n").unwrap();
    assert!(counter.contains("2000"), "{counter}");
    max_rd = max_rd.max(r1.client_connections());
    max_mc = max_mc.max(m1.client_connections());
    assert!(
        (1..=3).contains(&max_rd),
        "redis saw {max_rd} connections from faed"
    );
    assert!(
        (1..=3).contains(&max_mc),
        "memcached saw {max_mc} connections from faed"
    );
    let st = server_stats(&f, &r1.addr());
    assert!(st["connects"].as_u64().unwrap() <= 3, "{st}");
    f.assert_alive();
}

/// A killed memcached: its breaker opens, calls for its keys fail at once naming it, keys on the other
/// server keep working; restarted, the breaker goes half-open, then closed.
#[test]
fn killed_memcached_opens_its_breaker_and_recovers() {
    let (mut m1, m2) = (Store::memcached(), Store::memcached());
    let extra = "[backend.breaker]\nconsecutive_failures = 3\nopen_ms = 300\nmax_open_ms = 600\nclose_after = 2\n";
    let f = Faed::start_with(
        "",
        &pools(&[&m1, &m2], &[], extra)
            .replace("[[redis.pools]]\nname = \"default\"\nservers = []\n", ""),
    );
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    // Keys by server, placed by the standard strategy over [m1, m2].
    let place = |k: &str| {
        let h = ((crc32fast::hash(k.as_bytes()) >> 16) & 0x7fff).max(1);
        (h % 2) as usize
    };
    let keys: Vec<String> = (0..40).map(|i| format!("brk:{i}")).collect();
    let on1: Vec<&String> = keys.iter().filter(|k| place(k) == 0).collect();
    let on2: Vec<&String> = keys.iter().filter(|k| place(k) == 1).collect();
    assert!(on1.len() >= 5 && on2.len() >= 5);
    let data = |v: &str| TMemcacheData::new(v.as_bytes().to_vec(), 0);
    for k in &keys {
        assert!(c
            .mc_set(ctx(), "default".into(), (*k).clone(), data("v"), 0)
            .unwrap());
    }
    // A load on every key from four sessions while m1 dies and comes back: (ok, failed) per server.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loaders: Vec<_> = (0..4)
        .map(|t| {
            let (addr, stop, keys) = (f.addr().to_string(), stop.clone(), keys.clone());
            std::thread::spawn(move || {
                let mut c = client::connect(&addr, Transport::Framed, IO_TIMEOUT).unwrap();
                let mut counts = [[0u64; 2]; 2];
                let mut foreign = Vec::new();
                for k in keys.iter().cycle().skip(t * 7) {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let server = place(k);
                    match c.mc_get(ctx(), "default".into(), k.clone()) {
                        Ok(_) => counts[server][0] += 1,
                        Err(e) => {
                            counts[server][1] += 1;
                            if server == 1 {
                                foreign.push(format!("{k}: {e:?}"));
                            }
                        }
                    }
                }
                (counts, foreign)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    m1.kill();
    // The first calls fail as the connections break or refuse; then the breaker is open.
    for k in on1.iter().cycle().take(10) {
        let msg = app_error(c.mc_get(ctx(), "default".into(), (*k).clone()));
        assert!(msg.contains(&m1.addr()), "{msg}");
    }
    let st = server_stats(&f, &m1.addr());
    assert_eq!(st["breaker"], "open", "{st}");
    let msg = app_error(c.mc_get(ctx(), "default".into(), on1[0].clone()));
    assert!(
        msg.contains("circuit breaker open") && msg.contains(&m1.addr()),
        "{msg}"
    );
    assert!(server_stats(&f, &m1.addr())["rejected"].as_u64().unwrap() >= 1);
    // The other server's keys are untouched.
    for k in &on2 {
        assert_eq!(
            c.mc_get(ctx(), "default".into(), (*k).clone())
                .unwrap()
                .data,
            b"v"
        );
    }
    m1.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.mc_set(ctx(), "default".into(), on1[0].clone(), data("back"), 0);
        let closed = server_stats(&f, &m1.addr())["breaker"] == "closed";
        if r.is_ok() && closed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "breaker did not close after the restart: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = server_stats(&f, &m1.addr());
    assert!(
        st["transitions"]["half_open"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert!(st["transitions"]["closed"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(
        c.mc_get(ctx(), "default".into(), on1[0].clone())
            .unwrap()
            .data,
        b"back"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = [[0u64; 2]; 2];
    for l in loaders {
        let (counts, foreign) = l.join().unwrap();
        assert!(
            foreign.is_empty(),
            "calls for m2's keys failed: {foreign:?}"
        );
        for s in 0..2 {
            total[s][0] += counts[s][0];
            total[s][1] += counts[s][1];
        }
    }
    assert!(
        total[1][0] > 0 && total[1][1] == 0,
        "m2's keys under load: {total:?}"
    );
    assert!(
        total[0][1] > 0,
        "no call for m1's keys failed while it was dead: {total:?}"
    );
    // Every back-end family of /metrics is there for the server, and moved.
    let metrics = admin_get(f.admin_port, "/metrics");
    let label = format!("server=\"{}\"", m1.addr());
    for family in [
        "fae_backend_calls_total{",
        "fae_backend_rejected_total{",
        "fae_backend_connects_total{",
        "fae_backend_breaker_transitions_total{",
        "fae_backend_call_duration_seconds_bucket{",
        "fae_backend_call_duration_seconds_sum{",
        "fae_backend_call_duration_seconds_count{",
        "fae_backend_connections{",
    ] {
        let moved = metrics.lines().any(|l| {
            l.starts_with(family)
                && l.contains(&label)
                && l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
        });
        assert!(moved, "{family} for {label} never moved:\n{metrics}");
    }
    let failed = metrics.lines().any(|l| {
        l.starts_with("fae_backend_failures_total{") && l.contains(&label) && !l.ends_with(" 0")
    });
    assert!(
        failed,
        "no failure counted for the killed server:\n{metrics}"
    );
    assert!(metrics.contains("# TYPE fae_backend_breaker_state gauge"));
    f.assert_alive();
}

/// A Redis stopped with SIGSTOP: its calls fail with a deadline error naming it, while noop is answered on
/// every event loop meanwhile.
#[test]
fn stopped_redis_gives_deadline_errors_while_noop_is_answered() {
    let r1 = Store::redis();
    let f = Faed::start_with(
        "call_timeout_ms = 600\nthreads = 2",
        &pools(&[], &[&r1], "")
            .replace("[[memcache.pools]]\nname = \"default\"\nservers = []\n", ""),
    );
    let addr = f.addr().to_string();
    let mut c = client::connect(&addr, Transport::Buffered, IO_TIMEOUT).unwrap();
    assert_eq!(
        c.rd_call(
            ctx(),
            "SET".into(),
            "default".into(),
            vec!["k".into(), "v".into()]
        )
        .unwrap(),
        "OK"
    );
    r1.signal(libc::SIGSTOP);
    // Calls to the stopped store, from a few sessions at once.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let (addr, answered) = (addr.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut c = client::connect(&addr, Transport::Buffered, IO_TIMEOUT).unwrap();
                let t0 = Instant::now();
                let r = c.rd_call(ctx(), "GET".into(), "default".into(), vec!["k".into()]);
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (r, t0.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    // Meanwhile noop on many sessions (spread over both loops) is answered while the store's calls are
    // still out: it never waits behind them.
    for i in 0..40 {
        let mut n = client::connect(&addr, Transport::Buffered, IO_TIMEOUT).unwrap();
        assert_eq!(n.noop(i).unwrap(), i);
    }
    assert_eq!(
        answered.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the rd_calls to the stopped store were answered before the noops"
    );
    for w in waiters {
        let (r, took) = w.join().unwrap();
        let msg = app_error(r);
        assert!(msg.contains("late") && msg.contains(&r1.addr()), "{msg}");
        // Not before the deadline (call_timeout_ms), and not long after it.
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
    r1.signal(libc::SIGCONT);
    // Recovered: a new connection replaces the one closed as late.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.rd_call(ctx(), "GET".into(), "default".into(), vec!["k".into()]) {
            Ok(v) => {
                assert_eq!(v, "v");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "not recovered: {e:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f.assert_alive();
}

/// An answer larger than `server.max_message_bytes` fails its call with a clear error, and does not count
/// against the server: the breaker stays closed and the next call is served.
#[test]
fn oversized_answers_fail_their_call_not_the_server() {
    let r1 = Store::redis();
    let f = Faed::start_with(
        "max_message_bytes = 1048576",
        &pools(&[], &[&r1], "[backend.breaker]\nconsecutive_failures = 1\n")
            .replace("[[memcache.pools]]\nname = \"default\"\nservers = []\n", ""),
    );
    let big = vec![b'x'; 2 << 20];
    let mut req = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", big.len()).into_bytes();
    req.extend_from_slice(&big);
    req.extend_from_slice(b"\r\n");
    assert!(r1.ask(&req, b"\r\n").unwrap().starts_with("+OK"));
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    for _ in 0..3 {
        let msg = app_error(c.rd_call(ctx(), "GET".into(), "default".into(), vec!["big".into()]));
        assert!(msg.contains("more than 1048576 bytes"), "{msg}");
        assert_eq!(
            c.rd_call(ctx(), "STRLEN".into(), "default".into(), vec!["big".into()])
                .unwrap(),
            "2097152"
        );
    }
    let st = server_stats(&f, &r1.addr());
    assert_eq!(st["breaker"], "closed", "{st}");
    assert_eq!(st["failures"]["too_large"], 3, "{st}");
    f.assert_alive();
}

/// A client pipelining calls to a stopped store: faed stops reading it once its deferred calls are out and
/// a read's worth of requests waits, instead of buffering everything it is sent.
#[test]
fn pipelining_behind_a_stopped_store_does_not_grow_memory() {
    let m1 = Store::memcached();
    let f = Faed::start_with(
        "call_timeout_ms = 3000",
        &pools(&[&m1], &[], "").replace("[[redis.pools]]\nname = \"default\"\nservers = []\n", ""),
    );
    let mut c = f.connect(Transport::Framed);
    c.call(&noop_call(1, 1));
    m1.signal(libc::SIGSTOP);
    let rss0 = f.rss_kib();
    // 400,000 pipelined mc_get calls (about 28 MB, more than the kernel's socket buffers hold) written without
    // reading any reply.
    let one = framed(&call("mc_get", 2, |e| {
        ctx_arg(e);
        e.field_bytes(2, b"default");
        e.field_bytes(3, b"some:key");
    }));
    let mut writer = c.w.try_clone().unwrap();
    writer.set_nonblocking(true).unwrap();
    let mut sent = 0usize;
    let all = one.repeat(400_000);
    let t0 = Instant::now();
    while sent < all.len() && t0.elapsed() < Duration::from_secs(2) {
        use std::io::Write;
        match writer.write(&all[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    let grown = f.rss_kib().saturating_sub(rss0);
    assert!(
        sent < all.len(),
        "faed took all {} bytes while the store was stopped",
        all.len()
    );
    assert!(grown < 32 << 10, "faed grew by {grown} KiB");
    m1.signal(libc::SIGCONT);
    f.assert_alive();
}

/// With `eject = true`, a server whose breaker is open leaves its pool's placement: its keys are served by
/// the other server meanwhile (as twemproxy's auto_eject_hosts), and come back when it recovers.
#[test]
fn open_servers_are_ejected_from_a_consistent_ring() {
    let (mut m1, m2) = (Store::memcached(), Store::memcached());
    let extra = "[backend.breaker]\nconsecutive_failures = 2\nopen_ms = 60000\nmax_open_ms = 60000\neject = true\n\
                 [memcache]\nhash = \"ketama\"\n";
    let f = Faed::start_with(
        "",
        &pools(&[&m1, &m2], &[], extra)
            .replace("[[redis.pools]]\nname = \"default\"\nservers = []\n", ""),
    );
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    let data = |v: &str| TMemcacheData::new(v.as_bytes().to_vec(), 0);
    let keys: Vec<String> = (0..40).map(|i| format!("ej:{i}")).collect();
    for k in &keys {
        assert!(c
            .mc_set(ctx(), "default".into(), k.clone(), data("v"), 0)
            .unwrap());
    }
    // Which keys m1 holds, asked of m1 itself.
    let on1: Vec<&String> = keys
        .iter()
        .filter(|k| {
            m1.ask(format!("get {k}\r\n").as_bytes(), b"END\r\n")
                .unwrap()
                .starts_with("VALUE")
        })
        .collect();
    assert!(
        on1.len() >= 5 && on1.len() < keys.len(),
        "{} of {} on m1",
        on1.len(),
        keys.len()
    );
    m1.kill();
    // Two failures open m1's breaker; from then on its keys go to m2.
    for k in on1.iter().take(2) {
        let _ = c.mc_get(ctx(), "default".into(), (*k).clone());
    }
    assert_eq!(server_stats(&f, &m1.addr())["breaker"], "open");
    for k in &on1 {
        assert!(
            c.mc_set(ctx(), "default".into(), (*k).clone(), data("moved"), 0)
                .unwrap(),
            "{k}"
        );
        assert_eq!(
            c.mc_get(ctx(), "default".into(), (*k).clone())
                .unwrap()
                .data,
            b"moved"
        );
    }
    let at_m2 = m2
        .ask(format!("get {}\r\n", on1[0]).as_bytes(), b"END\r\n")
        .unwrap();
    assert!(at_m2.contains("moved"), "{at_m2}");
    f.assert_alive();
}

/// An idle connection is checked before it carries a call (Redis PING), and one the server closed while
/// idle is replaced without failing a call.
#[test]
fn idle_connections_are_checked_and_replaced() {
    let mut r1 = Store::redis();
    let f = Faed::start_with(
        "",
        &pools(&[], &[&r1], "[backend]\nhealth_check_idle_ms = 100\n")
            .replace("[[memcache.pools]]\nname = \"default\"\nservers = []\n", ""),
    );
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    let pings = |r: &Store| -> u64 {
        let info = r.redis_bulk(b"INFO commandstats\r\n").unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // (The store's own readiness probe was a PING too: count from here.)
    let base = pings(&r1);
    assert_eq!(
        c.rd_call(
            ctx(),
            "SET".into(),
            "default".into(),
            vec!["k".into(), "1".into()]
        )
        .unwrap(),
        "OK"
    );
    assert_eq!(pings(&r1), base, "a fresh connection is not checked");
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(
        c.rd_call(ctx(), "GET".into(), "default".into(), vec!["k".into()])
            .unwrap(),
        "1"
    );
    assert_eq!(
        pings(&r1),
        base + 1,
        "the idle connection was checked once before the call"
    );
    // The store restarts while the connection is idle: the next call goes on a new connection.
    r1.restart();
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(
        c.rd_call(
            ctx(),
            "SET".into(),
            "default".into(),
            vec!["k".into(), "2".into()]
        )
        .unwrap(),
        "OK"
    );
    let st = server_stats(&f, &r1.addr());
    assert_eq!(st["connects"], 2, "{st}");
    assert_eq!(st["failures"]["broken"], 0, "{st}");
    f.assert_alive();
}
