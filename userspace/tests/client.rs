//! The Rust client generated from idl/fae.thrift (Apache `thrift` crate) against a real faed, over both
//! transports, and the metrics it leaves behind: every counter faed declares must move under traffic.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use common::{Faed, Transport};
use fae::client::{self, fun_rpc::TCacheMissed, TFunServantSyncClient};

fn ctx() -> fae::client::Context {
    client::context("rust-test")
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).expect("admin read");
    assert!(body.starts_with("HTTP/1.1 200"), "{path}: {body}");
    body
}

fn exercise(addr: &str, transport: Transport) {
    let mut c = client::connect(addr, transport, Duration::from_secs(5)).expect("connect");
    assert_eq!(c.noop(-7).unwrap(), -7);
    let pong = c.ping(ctx()).unwrap();
    assert!(
        pong.starts_with("ver:0.1.0, build:") && pong.contains(", myid:1, uptime:"),
        "{pong}"
    );
    let a = c.id_next(ctx()).unwrap();
    let b = c.id_next_with_tag(ctx(), 31).unwrap();
    assert!(b > a);
    let parts = c.id_decode(ctx(), b).unwrap();
    assert_eq!(parts[1..3], [31, 0]);
    let key = format!("rust-{transport:?}");
    let value: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    assert!(c.lc_set(ctx(), key.clone(), value.clone()).unwrap());
    assert_eq!(c.lc_get(ctx(), key.clone()).unwrap(), value);
    c.lc_del(ctx(), key.clone()).unwrap();
    match c.lc_get(ctx(), key.clone()) {
        Err(thrift::Error::User(e)) => assert!(e.downcast_ref::<TCacheMissed>().is_some(), "{e}"),
        other => panic!("lc_get after lc_del: {other:?}"),
    }
    assert!(c.lock(ctx(), "r".into(), key.clone()).unwrap());
    assert!(!c.lock(ctx(), "r".into(), key.clone()).unwrap());
    c.unlock(ctx(), "r".into(), key.clone()).unwrap();
    assert!(c.lock(ctx(), "r".into(), key.clone()).unwrap());
    let path = format!("/rust/{transport:?}/node");
    assert!(c.zk_create(ctx(), path.clone(), "data".into()).unwrap());
    assert!(!c.zk_create(ctx(), path.clone(), "data".into()).unwrap());
    assert_eq!(
        c.zk_children(ctx(), format!("/rust/{transport:?}"))
            .unwrap(),
        ["node"]
    );
    assert!(c.zk_del(ctx(), path.clone()).unwrap());
    assert!(c
        .zk_children(ctx(), format!("/rust/{transport:?}"))
        .unwrap()
        .is_empty());
    // Application errors keep the session.
    let bad = fae::client::Context::new(0, "x".into(), 0, None);
    match c.ping(bad) {
        Err(thrift::Error::Application(e)) => {
            assert_eq!(e.kind, thrift::ApplicationErrorKind::InternalError);
            assert!(e.message.contains("rid must be non-zero"), "{}", e.message);
        }
        other => panic!("ping with rid 0: {other:?}"),
    }
    match c.mc_get(ctx(), "pool".into(), "k".into()) {
        Err(thrift::Error::Application(e)) => {
            assert_eq!(e.kind, thrift::ApplicationErrorKind::InternalError);
            assert!(
                e.message.contains("unknown memcache pool \"pool\""),
                "{}",
                e.message
            );
        }
        other => panic!("mc_get: {other:?}"),
    }
    assert_eq!(c.noop(1).unwrap(), 1);
}

#[test]
fn generated_rust_client_calls_every_method_both_transports() {
    let f = Faed::start("");
    let addr = f.addr().to_string();
    exercise(&addr, Transport::Buffered);
    exercise(&addr, Transport::Framed);
    f.assert_alive();
}

#[test]
fn every_declared_metric_moves() {
    // slow_call_ms = 0: every call counts as slow. Missed deadlines cannot be caused from outside without
    // timing luck (in-memory calls take microseconds); the session's unit tests cover that counter.
    // my_evict is degraded: one call of it moves the rejection counter.
    let f = Faed::start_with(
        "message_timeout_ms = 1000",
        "[metrics]\nslow_call_ms = 0\n\n[degrade]\nmethods = [\"my_evict\"]\n",
    );
    const NOT_FROM_OUTSIDE: &[&str] = &["fae_deadline_exceeded_total"];
    let addr = f.addr().to_string();
    exercise(&addr, Transport::Buffered);
    let mut c = client::connect(&addr, Transport::Framed, Duration::from_secs(5)).expect("connect");
    assert!(c.lc_set(ctx(), "kept".into(), b"v".to_vec()).unwrap());
    match c.my_evict(ctx(), "k".into()) {
        Err(thrift::Error::Application(e)) => {
            assert!(e.message.contains("degraded"), "{}", e.message)
        }
        other => panic!("my_evict while degraded: {other:?}"),
    }
    // A malformed message and a stalled one.
    let mut bad = f.connect(Transport::Buffered);
    bad.send_raw(&[0x80, 0x02, 0x00, 0x01, 0, 0, 0, 0]);
    let mut stalled = f.connect(Transport::Buffered);
    stalled.send_raw(&[0x80, 0x01]);
    std::thread::sleep(Duration::from_millis(2500)); // the stalled session times out
                                                     // One session open while the gauge is read.
    let mut held = f.connect(Transport::Buffered);
    held.call(&common::ping_call(1));
    let metrics = http_get(f.admin_port, "/metrics");
    let mut families = Vec::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.push(rest.split_whitespace().next().unwrap().to_owned());
        }
    }
    assert!(families.len() >= 15, "{families:?}");
    for fam in families
        .iter()
        .filter(|f| !NOT_FROM_OUTSIDE.contains(&f.as_str()))
    {
        let moved = metrics.lines().any(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{fam} "))
                    || l.starts_with(&format!("{fam}{{"))
                    || l.starts_with(&format!("{fam}_")))
                && l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
        });
        assert!(moved, "metric {fam} never moved:\n{metrics}");
    }
    let stats = http_get(f.admin_port, "/api/stats");
    let json = &stats[stats.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(
        v["methods"]["lc_get"]["calls"].as_u64().unwrap() >= 2,
        "{v}"
    );
    assert!(v["protocol_errors"].as_u64().unwrap() >= 1, "{v}");
}
