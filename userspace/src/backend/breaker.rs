//! A circuit breaker per back-end server, shared by every back end (memcache, Redis, MySQL).
//!
//! Closed, it lets every call through and watches outcomes: it opens after `consecutive_failures` system
//! failures in a row, or when the failure rate over a sliding window (`window_ms`, ten buckets) passes
//! `failure_rate` once `min_calls` calls have been seen there. Calls slower than `slow_call_ms` count as
//! failures. Open, it refuses at once; after `open_ms` (jittered by ±20 %, doubled for every failed probe
//! round up to `max_open_ms`) it goes half-open and lets at most `half_open_probes` calls through at a time;
//! `close_after` successes close it, one failure opens it again. Only system failures count (connect,
//! timeout, broken connection, protocol garbage, slowness): an application answer (NOT_STORED, WRONGTYPE, a
//! duplicate key) is a success of the server.
//!
//! The closed state is read with one atomic load, so the event loops ask the breaker before every call for
//! free; everything else takes a mutex that only the outcome of a call or a state change needs.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// Buckets of the sliding window.
const WINDOW_BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
}

/// Leave to make one call: hand it back with the call's outcome ([`Breaker::record`]) or unused
/// ([`Breaker::release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    probe: bool,
    /// The half-open round a probe belongs to: a probe of an earlier round that ends late moves nothing.
    round: u32,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub state: State,
    /// How long until probes are let through (zero while half-open probes are already out).
    pub retry_in: Duration,
    pub last_failure: String,
}

/// A call's outcome, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered (an application error is an answer).
    Success,
    /// Connect, timeout, broken connection, protocol garbage.
    Failure,
}

#[derive(Default, Clone, Copy)]
struct Bucket {
    /// Which window slot this bucket holds (the slot number it was last reset for).
    slot: u64,
    calls: u32,
    failures: u32,
}

struct Inner {
    consecutive: u32,
    window: [Bucket; WINDOW_BUCKETS],
    open_until: Option<Instant>,
    /// Failed probe rounds in a row: the open period doubles for each.
    backoff: u32,
    probes_out: u32,
    probe_successes: u32,
    /// Half-open rounds so far.
    round: u32,
    last_failure: String,
}

pub struct Breaker {
    cfg: BreakerConfig,
    state: AtomicU8,
    inner: Mutex<Inner>,
    epoch: Instant,
    /// Transitions into each state, for metrics.
    pub opened: AtomicU64,
    pub half_opened: AtomicU64,
    pub closed: AtomicU64,
}

