//! Moving a vbucket's cache entries and held locks to its new owner, driven by the replicated map.
//!
//! - **Driven by state, not events.** A thread looks at the published view (woken by map events, and every
//!   200 ms while a move is due): every vbucket this node owns with a pending owner is handed over, then
//!   `MoveDone` is proposed. A restart, a snapshot install or a dropped event only delays a move until the
//!   next look; a move re-targeted mid-flight is handed to whoever is pending now (the state machine ignores
//!   a `MoveDone` for an owner no longer pending).
//! - **Raw bytes, remaining TTLs, fences.** Batches travel on the authenticated cluster port
//!   (`Cluster::app_call`), in the binary layout below, keys and values as bytes: a binary key lands on the
//!   vbucket it hashes to. A lock carries the time it had left, and the new owner holds it exactly that long.
//!   A vbucket the source had fenced (it took it over without its locks, or restarted) carries the fence's
//!   time left, and the new owner refuses lock grants as long: it has no more idea of the locks than the
//!   source had.
//! - **Whole or nothing, and fresh.** The receiver checks every vbucket of a batch is pending to it and every
//!   key is in one of them, or refuses the batch. The first batch of a handoff (a random id per attempt)
//!   clears what the receiver held for its vbuckets, so entries left from an earlier ownership (a node failed
//!   over and back) never come back.
//! - **Entries leave with the vbucket.** The old owner keeps its entries until the map no longer names it
//!   (owner or pending): then they are dropped, as are the entries of any vbucket lost to failover.
//!
//! ```text
//! batch = "FAEH" | version 2 | handoff id u64 | from u64 | (vbucket u16, fence ms left u64) × (count u16)
//!         | entries (count u32) × (key len u32, key, value len u32, value)
//!         | locks (count u32) × (key len u32, key, ms left u64)          all big-endian
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fae_cluster::{vbucket_of, Cluster, ClusterEvent, ClusterView, VBUCKETS};

use super::caught_up;
use crate::servant::Servants;

const MAGIC: &[u8; 4] = b"FAEH";
const VERSION: u8 = 2;
/// A batch's size before it is sent (the cluster port takes `MAX_APP_REQUEST`).
const BATCH_BYTES: usize = 4 << 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One batch of a handoff.
#[derive(Debug, Default, PartialEq)]
pub struct Batch {
    pub id: u64,
    pub from: u64,
    pub vbuckets: Vec<u16>,
    /// Per vbucket (same order): how long its source still refuses lock grants on it, in ms (0: not).
    pub fences: Vec<u64>,
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    pub locks: Vec<(Vec<u8>, u64)>,
}

impl Batch {
    fn encoded_len(&self) -> usize {
        4 + 1
            + 16
            + 2
            + 10 * self.vbuckets.len()
            + 4
            + self
                .entries
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>()
            + 4
            + self.locks.iter().map(|(k, _)| 12 + k.len()).sum::<usize>()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len());
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&self.id.to_be_bytes());
        b.extend_from_slice(&self.from.to_be_bytes());
        b.extend_from_slice(&(self.vbuckets.len() as u16).to_be_bytes());
        for (vb, fence) in self.vbuckets.iter().zip(&self.fences) {
            b.extend_from_slice(&vb.to_be_bytes());
            b.extend_from_slice(&fence.to_be_bytes());
        }
        b.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for (k, v) in &self.entries {
            b.extend_from_slice(&(k.len() as u32).to_be_bytes());
            b.extend_from_slice(k);
            b.extend_from_slice(&(v.len() as u32).to_be_bytes());
            b.extend_from_slice(v);
        }
        b.extend_from_slice(&(self.locks.len() as u32).to_be_bytes());
        for (k, ms) in &self.locks {
            b.extend_from_slice(&(k.len() as u32).to_be_bytes());
            b.extend_from_slice(k);
            b.extend_from_slice(&ms.to_be_bytes());
        }
        b
    }

    /// Decodes a batch; every length is checked against what is left, so nothing is allocated past the
    /// input's own size.
    pub fn decode(b: &[u8]) -> Result<Batch, String> {
        let mut r = Cursor(b);
        if r.take(4)? != MAGIC || r.take(1)? != [VERSION] {
            return Err(format!("not a handoff batch of version {VERSION}"));
        }
        let id = r.u64()?;
        let from = r.u64()?;
        let n = r.u16()? as usize;
        if n > VBUCKETS {
            return Err(format!("{n} vbuckets"));
        }
        let (mut vbuckets, mut fences) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            vbuckets.push(r.u16()?);
            fences.push(r.u64()?);
        }
        let n = r.u32()? as usize;
        let mut entries = Vec::with_capacity(n.min(r.0.len() / 8));
        for _ in 0..n {
            let k = r.bytes()?;
            let v = r.bytes()?;
            entries.push((k, v));
        }
        let n = r.u32()? as usize;
        let mut locks = Vec::with_capacity(n.min(r.0.len() / 12));
        for _ in 0..n {
            let k = r.bytes()?;
            locks.push((k, r.u64()?));
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the batch", r.0.len()));
        }
        Ok(Batch {
            id,
            from,
            vbuckets,
            fences,
            entries,
            locks,
        })
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated handoff batch".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
}

