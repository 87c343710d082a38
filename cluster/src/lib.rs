//! fae's cluster: a raft group (tikv's raft-rs 0.7 on `RawNode`) that owns the members, the 1024-entry
//! vbucket map and the registry tree (`zk_*`). It knows nothing of Thrift or of fae's servants: the daemon
//! reads [`ClusterView`]s to route calls and reacts to [`ClusterEvent`]s to hand vbuckets over.
//!
//! Layers, each importing only those before it: [`rebalance`] (the map and move planning, pure), [`state`]
//! (the replicated state machine, deterministic), `storage` (the raft log, hard state and snapshots on disk),
//! `auth` (the cluster secret's handshake), `transport` (frames on the cluster port), `node` (the raft loop
//! and the public [`Cluster`] handle; its submodules: `config`, `view`, `rpc`, `membership` (the leader's
//! failover, promotion and removal duties), `lease`, `logging`).
//!
//! # Public API
//! ```text
//! Cluster::start(ClusterConfig) -> Result<Cluster, ClusterError>
//!     ClusterConfig::new(raft_addr, rpc_addr, data_dir) then set node_id, bootstrap, seeds,
//!     failover_timeout, tick, election_ticks, heartbeat_ticks, snapshot_every, request_timeout,
//!     join_timeout, handoff (Auto | Manual), send_queue
//! cluster.id() -> u64                       cluster.raft_addr() -> &str
//! cluster.view() -> Arc<ClusterView>        lock-free: members, map, epoch, leader, term, commit, role
//! cluster.status() -> ClusterStatus         serialisable, for `fae cluster status`
//! cluster.events() -> Option<Receiver<ClusterEvent>>   MoveStarted / MoveFinished / MapChanged, once
//! cluster.registry_create(path, data, &limits) -> Result<bool>  linearizable write (resolves when applied)
//! cluster.registry_delete(path) -> Result<bool>
//! cluster.registry_children(path) -> Result<Vec<String>> linearizable read (raft ReadIndex)
//! cluster.leave(node_id) -> Result<()>      hand over, then removal from the raft group
//! cluster.move_done(&[vbucket], from, to, since) -> Result<()>  after a handoff (Handoff::Manual)
//! cluster.shutdown(leave: bool) -> Result<()>  (dropping = stop without leaving)
//! cluster.set_app_handler(Fn(peer, &[u8]) -> Result<Vec<u8>, String>)   the daemon's member-to-member calls
//! cluster.app_call(node, &[u8], timeout) -> Result<Vec<u8>>            (a handoff batch), ≤ MAX_APP_REQUEST
//! remote_status(addr, secret, timeout), remote_leave(addr, secret, node_id, timeout)   a tool's requests
//! ClusterSecret::from_file(path) / ::new(bytes)   the cluster secret (ClusterConfig::secret)
//! vbucket_of(key) -> u16 = crc32(key) % 1024
//! ```
//!
//! # How it behaves
//! - **Bootstrap / join / restart.** `bootstrap` makes a single-voter cluster owning every vbucket. A node
//!   with an empty data dir and `seeds` asks a seed to add it; a non-leader answers with the leader's address
//!   and the node asks again there. The leader adds it as a raft learner (it catches up by snapshot and log),
//!   promotes it to voter once its matched index is within 10 entries of the leader's, and the promotion
//!   rebalances the map. A node whose data dir holds state ignores `bootstrap` and `seeds`: it recovers and
//!   rejoins with what is on disk.
//! - **32 nodes at most.** Each member gets a unique idgen worker id 0..31 when it joins (API.md's snowflake
//!   has 5 bits for it); a 33rd node is refused with [`ClusterError::ClusterFull`]. A member's id is freed
//!   when it leaves.
//! - **Moves** are two-phase: the map names a pending owner ([`ClusterEvent::MoveStarted`]); the old owner
//!   keeps serving until `MoveDone` makes the pending owner the owner. With `Handoff::Manual` the daemon
//!   proposes it (`move_done`) after handing the vbucket's entries over; with `Handoff::Auto` the leader does
//!   at once. Plans move the fewest vbuckets for an even spread ([`rebalance::plan`]).
//! - **Failover.** The leader fails a member it has not heard from for `failover_timeout`; the failed node's
//!   vbuckets go straight to the others (nothing to hand over). When the leader hears from it again it is
//!   marked alive and gets its share back by planned moves. Map changes are raft commands, so a minority side
//!   of a partition cannot make any (check-quorum also makes a cut-off leader step down).
//! - **Registry.** Writes are proposals that resolve when applied on the calling node (a follower's proposal
//!   travels to the leader as raft's own `MsgPropose`); reads use ReadIndex, so any member serves them
//!   linearizably. Without a known leader both fail fast with [`ClusterError::NoLeader`].
//! - **Events** are emitted as entries are applied, on every node, including when a restarted node replays its
//!   log: they say what changed, the view says what is. A daemon reacting to `MoveStarted` should check that the
//!   view still names that pending owner.
//! - **Durability.** Entries and term/vote are fsynced before the messages that depend on them are sent; the
//!   log is compacted into a snapshot every `snapshot_every` applied entries (see `storage`).

#![deny(unsafe_code)]

mod auth;
mod codec;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod node;
pub mod rebalance;
pub mod registry;
pub mod state;
mod storage;
mod transport;

pub use auth::{ClusterSecret, MIN_SECRET_BYTES};
pub use error::ClusterError;
pub use node::{
    remote_leave, remote_status, AppHandler, Cluster, ClusterConfig, ClusterStatus, ClusterView,
    Handoff, MemberStatus, RaftWatch, Role,
};
pub use rebalance::{vbucket_of, Move, Vbucket, VbucketMap, VBUCKETS};
pub use registry::RegistryLimits;
pub use state::{ClusterEvent, Member, MemberInfo, MemberState, MAX_MEMBERS};
pub use storage::DiskStorage;
pub use transport::MAX_APP_REQUEST;

/// 64 random bits from the operating system (node ids, incarnations, handoff ids).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No OS randomness (not on Linux): the standard library's per-process hasher keys and the clock.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        return h.finish();
    }
    u64::from_ne_bytes(b)
}
