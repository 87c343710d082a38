//! The vbucket map and rebalance planning: pure functions, no I/O.
//!
//! A key lives in vbucket `crc32(key) % 1024`; every vbucket has one owner. During a planned move the map also
//! names a pending owner: the old owner keeps serving until the handoff of the vbucket's entries is done
//! (`MoveDone`), so a lock is never held by two owners.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The number of vbuckets, fixed for the life of a cluster.
pub const VBUCKETS: usize = 1024;

/// The vbucket of a key: `crc32(key) % 1024`, the rule API.md fixes for every node.
pub fn vbucket_of(key: &[u8]) -> u16 {
    (crc32fast::hash(key) % VBUCKETS as u32) as u16
}

/// One vbucket's owner (node id; 0 = nobody yet) and, during a move, the node taking it over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vbucket {
    pub owner: u64,
    pub pending: Option<u64>,
    /// The map epoch at which the pending move began (0 without one): a `MoveDone` names it, so that a
    /// completion sent for an earlier move of the vbucket (re-targeted since) cannot complete this one.
    #[serde(default)]
    pub since: u64,
}

impl Vbucket {
    /// The owner once every move under way is done.
    pub fn target(&self) -> u64 {
        self.pending.unwrap_or(self.owner)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VbucketMap {
    entries: Vec<Vbucket>,
}

impl Default for VbucketMap {
    fn default() -> Self {
        VbucketMap::owned_by(0)
    }
}

impl VbucketMap {
    /// Every vbucket owned by `node`.
    pub fn owned_by(node: u64) -> Self {
        VbucketMap {
            entries: vec![
                Vbucket {
                    owner: node,
                    pending: None,
                    since: 0,
                };
                VBUCKETS
            ],
        }
    }

    pub fn get(&self, vbucket: u16) -> Vbucket {
        self.entries[vbucket as usize % VBUCKETS]
    }

    pub(crate) fn get_mut(&mut self, vbucket: u16) -> &mut Vbucket {
        &mut self.entries[vbucket as usize % VBUCKETS]
    }

    /// The node that serves the vbucket now.
    pub fn owner(&self, vbucket: u16) -> u64 {
        self.get(vbucket).owner
    }

    /// The node that serves `key` now.
    pub fn owner_of_key(&self, key: &[u8]) -> u64 {
        self.owner(vbucket_of(key))
    }

    pub fn entries(&self) -> &[Vbucket] {
        &self.entries
    }

    /// Vbuckets per current owner.
    pub fn counts(&self) -> BTreeMap<u64, usize> {
        let mut c = BTreeMap::new();
        for e in &self.entries {
            *c.entry(e.owner).or_insert(0) += 1;
        }
        c
    }

    /// Vbuckets per owner once the moves under way are done.
    pub fn target_counts(&self) -> BTreeMap<u64, usize> {
        let mut c = BTreeMap::new();
        for e in &self.entries {
            *c.entry(e.target()).or_insert(0) += 1;
        }
        c
    }

    /// The vbuckets with a move under way.
    pub fn pending(&self) -> impl Iterator<Item = (u16, Vbucket)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.pending.is_some())
            .map(|(i, e)| (i as u16, *e))
    }
}

/// One vbucket to move: `from` is its target owner before the plan (0 = nobody).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub vbucket: u16,
    pub from: u64,
    pub to: u64,
}

