//! Key placement: which server of a pool holds a key, computed exactly as the PHP clients FAE's users run
//! compute it, so that a key written by PHP straight into memcached is found by fae and the other way round.
//!
//! - `Standard`: PHP `memcache` with `hash_strategy=standard` (FAE's choice): `h = (crc32(key) >> 16) &
//!   0x7fff`, `h = 1` when it is 0, server `h % n`.
//! - `Consistent`: PHP `memcache`'s consistent strategy: 160 points per server at `crc32("HOST:PORT-i")`,
//!   sorted; 1,024 buckets, bucket `b` holding the first point at or after `b * (0xffffffff / 1024)`
//!   (wrapping); a key goes to bucket `crc32(key) % 1024`.
//! - `Ketama`: libmemcached's ketama (PHP `memcached` with `OPT_LIBKETAMA_COMPATIBLE`, and fae's Redis
//!   pools): for `i` in 0..40, `md5("HOST:PORT-i")` (`"HOST-i"` when the port is 11211) gives four points,
//!   its 4-byte groups read little-endian; a key hashes to the first four bytes of `md5(key)` read
//!   little-endian and goes to the first point at or after it (wrapping).
//!
//! The formulas and sample placements are in ../shared/TOOLCHAIN-backends.md; the tests below check them, and
//! the PHP suite checks them against the real extensions.
//!
//! Ejection (`eject = true`) takes servers out as twemproxy's `auto_eject_hosts` does: a ring walks on to
//! the next point of a server still in (the same as a ring rebuilt without the ejected ones), and the
//! standard strategy takes `h % live` over the servers still in.

use md5::{Digest, Md5};

use crate::config::McHash;

const PHP_BUCKETS: usize = 1024;

/// One pool's placement of keys on its servers (indexes into the pool's server list).
pub struct Ring {
    kind: McHash,
    n: usize,
    /// Ring points (hash, server), sorted by hash.
    points: Vec<(u32, u16)>,
    /// `Consistent` only: the index in `points` of each bucket's point.
    buckets: Vec<u16>,
}

