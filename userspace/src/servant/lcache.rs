//! `lc_*`: the node-local LRU cache, bounded by item count and by bytes.
//!
//! Sharded by key hash so that event loops rarely meet on one lock; each shard holds its share of both
//! bounds and evicts its least recently used entries until it is under them.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

use crate::config::LcacheConfig;
use crate::wire::{ttype, Encoder};

/// What an entry costs beyond its key and value bytes (two boxes, the map slot and list links), so that a
/// flood of empty values is still bounded by `max_bytes`.
const ENTRY_OVERHEAD: usize = 64;

struct Shard {
    lru: LruCache<Box<[u8]>, Box<[u8]>>,
    bytes: usize,
    max_bytes: usize,
}

pub struct LCache {
    shards: Box<[Mutex<Shard>]>,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LcacheStats {
    pub items: usize,
    pub bytes: usize,
}

fn cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl LCache {
    pub fn new(cfg: &LcacheConfig) -> Self {
        let n = cfg.shards.max(1);
        let items = NonZeroUsize::new((cfg.max_items / n).max(1)).expect("at least one");
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruCache::new(items),
                    bytes: 0,
                    max_bytes: (cfg.max_bytes / n).max(1),
                })
            })
            .collect();
        LCache { shards }
    }

    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Shard> {
        let i = super::shard_of(key, self.shards.len());
        // A panic while holding a shard cannot leave it inconsistent beyond one entry: keep serving.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `value`; false when one entry alone is larger than a shard may hold.
    pub fn set(&self, key: &[u8], value: &[u8]) -> bool {
        let mut s = self.shard(key);
        let c = cost(key, value);
        if c > s.max_bytes {
            return false;
        }
        if let Some(old) = s.lru.pop(key) {
            s.bytes -= cost(key, &old);
        }
        while s.bytes + c > s.max_bytes {
            match s.lru.pop_lru() {
                Some((k, v)) => s.bytes -= cost(&k, &v),
                None => break,
            }
        }
        if let Some((k, v)) = s.lru.push(key.into(), value.into()) {
            // Pushed out by the item bound.
            s.bytes -= cost(&k, &v);
        }
        s.bytes += c;
        true
    }

    /// Writes the value as the result, or a `TCacheMissed`.
    pub fn get(&self, key: &[u8], out: &mut Encoder<'_>) {
        let mut s = self.shard(key);
        match s.lru.get(key) {
            Some(v) => out.field_bytes(0, v),
            None => {
                drop(s);
                cache_missed(out, key);
            }
        }
    }

    /// A copy of the value, for tests and tools.
    pub fn lookup(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.shard(key).lru.get(key).map(|v| v.to_vec())
    }

    pub fn del(&self, key: &[u8]) {
        let mut s = self.shard(key);
        if let Some(v) = s.lru.pop(key) {
            s.bytes -= cost(key, &v);
        }
    }

    /// Copies of every entry whose key matches (a vbucket being handed to another node).
    pub fn copy_matching(&self, matches: impl Fn(&[u8]) -> bool) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let s = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(
                s.lru
                    .iter()
                    .filter(|(k, _)| matches(k))
                    .map(|(k, v)| (k.to_vec(), v.to_vec())),
            );
        }
        out
    }

    /// Removes every entry whose key matches (a vbucket handed to another node).
    pub fn remove_matching(&self, matches: impl Fn(&[u8]) -> bool) {
        for shard in self.shards.iter() {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<Box<[u8]>> = s
                .lru
                .iter()
                .filter(|(k, _)| matches(k))
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                if let Some(v) = s.lru.pop(&k) {
                    s.bytes -= cost(&k, &v);
                }
            }
        }
    }

    pub fn stats(&self) -> LcacheStats {
        self.shards
            .iter()
            .fold(LcacheStats::default(), |mut acc, s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                acc.items += s.lru.len();
                acc.bytes += s.bytes;
                acc
            })
    }
}

/// The declared exception `TCacheMissed` as result field 1.
pub fn cache_missed(out: &mut Encoder<'_>, key: &[u8]) {
    out.field_begin(ttype::STRUCT, 1);
    out.field_fmt(
        11,
        format_args!("key not found: {}", String::from_utf8_lossy(key)),
    );
    out.stop();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_items: usize, max_bytes: usize) -> LCache {
        LCache::new(&LcacheConfig {
            max_items,
            max_bytes,
            shards: 1,
        })
    }

    #[test]
    fn bounded_by_items() {
        let c = cache(3, 1 << 20);
        for k in 0..10u8 {
            assert!(c.set(&[k], b"v"));
        }
        assert_eq!(c.stats().items, 3);
        assert_eq!(c.lookup(&[9]), Some(b"v".to_vec()));
        assert_eq!(c.lookup(&[0]), None);
        assert_eq!(c.stats().bytes, 3 * cost(&[0], b"v"));
    }

    #[test]
    fn bounded_by_bytes_and_lru_order() {
        let c = cache(1000, 3 * cost(b"k0", &[0; 100]));
        c.set(b"k0", &[0; 100]);
        c.set(b"k1", &[1; 100]);
        c.set(b"k2", &[2; 100]);
        assert!(c.lookup(b"k0").is_some()); // k0 is now most recent
        c.set(b"k3", &[3; 100]);
        assert_eq!(c.lookup(b"k1"), None, "least recently used goes first");
        assert!(c.lookup(b"k0").is_some());
        assert!(c.stats().bytes <= 3 * cost(b"k0", &[0; 100]));
        assert!(
            !c.set(b"huge", &vec![0; 1000]),
            "larger than the whole shard"
        );
        c.set(b"k0", &[9; 10]);
        c.del(b"k0");
        assert_eq!(c.stats().items, 2);
        assert_eq!(c.stats().bytes, 2 * cost(b"k0", &[0; 100]));
    }
}
