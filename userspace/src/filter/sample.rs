//! The sampled call log (`metrics.sample_per_10000`, FAE's profiler_rate): one call in so many is logged when
//! it ends, with its method, client, duration and outcome, as one structured line on stderr (journald).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{CallInfo, Ending, Filter, Rejection};

pub struct Sample {
    every: u64,
    seen: AtomicU64,
}

impl Sample {
    pub fn new(per_10000: u32) -> Sample {
        Sample {
            every: (10_000 / u64::from(per_10000.max(1))).max(1),
            seen: AtomicU64::new(0),
        }
    }
}

impl Filter for Sample {
    fn name(&self) -> &'static str {
        "sample"
    }

    fn admit(&self, _call: &CallInfo) -> Result<(), Rejection> {
        Ok(())
    }

    fn done(&self, call: &CallInfo, ending: Ending) {
        if self.seen.fetch_add(1, Ordering::Relaxed) % self.every == 0 {
            tracing::info!(
                target: "fae::calls",
                method = call.method.name(),
                client = %call.peer,
                caller = %call.caller.name(),
                took_us = ending.took.as_micros() as u64,
                ok = ending.ok,
                "sampled call"
            );
        }
    }
}