impl Ring {
    /// The placement of `servers` (as configured: `HOST:PORT`).
    pub fn new(kind: McHash, servers: &[String]) -> Ring {
        let n = servers.len();
        let mut points = Vec::new();
        let mut buckets = Vec::new();
        match kind {
            McHash::Standard => {}
            McHash::Consistent => {
                for (s, name) in servers.iter().enumerate() {
                    for i in 0..160 {
                        let p = crc32fast::hash(format!("{name}-{i}").as_bytes());
                        points.push((p, s as u16));
                    }
                }
                points.sort_unstable();
                let step = 0xffff_ffffu32 / PHP_BUCKETS as u32;
                buckets = (0..PHP_BUCKETS)
                    .map(|b| first_at_or_after(&points, step.wrapping_mul(b as u32)) as u16)
                    .collect();
            }
            McHash::Ketama => {
                for (s, name) in servers.iter().enumerate() {
                    let label = match name.rsplit_once(':') {
                        Some((host, "11211")) => host,
                        _ => name.as_str(),
                    };
                    for i in 0..40 {
                        let d = Md5::digest(format!("{label}-{i}").as_bytes());
                        for k in 0..4 {
                            let b = [d[4 * k], d[4 * k + 1], d[4 * k + 2], d[4 * k + 3]];
                            points.push((u32::from_le_bytes(b), s as u16));
                        }
                    }
                }
                points.sort_unstable();
            }
        }
        Ring {
            kind,
            n,
            points,
            buckets,
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The server for `key`, skipping the servers whose bit is set in `ejected` (all of them set is treated
    /// as none: a pool never ejects every server).
    pub fn place(&self, key: &[u8], ejected: u64) -> usize {
        let all = if self.n >= 64 {
            u64::MAX
        } else {
            (1u64 << self.n) - 1
        };
        let ejected = if ejected & all == all { 0 } else { ejected };
        match self.kind {
            McHash::Standard => {
                let mut h = ((crc32fast::hash(key) >> 16) & 0x7fff) as usize;
                if h == 0 {
                    h = 1;
                }
                if ejected == 0 {
                    return h % self.n;
                }
                let live = (self.n as u32 - ejected.count_ones()) as usize;
                let pick = h % live;
                (0..self.n)
                    .filter(|s| ejected & (1 << s) == 0)
                    .nth(pick)
                    .unwrap_or(0)
            }
            McHash::Consistent => {
                let b = crc32fast::hash(key) as usize % PHP_BUCKETS;
                self.walk(self.buckets[b] as usize, ejected)
            }
            McHash::Ketama => {
                let d = Md5::digest(key);
                let h = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                self.walk(first_at_or_after(&self.points, h), ejected)
            }
        }
    }

    /// The server of point `i`, or of the first point after it whose server is not ejected.
    fn walk(&self, i: usize, ejected: u64) -> usize {
        let len = self.points.len();
        for k in 0..len {
            let s = self.points[(i + k) % len].1 as usize;
            if s >= 64 || ejected & (1 << s) == 0 {
                return s;
            }
        }
        self.points[i % len].1 as usize
    }
}

/// The index of the first point with a hash at or after `h`, wrapping to the first.
fn first_at_or_after(points: &[(u32, u16)], h: u32) -> usize {
    let i = points.partition_point(|p| p.0 < h);
    if i == points.len() {
        0
    } else {
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<String> {
        ["127.0.0.1:21211", "127.0.0.1:21212", "127.0.0.1:21213"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn first12(kind: McHash) -> String {
        let r = Ring::new(kind, &servers());
        (0..12)
            .map(|i| char::from(b'0' + r.place(format!("key:{i}").as_bytes(), 0) as u8))
            .collect()
    }

    // Sample placements verified against the PHP extensions (TOOLCHAIN-backends.md).
    #[test]
    fn standard_matches_php_memcache() {
        assert_eq!(first12(McHash::Standard), "020022222202");
        // A 15-bit hash of 0 counts as 1: these keys land on server 1 of 2 and 3 (checked with PHP).
        for key in ["z37384", "z63051", "z118415", "z171314"] {
            assert_eq!((crc32fast::hash(key.as_bytes()) >> 16) & 0x7fff, 0, "{key}");
            let r2 = Ring::new(McHash::Standard, &servers()[..2]);
            assert_eq!(r2.place(key.as_bytes(), 0), 1, "{key}");
            assert_eq!(
                Ring::new(McHash::Standard, &servers()).place(key.as_bytes(), 0),
                1
            );
        }
    }

    #[test]
    fn consistent_matches_php_memcache() {
        assert_eq!(first12(McHash::Consistent), "222121121220");
    }

    #[test]
    fn ketama_matches_libmemcached() {
        assert_eq!(first12(McHash::Ketama), "201111210101");
    }

    #[test]
    fn ejection_moves_only_the_ejected_servers_keys() {
        for kind in [McHash::Consistent, McHash::Ketama] {
            let r = Ring::new(kind, &servers());
            let without: Vec<String> = vec![servers()[0].clone(), servers()[2].clone()];
            let rebuilt = Ring::new(kind, &without);
            for i in 0..2000 {
                let key = format!("k{i}");
                let before = r.place(key.as_bytes(), 0);
                let after = r.place(key.as_bytes(), 0b010);
                assert_ne!(after, 1);
                if before != 1 {
                    assert_eq!(
                        before, after,
                        "{kind:?} {key}: a key of a live server moved"
                    );
                }
                // The same as a ring built without server 1.
                let idx = rebuilt.place(key.as_bytes(), 0);
                assert_eq!(after, if idx == 0 { 0 } else { 2 }, "{kind:?} {key}");
            }
        }
        let r = Ring::new(McHash::Standard, &servers());
        for i in 0..200 {
            let key = format!("k{i}");
            let h = ((crc32fast::hash(key.as_bytes()) >> 16) & 0x7fff).max(1) as usize;
            let want = [0, 2][h % 2];
            assert_eq!(r.place(key.as_bytes(), 0b010), want);
        }
        // Never every server.
        assert_eq!(r.place(b"key:0", 0b111), r.place(b"key:0", 0));
    }

    #[test]
    fn ketama_default_port_is_left_out_of_the_label() {
        let a = Ring::new(
            McHash::Ketama,
            &["10.0.0.1:11211".into(), "10.0.0.2:11211".into()],
        );
        let b = Ring::new(
            McHash::Ketama,
            &["10.0.0.1:11212".into(), "10.0.0.2:11212".into()],
        );
        let differs = (0..100).any(|i| {
            let k = format!("k{i}");
            a.place(k.as_bytes(), 0) != b.place(k.as_bytes(), 0)
        });
        assert!(differs);
    }
}
