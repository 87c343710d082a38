//! Calls per second per client IP (`limits.client_calls_per_sec`, bursts of `client_burst`), by GCRA (the
//! generic cell rate algorithm): one timestamp per client, moved with a compare-and-swap, so admitting a call
//! takes no lock beyond finding the client's cell.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{CallInfo, Filter, Reason, Rejection};

const SHARDS: usize = 16;

pub struct ClientRate {
    rate: u64,
    /// Nanoseconds between two calls at the rate.
    interval: u64,
    /// How far ahead of now a client's theoretical arrival time may run: its burst.
    tolerance: u64,
    epoch: Instant,
    /// Per client, the theoretical arrival time of its next call (ns since `epoch`).
    cells: Vec<Mutex<HashMap<IpAddr, Arc<AtomicU64>>>>,
}

impl ClientRate {
    pub fn new(rate: u64, burst: u64) -> ClientRate {
        let interval = (1_000_000_000 / rate.max(1)).max(1);
        let burst = if burst == 0 { rate } else { burst };
        ClientRate {
            rate,
            interval,
            tolerance: interval.saturating_mul(burst.max(1)),
            epoch: Instant::now(),
            cells: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn cell(&self, ip: IpAddr) -> Arc<AtomicU64> {
        let shard = match ip {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => u128::from(a) as usize,
        } % SHARDS;
        let mut g = self.cells[shard].lock().unwrap_or_else(|p| p.into_inner());
        g.entry(ip)
            .or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone()
    }
}

impl Filter for ClientRate {
    fn name(&self) -> &'static str {
        "rate"
    }

    fn admit(&self, call: &CallInfo) -> Result<(), Rejection> {
        let now = call
            .admitted
            .saturating_duration_since(self.epoch)
            .as_nanos() as u64;
        let cell = self.cell(call.peer);
        let mut tat = cell.load(Ordering::Acquire);
        loop {
            let start = tat.max(now);
            if start - now >= self.tolerance {
                return Err(Rejection {
                    reason: Reason::RateLimited,
                    message: format!(
                        "rate limited: client {} is over {} calls/s (limits.client_calls_per_sec)",
                        call.peer, self.rate
                    ),
                });
            }
            match cell.compare_exchange_weak(
                tat,
                start + self.interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Forgets clients whose cell has caught up with now (they would start afresh anyway).
    fn tick(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        for shard in &self.cells {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, c| c.load(Ordering::Relaxed) > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn admits_the_rate_and_a_burst_per_client() {
        let f = ClientRate::new(100, 10);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let at = |ip, ms: u64| CallInfo {
            method: crate::servant::Method::Noop,
            peer: ip,
            admitted: t0 + Duration::from_millis(ms),
            caller: Default::default(),
        };
        // A burst of 10 at once, then refused.
        let admitted = (0..20).filter(|_| f.admit(&at(a, 0)).is_ok()).count();
        assert_eq!(admitted, 10);
        // Another client is not affected.
        assert!(f.admit(&at(b, 0)).is_ok());
        // One second later, 100 calls spread over it are admitted (the rate), with the burst refilled.
        let admitted = (0..100)
            .filter(|i| f.admit(&at(a, 1000 + i * 10)).is_ok())
            .count();
        assert!((99..=100).contains(&admitted), "{admitted}");
        f.tick();
    }
}
