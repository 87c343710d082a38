//! `fae check`: a correctness run for a node, through the generated Rust client. Every connection calls
//! every in-memory servant once and checks each answer, then makes `calls` more calls (noop with a
//! distinct argument each, and every tenth a value written and read back), checking every answer.
//! Unlike `fae bench`, it verifies values, not only that a reply came.

use std::time::{Duration, Instant};

use super::{connect, context, Client, TFunServantSyncClient, Transport};

#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub addr: String,
    pub connections: usize,
    pub calls: usize,
    pub value_size: usize,
    pub transport: Transport,
    pub timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub connections: usize,
    pub calls: u64,
    pub failures: u64,
    /// The first failures, described.
    pub first_failures: Vec<String>,
    pub seconds: f64,
}

fn value(conn: usize, i: usize, size: usize) -> Vec<u8> {
    (0..size).map(|j| (conn * 31 + i * 7 + j) as u8).collect()
}

/// One connection's work; returns (calls, failures described).
fn one(cfg: &CheckConfig, conn: usize) -> (u64, Vec<String>) {
    let mut fails = Vec::new();
    let mut calls = 0u64;
    let mut c: Client = match connect(&cfg.addr, cfg.transport, cfg.timeout) {
        Ok(c) => c,
        Err(e) => return (0, vec![format!("conn {conn}: {e}")]),
    };
    let ctx = || context("fae-check");
    macro_rules! check {
        ($what:expr, $call:expr, $ok:expr) => {{
            calls += 1;
            match $call {
                Ok(v) =>
                {
                    #[allow(clippy::redundant_closure_call)]
                    if !($ok)(&v) {
                        fails.push(format!("conn {conn}: {}: unexpected answer {:?}", $what, v));
                    }
                }
                Err(e) => fails.push(format!("conn {conn}: {}: {e}", $what)),
            }
        }};
    }
    let key = format!("check:{conn}");
    let path = format!("/check/{conn}");
    check!("ping", c.ping(ctx()), |v: &String| v.starts_with("ver:"));
    check!("id_next", c.id_next(ctx()), |v: &i64| *v > 0);
    check!(
        "id_next_with_tag",
        c.id_next_with_tag(ctx(), 9),
        |v: &i64| (*v >> 17) & 31 == 9
    );
    check!(
        "id_decode",
        c.id_decode(ctx(), 5 << 22 | 3 << 17),
        |v: &Vec<i64>| v.len() == 4 && v[1] == 3
    );
    check!(
        "lock",
        c.lock(ctx(), "check".into(), key.clone()),
        |v: &bool| *v
    );
    check!(
        "lock held",
        c.lock(ctx(), "check".into(), key.clone()),
        |v: &bool| !*v
    );
    check!(
        "unlock",
        c.unlock(ctx(), "check".into(), key.clone()),
        |_: &()| true
    );
    check!(
        "zk_create",
        c.zk_create(ctx(), path.clone(), "d".into()),
        |v: &bool| *v
    );
    check!(
        "zk_children",
        c.zk_children(ctx(), "/check".into()),
        |v: &Vec<String>| v.contains(&conn.to_string())
    );
    check!("zk_del", c.zk_del(ctx(), path.clone()), |v: &bool| *v);
    for i in 0..cfg.calls {
        if i % 10 == 9 {
            let v = value(conn, i, cfg.value_size);
            check!(
                "lc_set",
                c.lc_set(ctx(), key.clone(), v.clone()),
                |ok: &bool| *ok
            );
            check!("lc_get", c.lc_get(ctx(), key.clone()), |got: &Vec<u8>| *got
                == v);
        } else {
            let x = (conn * 1_000_003 + i) as i32;
            check!("noop", c.noop(x), |got: &i32| *got == x);
        }
        if fails.len() > 10 {
            break;
        }
    }
    check!("lc_del", c.lc_del(ctx(), key.clone()), |_: &()| true);
    (calls, fails)
}

pub fn run(cfg: &CheckConfig) -> CheckReport {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..cfg.connections)
        .map(|i| {
            let cfg = cfg.clone();
            std::thread::spawn(move || one(&cfg, i))
        })
        .collect();
    let mut report = CheckReport {
        connections: cfg.connections,
        calls: 0,
        failures: 0,
        first_failures: Vec::new(),
        seconds: 0.0,
    };
    for h in handles {
        let (calls, fails) = h
            .join()
            .unwrap_or((0, vec!["a check thread panicked".into()]));
        report.calls += calls;
        report.failures += fails.len() as u64;
        for f in fails {
            if report.first_failures.len() < 20 {
                report.first_failures.push(f);
            }
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report
}
