//! An adaptive concurrency limit for all calls (`limits.adaptive`), after the gradient algorithms of
//! Netflix's concurrency-limits (Gradient2) and Envoy's adaptive concurrency filter: every window the limit
//! is multiplied by a gradient, `TOLERANCE × baseline / latest latency` (kept within 0.5..1), and grows by
//! its square root (the queue it allows). While latency stays within TOLERANCE of the baseline the limit
//! grows; as calls queue it shrinks, and calls past it are shed at once with "overloaded", before the
//! latency of the admitted ones collapses.
//!
//! The baseline is measured as Envoy measures its minRTT: at the start and every 30 s (±20%), the limit is
//! pinned to `adaptive_min` until a window of calls admitted after the pin has finished, and their mean
//! latency is the baseline (lowered by any faster window in between). A baseline taken from running windows
//! alone (Gradient2's long-term average) follows a sustained overload's queued latency up: the gradient
//! returns to 1 and the limit grows back. The pinned measurement does not drift, and a back end that has
//! become slower for good is taken as the new normal at the next one. docs/PERFORMANCE.md has the numbers
//! (scripts/bench-adaptive).
//!
//! Admitting a call is one atomic add on the calls in flight; every 100 ms (and 10 samples) one finishing
//! call takes the window's lock (a `try_lock`: the others skip) and moves the limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{CallInfo, Ending, Filter, Reason, Rejection};

const WINDOW: Duration = Duration::from_millis(100);
const MIN_SAMPLES: u64 = 10;
/// How much of a new estimate enters the limit per window.
const SMOOTHING: f64 = 0.2;
/// Latency up to this multiple of the baseline counts as no queueing.
const TOLERANCE: f64 = 2.0;
/// How often the baseline is measured again (±20%).
const PROBE_EVERY: Duration = Duration::from_secs(30);

pub struct Adaptive {
    min: u64,
    max: u64,
    limit: AtomicU64,
    inflight: AtomicU64,
    window: Mutex<Window>,
}

struct Window {
    start: Instant,
    sum_ns: u64,
    n: u64,
    /// Mean latency (ns) at the pinned limit; 0 before the first measurement.
    baseline: f64,
    /// While measuring the baseline: since when the limit is pinned (calls admitted earlier are not counted).
    probing: Option<Instant>,
    next_probe: Instant,
    estimate: f64,
}

impl Adaptive {
    pub fn new(min: u64, max: u64) -> Adaptive {
        let (min, max) = (min.max(1), max.max(1));
        let now = Instant::now();
        Adaptive {
            min,
            max,
            // Pinned until the first baseline is measured.
            limit: AtomicU64::new(min),
            inflight: AtomicU64::new(0),
            window: Mutex::new(Window {
                start: now,
                sum_ns: 0,
                n: 0,
                baseline: 0.0,
                probing: Some(now),
                next_probe: now,
                estimate: 64u64.clamp(min, max) as f64,
            }),
        }
    }

    fn sample(&self, call: &CallInfo, took: Duration) {
        let Ok(mut w) = self.window.try_lock() else {
            return;
        };
        if w.probing.is_some_and(|pinned| call.admitted < pinned) {
            return;
        }
        w.sum_ns += took.as_nanos() as u64;
        w.n += 1;
        if w.n < MIN_SAMPLES || w.start.elapsed() < WINDOW {
            return;
        }
        let short = (w.sum_ns / w.n).max(1) as f64;
        let now = Instant::now();
        w.start = now;
        w.sum_ns = 0;
        w.n = 0;
        if w.probing.take().is_some() {
            w.baseline = short;
            w.next_probe = now + PROBE_EVERY.mul_f64(0.8 + fastrand::f64() * 0.4);
            self.limit.store(w.estimate as u64, Ordering::Relaxed);
            return;
        }
        if now >= w.next_probe {
            w.probing = Some(now);
            self.limit.store(self.min, Ordering::Relaxed);
            return;
        }
        w.baseline = w.baseline.min(short);
        // Latency within TOLERANCE of the baseline: grow by the queue; above it: shrink.
        let gradient = (TOLERANCE * w.baseline / short).clamp(0.5, 1.0);
        let queue = w.estimate.sqrt();
        let next = w.estimate * gradient + queue;
        w.estimate = (w.estimate * (1.0 - SMOOTHING) + next * SMOOTHING)
            .clamp(self.min as f64, self.max as f64);
        self.limit.store(w.estimate as u64, Ordering::Relaxed);
    }
}

