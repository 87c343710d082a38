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
    cc.seeds = c.seeds.clone();
    cc.failover_timeout = Duration::from_millis(c.failover_timeout_ms);
    cc.handoff = Handoff::Manual;
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
    Ok(cluster)
}

/// Routes by the cluster's published view: no lock, no raft on the call path.
pub struct ClusterRouter {
    pub cluster: Arc<Cluster>,
}

impl Router for ClusterRouter {
    fn route(&self, key: &[u8]) -> Route {
        let view = self.cluster.view();
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

    fn accepts_forwarded(&self, key: &[u8]) -> bool {
        let view = self.cluster.view();
        let e = view.map.get(fae_cluster::vbucket_of(key));
        e.owner == view.my_id || e.pending == Some(view.my_id)
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
            while let Ok(first) = events.recv() {
                // A rebalance starts hundreds of moves at once: take them together and complete them in one
                // proposal rather than one raft entry per vbucket.
                let mut batch = vec![first];
                batch.extend(events.try_iter());
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                let view = cluster.view();
                let mut by_target: std::collections::BTreeMap<u64, Vec<u16>> = Default::default();
                for ev in batch {
                    if let ClusterEvent::MoveStarted { vbucket, from, to } = ev {
                        // Events are replayed when a node re-applies its log: act only on moves still pending.
                        let still = view.map.get(vbucket).pending == Some(to);
                        if from == view.my_id && still {
                            by_target.entry(to).or_default().push(vbucket);
                        }
                    }
                }
                for (to, vbuckets) in by_target {
                    let Some(target) = view.members.get(&to).map(|m| m.rpc_addr.clone()) else {
                        continue;
                    };
                    match hand_over(&servants, &vbuckets, &target) {
                        Ok((entries, locks)) => {
                            tracing::info!(
                                vbuckets = vbuckets.len(),
                                to,
                                entries,
                                locks,
                                "vbuckets handed over"
                            );
                        }
                        Err(e) => tracing::warn!(to, error = %e, "vbucket handoff incomplete"),
                    }
                    if let Err(e) = cluster.move_done(&vbuckets) {
                        tracing::warn!(to, error = %e, "cannot complete the moves");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the handoff thread");
    }
}

fn hand_over(
    servants: &Servants,
    vbuckets: &[u16],
    target: &str,
) -> Result<(usize, usize), String> {
    let in_vb = |k: &[u8]| vbuckets.contains(&fae_cluster::vbucket_of(k));
    let entries = servants.lcache.take_matching(in_vb);
    let locks = servants.lock.take_matching(in_vb);
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
    Ok((entries.len(), locks.len()))
}
