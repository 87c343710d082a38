//! What the node publishes: its role, the view the data plane reads, the status `fae cluster status` shows.

use super::*;

/// This node's raft role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    PreCandidate,
}

impl From<StateRole> for Role {
    fn from(r: StateRole) -> Self {
        match r {
            StateRole::Leader => Role::Leader,
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
        }
    }
}

/// What the data plane reads: published after every applied change, read without locks or raft.
#[derive(Clone, Debug)]
pub struct ClusterView {
    pub my_id: u64,
    pub role: Role,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Bumped on every change of the map or the members.
    pub epoch: u64,
    pub members: BTreeMap<u64, Member>,
    pub map: Arc<VbucketMap>,
}

impl ClusterView {
    pub fn me(&self) -> Option<&Member> {
        self.members.get(&self.my_id)
    }

    /// This node's idgen worker id (`None` until it has joined).
    pub fn my_worker_id(&self) -> Option<u8> {
        self.me().map(|m| m.worker_id)
    }

    pub fn is_leader(&self) -> bool {
        self.leader_id == Some(self.my_id)
    }

    pub fn leader(&self) -> Option<&Member> {
        self.leader_id.and_then(|id| self.members.get(&id))
    }

    /// The member serving `key` now (`None` before the node has the cluster's state).
    pub fn owner_of(&self, key: &[u8]) -> Option<&Member> {
        self.members.get(&self.map.owner_of_key(key))
    }

    /// Vbuckets per member (members owning none included).
    pub fn vbucket_counts(&self) -> BTreeMap<u64, usize> {
        let mut c: BTreeMap<u64, usize> = self.members.keys().map(|&id| (id, 0)).collect();
        for (id, n) in self.map.counts() {
            if id != 0 {
                *c.entry(id).or_insert(0) += n;
            }
        }
        c
    }
}

/// `fae cluster status`: a serialisable summary of a view.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub my_id: u64,
    pub my_state: MemberState,
    pub role: Role,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub epoch: u64,
    pub members: Vec<MemberStatus>,
    pub pending_moves: usize,
    /// Whether the node holds its lease (serves keyed calls); see `ClusterConfig::lease`.
    #[serde(default)]
    pub lease: bool,
    /// Cluster connections refused (over the cap, a failed handshake, garbage) since start.
    #[serde(default)]
    pub refused_connections: u64,
    /// Raft messages dropped unstepped (a sender that is not the connection's member, not a member, not
    /// addressed here, malformed) since start.
    #[serde(default)]
    pub refused_messages: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    #[serde(flatten)]
    pub member: Member,
    pub vbuckets: usize,
}

impl ClusterStatus {
    pub fn of(v: &ClusterView) -> Self {
        let counts = v.vbucket_counts();
        ClusterStatus {
            my_id: v.my_id,
            my_state: v.me().map_or(MemberState::Joining, |m| m.state),
            role: v.role,
            leader_id: v.leader_id,
            term: v.term,
            commit_index: v.commit_index,
            applied_index: v.applied_index,
            epoch: v.epoch,
            members: v
                .members
                .values()
                .map(|m| MemberStatus {
                    member: m.clone(),
                    vbuckets: counts.get(&m.id).copied().unwrap_or(0),
                })
                .collect(),
            pending_moves: v.map.pending().count(),
            lease: false,
            refused_connections: 0,
            refused_messages: 0,
        }
    }
}
