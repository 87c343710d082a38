//! The daemon's side of the cluster: routing keyed calls by the vbucket map, the registry in raft, and the
//! handoff of a vbucket's cache and lock entries when it moves. fae-cluster knows nothing of servants; this
//! module is where the two meet.

use std::sync::{Arc, Weak};
use std::time::Duration;

use fae_cluster::{Cluster, ClusterConfig, ClusterError, ClusterEvent, Handoff};

use crate::client::{self, TFunServantSyncClient};
use crate::config::Config;
use crate::proxy::{RegistryBackend, Route, Router};
use crate::servant::Servants;

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
    cc.failover_timeout = Duration::from_millis(c.failover_timeout_ms);
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
        tracing::warn!("no quorum confirmed this node yet: keyed calls are refused until one does");
    }
    Ok(cluster)
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
        let view = self.cluster.view();
        let vb = fae_cluster::vbucket_of(key);
        if view.map.get(vb).pending == Some(view.my_id) {
            return None; // the old owner handing its entries over
        }
        if !self.cluster.has_lease() {
            return Some(
                "this node has not been confirmed by a quorum of the cluster within its lease (half of \
                 cluster.failover_timeout_ms): it may be cut off and its vbuckets failed over; retry"
                    .into(),
            );
        }
        if method == crate::servant::Method::Lock {
            if let Some(left) = self.cluster.lock_fence(vb) {
                return Some(format!(
                    "vbucket {vb} came to this node without a handoff (a failover, or this node restarted): \
                     locks granted before may still be held, so grants resume in {} ms; retry",
                    left.as_millis()
                ));
            }
        }
        None
    }

    fn accepts_forwarded(&self, key: &[u8]) -> bool {
        let view = self.cluster.view();
        let e = view.map.get(fae_cluster::vbucket_of(key));
        // The new owner takes the handoff; the old one takes nothing more once a move away has begun.
        caught_up(&view)
            && ((e.owner == view.my_id && e.pending.is_none()) || e.pending == Some(view.my_id))
    }

    fn registry(&self) -> Option<Arc<dyn RegistryBackend>> {
        Some(Arc::new(ClusterRegistry {
            cluster: self.cluster.clone(),
        }))
    }
}

struct ClusterRegistry {
    cluster: Arc<Cluster>,
}

impl RegistryBackend for ClusterRegistry {
    fn create(&self, path: &str, data: &[u8]) -> Result<bool, String> {
        self.cluster
            .registry_create(path, data)
            .map_err(|e| e.to_string())
    }
    fn children(&self, path: &str) -> Result<Vec<String>, String> {
        self.cluster
            .registry_children(path)
            .map_err(|e| e.to_string())
    }
    fn delete(&self, path: &str) -> Result<bool, String> {
        self.cluster
            .registry_delete(path)
            .map_err(|e| e.to_string())
    }
}

/// Hands moving vbuckets over: on `MoveStarted` from this node, sends the vbucket's cache entries and held
/// locks to the new owner (sticky calls, which the pending owner accepts), drops them here, and tells the
/// cluster the move is done. Runs on a thread of its own until the cluster goes away.
pub fn spawn_handoff(cluster: &Arc<Cluster>, servants: Arc<Servants>) {
    let Some(events) = cluster.events() else {
        return;
    };
    let weak: Weak<Cluster> = Arc::downgrade(cluster);
    let spawned = std::thread::Builder::new()
        .name("fae-handoff".into())
        .spawn(move || {
            // Moves this node still has to hand over, by new owner: retried until handed over (the new owner
            // may not have applied the move yet and refuse), or until the map no longer shows them pending.
            let mut todo: std::collections::BTreeMap<u64, std::collections::BTreeSet<u16>> =
                Default::default();
            loop {
                // A rebalance starts hundreds of moves at once: take them together and complete them in one
                // proposal rather than one raft entry per vbucket.
                let wait = if todo.is_empty() {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_millis(200)
                };
                let mut batch = Vec::new();
                match events.recv_timeout(wait) {
                    Ok(ev) => batch.push(ev),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                batch.extend(events.try_iter());
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                for ev in batch {
                    if let ClusterEvent::MoveStarted { vbucket, from, to } = ev {
                        if from == cluster.view().my_id {
                            todo.entry(to).or_default().insert(vbucket);
                        }
                    }
                }
                let view = cluster.view();
                for (&to, vbuckets) in todo.iter_mut() {
                    // Events are replayed when a node re-applies its log: act only on moves still pending.
                    vbuckets.retain(|&vb| view.map.get(vb).pending == Some(to));
                    if vbuckets.is_empty() {
                        continue;
                    }
                    let Some(target) = view.members.get(&to).map(|m| m.rpc_addr.clone()) else {
                        continue;
                    };
                    let vbs: Vec<u16> = vbuckets.iter().copied().collect();
                    match hand_over(&servants, &vbs, &target) {
                        Ok((entries, locks)) => {
                            tracing::info!(
                                vbuckets = vbs.len(),
                                to,
                                entries,
                                locks,
                                "vbuckets handed over"
                            );
                            match cluster.move_done(&vbs, view.my_id, to) {
                                Ok(()) => vbuckets.clear(),
                                Err(e) => {
                                    tracing::warn!(to, error = %e, "cannot complete the moves yet")
                                }
                            }
                        }
                        Err(e) => {
                            tracing::debug!(to, error = %e, "vbucket handoff refused; retrying")
                        }
                    }
                }
                todo.retain(|_, v| !v.is_empty());
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the handoff thread");
    }
}

/// Copies the vbuckets' entries and held locks to `target`, then drops them here. On any failure nothing is
/// dropped and the caller retries (the new owner refuses until it has applied the move); calls for a moving
/// vbucket are refused, so the entries cannot change meanwhile.
fn hand_over(
    servants: &Servants,
    vbuckets: &[u16],
    target: &str,
) -> Result<(usize, usize), String> {
    let in_vb = |k: &[u8]| vbuckets.contains(&fae_cluster::vbucket_of(k));
    let entries = servants.lcache.copy_matching(in_vb);
    let locks = servants.lock.copy_matching(in_vb);
    if entries.is_empty() && locks.is_empty() {
        return Ok((0, 0));
    }
    let mut c = client::connect(target, client::Transport::Framed, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let ctx = || {
        let mut x = client::context("vbucket-handoff");
        x.sticky = Some(true);
        x
    };
    for (k, v) in &entries {
        let key = String::from_utf8_lossy(k).into_owned();
        c.lc_set(ctx(), key, v.clone()).map_err(|e| e.to_string())?;
    }
    for k in &locks {
        let key = String::from_utf8_lossy(k).into_owned();
        c.lock(ctx(), "vbucket-handoff".into(), key)
            .map_err(|e| e.to_string())?;
    }
    servants.lcache.remove_matching(in_vb);
    servants.lock.remove_matching(in_vb);
    Ok((entries.len(), locks.len()))
}