impl Breaker {
    pub fn new(cfg: &BreakerConfig) -> Breaker {
        Breaker {
            cfg: cfg.clone(),
            state: AtomicU8::new(State::Closed as u8),
            inner: Mutex::new(Inner {
                consecutive: 0,
                window: [Bucket::default(); WINDOW_BUCKETS],
                open_until: None,
                backoff: 0,
                probes_out: 0,
                probe_successes: 0,
                round: 0,
                last_failure: String::new(),
            }),
            epoch: Instant::now(),
            opened: AtomicU64::new(0),
            half_opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether the server is open and not yet due for probes: the condition for ejecting it from its ring.
    pub fn rejecting(&self, now: Instant) -> bool {
        if self.state() != State::Open {
            return false;
        }
        self.lock().open_until.is_some_and(|t| now < t)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks to make a call now.
    pub fn admit(&self, now: Instant) -> Result<Permit, Refused> {
        const NORMAL: Permit = Permit {
            probe: false,
            round: 0,
        };
        if self.state() == State::Closed {
            return Ok(NORMAL);
        }
        let mut g = self.lock();
        match self.state() {
            State::Closed => Ok(NORMAL),
            State::Open => {
                let until = g.open_until.unwrap_or(now);
                if now < until {
                    return Err(Refused {
                        state: State::Open,
                        retry_in: until - now,
                        last_failure: g.last_failure.clone(),
                    });
                }
                self.set(State::HalfOpen);
                g.round = g.round.wrapping_add(1);
                g.probes_out = 1;
                g.probe_successes = 0;
                Ok(Permit {
                    probe: true,
                    round: g.round,
                })
            }
            State::HalfOpen => {
                if g.probes_out < self.cfg.half_open_probes {
                    g.probes_out += 1;
                    Ok(Permit {
                        probe: true,
                        round: g.round,
                    })
                } else {
                    Err(Refused {
                        state: State::HalfOpen,
                        retry_in: Duration::ZERO,
                        last_failure: g.last_failure.clone(),
                    })
                }
            }
        }
    }

    /// A permitted call that was never made (refused before it reached the server).
    pub fn release(&self, p: Permit) {
        if p.probe {
            let mut g = self.lock();
            if p.round == g.round && self.state() == State::HalfOpen {
                g.probes_out = g.probes_out.saturating_sub(1);
            }
        }
    }

    /// The outcome of a permitted call that took `took`; `why` describes a failure.
    pub fn record(&self, p: Permit, outcome: Outcome, took: Duration, now: Instant, why: &str) {
        let slow = took > Duration::from_millis(self.cfg.slow_call_ms);
        let failed = outcome == Outcome::Failure || slow;
        if !failed && !p.probe && self.state() == State::Closed {
            // The common case: one success while closed. Only the window needs it, and a consecutive-run reset.
            let mut g = self.lock();
            g.consecutive = 0;
            self.count(&mut g, now, false);
            return;
        }
        let mut g = self.lock();
        if failed {
            g.last_failure = if outcome == Outcome::Failure {
                why.to_owned()
            } else {
                format!(
                    "a call took {} ms (slow_call_ms {})",
                    took.as_millis(),
                    self.cfg.slow_call_ms
                )
            };
        }
        // A probe counts only in its own half-open round.
        let probe = p.probe && p.round == g.round && self.state() == State::HalfOpen;
        if probe {
            g.probes_out = g.probes_out.saturating_sub(1);
        }
        match self.state() {
            State::Closed => {
                self.count(&mut g, now, failed);
                if failed {
                    g.consecutive += 1;
                    let (calls, failures) = self.window_totals(&g, now);
                    let rate_trips = calls >= self.cfg.min_calls
                        && f64::from(failures) / f64::from(calls) > self.cfg.failure_rate;
                    if g.consecutive >= self.cfg.consecutive_failures || rate_trips {
                        self.open(&mut g, now);
                    }
                } else {
                    g.consecutive = 0;
                }
            }
            State::HalfOpen if probe => {
                if failed {
                    g.backoff = g.backoff.saturating_add(1);
                    self.open(&mut g, now);
                } else {
                    g.probe_successes += 1;
                    if g.probe_successes >= self.cfg.close_after {
                        g.consecutive = 0;
                        g.backoff = 0;
                        g.window = [Bucket::default(); WINDOW_BUCKETS];
                        g.open_until = None;
                        self.set(State::Closed);
                    }
                }
            }
            // Calls admitted before the breaker opened, ending now: they do not move it.
            _ => {}
        }
    }

    fn set(&self, s: State) {
        self.state.store(s as u8, Ordering::Release);
        let c = match s {
            State::Closed => &self.closed,
            State::Open => &self.opened,
            State::HalfOpen => &self.half_opened,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn open(&self, g: &mut Inner, now: Instant) {
        let base = self
            .cfg
            .open_ms
            .saturating_mul(1u64 << g.backoff.min(20))
            .min(self.cfg.max_open_ms);
        // ±20 % so that the breakers of many nodes do not probe a recovering server in step.
        let jitter = 0.8 + fastrand::f64() * 0.4;
        let ms = ((base as f64) * jitter).max(1.0) as u64;
        g.open_until = Some(now + Duration::from_millis(ms));
        g.probes_out = 0;
        g.probe_successes = 0;
        self.set(State::Open);
    }

    fn slot_of(&self, now: Instant) -> u64 {
        let width = (self.cfg.window_ms / WINDOW_BUCKETS as u64).max(1);
        now.saturating_duration_since(self.epoch).as_millis() as u64 / width
    }

    fn count(&self, g: &mut Inner, now: Instant, failed: bool) {
        let slot = self.slot_of(now);
        let b = &mut g.window[(slot % WINDOW_BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Bucket {
                slot,
                calls: 0,
                failures: 0,
            };
        }
        b.calls += 1;
        b.failures += u32::from(failed);
    }

    fn window_totals(&self, g: &Inner, now: Instant) -> (u32, u32) {
        let slot = self.slot_of(now);
        g.window
            .iter()
            .filter(|b| b.slot + (WINDOW_BUCKETS as u64) > slot && b.slot <= slot)
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window_ms: 1_000,
            min_calls: 10,
            slow_call_ms: 100,
            open_ms: 100,
            max_open_ms: 1_000,
            half_open_probes: 2,
            close_after: 2,
            eject: false,
            max_ejected_percent: 50,
        }
    }

    fn call(b: &Breaker, now: Instant, outcome: Outcome) -> Result<(), Refused> {
        let p = b.admit(now)?;
        b.record(p, outcome, Duration::from_millis(1), now, "boom");
        Ok(())
    }

    #[test]
    fn opens_after_consecutive_failures_and_refuses_at_once() {
        let b = Breaker::new(&cfg());
        let t = Instant::now();
        call(&b, t, Outcome::Failure).unwrap();
        call(&b, t, Outcome::Failure).unwrap();
        call(&b, t, Outcome::Success).unwrap(); // a success breaks the run
        call(&b, t, Outcome::Failure).unwrap();
        call(&b, t, Outcome::Failure).unwrap();
        assert_eq!(b.state(), State::Closed);
        call(&b, t, Outcome::Failure).unwrap();
        assert_eq!(b.state(), State::Open);
        let r = b.admit(t).unwrap_err();
        assert_eq!(r.state, State::Open);
        assert_eq!(r.last_failure, "boom");
        assert!(r.retry_in > Duration::from_millis(70) && r.retry_in <= Duration::from_millis(120));
        assert!(b.rejecting(t));
    }

    #[test]
    fn opens_on_failure_rate_once_min_calls_are_seen() {
        let b = Breaker::new(&cfg());
        let t = Instant::now();
        // Alternating: never three in a row, but a rate of one half, then above.
        for i in 0..9 {
            let o = if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            call(&b, t, o).unwrap();
        }
        assert_eq!(b.state(), State::Closed, "9 calls < min_calls");
        call(&b, t, Outcome::Success).unwrap(); // 10 calls, 5 failures: 0.5 is not above 0.5
        assert_eq!(b.state(), State::Closed);
        call(&b, t, Outcome::Failure).unwrap(); // 11 calls, 6 failures
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn old_window_buckets_are_forgotten() {
        let b = Breaker::new(&cfg());
        let t = Instant::now();
        // Twenty calls, every second one failing: the rate stays at one half, never above.
        for i in 0..20 {
            let o = if i % 2 == 1 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            call(&b, t, o).unwrap();
        }
        assert_eq!(b.state(), State::Closed);
        // Two seconds later the window is empty: a failure alone does not trip the rate.
        let later = t + Duration::from_secs(2);
        call(&b, later, Outcome::Failure).unwrap();
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn slow_calls_count_as_failures() {
        let b = Breaker::new(&cfg());
        let t = Instant::now();
        for _ in 0..3 {
            let p = b.admit(t).unwrap();
            b.record(p, Outcome::Success, Duration::from_millis(150), t, "");
        }
        assert_eq!(b.state(), State::Open);
        assert!(b.admit(t).unwrap_err().last_failure.contains("150 ms"));
    }

    #[test]
    fn half_open_bounds_probes_then_closes_or_reopens_with_backoff() {
        let b = Breaker::new(&cfg());
        let t = Instant::now();
        for _ in 0..3 {
            call(&b, t, Outcome::Failure).unwrap();
        }
        let t1 = t + Duration::from_millis(200);
        let p1 = b.admit(t1).unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        let p2 = b.admit(t1).unwrap();
        assert_eq!(
            b.admit(t1).unwrap_err().state,
            State::HalfOpen,
            "two probes at most"
        );
        // A failed probe opens it again, for twice as long (±20 %).
        b.record(
            p1,
            Outcome::Failure,
            Duration::from_millis(1),
            t1,
            "still down",
        );
        assert_eq!(b.state(), State::Open);
        b.record(p2, Outcome::Success, Duration::from_millis(1), t1, "");
        assert_eq!(b.state(), State::Open, "a late probe does not close it");
        let r = b.admit(t1).unwrap_err();
        assert!(r.retry_in >= Duration::from_millis(160), "{r:?}");
        let t2 = t1 + Duration::from_millis(300);
        let p = b.admit(t2).unwrap();
        b.record(p, Outcome::Success, Duration::from_millis(1), t2, "");
        assert_eq!(b.state(), State::HalfOpen);
        let p = b.admit(t2).unwrap();
        b.record(p, Outcome::Success, Duration::from_millis(1), t2, "");
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.opened.load(Ordering::Relaxed), 2);
        assert_eq!(b.half_opened.load(Ordering::Relaxed), 2);
        assert_eq!(b.closed.load(Ordering::Relaxed), 1);
        // Closed again with a clean slate: two failures do not open it.
        call(&b, t2, Outcome::Failure).unwrap();
        call(&b, t2, Outcome::Failure).unwrap();
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_probe_of_an_earlier_round_moves_nothing() {
        let b = Breaker::new(&cfg());
        let t = Instant::now();
        for _ in 0..3 {
            call(&b, t, Outcome::Failure).unwrap();
        }
        let t1 = t + Duration::from_millis(200);
        let old = b.admit(t1).unwrap();
        let failing = b.admit(t1).unwrap();
        b.record(
            failing,
            Outcome::Failure,
            Duration::from_millis(1),
            t1,
            "down",
        );
        let t2 = t1 + Duration::from_millis(500);
        let p1 = b.admit(t2).unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        // The first round's probe ends now: it neither frees a place nor counts toward closing.
        b.record(old, Outcome::Success, Duration::from_millis(1), t2, "");
        b.release(old);
        let _p2 = b.admit(t2).unwrap();
        assert!(b.admit(t2).is_err(), "still two probes out");
        b.record(p1, Outcome::Success, Duration::from_millis(1), t2, "");
        assert_eq!(
            b.state(),
            State::HalfOpen,
            "one success of this round is not close_after = 2"
        );
    }

    #[test]
    fn released_probe_frees_its_place() {
        let b = Breaker::new(&cfg());
        let t = Instant::now();
        for _ in 0..3 {
            call(&b, t, Outcome::Failure).unwrap();
        }
        let t1 = t + Duration::from_millis(200);
        let p1 = b.admit(t1).unwrap();
        let _p2 = b.admit(t1).unwrap();
        assert!(b.admit(t1).is_err());
        b.release(p1);
        assert!(b.admit(t1).is_ok());
    }
}
