//! An adaptive concurrency limit for all calls (`limits.adaptive`), after the gradient algorithm of Netflix's
//! concurrency-limits (Gradient2) and Envoy's adaptive concurrency filter: the limit follows the ratio of the
//! long-term latency to the latest window's, growing by about its square root while latency holds and
//! shrinking as queueing shows; calls past it are shed at once with "overloaded", before the latency of the
//! admitted ones collapses.
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
/// How fast the long-term latency follows the windows'.
const LONG_WEIGHT: f64 = 0.05;

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
    /// Long-term latency (ns), an exponential average of the windows'.
    long: f64,
    estimate: f64,
}

impl Adaptive {
    pub fn new(min: u64, max: u64) -> Adaptive {
        let initial = 64u64.clamp(min.max(1), max.max(1));
        Adaptive {
            min: min.max(1),
            max: max.max(1),
            limit: AtomicU64::new(initial),
            inflight: AtomicU64::new(0),
            window: Mutex::new(Window {
                start: Instant::now(),
                sum_ns: 0,
                n: 0,
                long: 0.0,
                estimate: initial as f64,
            }),
        }
    }

    fn sample(&self, took: Duration) {
        let Ok(mut w) = self.window.try_lock() else {
            return;
        };
        w.sum_ns += took.as_nanos() as u64;
        w.n += 1;
        if w.n < MIN_SAMPLES || w.start.elapsed() < WINDOW {
            return;
        }
        let short = (w.sum_ns / w.n).max(1) as f64;
        w.long = if w.long == 0.0 {
            short
        } else {
            w.long * (1.0 - LONG_WEIGHT) + short * LONG_WEIGHT
        };
        // Latency above its long-term level means queueing: shrink; at or below it: grow by the queue.
        let gradient = (w.long / short).clamp(0.5, 1.0);
        let queue = w.estimate.sqrt();
        let next = w.estimate * gradient + queue;
        w.estimate = (w.estimate * (1.0 - SMOOTHING) + next * SMOOTHING)
            .clamp(self.min as f64, self.max as f64);
        // A long-term level far above the latest window's (load went away) decays toward it faster.
        if w.long > 2.0 * short {
            w.long = short * 2.0;
        }
        self.limit.store(w.estimate as u64, Ordering::Relaxed);
        w.start = Instant::now();
        w.sum_ns = 0;
        w.n = 0;
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

    fn done(&self, _call: &CallInfo, ending: Ending) {
        let _ = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        if ending.ok {
            self.sample(ending.took);
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
