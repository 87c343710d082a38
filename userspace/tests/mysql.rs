//! The MySQL servant against a real MariaDB (started by the tests, stopped by PID): a server killed under load
//! and restarted, a statement slower than the call's deadline, and the result cache kept in Redis.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::stores::{Mariadb, Store};
use common::*;
use fae::client::{self, TFunServantSyncClient};

fn ctx() -> fae::client::Context {
    fae::client::Context::new(11, "mysql-test".into(), 1, None)
}

fn stats(f: &Faed) -> serde_json::Value {
    serde_json::from_str(&admin_get(f.admin_port, "/api/stats")).unwrap()
}

fn global(f: &Faed) -> serde_json::Value {
    stats(f)["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["server"].as_str().unwrap().starts_with("global "))
        .cloned()
        .expect("the global server's stats")
}

fn app_error(r: thrift::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(thrift::Error::Application(e)) => e.message,
        other => panic!("expected an application error, got {other:?}"),
    }
}

/// MariaDB killed while four sessions query it: the breaker opens, calls fail fast naming the server, the
/// in-memory servants and memcached keep answering; restarted, the calls come back.
#[test]
fn killed_mariadb_opens_the_breaker_and_recovers() {
    let mut db = Mariadb::start();
    let mc = Store::memcached();
    let sections = format!(
        "{}\n[[memcache.pools]]\nname = \"default\"\nservers = [\"{}\"]\n\n\
         [backend.breaker]\nconsecutive_failures = 3\nopen_ms = 300\nmax_open_ms = 600\nclose_after = 2\n",
        db.config(),
        mc.addr()
    );
    let f = Faed::start_with("call_timeout_ms = 2000", &sections);
    let addr = f.addr().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop, failed) = (addr.clone(), stop.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut c = client::connect(&addr, Transport::Buffered, IO_TIMEOUT).unwrap();
                let mut ok = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match c.my_query(
                        ctx(),
                        "global".into(),
                        "kv".into(),
                        0,
                        "SELECT 1".into(),
                        vec![],
                        "".into(),
                    ) {
                        Ok(_) => ok += 1,
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                ok
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    db.kill();
    // Soon every call is refused at once by the open breaker.
    let mut c = client::connect(&addr, Transport::Framed, IO_TIMEOUT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let msg = app_error(c.my_query(
            ctx(),
            "global".into(),
            "kv".into(),
            0,
            "SELECT 1".into(),
            vec![],
            "".into(),
        ));
        if msg.contains("circuit breaker open") {
            assert!(msg.contains("global ("), "{msg}");
            break;
        }
        assert!(Instant::now() < deadline, "breaker not open: {msg}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Other servants are untouched meanwhile.
    assert_eq!(c.noop(5).unwrap(), 5);
    assert!(c.lc_set(ctx(), "k".into(), b"v".to_vec()).unwrap());
    let data = fae::client::fun_rpc::TMemcacheData::new(b"m".to_vec(), 0);
    assert!(c
        .mc_set(ctx(), "default".into(), "mk".into(), data, 0)
        .unwrap());
    db.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = c.my_query(
            ctx(),
            "global".into(),
            "kv".into(),
            0,
            "SELECT 2 AS two".into(),
            vec![],
            "".into(),
        );
        if let Ok(r) = r {
            assert_eq!(r.rows, vec![vec!["2".to_string()]]);
            break;
        }
        assert!(Instant::now() < deadline, "not recovered: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let ok: u64 = loaders.into_iter().map(|l| l.join().unwrap()).sum();
    assert!(
        ok > 0 && failed.load(Ordering::Relaxed) > 0,
        "ok {ok}, failed {failed:?}"
    );
    let st = global(&f);
    assert!(st["transitions"]["open"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["rejected"].as_u64().unwrap() >= 1, "{st}");
    f.assert_alive();
}

/// A statement slower than the deadline: the call gets a deadline error naming the server when its deadline
/// passes, while noop is answered on every event loop meanwhile.
#[test]
fn a_slow_statement_gets_a_deadline_error_and_holds_no_loop() {
    let db = Mariadb::start();
    let f = Faed::start_with("call_timeout_ms = 1000\nthreads = 2", &db.config());
    let addr = f.addr().to_string();
    let answered = Arc::new(AtomicBool::new(false));
    let slow = {
        let (addr, answered) = (addr.clone(), answered.clone());
        std::thread::spawn(move || {
            let mut c = client::connect(&addr, Transport::Buffered, IO_TIMEOUT).unwrap();
            let t0 = Instant::now();
            let r = c.my_query(
                ctx(),
                "global".into(),
                "kv".into(),
                0,
                "SELECT SLEEP(10)".into(),
                vec![],
                "".into(),
            );
            answered.store(true, Ordering::SeqCst);
            (r, t0.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..40 {
        let mut n = client::connect(&addr, Transport::Buffered, IO_TIMEOUT).unwrap();
        assert_eq!(n.noop(i).unwrap(), i);
    }
    assert!(
        !answered.load(Ordering::SeqCst),
        "the slow statement was answered before the noops"
    );
    let (r, took) = slow.join().unwrap();
    let msg = app_error(r);
    assert!(msg.contains("late") && msg.contains("global ("), "{msg}");
    // At the deadline (1 s), not when the statement would have ended (10 s).
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    f.assert_alive();
}

/// `mysql.cache_store = "redis"`: a cached read is kept in Redis (so every node sees one copy), an exec with
/// its cacheKey and my_evict remove it.
#[test]
fn the_result_cache_can_live_in_redis() {
    let db = Mariadb::start();
    let r1 = Store::redis();
    let sections = format!(
        "{}\n[[redis.pools]]\nname = \"cache\"\nservers = [\"{}\"]\n",
        db.config()
            .replace("[mysql]\n", "[mysql]\ncache_store = \"redis\"\ncache_redis_pool = \"cache\"\ncache_ttl_ms = 60000\n"),
        r1.addr()
    );
    let f = Faed::start_with("", &sections);
    let mut c = client::connect(&f.addr().to_string(), Transport::Framed, IO_TIMEOUT).unwrap();
    let q = |c: &mut client::Client, sql: &str, args: Vec<String>| {
        c.my_query(
            ctx(),
            "global".into(),
            "kv".into(),
            0,
            sql.into(),
            args,
            "rc:1".into(),
        )
        .unwrap()
    };
    q(
        &mut c,
        "INSERT INTO kv (k, v) VALUES (?, ?)",
        vec!["rc".into(), "one".into()],
    );
    assert_eq!(
        q(&mut c, "SELECT v FROM kv WHERE k = ?", vec!["rc".into()]).rows,
        vec![vec!["one".to_string()]]
    );
    let cached = r1.redis_bulk(b"GET rc:1\r\n").unwrap();
    assert!(cached.contains("one"), "{cached}");
    db.sql("UPDATE fae_global.kv SET v = 'behind' WHERE k = 'rc'");
    assert_eq!(
        q(&mut c, "SELECT v FROM kv WHERE k = ?", vec!["rc".into()]).rows,
        vec![vec!["one".to_string()]]
    );
    q(
        &mut c,
        "UPDATE kv SET v = ? WHERE k = ?",
        vec!["two".into(), "rc".into()],
    );
    assert!(r1
        .ask(b"EXISTS rc:1\r\n", b"\r\n")
        .unwrap()
        .starts_with(":0"));
    assert_eq!(
        q(&mut c, "SELECT v FROM kv WHERE k = ?", vec!["rc".into()]).rows,
        vec![vec!["two".to_string()]]
    );
    c.my_evict(ctx(), "rc:1".into()).unwrap();
    assert!(r1
        .ask(b"EXISTS rc:1\r\n", b"\r\n")
        .unwrap()
        .starts_with(":0"));
    let m = &stats(&f)["mysql"];
    assert!(
        m["cache_hits"].as_u64().unwrap() >= 1 && m["cache_evictions"].as_u64().unwrap() >= 2,
        "{m}"
    );
    f.assert_alive();
}

/// A password (from `password_file`) reaches the server and nothing else: not the log (at debug level), not
/// /metrics, not /api/stats, not the errors clients see, even when the login fails.
#[test]
fn passwords_never_reach_logs_metrics_or_clients() {
    const SECRET: &str = "Zq9-secret-7Kx";
    let db = Mariadb::start();
    let dir = TempDir::new();
    let good = dir.path().join("good.password");
    let bad = dir.path().join("bad.password");
    std::fs::write(&good, format!("{SECRET}\n")).unwrap();
    std::fs::write(&bad, format!("{SECRET}-wrong\n")).unwrap();
    let server = |pool: &str, file: &std::path::Path| {
        format!(
            "[[mysql.servers]]\npool = \"{pool}\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"secretive\"\n\
             password_file = \"{}\"\ndb = \"fae_global\"\n\n",
            db.port,
            file.display()
        )
    };
    let sections = format!(
        "[mysql]\nglobal_pools = [\"good\", \"bad\"]\n\n{}{}",
        server("good", &good),
        server("bad", &bad)
    );
    let mut spec = FaedSpec::new(dir.path().join("faed"));
    spec.sections = sections;
    spec.log_level = "debug".into();
    let mut f = Faed::spawn(&spec);
    f.wait_ready(START_TIMEOUT).expect("faed starts");
    let mut c = client::connect(&f.addr().to_string(), Transport::Buffered, IO_TIMEOUT).unwrap();
    let r = c
        .my_query(
            ctx(),
            "good".into(),
            "kv".into(),
            0,
            "SELECT CURRENT_USER() AS u".into(),
            vec![],
            "".into(),
        )
        .unwrap();
    assert!(r.rows[0][0].starts_with("secretive@"), "{r:?}");
    let msg = app_error(c.my_query(
        ctx(),
        "bad".into(),
        "kv".into(),
        0,
        "SELECT 1".into(),
        vec![],
        "".into(),
    ));
    assert!(msg.contains("1045") && !msg.contains(SECRET), "{msg}");
    for text in [
        admin_get(f.admin_port, "/metrics"),
        admin_get(f.admin_port, "/api/stats"),
        f.log(),
        msg,
    ] {
        assert!(!text.contains(SECRET), "the password leaked:\n{text}");
    }
    f.assert_alive();
}
