//! The replicated state machine: members, the vbucket map, the registry tree and the map epoch.
//!
//! Every node applies the same commands in the same order, so everything here is deterministic: no clock, no
//! randomness, no I/O. Rebalancing happens inside `apply` for the same reason: the plan is a pure function of
//! the state, so every node computes the same moves without shipping them in the log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rebalance::{self, Vbucket, VbucketMap, VBUCKETS};
use crate::registry::{RegistryLimits, Tree};

/// Idgen worker ids are 5 bits (API.md's snowflake layout): at most 32 members.
pub const MAX_MEMBERS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// This node asked to join and has not yet received the cluster's state (only ever seen in a node's
    /// own status, never in the replicated members).
    Joining,
    /// A raft learner catching up; owns no vbuckets.
    Learner,
    /// A raft voter; owns its share of the vbuckets.
    Voter,
    /// Asked to leave: handing its vbuckets over, then removed from the group.
    Leaving,
    /// Silent for longer than the failover timeout: its vbuckets went to the others.
    Failed,
}

/// What a node tells the cluster about itself when it joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: u64,
    pub rpc_addr: String,
    pub raft_addr: String,
    /// Where the node serves its admin port and dashboard ("" when it has none).
    #[serde(default)]
    pub admin_addr: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// Where the node serves the FunServant API (calls are forwarded there).
    pub rpc_addr: String,
    /// The node's cluster port (raft traffic and the cluster RPC).
    pub raft_addr: String,
    /// The node's admin port and dashboard ("" when it has none, or joined before fae knew it).
    #[serde(default)]
    pub admin_addr: String,
    pub state: MemberState,
    /// Whether raft counts the node as a voter (kept while the node is failed, to restore its state).
    pub voter: bool,
    /// The node's idgen worker id, unique in the cluster.
    pub worker_id: u8,
}

impl Member {
    /// Reachable as far as the cluster knows: its vbuckets are handed over, not taken.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            MemberState::Learner | MemberState::Voter | MemberState::Leaving
        )
    }
}

/// A change to the replicated state, carried in a raft entry (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    RegistryCreate {
        path: String,
        data: Vec<u8>,
        /// The proposer's `[registry]` limits, checked again at apply (every node decides alike). `None` in
        /// entries written before limits travelled with them.
        #[serde(default)]
        limits: Option<RegistryLimits>,
    },
    RegistryDelete {
        path: String,
    },
    /// The pending owners of these vbuckets become their owners (the handoff is done). With `from`/`to`,
    /// only moves from `from` to `to` complete: a MoveDone for an older move (a node re-applying its log
    /// replays its old moves) must not complete a newer move of the same vbucket before its handoff.
    MoveDone {
        vbuckets: Vec<u16>,
        #[serde(default)]
        from: Option<u64>,
        #[serde(default)]
        to: Option<u64>,
        /// The `since` of the moves completed (see `Vbucket::since`); `None`: any.
        #[serde(default)]
        since: Option<u64>,
    },
    MarkFailed {
        id: u64,
    },
    MarkAlive {
        id: u64,
    },
    Leave {
        id: u64,
    },
}

/// The result of applying a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    /// `RegistryCreate`: created; `RegistryDelete`: existed.
    Bool(bool),
    Refused(String),
}

/// What the daemon learns about the map as commands are applied (on every node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterEvent {
    /// `from` should hand the vbucket's entries to `to`, then call `Cluster::move_done` (unless the cluster
    /// completes moves itself, `Handoff::Auto`).
    MoveStarted { vbucket: u16, from: u64, to: u64 },
    /// `owner` now serves the vbucket.
    MoveFinished { vbucket: u16, owner: u64 },
    /// The map or the members changed; the new view carries `epoch`.
    MapChanged { epoch: u64 },
    /// `owner` took the vbucket over from a failed member, without a handoff: what that member held in
    /// memory (locks) is unknown to `owner`. Consumed by the node itself (lock fencing), never sent out.
    TakenOver { vbucket: u16, owner: u64 },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    pub members: BTreeMap<u64, Member>,
    pub map: VbucketMap,
    pub registry: Tree,
    /// Bumped on every change of the map or the members.
    pub epoch: u64,
}

/// Absolute, no empty component, no trailing slash (the servant's `zk_*` rules).
pub use crate::registry::valid_path;

