//! Snowflake ids, bit for bit the layout of the original FAE so that ids from both systems decode alike:
//! `(now_ms - EPOCH_MS) << 22 | tag << 17 | worker_id << 12 | seq`.
//!
//! One atomic word holds the last (millisecond, sequence) pair for the whole node, so ids are unique across
//! every event loop without a lock: a compare-and-swap per id. The tag is not part of the sequence: the
//! (millisecond, sequence) pair alone never repeats, whatever the tag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::CallError;
use crate::config::IdgenConfig;
use crate::wire::{ttype, Encoder};

/// FAE's epoch: 2014-01-04T23:29:34.657Z.
pub const EPOCH_MS: u64 = 1_388_834_974_657;
const SEQ_BITS: u32 = 12;
const SEQ_MAX: u64 = (1 << SEQ_BITS) - 1;
const TIME_BITS: u32 = 41;
pub const MAX_TAG: i16 = 31;
pub const MAX_WORKER: u8 = 31;

/// Reads the wall clock in unix milliseconds.
pub type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

fn system_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct IdGen {
    /// The worker id (a cluster node gets its own when it joins, after the servants exist).
    worker: AtomicU64,
    /// `(ms since EPOCH_MS) << SEQ_BITS | seq` of the last id issued.
    last: AtomicU64,
    clock: Clock,
    max_backwards: Duration,
}

impl IdGen {
    pub fn new(cfg: &IdgenConfig) -> Self {
        Self::with_clock(cfg, Box::new(system_clock))
    }

    pub fn with_clock(cfg: &IdgenConfig, clock: Clock) -> Self {
        IdGen {
            worker: AtomicU64::new(u64::from(cfg.worker_id)),
            last: AtomicU64::new(0),
            clock,
            max_backwards: Duration::from_millis(cfg.max_clock_backwards_ms),
        }
    }

    /// Sets the worker id (0..31): a cluster node's, assigned when it joins.
    pub fn set_worker(&self, worker: u8) {
        self.worker.store(u64::from(worker), Ordering::Relaxed);
    }

    pub fn next_with_tag(&self, tag: i16) -> Result<i64, CallError> {
        if !(0..=MAX_TAG).contains(&tag) {
            return Err(CallError::refused(format!(
                "tag {tag} out of range 0..{MAX_TAG}"
            )));
        }
        self.next(tag as u64)
    }

    /// The next id. Sequence exhausted within a millisecond: wait for the next one. Clock behind the last id
    /// issued: wait up to `max_clock_backwards_ms` for it to catch up, then refuse — never a duplicate.
    pub fn next(&self, tag: u64) -> Result<i64, CallError> {
        let mut waiting_since: Option<Instant> = None;
        loop {
            // The last id is read before the clock, so that a clock reading older than it means the clock
            // really went back, not that another loop issued an id in between.
            let cur = self.last.load(Ordering::Acquire);
            let now = (self.clock)();
            let Some(t) = now.checked_sub(EPOCH_MS).filter(|t| *t < 1 << TIME_BITS) else {
                return Err(CallError::refused(format!(
                    "clock reads {now} ms, outside the id range of epoch {EPOCH_MS}"
                )));
            };
            let (last_t, seq) = (cur >> SEQ_BITS, cur & SEQ_MAX);
            let next = if t > last_t {
                t << SEQ_BITS
            } else if t == last_t && seq < SEQ_MAX {
                cur + 1
            } else if t == last_t {
                // Sequence used up within this millisecond: the next one is at most a millisecond away.
                std::hint::spin_loop();
                continue;
            } else {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                let behind = last_t - t;
                if since.elapsed() > self.max_backwards {
                    return Err(CallError::refused(format!(
                        "clock moved backwards by {behind} ms; no id issued rather than risk a duplicate"
                    )));
                }
                std::hint::spin_loop();
                std::thread::yield_now();
                continue;
            };
            if self
                .last
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let (t, seq) = (next >> SEQ_BITS, next & SEQ_MAX);
                let worker = self.worker.load(Ordering::Relaxed);
                return Ok((t << 22 | tag << 17 | worker << 12 | seq) as i64);
            }
        }
    }
}

/// `[ts_ms, tag, worker_id, seq]`, with `ts_ms` in unix milliseconds.
pub fn decode_parts(id: i64) -> [i64; 4] {
    let id = id as u64;
    [
        ((id >> 22) + EPOCH_MS) as i64,
        ((id >> 17) & 0x1f) as i64,
        ((id >> 12) & 0x1f) as i64,
        (id & SEQ_MAX) as i64,
    ]
}

pub fn decode(id: i64, out: &mut Encoder<'_>) {
    out.field_begin(ttype::LIST, 0);
    out.list_begin(ttype::I64, 4);
    for v in decode_parts(id) {
        out.i64(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicI64;
    use std::sync::Arc;

    fn cfg(worker_id: u8) -> IdgenConfig {
        IdgenConfig {
            worker_id,
            max_clock_backwards_ms: 5,
        }
    }

    #[test]
    fn layout_matches_fae() {
        let g = IdGen::with_clock(&cfg(3), Box::new(|| EPOCH_MS + 1000));
        let id = g.next_with_tag(7).unwrap();
        assert_eq!(id, 1000 << 22 | 7 << 17 | 3 << 12);
        assert_eq!(decode_parts(id), [(EPOCH_MS + 1000) as i64, 7, 3, 0]);
        assert_eq!(decode_parts(g.next(7).unwrap())[3], 1);
        assert!(g.next_with_tag(32).is_err());
        assert!(g.next_with_tag(-1).is_err());
    }

    #[test]
    fn sequence_exhaustion_waits_for_the_next_millisecond() {
        let calls = Arc::new(AtomicI64::new(0));
        let c = calls.clone();
        // The clock advances one ms every 5000 reads.
        let g = IdGen::with_clock(
            &cfg(0),
            Box::new(move || EPOCH_MS + 10 + c.fetch_add(1, Ordering::Relaxed) as u64 / 5000),
        );
        let ids: Vec<i64> = (0..10_000).map(|_| g.next(0).unwrap()).collect();
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn clock_stepping_back_never_duplicates() {
        let now = Arc::new(AtomicI64::new(5_000));
        let n = now.clone();
        let g = IdGen::with_clock(
            &cfg(0),
            Box::new(move || EPOCH_MS + n.load(Ordering::Relaxed) as u64),
        );
        let a = g.next(0).unwrap();
        now.store(4_000, Ordering::Relaxed); // one second back
        let err = g.next(0).unwrap_err();
        assert!(
            err.message.contains("backwards by 1000 ms"),
            "{}",
            err.message
        );
        now.store(5_000, Ordering::Relaxed);
        let b = g.next(0).unwrap();
        assert!(b > a);
    }

    #[test]
    fn unique_across_threads() {
        let g = Arc::new(IdGen::new(&cfg(1)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..20_000).map(|_| g.next(0).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().unwrap() {
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 80_000);
    }
}