/// What the receiving side keeps between batches.
struct Receiver {
    cluster: Weak<Cluster>,
    servants: Arc<Servants>,
    /// Per vbucket, the handoff whose batches it last took (a new one clears the vbucket first).
    taken: Mutex<HashMap<u16, u64>>,
    /// Held while batches are taken and while lost vbuckets are swept, so that a sweep by an older view
    /// never drops what a batch just brought.
    guard: Arc<Mutex<()>>,
}

impl Receiver {
    fn take(&self, peer: Option<u64>, request: &[u8]) -> Result<Vec<u8>, String> {
        let batch = Batch::decode(request)?;
        let cluster = self.cluster.upgrade().ok_or("stopping")?;
        if peer.is_some_and(|p| p != batch.from) {
            return Err(format!(
                "a handoff from node {} on a connection of node {}",
                batch.from,
                peer.unwrap_or(0)
            ));
        }
        let _g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        let view = cluster.view();
        if !caught_up(&view) {
            return Err("this node's map is not caught up yet; retry".into());
        }
        for &vb in &batch.vbuckets {
            let e = view.map.get(vb);
            if e.owner != batch.from || e.pending != Some(view.my_id) {
                return Err(format!(
                    "vbucket {vb} is not moving from node {} to this node here (owner {}, pending {:?}); retry",
                    batch.from, e.owner, e.pending
                ));
            }
        }
        let keys = batch
            .entries
            .iter()
            .map(|(k, _)| k)
            .chain(batch.locks.iter().map(|(k, _)| k));
        for k in keys {
            if !batch.vbuckets.contains(&vbucket_of(k)) {
                return Err(format!(
                    "a key of vbucket {} in a batch for {:?}",
                    vbucket_of(k),
                    batch.vbuckets
                ));
            }
        }
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let fresh: Vec<u16> = batch
            .vbuckets
            .iter()
            .copied()
            .filter(|vb| taken.insert(*vb, batch.id) != Some(batch.id))
            .collect();
        if !fresh.is_empty() {
            let stale = |k: &[u8]| fresh.contains(&vbucket_of(k));
            self.servants.lcache.remove_matching(stale);
            self.servants.lock.remove_matching(stale);
        }
        for (&vb, &ms) in batch.vbuckets.iter().zip(&batch.fences) {
            if ms > 0 {
                cluster.fence_locks(vb, Duration::from_millis(ms));
            }
        }
        for (k, v) in &batch.entries {
            self.servants.lcache.set(k, v);
        }
        for (k, ms) in &batch.locks {
            self.servants.lock.hold(k, Duration::from_millis(*ms));
        }
        Ok(Vec::new())
    }
}