impl StateMachine {
    /// The state of a new cluster: `first` is its only member, a voter owning every vbucket.
    pub fn bootstrap(first: MemberInfo) -> Self {
        let id = first.id;
        let mut members = BTreeMap::new();
        members.insert(
            id,
            Member {
                id,
                rpc_addr: first.rpc_addr,
                raft_addr: first.raft_addr,
                admin_addr: first.admin_addr,
                state: MemberState::Voter,
                voter: true,
                worker_id: 0,
            },
        );
        StateMachine {
            members,
            map: VbucketMap::owned_by(id),
            registry: Tree::default(),
            epoch: 1,
        }
    }

    pub fn apply(&mut self, cmd: &Command, events: &mut Vec<ClusterEvent>) -> Outcome {
        match cmd {
            Command::RegistryCreate { path, data, limits } => {
                match self.registry.create(path, data, limits.as_ref()) {
                    Ok(created) => Outcome::Bool(created),
                    Err(why) => Outcome::Refused(why.0),
                }
            }
            Command::RegistryDelete { path } => {
                if !valid_path(path) {
                    return Outcome::Refused(format!("invalid registry path {path:?}"));
                }
                Outcome::Bool(self.registry.delete(path))
            }
            Command::MoveDone {
                vbuckets,
                from,
                to,
                since,
            } => {
                let mut changed = false;
                for &vb in vbuckets {
                    if vb as usize >= VBUCKETS {
                        continue;
                    }
                    let e = self.map.get_mut(vb);
                    let this_move = from.is_none_or(|f| e.owner == f)
                        && to.is_none_or(|t| e.pending == Some(t))
                        && since.is_none_or(|s| e.since == s);
                    if !this_move {
                        continue;
                    }
                    if let Some(to) = e.pending.take() {
                        e.owner = to;
                        e.since = 0;
                        changed = true;
                        events.push(ClusterEvent::MoveFinished {
                            vbucket: vb,
                            owner: to,
                        });
                    }
                }
                if changed {
                    self.bump(events);
                }
                Outcome::Done
            }
            Command::MarkFailed { id } => {
                let Some(m) = self.members.get_mut(id) else {
                    return Outcome::Refused(format!("node {id} is not a member"));
                };
                match m.state {
                    MemberState::Leaving => {
                        // A silent leaver cannot hand over: its moves complete at once.
                        self.force_moves_from(*id, events);
                        self.bump(events);
                    }
                    MemberState::Learner | MemberState::Voter => {
                        m.state = MemberState::Failed;
                        self.rebalance(events);
                        self.bump(events);
                    }
                    MemberState::Failed | MemberState::Joining => {}
                }
                Outcome::Done
            }
            Command::MarkAlive { id } => {
                let Some(m) = self.members.get_mut(id) else {
                    return Outcome::Refused(format!("node {id} is not a member"));
                };
                if m.state == MemberState::Failed {
                    m.state = if m.voter {
                        MemberState::Voter
                    } else {
                        MemberState::Learner
                    };
                    self.rebalance(events);
                    self.bump(events);
                }
                Outcome::Done
            }
            Command::Leave { id } => {
                let Some(m) = self.members.get(id) else {
                    return Outcome::Refused(format!("node {id} is not a member"));
                };
                if m.state == MemberState::Leaving {
                    return Outcome::Done;
                }
                let others = self
                    .members
                    .values()
                    .filter(|o| o.id != *id && o.state == MemberState::Voter)
                    .count();
                if m.voter && others == 0 {
                    return Outcome::Refused(format!(
                        "node {id} is the last voter: a cluster cannot lose its last member"
                    ));
                }
                self.members.get_mut(id).expect("checked").state = MemberState::Leaving;
                self.rebalance(events);
                self.bump(events);
                Outcome::Done
            }
        }
    }

    /// A raft `AddLearnerNode` was applied. Returns false (and changes nothing) if no worker id is free.
    pub fn add_learner(&mut self, info: &MemberInfo, events: &mut Vec<ClusterEvent>) -> bool {
        if let Some(m) = self.members.get_mut(&info.id) {
            m.rpc_addr.clone_from(&info.rpc_addr);
            m.raft_addr.clone_from(&info.raft_addr);
            self.bump(events);
            return true;
        }
        let Some(worker_id) = self.free_worker_id() else {
            return false;
        };
        self.members.insert(
            info.id,
            Member {
                id: info.id,
                rpc_addr: info.rpc_addr.clone(),
                raft_addr: info.raft_addr.clone(),
                admin_addr: info.admin_addr.clone(),
                state: MemberState::Learner,
                voter: false,
                worker_id,
            },
        );
        self.bump(events);
        true
    }