impl Filter for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn admit(&self, _call: &CallInfo) -> Result<(), Rejection> {
        let limit = self.limit.load(Ordering::Relaxed);
        let before = self.inflight.fetch_add(1, Ordering::AcqRel);
        if before < limit {
            return Ok(());
        }
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        Err(Rejection {
            reason: Reason::Overloaded,
            message: format!(
                "overloaded: {before} calls in flight at the adaptive concurrency limit ({limit}); retry later"
            ),
        })
    }

    fn done(&self, call: &CallInfo, ending: Ending) {
        let _ = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        if ending.ok {
            self.sample(call, ending.took);
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "limit": self.limit.load(Ordering::Relaxed),
            "inflight": self.inflight.load(Ordering::Relaxed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> CallInfo {
        CallInfo {
            method: crate::servant::Method::Noop,
            peer: std::net::Ipv4Addr::LOCALHOST.into(),
            admitted: Instant::now(),
            caller: Default::default(),
        }
    }

    /// Feeds windows of calls of latency `us` µs; returns the limit after `windows` of them.
    fn feed(a: &Adaptive, us: u64, windows: usize) -> u64 {
        for _ in 0..windows {
            {
                let mut w = a.window.lock().unwrap();
                w.start = Instant::now() - WINDOW;
            }
            for _ in 0..MIN_SAMPLES {
                a.done(
                    &call(),
                    Ending {
                        took: Duration::from_micros(us),
                        ok: true,
                    },
                );
            }
        }
        a.limit.load(Ordering::Relaxed)
    }

    #[test]
    fn grows_while_latency_holds_and_shrinks_when_it_rises() {
        let a = Adaptive::new(8, 10_000);
        let start = a.limit.load(Ordering::Relaxed);
        let grown = feed(&a, 100, 50);
        assert!(grown > start, "{start} -> {grown}");
        let shrunk = feed(&a, 2_000, 20);
        assert!(shrunk < grown / 2, "{grown} -> {shrunk}");
        assert!(shrunk >= 8);
    }

    /// A back end that became slower for good: at the next measurement its latency is the baseline and the
    /// limit grows again.
    #[test]
    fn a_lasting_slowdown_becomes_the_baseline() {
        let a = Adaptive::new(8, 10_000);
        feed(&a, 100, 30);
        let low = feed(&a, 1_000, 20);
        // The next measurement of the baseline: the limit is pinned to its minimum meanwhile.
        a.window.lock().unwrap().next_probe = Instant::now();
        feed(&a, 1_000, 1);
        assert_eq!(a.limit.load(Ordering::Relaxed), 8);
        feed(&a, 1_000, 1);
        assert_eq!(a.limit.load(Ordering::Relaxed), low, "back to the estimate");
        let recovered = feed(&a, 1_000, 50);
        assert!(recovered > low * 2, "{low} -> {recovered}");
    }

    #[test]
    fn sheds_past_the_limit() {
        let a = Adaptive::new(2, 2);
        assert!(a.admit(&call()).is_ok());
        assert!(a.admit(&call()).is_ok());
        assert_eq!(a.admit(&call()).unwrap_err().reason, Reason::Overloaded);
        a.done(
            &call(),
            Ending {
                took: Duration::ZERO,
                ok: false,
            },
        );
        assert!(a.admit(&call()).is_ok());
    }
}
