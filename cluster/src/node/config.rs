//! The node's configuration.

use super::*;

/// Who completes a vbucket move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handoff {
    /// The leader proposes `MoveDone` for every pending move at once: nothing is handed over. For tests and
    /// for deployments that accept losing cached entries of moved vbuckets.
    Auto,
    /// The daemon hands each vbucket's entries over on `ClusterEvent::MoveStarted` and then calls
    /// `Cluster::move_done`. Moves away from a failed node complete at once either way.
    Manual,
}

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's id (non-zero). `None`: the id saved in the data dir, or a new random one.
    pub node_id: Option<u64>,
    /// The cluster port to listen on, and the address other nodes use. Port 0 picks a free port; the bound
    /// address is then what the node advertises (`Cluster::raft_addr`).
    pub raft_addr: String,
    /// Where this node serves the FunServant API; replicated so that others can forward calls.
    pub rpc_addr: String,
    /// Where this node serves its admin port (replicated, for the dashboards' links); may be empty.
    pub admin_addr: String,
    pub data_dir: PathBuf,
    /// Start a new single-node cluster if the data dir is empty.
    pub bootstrap: bool,
    /// Cluster addresses of members to join through if the data dir is empty.
    pub seeds: Vec<String>,
    /// A member silent for this long is failed over (its vbuckets go to the others).
    pub failover_timeout: Duration,
    /// The raft tick.
    pub tick: Duration,
    /// Election timeout in ticks (randomised by raft between this and twice this).
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log after this many applied entries.
    pub snapshot_every: u64,
    /// How long a proposal, a read or a join request may take.
    pub request_timeout: Duration,
    /// A failed member silent this long is removed from the cluster (zero: never). Its vbuckets went to
    /// the others when it failed; removal takes it out of the voters, so replacing it does not grow the
    /// quorum. To come back it must join again with an empty data dir.
    pub remove_after: Duration,
    /// How long `start` keeps trying to join through the seeds.
    pub join_timeout: Duration,
    pub handoff: Handoff,
    /// Outbound raft messages queued per peer before new ones are dropped.
    pub send_queue: usize,
    /// How long lock grants are refused on a vbucket this node took over without a handoff, and on every
    /// vbucket after a restart (the daemon sets its lock TTL): a lock the old owner granted has expired by
    /// then. Zero: no fencing.
    pub lock_fence: Duration,
    /// The cluster secret: every connection on the cluster port proves it (see `auth`). `None`: anyone
    /// who reaches the port is trusted (a cluster on loopback, a test).
    pub secret: Option<ClusterSecret>,
}

impl ClusterConfig {
    pub fn new(
        raft_addr: impl Into<String>,
        rpc_addr: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        ClusterConfig {
            node_id: None,
            raft_addr: raft_addr.into(),
            rpc_addr: rpc_addr.into(),
            admin_addr: String::new(),
            data_dir: data_dir.into(),
            bootstrap: false,
            seeds: Vec::new(),
            failover_timeout: Duration::from_secs(10),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 1000,
            request_timeout: Duration::from_secs(5),
            remove_after: Duration::ZERO,
            join_timeout: Duration::from_secs(30),
            handoff: Handoff::Manual,
            lock_fence: Duration::ZERO,
            send_queue: 1024,
            secret: None,
        }
    }

    pub(super) fn election_timeout(&self) -> Duration {
        self.tick * self.election_ticks as u32
    }

    /// How long a confirmed ReadIndex lets this node serve keyed calls: half the failover timeout, a margin
    /// for clocks that run at different rates and for the leader's own detection delay.
    pub fn lease(&self) -> Duration {
        self.failover_timeout / 2
    }
}