    /// A raft `AddNode` was applied: the node votes and takes its share of the vbuckets.
    pub fn promote(&mut self, id: u64, events: &mut Vec<ClusterEvent>) {
        if let Some(m) = self.members.get_mut(&id) {
            m.voter = true;
            if m.state == MemberState::Learner {
                m.state = MemberState::Voter;
            }
            self.rebalance(events);
            self.bump(events);
        }
    }

    /// A raft `RemoveNode` was applied.
    pub fn remove(&mut self, id: u64, events: &mut Vec<ClusterEvent>) {
        if self.members.remove(&id).is_some() {
            self.rebalance(events);
            self.bump(events);
        }
    }

    fn free_worker_id(&self) -> Option<u8> {
        (0..MAX_MEMBERS as u8).find(|w| self.members.values().all(|m| m.worker_id != *w))
    }

    fn bump(&mut self, events: &mut Vec<ClusterEvent>) {
        self.epoch += 1;
        events.push(ClusterEvent::MapChanged { epoch: self.epoch });
    }

    fn is_live(&self, id: u64) -> bool {
        self.members.get(&id).is_some_and(Member::is_live)
    }

    /// Moves away from `id` finish now; used when `id` can no longer hand anything over. The new owners
    /// take the vbuckets without (or with part of) a handoff: `TakenOver` fences their locks.
    fn force_moves_from(&mut self, id: u64, events: &mut Vec<ClusterEvent>) {
        for vb in 0..VBUCKETS as u16 {
            let e = self.map.get_mut(vb);
            if e.owner == id {
                if let Some(to) = e.pending.take() {
                    e.owner = to;
                    e.since = 0;
                    events.push(ClusterEvent::TakenOver {
                        vbucket: vb,
                        owner: to,
                    });
                    events.push(ClusterEvent::MoveFinished {
                        vbucket: vb,
                        owner: to,
                    });
                }
            }
        }
    }

    /// Spreads the vbuckets evenly over the voters with the fewest moves. A live owner hands a vbucket over
    /// (pending); a failed or departed one cannot, so the new owner takes it at once.
    fn rebalance(&mut self, events: &mut Vec<ClusterEvent>) {
        let voters: Vec<u64> = self
            .members
            .values()
            .filter(|m| m.state == MemberState::Voter)
            .map(|m| m.id)
            .collect();
        // Pending moves towards nodes that cannot take them any more are cancelled first.
        for vb in 0..VBUCKETS as u16 {
            let e = self.map.get(vb);
            if let Some(p) = e.pending {
                if !voters.contains(&p) {
                    let slot = self.map.get_mut(vb);
                    slot.pending = None;
                    slot.since = 0;
                }
            }
        }
        // Moves away from owners that cannot hand over any more (failed mid-move) finish at once: the plan
        // below counts a pending move as done, so nothing else would ever finish them.
        let dead: Vec<u64> = self
            .members
            .values()
            .filter(|m| !m.is_live())
            .map(|m| m.id)
            .collect();
        for id in dead {
            self.force_moves_from(id, events);
        }
        for m in rebalance::plan(&self.map, &voters) {
            let e: Vbucket = self.map.get(m.vbucket);
            let owner_live = self.is_live(e.owner);
            let slot = self.map.get_mut(m.vbucket);
            if e.owner == m.to {
                slot.pending = None;
                slot.since = 0;
            } else if owner_live {
                slot.pending = Some(m.to);
                slot.since = self.epoch;
                events.push(ClusterEvent::MoveStarted {
                    vbucket: m.vbucket,
                    from: e.owner,
                    to: m.to,
                });
            } else {
                *slot = Vbucket {
                    owner: m.to,
                    pending: None,
                    since: 0,
                };
                events.push(ClusterEvent::TakenOver {
                    vbucket: m.vbucket,
                    owner: m.to,
                });
                events.push(ClusterEvent::MoveFinished {
                    vbucket: m.vbucket,
                    owner: m.to,
                });
            }
        }
    }

    /// The sorted names of the node's children (none for a missing node).
    pub fn registry_children(&self, path: &str) -> Vec<String> {
        self.registry.children(path)
    }