/// Sends the vbuckets' entries and held locks to `to`, in batches of at most `BATCH_BYTES`.
fn hand_over(
    cluster: &Cluster,
    servants: &Servants,
    me: u64,
    to: u64,
    vbuckets: &[u16],
) -> Result<(usize, usize), String> {
    let in_vb = |k: &[u8]| vbuckets.contains(&vbucket_of(k));
    let entries = servants.lcache.copy_matching(in_vb);
    let locks = servants.lock.copy_matching(in_vb);
    let counts = (entries.len(), locks.len());
    let id = fae_cluster::random_u64();
    let fences: Vec<u64> = vbuckets
        .iter()
        .map(|&vb| {
            cluster
                .lock_fence(vb)
                .map_or(0, |d| d.as_millis().max(1) as u64)
        })
        .collect();
    let new_batch = || Batch {
        id,
        from: me,
        vbuckets: vbuckets.to_vec(),
        fences: fences.clone(),
        ..Batch::default()
    };
    let mut batch = new_batch();
    let mut size = 0;
    let send = |b: &Batch| {
        cluster
            .app_call(to, &b.encode(), CALL_TIMEOUT)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    for (k, v) in entries {
        let n = 8 + k.len() + v.len();
        if n + 64 + 10 * VBUCKETS > fae_cluster::MAX_APP_REQUEST {
            tracing::warn!(
                key_bytes = k.len(),
                value_bytes = v.len(),
                "a cache entry too large to hand over is dropped"
            );
            continue;
        }
        if size + n > BATCH_BYTES && !batch.entries.is_empty() {
            send(&batch)?;
            batch = new_batch();
            size = 0;
        }
        size += n;
        batch.entries.push((k, v));
    }
    for (k, left) in locks {
        let n = 12 + k.len();
        if size + n > BATCH_BYTES && !(batch.entries.is_empty() && batch.locks.is_empty()) {
            send(&batch)?;
            batch = new_batch();
            size = 0;
        }
        size += n;
        batch.locks.push((k, left.as_millis().max(1) as u64));
    }
    // The last batch goes even when empty: it clears what the receiver may hold from an earlier ownership.
    send(&batch)?;
    Ok(counts)
}

/// Drops the entries and locks of every vbucket the map no longer gives this node (owner or pending).
fn sweep(view: &ClusterView, servants: &Servants) {
    let me = view.my_id;
    let lost: Vec<bool> = (0..VBUCKETS as u16)
        .map(|vb| {
            let e = view.map.get(vb);
            e.owner != me && e.pending != Some(me)
        })
        .collect();
    if lost.iter().any(|&l| l) {
        let gone = |k: &[u8]| lost[usize::from(vbucket_of(k))];
        servants.lcache.remove_matching(gone);
        servants.lock.remove_matching(gone);
    }
}

/// Starts the handoff: the receiver of other members' batches and the thread that hands this node's moving
/// vbuckets over and sweeps lost ones. Runs until the cluster goes away.
pub fn spawn_handoff(cluster: &Arc<Cluster>, servants: Arc<Servants>) {
    let guard = Arc::new(Mutex::new(()));
    let receiver = Receiver {
        cluster: Arc::downgrade(cluster),
        servants: servants.clone(),
        taken: Mutex::new(HashMap::new()),
        guard: guard.clone(),
    };
    cluster.set_app_handler(move |peer, request| receiver.take(peer, request));
    let events = cluster.events();
    let weak: Weak<Cluster> = Arc::downgrade(cluster);
    let spawned = std::thread::Builder::new()
        .name("fae-handoff".into())
        .spawn(move || {
            let mut swept_epoch = None;
            let mut due = false;
            loop {
                // Events only wake the thread early; what to do comes from the view.
                let wait = Duration::from_millis(if due { 200 } else { 1000 });
                match &events {
                    Some(ev) => match ev.recv_timeout(wait) {
                        Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            ev.try_iter().for_each(|_: ClusterEvent| ())
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    },
                    None => std::thread::sleep(wait),
                }
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                let view = cluster.view();
                if !caught_up(&view) {
                    due = true;
                    continue;
                }
                if swept_epoch != Some(view.epoch) {
                    let _g = guard.lock().unwrap_or_else(|e| e.into_inner());
                    let view = cluster.view();
                    sweep(&view, &servants);
                    swept_epoch = Some(view.epoch);
                }
                let me = view.my_id;
                // By new owner and by the epoch each move began at (a completion names both).
                let mut moves: BTreeMap<(u64, u64), Vec<u16>> = BTreeMap::new();
                for vb in 0..VBUCKETS as u16 {
                    let e = view.map.get(vb);
                    if let (true, Some(to)) = (e.owner == me, e.pending) {
                        moves.entry((to, e.since)).or_default().push(vb);
                    }
                }
                due = !moves.is_empty();
                for ((to, since), vbs) in moves {
                    match hand_over(&cluster, &servants, me, to, &vbs) {
                        Ok((entries, locks)) => {
                            tracing::info!(
                                vbuckets = vbs.len(),
                                to,
                                entries,
                                locks,
                                "vbuckets handed over"
                            );
                            if let Err(e) = cluster.move_done(&vbs, me, to, since) {
                                tracing::warn!(to, error = %e, "cannot complete the moves yet");
                            }
                        }
                        Err(e) => {
                            tracing::debug!(to, error = %e, "vbucket handoff refused; retrying")
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the handoff thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_round_trips_binary_keys_and_refuses_garbage() {
        let b = Batch {
            id: 7,
            from: 3,
            vbuckets: vec![1, 1023],
            fences: vec![0, 2500],
            entries: vec![(vec![0, 255, 10], vec![]), (b"k".to_vec(), vec![1; 300])],
            locks: vec![(vec![0xff, 0xfe], 1234)],
        };
        let bytes = b.encode();
        assert_eq!(bytes.len(), b.encoded_len());
        assert_eq!(Batch::decode(&bytes).unwrap(), b);
        for cut in 0..bytes.len() {
            assert!(Batch::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // An absurd count does not allocate: it runs out of input.
        let mut absurd = bytes[..4 + 1 + 16 + 2 + 20].to_vec();
        absurd.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Batch::decode(&absurd).is_err());
    }
}
