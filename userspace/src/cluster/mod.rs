//! The daemon's side of the cluster: routing keyed calls by the vbucket map, the registry in raft, and the
//! handoff of a vbucket's cache and lock entries when it moves. fae-cluster knows nothing of servants; this
//! module is where the two meet, and the engine knows nothing of the cluster but one outcome per call.
//!
//! - `route`: where a call runs (local, deferred to a worker, refused), asked once per call by the engine.
//! - `forward`: the forwarding workers and the `Router` trait the map implements (here, `ClusterRouter`).
//! - `registry`: `zk_*` on raft, run on a worker.
//! - `handoff`: a moving vbucket's entries and locks, and the sweep of lost ones.

use std::sync::Arc;
use std::time::Duration;

use fae_cluster::{Cluster, ClusterConfig, ClusterError, Handoff};

pub mod forward;
mod handoff;
mod registry;
pub mod route;
pub use handoff::spawn_handoff;

use crate::cluster::forward::{RegistryBackend, Route, Router};
use crate::config::Config;

/// Starts (bootstraps, joins or rejoins) this node's membership.
pub fn start(cfg: &Config) -> Result<Cluster, ClusterError> {
    let c = &cfg.cluster;
    let mut cc = ClusterConfig::new(
        c.listen.clone(),
        cfg.server.listen.to_string(),
        c.data_dir.clone(),
    );
    cc.bootstrap = c.bootstrap;
    if cfg.admin.enabled {
        cc.admin_addr = cfg.admin.listen.to_string();
    }
    cc.seeds = c.seeds.clone();
    cc.secret = c
        .secret()
        .map_err(|e| ClusterError::Config(e.to_string()))?;
    let cc_secret = cc.secret.clone();
    cc.failover_timeout = Duration::from_millis(c.failover_timeout_ms);
    cc.remove_after = Duration::from_millis(c.remove_after_ms);
    cc.handoff = Handoff::Manual;
    // A lock granted by a failed owner expires within its TTL: a vbucket taken over without a handoff (or
    // held across a restart) grants no lock before then.
    cc.lock_fence = Duration::from_millis(cfg.lock.ttl_ms);
    let cluster = Cluster::start(cc)?;
    // A joining node has been accepted once start returns, but may not have applied its own membership
    // yet: wait (bounded) until its view holds it, so that it has a worker id before serving ids.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.view().my_worker_id().is_none() {
        if std::time::Instant::now() > deadline {
            return Err(ClusterError::Timeout {
                what: "this node's own membership to be applied",
                after: Duration::from_secs(30),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // And its first lease (a ReadIndex a quorum confirmed), so that it does not open with "retry" answers
    // to keyed calls. Without a quorum it starts anyway and refuses them until it has one.
    // Bounded by the failover timeout, and at least 5 s: an election may take two election timeouts.
    let deadline =
        std::time::Instant::now() + Duration::from_millis(c.failover_timeout_ms.max(5000));
    while !cluster.has_lease() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !cluster.has_lease() {
        if let Some(why) = removed(&cluster, cc_secret.as_ref()) {
            return Err(ClusterError::Config(why));
        }
        tracing::warn!("no quorum confirmed this node yet: keyed calls are refused until one does");
    }
    Ok(cluster)
}

/// Why this node will never be heard again, if the members it knows say it is not one of them any more
/// (removed after failing for `cluster.remove_after_ms`, or made to leave while it was down): the members
/// drop its messages, so it would wait for a leader for ever.
fn removed(cluster: &Cluster, secret: Option<&fae_cluster::ClusterSecret>) -> Option<String> {
    let view = cluster.view();
    for m in view.members.values().filter(|m| m.id != view.my_id) {
        let Ok(st) = fae_cluster::remote_status(&m.raft_addr, secret, Duration::from_secs(2))
        else {
            continue;
        };
        // Only the leader's word: a follower may not have applied this node's own join yet.
        if st.leader_id == Some(st.my_id) && !st.members.iter().any(|x| x.member.id == view.my_id) {
            return Some(format!(
                "node {} at {} says this node ({}) is not a member of the cluster any more (removed after \
                 failing for cluster.remove_after_ms, or made to leave while it was down): start it with an \
                 empty data dir to join again",
                m.id, m.raft_addr, view.my_id
            ));
        }
    }
    None
}

/// Whether this node's map can be trusted: it has heard from a leader and applied all it knows committed.
/// A restarted node holds its map from disk until then, and must not serve keys by it.
fn caught_up(view: &fae_cluster::ClusterView) -> bool {
    view.leader_id.is_some() && view.applied_index >= view.commit_index
}

/// Routes by the cluster's published view: no lock, no raft on the call path.
pub struct ClusterRouter {
    pub cluster: Arc<Cluster>,
}

impl Router for ClusterRouter {
    fn route(&self, key: &[u8]) -> Route {
        let view = self.cluster.view();
        if !caught_up(&view) {
            return Route::Unavailable(
                "this node is catching up with the cluster (no leader heard yet, or its map is behind); retry"
                    .into(),
            );
        }
        let vb = fae_cluster::vbucket_of(key);
        let entry = view.map.get(vb);
        let Some(owner) = view.members.get(&entry.owner) else {
            return Route::Unavailable(format!(
                "vbucket {vb} has no owner yet (the cluster map is not loaded)"
            ));
        };
        if let Some(to) = entry.pending {
            // Refused while the entries move, so that a lock is never held on two nodes.
            return Route::Unavailable(format!(
                "vbucket {vb} is moving from node {} to node {to}; retry in a moment",
                owner.id
            ));
        }
        if owner.id == view.my_id {
            return Route::Local;
        }
        if !owner.is_live() {
            return Route::Unavailable(format!(
                "vbucket {vb}'s owner, node {} at {}, is unreachable; its vbuckets are being failed over",
                owner.id, owner.rpc_addr
            ));
        }
        Route::Remote {
            node: owner.id,
            addr: owner.rpc_addr.clone(),
        }
    }

    fn refuse_local(&self, method: crate::servant::Method, key: &[u8]) -> Option<String> {
        let vb = fae_cluster::vbucket_of(key);
        if !self.cluster.has_lease() {
            return Some(
                "this node has not been confirmed by a quorum of the cluster within its lease (half of \
                 cluster.failover_timeout_ms): it may be cut off and its vbuckets failed over; retry"
                    .into(),
            );
        }
        // The map again, now that the lease holds: the node publishes its map before it renews its lease,
        // so this one is at least as new as the read that renewed it, where the one the call was routed by
        // may be from before a pause.
        let view = self.cluster.view();
        let e = view.map.get(vb);
        if e.owner != view.my_id || e.pending.is_some() {
            return Some(format!(
                "vbucket {vb} changed hands while the call was routed (owner {}, pending {:?}); retry",
                e.owner, e.pending
            ));
        }
        if method == crate::servant::Method::Lock {
            if let Some(left) = self.cluster.lock_fence(vb) {
                return Some(format!(
                    "vbucket {vb} came to this node without its locks (a failover, a restart, or from a node \
                     that had them fenced): locks granted before may still be held, so grants resume in {} \
                     ms; retry",
                    left.as_millis()
                ));
            }
        }
        None
    }

    fn is_member_rpc_addr(&self, addr: &str) -> bool {
        self.cluster
            .view()
            .members
            .values()
            .any(|m| m.rpc_addr == addr)
    }

    fn accepts_forwarded(&self, key: &[u8]) -> bool {
        let view = self.cluster.view();
        let e = view.map.get(fae_cluster::vbucket_of(key));
        // Only the owner, and not once a move away has begun: a pending owner takes the handoff on the
        // cluster port, never as calls (a sticky call is anybody's to send).
        caught_up(&view) && e.owner == view.my_id && e.pending.is_none()
    }

    fn registry(&self) -> Option<Arc<dyn RegistryBackend>> {
        Some(Arc::new(registry::ClusterRegistry {
            cluster: self.cluster.clone(),
        }))
    }
}
