//! The dashboard's history: every second a background thread samples the node's counters into a ring of an
//! hour's points (views read it; nothing is computed per view).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::AdminState;
use crate::engine::metrics::{MethodSnapshot, Snapshot, BUCKETS};
use crate::filter::Reason;

/// Points kept: an hour of seconds.
pub const KEEP: usize = 3600;

/// One second of the node.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Unix time, seconds.
    pub t: u64,
    pub calls_per_sec: f64,
    pub errors_per_sec: f64,
    /// Latency of the calls of this second (µs).
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub sessions: u64,
    pub slow_calls: u64,
    pub protocol_errors: u64,
    pub deadline_exceeded: u64,
    /// Calls the filters refused this second, by reason.
    pub rejected: [u64; 4],
    /// Back-end failures this second, all servers.
    pub backend_failures: u64,
    pub rss_kib: u64,
}

pub struct History {
    points: Mutex<VecDeque<Point>>,
}

impl History {
    pub fn new() -> History {
        History {
            points: Mutex::new(VecDeque::with_capacity(KEEP)),
        }
    }

    /// The points newer than `since` (Unix seconds), oldest first.
    pub fn since(&self, since: u64) -> Vec<Point> {
        let g = self.points.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().filter(|p| p.t > since).cloned().collect()
    }

    fn push(&self, p: Point) {
        let mut g = self.points.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() == KEEP {
            g.pop_front();
        }
        g.push_back(p);
    }
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

/// VmRSS of this process, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

struct Last {
    snap: Snapshot,
    rejected: [u64; 4],
    failures: u64,
}

fn totals(s: &Snapshot) -> (u64, u64, Vec<u64>) {
    let mut latency = vec![0u64; BUCKETS];
    for m in &s.methods {
        for (a, b) in latency.iter_mut().zip(&m.latency) {
            *a += b;
        }
    }
    (
        s.methods.iter().map(|m| m.calls).sum(),
        s.methods.iter().map(|m| m.errors).sum(),
        latency,
    )
}

fn backend_failures(state: &AdminState) -> u64 {
    state
        .servants
        .backends()
        .servers
        .iter()
        .map(|s| {
            s.metrics
                .failures
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<u64>()
        })
        .sum()
}

/// Starts the sampler thread.
pub fn spawn(state: Arc<AdminState>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("fae-history".into())
        .spawn(move || {
            let mut last = Last {
                snap: Snapshot::merge(&state.metrics),
                rejected: [0; 4],
                failures: backend_failures(&state),
            };
            loop {
                std::thread::sleep(Duration::from_secs(1));
                state.filters.tick();
                let snap = Snapshot::merge(&state.metrics);
                let rejected: [u64; 4] =
                    std::array::from_fn(|i| state.filters.rejected[i].load(Ordering::Relaxed));
                let failures = backend_failures(&state);
                let (calls, errors, lat) = totals(&snap);
                let (calls0, errors0, lat0) = totals(&last.snap);
                let delta = MethodSnapshot {
                    calls: 0,
                    errors: 0,
                    sum_ns: 0,
                    latency: lat
                        .iter()
                        .zip(&lat0)
                        .map(|(a, b)| a.saturating_sub(*b))
                        .collect(),
                };
                let q = |x| {
                    if calls > calls0 {
                        delta.quantile_us(x)
                    } else {
                        0.0
                    }
                };
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                state.history.push(Point {
                    t,
                    calls_per_sec: calls.saturating_sub(calls0) as f64,
                    errors_per_sec: errors.saturating_sub(errors0) as f64,
                    p50_us: q(0.5),
                    p99_us: q(0.99),
                    p999_us: q(0.999),
                    sessions: snap.sessions,
                    slow_calls: snap.slow_calls.saturating_sub(last.snap.slow_calls),
                    protocol_errors: snap
                        .protocol_errors
                        .saturating_sub(last.snap.protocol_errors),
                    deadline_exceeded: snap
                        .deadline_exceeded
                        .saturating_sub(last.snap.deadline_exceeded),
                    rejected: std::array::from_fn(|i| rejected[i].saturating_sub(last.rejected[i])),
                    backend_failures: failures.saturating_sub(last.failures),
                    rss_kib: rss_kib(),
                });
                last = Last {
                    snap,
                    rejected,
                    failures,
                };
            }
        })?;
    Ok(())
}

/// The names of `Point::rejected`'s entries.
pub fn rejected_names() -> [&'static str; 4] {
    Reason::ALL.map(Reason::name)
}