/// The fewest moves that spread the vbuckets evenly over `nodes` (counts differ by at most one).
///
/// Works on target owners (moves under way count as done). Vbuckets of nodes not in `nodes` must move; of the
/// rest, a node keeps up to its share, and the `1024 % n` larger shares go to the nodes that hold the most now
/// (ties: lower id), which makes the number of moves the minimum: every vbucket above a node's share, plus
/// every orphan. A node gives up its highest-numbered vbuckets; receivers, in id order, take the lowest
/// freed ones. Same input, same plan, on every node.
pub fn plan(map: &VbucketMap, nodes: &[u64]) -> Vec<Move> {
    let mut ids: Vec<u64> = nodes.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Vec::new();
    }
    let mut held: BTreeMap<u64, Vec<u16>> = ids.iter().map(|&id| (id, Vec::new())).collect();
    let mut pool: Vec<u16> = Vec::new();
    for (vb, e) in map.entries.iter().enumerate() {
        match held.get_mut(&e.target()) {
            Some(v) => v.push(vb as u16),
            None => pool.push(vb as u16),
        }
    }
    let n = ids.len();
    let base = VBUCKETS / n;
    let extra = VBUCKETS % n;
    let mut by_size: Vec<u64> = ids.clone();
    by_size.sort_by(|a, b| held[b].len().cmp(&held[a].len()).then(a.cmp(b)));
    let share: BTreeMap<u64, usize> = by_size
        .iter()
        .enumerate()
        .map(|(rank, &id)| (id, base + usize::from(rank < extra)))
        .collect();
    for (id, vbs) in held.iter_mut() {
        let keep = share[id];
        if vbs.len() > keep {
            pool.extend(vbs.drain(keep..));
        }
    }
    pool.sort_unstable();
    let mut pool = pool.into_iter();
    let mut moves = Vec::new();
    for (id, vbs) in &held {
        for _ in vbs.len()..share[id] {
            let vb = pool.next().expect("shares sum to VBUCKETS");
            moves.push(Move {
                vbucket: vb,
                from: map.get(vb).target(),
                to: *id,
            });
        }
    }
    moves.sort_by_key(|m| m.vbucket);
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(map: &mut VbucketMap, moves: &[Move]) {
        for m in moves {
            *map.get_mut(m.vbucket) = Vbucket {
                owner: m.to,
                pending: None,
                since: 0,
            };
        }
    }

    fn sorted_counts(map: &VbucketMap) -> Vec<usize> {
        let mut c: Vec<usize> = map.counts().values().copied().collect();
        c.sort_unstable();
        c
    }

    #[test]
    fn three_nodes_from_one() {
        let mut map = VbucketMap::owned_by(1);
        let moves = plan(&map, &[1, 2, 3]);
        assert_eq!(moves.len(), 1024 - 342);
        apply(&mut map, &moves);
        assert_eq!(map.counts()[&1], 342);
        assert_eq!(sorted_counts(&map), vec![341, 341, 342]);
        assert!(
            plan(&map, &[1, 2, 3]).is_empty(),
            "a balanced map needs no move"
        );
    }

    #[test]
    fn fourth_node_takes_256_with_fewest_moves() {
        let mut map = VbucketMap::owned_by(1);
        let moves = plan(&map, &[1, 2, 3]);
        apply(&mut map, &moves);
        let moves = plan(&map, &[1, 2, 3, 4]);
        // Only vbuckets above each node's share move: 86 + 85 + 85.
        assert_eq!(moves.len(), 256);
        assert!(moves.iter().all(|m| m.to == 4));
        apply(&mut map, &moves);
        assert_eq!(sorted_counts(&map), vec![256; 4]);
    }

    #[test]
    fn removing_a_node_spreads_only_its_vbuckets() {
        let mut map = VbucketMap::owned_by(1);
        let moves = plan(&map, &[1, 2, 3, 4]);
        apply(&mut map, &moves);
        let before = map.clone();
        let moves = plan(&map, &[1, 2, 4]);
        assert_eq!(moves.len(), 256);
        assert!(moves.iter().all(|m| m.from == 3));
        apply(&mut map, &moves);
        assert_eq!(sorted_counts(&map), vec![341, 341, 342]);
        for vb in 0..VBUCKETS as u16 {
            if before.owner(vb) != 3 {
                assert_eq!(
                    before.owner(vb),
                    map.owner(vb),
                    "vbucket {vb} moved needlessly"
                );
            }
        }
    }

    #[test]
    fn moves_are_minimal_and_deterministic_for_uneven_maps() {
        // An arbitrary uneven map over 5 owners, one of which leaves.
        let mut map = VbucketMap::owned_by(1);
        for vb in 0..VBUCKETS as u16 {
            map.get_mut(vb).owner = [1, 1, 2, 3, 3, 3, 5, 7][vb as usize * 7 % 8];
        }
        let nodes = [1, 2, 3, 5, 9];
        let moves = plan(&map, &nodes);
        assert_eq!(moves, plan(&map, &nodes));
        let counts = map.counts();
        let orphans: usize = counts
            .iter()
            .filter(|(id, _)| !nodes.contains(id))
            .map(|(_, c)| c)
            .sum();
        // Lower bound: orphans, plus what the largest holders keep above the largest share.
        let mut held: Vec<usize> = nodes
            .iter()
            .map(|id| counts.get(id).copied().unwrap_or(0))
            .collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        let (base, extra) = (VBUCKETS / nodes.len(), VBUCKETS % nodes.len());
        let excess: usize = held
            .iter()
            .enumerate()
            .map(|(i, &h)| h.saturating_sub(base + usize::from(i < extra)))
            .sum();
        assert_eq!(moves.len(), orphans + excess);
        apply(&mut map, &moves);
        let c = sorted_counts(&map);
        assert!(c.last().unwrap() - c.first().unwrap() <= 1, "{c:?}");
        assert_eq!(c.iter().sum::<usize>(), VBUCKETS);
    }

    #[test]
    fn pending_moves_count_as_done() {
        let mut map = VbucketMap::owned_by(1);
        for m in plan(&map, &[1, 2]) {
            map.get_mut(m.vbucket).pending = Some(m.to);
        }
        assert!(plan(&map, &[1, 2]).is_empty());
        assert_eq!(
            map.target_counts().values().copied().collect::<Vec<_>>(),
            vec![512, 512]
        );
    }

    #[test]
    fn vbucket_of_is_crc32_mod_1024() {
        assert_eq!(vbucket_of(b""), 0);
        assert_eq!(
            u32::from(vbucket_of(b"hello")),
            crc32fast::hash(b"hello") % 1024
        );
        assert_eq!(
            crc32fast::hash(b"123456789"),
            0xCBF4_3926,
            "the IEEE crc32 everyone else computes"
        );
    }
}
