//! The leader's duties towards members: failover, revival, promotion, removal, automatic handoff.

use super::*;

impl Node {
    pub(super) fn once(&mut self, key: String, now: Instant) -> bool {
        let gap = self.cfg.election_timeout().max(Duration::from_secs(1));
        match self.recently.get(&key) {
            Some(at) if now.duration_since(*at) < gap => false,
            _ => {
                self.recently.insert(key, now);
                true
            }
        }
    }

    pub(super) fn propose_internal(&mut self, cmd: Command) {
        let (_, data) = self.proposal(cmd);
        if let Err(e) = self.raw.propose(vec![], data) {
            tracing::debug!(node = self.id, error = %e, "housekeeping proposal dropped");
        }
    }

    pub(super) fn conf_change(&mut self, kind: ConfChangeType, node: u64) {
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = node;
        if let Err(e) = self.raw.propose_conf_change(vec![], cc) {
            tracing::debug!(node = self.id, error = %e, "conf change not proposed");
        }
    }

    /// The leader's periodic duties: failover, revival, promotion, removal of leavers, automatic handoff.
    pub(super) fn housekeeping(&mut self, now: Instant) {
        let leader = self.raw.raft.state == StateRole::Leader;
        if leader && !self.was_leader {
            // A new leader gives everyone a full failover timeout from now.
            for &id in self.sm.members.keys() {
                self.last_heard.insert(id, now);
            }
        }
        self.was_leader = leader;
        if !leader {
            return;
        }
        let last_index = self.raw.raft.raft_log.last_index();
        let members: Vec<Member> = self.sm.members.values().cloned().collect();
        for m in &members {
            if m.id == self.id {
                continue;
            }
            let heard = *self.last_heard.entry(m.id).or_insert(now);
            let silent = now.duration_since(heard);
            let alive = silent < self.cfg.election_timeout();
            match m.state {
                MemberState::Learner | MemberState::Voter | MemberState::Leaving
                    if silent > self.cfg.failover_timeout
                        && self.once(format!("fail {}", m.id), now) =>
                {
                    tracing::warn!(
                        node = self.id,
                        peer = m.id,
                        ?silent,
                        "failing over a silent member"
                    );
                    self.propose_internal(Command::MarkFailed { id: m.id });
                }
                MemberState::Failed if alive && self.once(format!("alive {}", m.id), now) => {
                    tracing::info!(node = self.id, peer = m.id, "a failed member is back");
                    self.propose_internal(Command::MarkAlive { id: m.id });
                }
                // Failed and silent for good: out of the voters, so that a replacement does not grow the
                // quorum. (It owns nothing since it failed.)
                MemberState::Failed
                    if !self.cfg.remove_after.is_zero()
                        && silent > self.cfg.remove_after
                        && self.once(format!("remove {}", m.id), now) =>
                {
                    tracing::warn!(
                        node = self.id,
                        peer = m.id,
                        ?silent,
                        "removing a member failed for too long; it needs an empty data dir to join again"
                    );
                    self.conf_change(ConfChangeType::RemoveNode, m.id);
                }
                MemberState::Learner if alive => {
                    let matched = self.raw.raft.prs().get(m.id).map_or(0, |p| p.matched);
                    if matched > 0
                        && matched + PROMOTE_LAG >= last_index
                        && self.once(format!("promote {}", m.id), now)
                    {
                        tracing::info!(
                            node = self.id,
                            peer = m.id,
                            matched,
                            "promoting a caught-up learner"
                        );
                        self.conf_change(ConfChangeType::AddNode, m.id);
                    }
                }
                _ => {}
            }
            if m.state == MemberState::Leaving
                && self.owns_nothing(m.id)
                && self.once(format!("remove {}", m.id), now)
            {
                self.conf_change(ConfChangeType::RemoveNode, m.id);
            }
        }
        if self
            .sm
            .members
            .get(&self.id)
            .is_some_and(|m| m.state == MemberState::Leaving)
            && self.owns_nothing(self.id)
            && self.once("transfer".into(), now)
        {
            // The leader leaves by handing leadership to the most caught-up voter, which then removes it.
            let to = members
                .iter()
                .filter(|m| m.id != self.id && m.state == MemberState::Voter)
                .max_by_key(|m| self.raw.raft.prs().get(m.id).map_or(0, |p| p.matched))
                .map(|m| m.id);
            if let Some(to) = to {
                self.raw.transfer_leader(to);
            }
        }
        // A learner added while no worker id was free is in raft's configuration but not a member: remove it.
        let strays: Vec<u64> = self
            .store
            .conf_state()
            .learners
            .into_iter()
            .filter(|id| !self.sm.members.contains_key(id))
            .collect();
        for id in strays {
            if self.once(format!("remove {id}"), now) {
                self.conf_change(ConfChangeType::RemoveNode, id);
            }
        }
        if self.cfg.handoff == Handoff::Auto {
            let vbuckets: Vec<u16> = self.sm.map.pending().map(|(vb, _)| vb).collect();
            if !vbuckets.is_empty() && self.once("movedone".into(), now) {
                self.propose_internal(Command::MoveDone {
                    vbuckets,
                    from: None,
                    to: None,
                    since: None,
                });
            }
        }
    }

    pub(super) fn owns_nothing(&self, id: u64) -> bool {
        self.sm
            .map
            .entries()
            .iter()
            .all(|e| e.owner != id && e.pending != Some(id))
    }
}
