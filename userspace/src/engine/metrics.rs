//! Per-loop metrics: plain counters written only by their loop's thread and merged when read.
//!
//! Each loop owns its counters, so the hot path never shares a cache line with another core: a counter is
//! bumped with a relaxed load and store (no locked read-modify-write), and readers see a value that is at
//! most a few calls old.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::servant::Method;

/// Metrics slots: every method, then one for unknown method names.
pub const SLOTS: usize = Method::ALL.len() + 1;
pub const UNKNOWN_SLOT: usize = Method::ALL.len();
/// Latency buckets: four per power of two of nanoseconds, up to 2^36 ns (about 69 s).
pub const BUCKETS: usize = 4 * 36;

/// The bucket holding a latency of `ns` nanoseconds.
pub fn bucket(ns: u64) -> usize {
    if ns < 4 {
        return ns as usize;
    }
    let p = 63 - ns.leading_zeros() as usize;
    let sub = ((ns >> (p - 2)) & 3) as usize;
    (p * 4 + sub - 4).min(BUCKETS - 1)
}

/// The exclusive upper bound of bucket `i`, in nanoseconds.
pub fn bucket_upper(i: usize) -> u64 {
    if i < 4 {
        return i as u64 + 1;
    }
    let p = (i + 4) / 4;
    let sub = ((i + 4) % 4) as u64;
    (4 + sub + 1) << (p - 2)
}

fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// One event loop's counters.
pub struct LoopMetrics {
    calls: Box<[AtomicU64]>,
    errors: Box<[AtomicU64]>,
    latency: Box<[AtomicU64]>,
    /// Total nanoseconds of each slot's calls (the histograms' `_sum`).
    latency_sum: Box<[AtomicU64]>,
    pub sessions: AtomicU64,
    pub accepted: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub slow_calls: AtomicU64,
    pub deadline_exceeded: AtomicU64,
    pub timed_out_sessions: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Calls forwarded to the node owning their key.
    pub forwarded: AtomicU64,
}

fn zeros(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl Default for LoopMetrics {
    fn default() -> Self {
        LoopMetrics {
            calls: zeros(SLOTS),
            errors: zeros(SLOTS),
            latency: zeros(SLOTS * BUCKETS),
            latency_sum: zeros(SLOTS),
            sessions: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            slow_calls: AtomicU64::new(0),
            deadline_exceeded: AtomicU64::new(0),
            timed_out_sessions: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
        }
    }
}

impl LoopMetrics {
    /// Records one call: `slot` is `Method as usize` or [`UNKNOWN_SLOT`].
    pub fn call(&self, slot: usize, ns: u64, error: bool) {
        bump(&self.calls[slot], 1);
        if error {
            bump(&self.errors[slot], 1);
        }
        bump(&self.latency[slot * BUCKETS + bucket(ns)], 1);
        bump(&self.latency_sum[slot], ns);
    }

    /// Bumps one of the loop's plain counters (only from the loop's own thread).
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        bump(counter, n);
    }

    /// Session gauge changes, from the loop's own thread.
    pub fn session_opened(&self) {
        bump(&self.sessions, 1);
        bump(&self.accepted, 1);
    }
    pub fn session_closed(&self) {
        let c = &self.sessions;
        c.store(
            c.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
    }
}

/// Counters of one method, merged over loops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodSnapshot {
    pub calls: u64,
    pub errors: u64,
    pub latency: Vec<u64>,
    pub sum_ns: u64,
}

impl MethodSnapshot {
    /// The latency below which `q` of the calls completed, in microseconds (bucket upper bound).
    pub fn quantile_us(&self, q: f64) -> f64 {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_upper(i) as f64 / 1000.0;
            }
        }
        bucket_upper(BUCKETS - 1) as f64 / 1000.0
    }
}

/// All loops' counters merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub methods: Vec<MethodSnapshot>,
    pub sessions: u64,
    pub accepted: u64,
    pub protocol_errors: u64,
    pub slow_calls: u64,
    pub deadline_exceeded: u64,
    pub timed_out_sessions: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub forwarded: u64,
}

impl Snapshot {
    pub fn merge(loops: &[std::sync::Arc<LoopMetrics>]) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let sum = |f: &dyn Fn(&LoopMetrics) -> u64| loops.iter().map(|l| f(l)).sum::<u64>();
        let methods = (0..SLOTS)
            .map(|slot| MethodSnapshot {
                calls: sum(&|l| get(&l.calls[slot])),
                errors: sum(&|l| get(&l.errors[slot])),
                latency: (0..BUCKETS)
                    .map(|b| sum(&|l| get(&l.latency[slot * BUCKETS + b])))
                    .collect(),
                sum_ns: sum(&|l| get(&l.latency_sum[slot])),
            })
            .collect();
        Snapshot {
            methods,
            sessions: sum(&|l| get(&l.sessions)),
            accepted: sum(&|l| get(&l.accepted)),
            protocol_errors: sum(&|l| get(&l.protocol_errors)),
            slow_calls: sum(&|l| get(&l.slow_calls)),
            deadline_exceeded: sum(&|l| get(&l.deadline_exceeded)),
            timed_out_sessions: sum(&|l| get(&l.timed_out_sessions)),
            bytes_in: sum(&|l| get(&l.bytes_in)),
            bytes_out: sum(&|l| get(&l.bytes_out)),
            forwarded: sum(&|l| get(&l.forwarded)),
        }
    }

    /// The name of a metrics slot.
    pub fn slot_name(slot: usize) -> &'static str {
        Method::ALL.get(slot).map_or("unknown", |m| m.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_values() {
        for ns in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            100,
            1000,
            123_456,
            1 << 20,
            5_000_000_000,
        ] {
            let b = bucket(ns);
            assert!(
                ns < bucket_upper(b),
                "{ns} in bucket {b} < {}",
                bucket_upper(b)
            );
            if b > 0 {
                assert!(ns >= bucket_upper(b - 1), "{ns} below bucket {b}");
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles() {
        let m = LoopMetrics::default();
        for _ in 0..99 {
            m.call(0, 1_000, false);
        }
        m.call(0, 1_000_000, true);
        let s = Snapshot::merge(&[std::sync::Arc::new(m)]);
        let noop = &s.methods[0];
        assert_eq!((noop.calls, noop.errors), (100, 1));
        assert!(noop.quantile_us(0.5) <= 1.25 && noop.quantile_us(0.5) >= 1.0);
        assert!(noop.quantile_us(0.999) >= 1000.0);
    }
}
