//! `lock`/`unlock`: named locks with expiry, so that a holder that dies never blocks a key for ever.
//!
//! Node-local for now; the cluster routes each key to the node owning its vbucket, which makes a lock held
//! on that node a cluster lock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::LockConfig;

const SHARDS: usize = 16;

struct Shard {
    held: HashMap<Box<[u8]>, Instant>,
    /// Size at which the next insert first sweeps out expired entries.
    sweep_at: usize,
}

pub struct Locks {
    shards: Box<[Mutex<Shard>]>,
    ttl: Duration,
}

impl Locks {
    pub fn new(cfg: &LockConfig) -> Self {
        Locks {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        held: HashMap::new(),
                        sweep_at: 1024,
                    })
                })
                .collect(),
            ttl: Duration::from_millis(cfg.ttl_ms),
        }
    }

    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[super::shard_of(key, SHARDS)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// True if the lock was free (absent or expired) and is now held until the ttl passes.
    pub fn lock(&self, key: &[u8]) -> bool {
        self.lock_at(key, Instant::now())
    }

    fn lock_at(&self, key: &[u8], now: Instant) -> bool {
        let mut s = self.shard(key);
        if let Some(expiry) = s.held.get_mut(key) {
            if *expiry > now {
                return false;
            }
            *expiry = now + self.ttl;
            return true;
        }
        if s.held.len() >= s.sweep_at {
            s.held.retain(|_, expiry| *expiry > now);
            s.sweep_at = (s.held.len() * 2).max(1024);
        }
        s.held.insert(key.into(), now + self.ttl);
        true
    }

    pub fn unlock(&self, key: &[u8]) {
        self.shard(key).held.remove(key);
    }

    /// The held (unexpired) locks whose key matches (a vbucket being handed over), each with the time it
    /// has left: the new owner holds it exactly that long, not a fresh TTL.
    pub fn copy_matching(&self, matches: impl Fn(&[u8]) -> bool) -> Vec<(Vec<u8>, Duration)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let s = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(
                s.held
                    .iter()
                    .filter(|(k, e)| matches(k) && **e > now)
                    .map(|(k, e)| (k.to_vec(), e.duration_since(now))),
            );
        }
        out
    }

    /// Holds `key` for `left` (a lock handed over with the time it had left); a lock already held here
    /// keeps the later expiry.
    pub fn hold(&self, key: &[u8], left: Duration) {
        let until = Instant::now() + left.min(self.ttl);
        let mut s = self.shard(key);
        let e = s.held.entry(key.into()).or_insert(until);
        *e = (*e).max(until);
    }

    /// Drops every lock whose key matches (a vbucket handed over).
    pub fn remove_matching(&self, matches: impl Fn(&[u8]) -> bool) {
        for shard in self.shards.iter() {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            s.held.retain(|k, _| !matches(k));
        }
    }

    /// Locks held and not expired.
    pub fn held(&self) -> usize {
        let now = Instant::now();
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.held.values().filter(|e| **e > now).count()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_until_unlock_or_expiry() {
        let l = Locks::new(&LockConfig { ttl_ms: 1000 });
        let t0 = Instant::now();
        assert!(l.lock_at(b"k", t0));
        assert!(!l.lock_at(b"k", t0 + Duration::from_millis(999)));
        assert!(l.lock_at(b"k", t0 + Duration::from_millis(1001)), "expired");
        l.unlock(b"k");
        assert!(l.lock_at(b"k", t0 + Duration::from_millis(1002)));
        assert!(l.lock_at(b"other", t0));
    }

    #[test]
    fn expired_entries_are_swept() {
        let l = Locks::new(&LockConfig { ttl_ms: 10 });
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            l.lock_at(&i.to_be_bytes(), t0);
        }
        let later = t0 + Duration::from_secs(1);
        for i in 100_000..200_000u32 {
            l.lock_at(&i.to_be_bytes(), later);
        }
        let total: usize = l.shards.iter().map(|s| s.lock().unwrap().held.len()).sum();
        assert!(total < 150_000, "expired locks kept: {total}");
    }
}