    pub fn registry_get(&self, path: &str) -> Option<&[u8]> {
        self.registry.get(path)
    }

    /// The ids and cluster addresses of the members, for the transport.
    pub fn peer_addrs(&self) -> Vec<(u64, String)> {
        self.members
            .values()
            .map(|m| (m.id, m.raft_addr.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64) -> MemberInfo {
        MemberInfo {
            id,
            rpc_addr: format!("127.0.0.1:{}", 9000 + id),
            raft_addr: format!("127.0.0.1:{}", 7000 + id),
            admin_addr: String::new(),
        }
    }

    fn counts(sm: &StateMachine) -> Vec<usize> {
        let mut c: Vec<usize> = sm.map.counts().values().copied().collect();
        c.sort_unstable();
        c
    }

    fn finish_moves(sm: &mut StateMachine, ev: &mut Vec<ClusterEvent>) {
        let vbuckets: Vec<u16> = sm.map.pending().map(|(vb, _)| vb).collect();
        sm.apply(
            &Command::MoveDone {
                vbuckets,
                from: None,
                to: None,
                since: None,
            },
            ev,
        );
    }

    #[test]
    fn registry_semantics() {
        let mut sm = StateMachine::bootstrap(info(1));
        let mut ev = Vec::new();
        let create = |p: &str| Command::RegistryCreate {
            path: p.into(),
            data: b"d".to_vec(),
            limits: Some(RegistryLimits::default()),
        };
        assert_eq!(sm.apply(&create("/a/b/c"), &mut ev), Outcome::Bool(true));
        assert_eq!(sm.apply(&create("/a/b/c"), &mut ev), Outcome::Bool(false));
        assert_eq!(
            sm.apply(&create("/a/b"), &mut ev),
            Outcome::Bool(false),
            "implicit parent exists"
        );
        assert_eq!(sm.registry_get("/a"), Some(&b""[..]));
        assert_eq!(sm.apply(&create("/a/a"), &mut ev), Outcome::Bool(true));
        assert_eq!(sm.registry_children("/a"), vec!["a", "b"]);
        assert_eq!(sm.registry_children("/"), vec!["a"]);
        assert!(sm.registry_children("/nope").is_empty());
        let del = |p: &str| Command::RegistryDelete { path: p.into() };
        assert_eq!(sm.apply(&del("/a/b"), &mut ev), Outcome::Bool(true));
        assert_eq!(sm.registry_get("/a/b/c"), None, "the subtree goes too");
        assert_eq!(sm.apply(&del("/a/b"), &mut ev), Outcome::Bool(false));
        assert!(matches!(
            sm.apply(&create("a//b"), &mut ev),
            Outcome::Refused(_)
        ));
    }

    #[test]
    fn joins_moves_failover_and_leave() {
        let mut sm = StateMachine::bootstrap(info(1));
        let mut ev = Vec::new();
        for id in [2, 3] {
            assert!(sm.add_learner(&info(id), &mut ev));
            assert_eq!(counts(&sm), vec![1024], "learners own nothing");
            sm.promote(id, &mut ev);
        }
        assert_eq!(
            counts(&sm),
            vec![1024],
            "moves are pending until handed over"
        );
        assert_eq!(
            sm.map.target_counts().values().copied().collect::<Vec<_>>(),
            vec![342, 341, 341]
        );
        assert!(ev
            .iter()
            .any(|e| matches!(e, ClusterEvent::MoveStarted { from: 1, .. })));
        finish_moves(&mut sm, &mut ev);
        assert_eq!(counts(&sm), vec![341, 341, 342]);
        let worker_ids: Vec<u8> = sm.members.values().map(|m| m.worker_id).collect();
        assert_eq!(worker_ids, vec![0, 1, 2]);

        // A failed node's vbuckets are taken at once, not handed over.
        let epoch = sm.epoch;
        sm.apply(&Command::MarkFailed { id: 3 }, &mut ev);
        assert!(sm.epoch > epoch);
        assert_eq!(sm.map.pending().count(), 0);
        assert_eq!(counts(&sm), vec![512, 512]);
        sm.apply(&Command::MarkAlive { id: 3 }, &mut ev);
        finish_moves(&mut sm, &mut ev);
        assert_eq!(counts(&sm), vec![341, 341, 342]);

        // Leaving hands over, then the removal takes the node out.
        sm.apply(&Command::Leave { id: 2 }, &mut ev);
        assert_eq!(sm.members[&2].state, MemberState::Leaving);
        finish_moves(&mut sm, &mut ev);
        assert_eq!(counts(&sm), vec![512, 512]);
        sm.remove(2, &mut ev);
        assert_eq!(sm.members.len(), 2);
        assert!(sm.add_learner(&info(4), &mut ev));
        assert_eq!(sm.members[&4].worker_id, 1, "the freed worker id is reused");
    }

    /// An owner that fails while its vbuckets move to a joining node can hand nothing over any more: the
    /// moves finish at once, fenced (`TakenOver`), and nothing stays pending.
    #[test]
    fn an_owner_failing_mid_move_leaves_nothing_pending() {
        let mut sm = StateMachine::bootstrap(info(1));
        let mut ev = Vec::new();
        for id in [2, 3] {
            assert!(sm.add_learner(&info(id), &mut ev));
            sm.promote(id, &mut ev);
        }
        finish_moves(&mut sm, &mut ev);
        assert!(sm.add_learner(&info(4), &mut ev));
        sm.promote(4, &mut ev);
        let from_2: Vec<u16> = sm
            .map
            .pending()
            .filter(|(vb, _)| sm.map.get(*vb).owner == 2)
            .map(|(vb, _)| vb)
            .collect();
        assert!(!from_2.is_empty(), "node 2 gives vbuckets to node 4");
        ev.clear();
        sm.apply(&Command::MarkFailed { id: 2 }, &mut ev);
        assert_eq!(
            sm.map
                .pending()
                .filter(|(vb, _)| sm.map.get(*vb).owner == 2)
                .count(),
            0
        );
        assert!(
            !sm.map.counts().contains_key(&2),
            "the failed node owns nothing"
        );
        for vb in from_2 {
            assert_eq!(
                sm.map.get(vb).owner,
                4,
                "vbucket {vb} went where it was moving"
            );
            assert!(ev.contains(&ClusterEvent::TakenOver {
                vbucket: vb,
                owner: 4
            }));
        }
        // The moves of the live owners still wait for their handoffs, then the map is even.
        finish_moves(&mut sm, &mut ev);
        assert_eq!(counts(&sm), vec![341, 341, 342]);
    }

    /// A move cancelled and begun again (its target failed and came back) has a new `since`: a completion
    /// sent for the first one (whose handoff the target may since have dropped) completes nothing.
    #[test]
    fn a_completion_of_an_earlier_move_does_not_complete_a_later_one() {
        let mut sm = StateMachine::bootstrap(info(1));
        let mut ev = Vec::new();
        assert!(sm.add_learner(&info(2), &mut ev));
        sm.promote(2, &mut ev);
        let (vb, first) = sm.map.pending().next().expect("a move to node 2");
        assert_eq!(first.pending, Some(2));
        let old_since = sm.map.get(vb).since;
        sm.apply(&Command::MarkFailed { id: 2 }, &mut ev);
        assert_eq!(
            sm.map.get(vb).pending,
            None,
            "the move to a failed node is cancelled"
        );
        sm.apply(&Command::MarkAlive { id: 2 }, &mut ev);
        let e = sm.map.get(vb);
        assert_eq!(e.pending, Some(2));
        assert_ne!(e.since, old_since);
        let done = |since| Command::MoveDone {
            vbuckets: vec![vb],
            from: Some(1),
            to: Some(2),
            since: Some(since),
        };
        sm.apply(&done(old_since), &mut ev);
        assert_eq!(
            sm.map.get(vb).owner,
            1,
            "completed by the earlier move's MoveDone"
        );
        sm.apply(&done(e.since), &mut ev);
        assert_eq!(sm.map.get(vb).owner, 2);
    }

    #[test]
    fn the_last_voter_cannot_leave() {
        let mut sm = StateMachine::bootstrap(info(1));
        let mut ev = Vec::new();
        assert!(matches!(
            sm.apply(&Command::Leave { id: 1 }, &mut ev),
            Outcome::Refused(_)
        ));
    }

    #[test]
    fn a_33rd_member_gets_no_worker_id() {
        let mut sm = StateMachine::bootstrap(info(1));
        let mut ev = Vec::new();
        for id in 2..=32 {
            assert!(sm.add_learner(&info(id), &mut ev));
        }
        assert!(!sm.add_learner(&info(33), &mut ev));
        assert_eq!(sm.members.len(), MAX_MEMBERS);
    }
}
