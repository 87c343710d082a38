//! The raft node: one thread owns the `RawNode`, the storage and the state machine; everything else talks to
//! it through its inbox and reads what it publishes (`ClusterView`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use protobuf::Message as PbMessage;
use raft::prelude::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};

use crate::auth::ClusterSecret;
use crate::codec;
use crate::rebalance::{VbucketMap, VBUCKETS};
use crate::registry::RegistryLimits;
use crate::state::{
    valid_path, ClusterEvent, Command, Member, MemberInfo, MemberState, Outcome, StateMachine,
    MAX_MEMBERS,
};
use crate::storage::{self, DiskStorage};
use crate::transport::{self, Auth, Handler, Refused, Report, Transport};
use crate::ClusterError;

mod config;
mod lease;
mod logging;
mod membership;
mod rpc;
mod view;

pub use config::{ClusterConfig, Handoff};
use logging::TracingDrain;
pub(crate) use rpc::{decode_request, decode_response, RpcRequest, RpcResponse};
pub use rpc::{remote_leave, remote_status};
pub use view::{ClusterStatus, ClusterView, MemberStatus, Role};

/// A random non-zero number for this start of the process.
fn incarnation() -> u64 {
    crate::random_u64().max(1)
}

/// The largest entry proposed: well below the cluster port's 64 MiB frame, which an append carrying it (and
/// a snapshot) must fit in.
pub const MAX_PROPOSAL: usize = 8 << 20;

/// A normal entry's payload.
#[derive(Serialize, Deserialize)]
struct Proposal {
    origin: u64,
    /// The proposing process's incarnation: sequence numbers restart after a restart, so a replayed entry of
    /// an earlier incarnation must not answer a new waiter with the same number. 0 in entries written before.
    #[serde(default)]
    inc: u64,
    seq: u64,
    cmd: Command,
}

/// A conf change's context.
#[derive(Serialize, Deserialize)]
struct ConfContext {
    origin: u64,
    #[serde(default)]
    inc: u64,
    seq: u64,
    member: Option<MemberInfo>,
}

type Reply<T> = SyncSender<Result<T, ClusterError>>;

enum Input {
    Raft(Message),
    Report(Report),
    Propose(Command, Reply<Outcome>),
    Join(MemberInfo, Reply<Vec<(u64, String)>>),
    Children(String, Reply<Vec<String>>),
}

enum Pending {
    Propose(Reply<Outcome>),
    Join(Reply<Vec<(u64, String)>>),
    Read(String, Reply<Vec<String>>),
}

struct Shared {
    id: u64,
    cfg: ClusterConfig,
    view: ArcSwap<ClusterView>,
    inbox: SyncSender<Input>,
    stop: AtomicBool,
    dropped_inbound: AtomicU64,
    refused_connections: AtomicU64,
    refused_messages: AtomicU64,
    /// The origin of the millisecond clocks below.
    t0: Instant,
    /// Until when (ms since `t0`) this node may serve keyed calls: renewed by a ReadIndex a quorum
    /// confirmed, with the map applied up to it. 0: no lease.
    lease_until: AtomicU64,
    /// Per vbucket: until when (ms since `t0`) lock grants are refused (taken over without a handoff).
    fences: Vec<AtomicU64>,
    /// The raft thread has ended (stopped, its storage failed, or it panicked).
    raft_dead: AtomicBool,
    /// The daemon's handler of `KIND_APP_REQUEST` (see `Cluster::set_app_handler`).
    app: Mutex<Option<Arc<AppHandler>>>,
}

/// The daemon's handler of requests from other members: the id the connection authenticated as (`None`
/// without a cluster secret) and the request; an answer, or why it was refused.
pub type AppHandler = dyn Fn(Option<u64>, &[u8]) -> Result<Vec<u8>, String> + Send + Sync;

impl Shared {
    /// The published view as `fae cluster status` shows it, with the lease and the refusal counts.
    fn status(&self) -> ClusterStatus {
        let mut st = ClusterStatus::of(&self.view.load());
        st.lease = self.has_lease();
        st.refused_connections = self.refused_connections.load(Ordering::Relaxed);
        st.refused_messages = self.refused_messages.load(Ordering::Relaxed);
        st
    }

    fn has_lease(&self) -> bool {
        !self.raft_dead.load(Ordering::Acquire)
            && self.now_ms() < self.lease_until.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Lock grants refused on `vbucket` until `for_` from now (never shortens a fence).
    fn fence(&self, vbucket: u16, for_: Duration) {
        let until = self.now_ms() + for_.as_millis() as u64;
        self.fences[usize::from(vbucket) % VBUCKETS].fetch_max(until, Ordering::AcqRel);
    }
}

/// See [`Cluster::raft_watch`].
pub struct RaftWatch(Arc<Shared>);

impl RaftWatch {
    /// The raft thread ended although nobody stopped it: a storage failure or a panic.
    pub fn failed(&self) -> bool {
        self.0.raft_dead.load(Ordering::Acquire) && !self.0.stop.load(Ordering::Acquire)
    }
}

/// Ends the lease and marks the raft thread dead when the thread ends, however it ends (a panic included).
struct RaftAlive(Arc<Shared>);

impl Drop for RaftAlive {
    fn drop(&mut self) {
        self.0.lease_until.store(0, Ordering::Release);
        self.0.raft_dead.store(true, Ordering::Release);
    }
}

impl Shared {
    fn request<T>(
        &self,
        what: &'static str,
        make: impl FnOnce(Reply<T>) -> Input,
    ) -> Result<T, ClusterError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.inbox
            .send(make(tx))
            .map_err(|_| ClusterError::Stopped)?;
        match rx.recv_timeout(self.cfg.request_timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(ClusterError::Timeout {
                what,
                after: self.cfg.request_timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(ClusterError::Stopped),
        }
    }

    fn not_leader(&self) -> ClusterError {
        let v = self.view.load();
        if v.leader_id.is_none() {
            return ClusterError::NoLeader;
        }
        ClusterError::NotLeader {
            me: self.id,
            leader_id: v.leader_id,
            leader_addr: v.leader().map(|m| m.raft_addr.clone()),
        }
    }

    fn handle_rpc(&self, req: RpcRequest) -> RpcResponse {
        match req {
            RpcRequest::Join(info) => {
                let v = self.view.load();
                if !v.is_leader() {
                    return RpcResponse::NotLeader {
                        leader: v.leader().map(|m| (m.id, m.raft_addr.clone())),
                    };
                }
                match self.request("join", |r| Input::Join(info, r)) {
                    Ok(members) => RpcResponse::Joined { members },
                    Err(ClusterError::NotLeader {
                        leader_id,
                        leader_addr,
                        ..
                    }) => RpcResponse::NotLeader {
                        leader: leader_id.zip(leader_addr),
                    },
                    Err(e @ (ClusterError::ClusterFull(_) | ClusterError::JoinRefused(_))) => {
                        RpcResponse::Refused {
                            reason: e.to_string(),
                            retry: false,
                        }
                    }
                    Err(e) => RpcResponse::Refused {
                        reason: e.to_string(),
                        retry: true,
                    },
                }
            }
            RpcRequest::Leave { id } => {
                match self.request("leave", |r| Input::Propose(Command::Leave { id }, r)) {
                    Ok(Outcome::Refused(reason)) => RpcResponse::Refused {
                        reason,
                        retry: false,
                    },
                    Ok(_) => RpcResponse::Done,
                    Err(e) => RpcResponse::Refused {
                        reason: e.to_string(),
                        retry: true,
                    },
                }
            }
            RpcRequest::Status => RpcResponse::Status(Box::new(self.status())),
        }
    }
}

impl Handler for Shared {
    fn raft_message(&self, msg: Message) {
        if let Err(TrySendError::Full(_)) = self.inbox.try_send(Input::Raft(msg)) {
            self.dropped_inbound.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn rpc(&self, request: &[u8], peer: Option<u64>) -> Vec<u8> {
        let answer = match decode_request(request) {
            Ok(RpcRequest::Join(info)) if peer.is_some_and(|p| p != info.id) => {
                self.refused(Refused::Message);
                RpcResponse::Refused {
                    reason: format!(
                        "join as node {} on a connection authenticated as {}",
                        info.id,
                        peer.unwrap_or(0)
                    ),
                    retry: false,
                }
            }
            Ok(req) => self.handle_rpc(req),
            Err(e) => RpcResponse::Refused {
                reason: format!("malformed cluster request: {e}"),
                retry: false,
            },
        };
        serde_json::to_vec(&answer).expect("responses always encode")
    }

    fn report(&self, report: Report) {
        let _ = self.inbox.try_send(Input::Report(report));
    }

    fn app(&self, request: &[u8], peer: Option<u64>) -> Vec<u8> {
        let handler = self.app.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let answer = match handler {
            Some(h) => h(peer, request),
            None => Err("this node takes no requests from members yet (starting)".into()),
        };
        match answer {
            Ok(mut body) => {
                body.insert(0, 0);
                body
            }
            Err(why) => {
                let mut body = vec![1];
                body.extend_from_slice(why.as_bytes());
                body
            }
        }
    }

    fn refused(&self, what: Refused) {
        match what {
            Refused::Connection => &self.refused_connections,
            Refused::Message => &self.refused_messages,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// A running cluster node. Dropping it stops the node without leaving (as a crash would, minus the crash).
pub struct Cluster {
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    thread: Option<JoinHandle<()>>,
    events: Mutex<Option<Receiver<ClusterEvent>>>,
    raft_addr: String,
}

fn new_node_id() -> u64 {
    // Positive as an i64 (Thrift has no unsigned types) and never 0 (raft's "nobody").
    (crate::random_u64() & (i64::MAX as u64)).max(1)
}

fn resolve_node_id(cfg: &ClusterConfig) -> Result<u64, ClusterError> {
    let saved = match storage::read_small(&cfg.data_dir, "node_id")? {
        Some(s) => Some(
            s.trim()
                .parse::<u64>()
                .map_err(|_| ClusterError::Corrupt(format!("node_id file holds {s:?}")))?,
        ),
        None => None,
    };
    match (saved, cfg.node_id) {
        (_, Some(0)) => Err(ClusterError::Config("node id 0 is reserved; pick another".into())),
        (Some(s), Some(c)) if s != c => Err(ClusterError::Config(format!(
            "data dir {} belongs to node {s}, but the config says node {c}: fix the config or use another data dir",
            cfg.data_dir.display()
        ))),
        (Some(s), _) => Ok(s),
        (None, c) => {
            let id = c.unwrap_or_else(new_node_id);
            storage::write_small(&cfg.data_dir, "node_id", &format!("{id}\n"))?;
            Ok(id)
        }
    }
}

impl Cluster {
    /// Starts the node: recovers from `data_dir`, or bootstraps a new cluster, or joins through `seeds`.
    /// Returns once the node runs (and, when joining, once the leader has accepted it as a learner; the
    /// cluster's state then arrives in the background: watch `view().me()`).
    pub fn start(mut cfg: ClusterConfig) -> Result<Cluster, ClusterError> {
        if cfg.tick.is_zero()
            || cfg.election_ticks <= cfg.heartbeat_ticks
            || cfg.heartbeat_ticks == 0
        {
            return Err(ClusterError::Config(
                "tick must be > 0 and election_ticks > heartbeat_ticks > 0".into(),
            ));
        }
        if cfg.failover_timeout <= cfg.election_timeout() {
            return Err(ClusterError::Config(format!(
                "failover_timeout {:?} must exceed the election timeout ({:?} = tick × election_ticks)",
                cfg.failover_timeout,
                cfg.election_timeout()
            )));
        }
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| ClusterError::storage("create data dir", &cfg.data_dir, e))?;
        let id = resolve_node_id(&cfg)?;
        let store = DiskStorage::open(&cfg.data_dir)?;
        let initialized = store.is_initialized();
        if !initialized && !cfg.bootstrap && cfg.seeds.is_empty() {
            return Err(ClusterError::Config(format!(
                "data dir {} holds no cluster state: bootstrap a new cluster or give seeds to join one",
                cfg.data_dir.display()
            )));
        }

        let (inbox_tx, inbox_rx) = mpsc::sync_channel(4096);
        let (events_tx, events_rx) = mpsc::sync_channel(16 << 10);
        let empty_view = ClusterView {
            my_id: id,
            role: Role::Follower,
            leader_id: None,
            term: 0,
            commit_index: 0,
            applied_index: 0,
            epoch: 0,
            members: BTreeMap::new(),
            map: Arc::new(VbucketMap::default()),
        };
        let shared = Arc::new(Shared {
            id,
            cfg: cfg.clone(),
            view: ArcSwap::from_pointee(empty_view),
            inbox: inbox_tx,
            stop: AtomicBool::new(false),
            dropped_inbound: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            refused_messages: AtomicU64::new(0),
            t0: Instant::now(),
            lease_until: AtomicU64::new(0),
            fences: (0..VBUCKETS).map(|_| AtomicU64::new(0)).collect(),
            raft_dead: AtomicBool::new(false),
            app: Mutex::new(None),
        });
        if initialized {
            // A restart: the locks this node held lived in memory and are gone, and it may still own
            // vbuckets whose clients believe they hold locks.
            for vb in 0..VBUCKETS as u16 {
                shared.fence(vb, cfg.lock_fence);
            }
        }
        let transport = Transport::start(
            id,
            &cfg.raft_addr,
            shared.clone(),
            cfg.send_queue,
            cfg.secret.clone(),
        )?;
        let local = transport.local_addr();
        if cfg.raft_addr.ends_with(":0") {
            cfg.raft_addr = local.to_string();
        }
        let me = MemberInfo {
            id,
            rpc_addr: cfg.rpc_addr.clone(),
            raft_addr: cfg.raft_addr.clone(),
            admin_addr: cfg.admin_addr.clone(),
        };
        if !initialized && cfg.bootstrap {
            let sm = StateMachine::bootstrap(me.clone());
            let mut snap = Snapshot::default();
            snap.set_data(codec::encode(&sm).into());
            let meta = snap.mut_metadata();
            meta.index = 1;
            meta.term = 1;
            meta.mut_conf_state().voters = vec![id];
            store.apply_snapshot(&snap)?;
            tracing::info!(node = id, raft_addr = %cfg.raft_addr, "bootstrapped a new cluster");
        }
        let node = match Node::new(
            id,
            cfg.clone(),
            store,
            shared.clone(),
            transport.clone(),
            inbox_rx,
            events_tx,
        ) {
            Ok(n) => n,
            Err(e) => {
                transport.shutdown();
                return Err(e);
            }
        };
        let thread = thread::Builder::new()
            .name(format!("cluster-raft-{id}"))
            .spawn(move || node.run())
            .map_err(|e| ClusterError::Config(format!("cannot start the raft thread: {e}")))?;
        let cluster = Cluster {
            shared,
            transport,
            thread: Some(thread),
            events: Mutex::new(Some(events_rx)),
            raft_addr: cfg.raft_addr.clone(),
        };
        if !initialized && !cfg.bootstrap {
            cluster.join(me)?;
        }
        Ok(cluster)
    }

    /// Asks the seeds (following "the leader is X" answers) to add this node, until `join_timeout`.
    fn join(&self, me: MemberInfo) -> Result<(), ClusterError> {
        let cfg = &self.shared.cfg;
        let deadline = Instant::now() + cfg.join_timeout;
        let request = serde_json::to_vec(&RpcRequest::Join(me)).expect("requests encode");
        let mut targets: VecDeque<String> = VecDeque::new();
        let mut backoff = Duration::from_millis(100);
        let mut last_error = String::from("no answer yet");
        while Instant::now() < deadline {
            if targets.is_empty() {
                targets.extend(cfg.seeds.iter().cloned());
            }
            let addr = targets.pop_front().expect("seeds are not empty");
            let answer = transport::rpc_call(
                &addr,
                transport::KIND_RPC_REQUEST,
                &request,
                cfg.request_timeout + Duration::from_secs(1),
                self.transport.auth(),
            )
            .and_then(|b| {
                decode_response(&b).map_err(|e| {
                    ClusterError::JoinRefused(format!("malformed answer from {addr}: {e}"))
                })
            });
            match answer {
                Ok(RpcResponse::Joined { members }) => {
                    tracing::info!(node = self.shared.id, via = %addr, "joined the cluster as a learner");
                    self.transport.set_peers(&members);
                    return Ok(());
                }
                Ok(RpcResponse::NotLeader {
                    leader: Some((_, leader)),
                }) if leader != addr => {
                    targets.push_front(leader);
                    continue;
                }
                Ok(RpcResponse::Refused {
                    reason,
                    retry: false,
                }) => return Err(ClusterError::JoinRefused(reason)),
                Ok(RpcResponse::Refused { reason, .. }) => last_error = reason,
                Ok(RpcResponse::NotLeader { .. }) => last_error = format!("{addr} knows no leader"),
                Ok(_) => last_error = format!("{addr} gave an unexpected answer"),
                // The secrets differ, or one side has none: asking again cannot help.
                Err(ClusterError::Transport { addr, source })
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    return Err(ClusterError::JoinRefused(format!("{addr}: {source}")));
                }
                Err(e) => last_error = e.to_string(),
            }
            thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        Err(ClusterError::JoinRefused(format!(
            "no member accepted the join within {:?}; last error: {last_error}",
            cfg.join_timeout
        )))
    }

    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The cluster address this node listens on and advertises.
    pub fn raft_addr(&self) -> &str {
        &self.raft_addr
    }

    /// The latest published view: one atomic load, no lock, no raft.
    /// Whether this node may serve keyed calls now: its raft thread runs and a quorum confirmed it within
    /// the lease (see `ClusterConfig::lease`).
    pub fn has_lease(&self) -> bool {
        self.shared.has_lease()
    }

    /// Whether the raft thread still runs (it ends on a storage failure or a panic).
    pub fn raft_alive(&self) -> bool {
        !self.shared.raft_dead.load(Ordering::Acquire)
    }

    /// A handle that tells whether the raft thread ended on its own (not by `shutdown`), without keeping
    /// the `Cluster` alive: for a watcher that stops the process.
    pub fn raft_watch(&self) -> RaftWatch {
        RaftWatch(self.shared.clone())
    }

    /// Refuses lock grants on `vbucket` for `for_` from now (never shortens a fence): a vbucket handed
    /// over by a node that had it fenced stays fenced here as long.
    pub fn fence_locks(&self, vbucket: u16, for_: Duration) {
        self.shared.fence(vbucket, for_);
    }

    /// How long lock grants stay refused on `vbucket` (taken over without a handoff, or a restart), if they
    /// are.
    pub fn lock_fence(&self, vbucket: u16) -> Option<Duration> {
        let until = self.shared.fences[usize::from(vbucket) % VBUCKETS].load(Ordering::Acquire);
        let now = self.shared.now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.shared.view.load_full()
    }

    pub fn status(&self) -> ClusterStatus {
        self.shared.status()
    }

    /// Sets the handler of the daemon's requests from other members ([`Cluster::app_call`]).
    pub fn set_app_handler(
        &self,
        handler: impl Fn(Option<u64>, &[u8]) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    ) {
        *self.shared.app.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(handler));
    }

    /// Sends the daemon's `request` to member `node` over the cluster port (authenticated like raft, bounded
    /// to `MAX_APP_REQUEST` bytes) and returns its answer; the member's refusal is `Refused`.
    pub fn app_call(
        &self,
        node: u64,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        let addr = self
            .view()
            .members
            .get(&node)
            .map(|m| m.raft_addr.clone())
            .ok_or_else(|| ClusterError::Refused(format!("node {node} is not a member")))?;
        let mut answer = transport::rpc_call(
            &addr,
            transport::KIND_APP_REQUEST,
            request,
            timeout,
            self.transport.auth(),
        )?;
        match answer.first() {
            Some(0) => {
                answer.remove(0);
                Ok(answer)
            }
            Some(1) => Err(ClusterError::Refused(format!(
                "node {node}: {}",
                String::from_utf8_lossy(&answer[1..])
            ))),
            _ => Err(ClusterError::Refused(format!(
                "node {node} gave a malformed answer"
            ))),
        }
    }

    /// The stream of map events (moves started and finished, epoch changes); can be taken once.
    pub fn events(&self) -> Option<Receiver<ClusterEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn propose(&self, what: &'static str, cmd: Command) -> Result<Outcome, ClusterError> {
        match self.shared.request(what, |r| Input::Propose(cmd, r))? {
            Outcome::Refused(reason) => Err(ClusterError::Refused(reason)),
            o => Ok(o),
        }
    }

    /// `zk_create`: true if created, false if the path existed. Linearizable: returns once applied here.
    /// `limits` are checked here, before anything is proposed, and again when the entry is applied.
    pub fn registry_create(
        &self,
        path: &str,
        data: &[u8],
        limits: &RegistryLimits,
    ) -> Result<bool, ClusterError> {
        crate::registry::check(path.as_bytes(), Some(data), limits)
            .map_err(|e| ClusterError::Refused(e.0))?;
        let cmd = Command::RegistryCreate {
            path: path.to_owned(),
            data: data.to_vec(),
            limits: Some(*limits),
        };
        Ok(matches!(
            self.propose("registry create", cmd)?,
            Outcome::Bool(true)
        ))
    }

    /// `zk_del`: true if the path existed; its subtree goes with it.
    pub fn registry_delete(&self, path: &str) -> Result<bool, ClusterError> {
        check_path(path)?;
        let cmd = Command::RegistryDelete {
            path: path.to_owned(),
        };
        Ok(matches!(
            self.propose("registry delete", cmd)?,
            Outcome::Bool(true)
        ))
    }

    /// `zk_children`: sorted child names. Linearizable (raft ReadIndex through the leader).
    pub fn registry_children(&self, path: &str) -> Result<Vec<String>, ClusterError> {
        if path != "/" {
            check_path(path)?;
        }
        self.shared
            .request("registry read", |r| Input::Children(path.to_owned(), r))
    }

    /// Asks the cluster to remove `node_id`: its vbuckets are handed over, then the leader removes it from the
    /// raft group. Returns once the request is committed; removal follows.
    pub fn leave(&self, node_id: u64) -> Result<(), ClusterError> {
        self.propose("leave", Command::Leave { id: node_id })
            .map(drop)
    }

    /// Reports that this node has handed the given vbuckets over (`Handoff::Manual`): the moves from `from`
    /// to `to` that began at map epoch `since` (`Vbucket::since`, as the handoff saw it). A move re-targeted
    /// or begun again since is not completed.
    pub fn move_done(
        &self,
        vbuckets: &[u16],
        from: u64,
        to: u64,
        since: u64,
    ) -> Result<(), ClusterError> {
        self.propose(
            "move done",
            Command::MoveDone {
                vbuckets: vbuckets.to_vec(),
                from: Some(from),
                to: Some(to),
                since: Some(since),
            },
        )
        .map(drop)
    }

    /// Stops the node. With `leave`, first asks the cluster to remove it and waits (up to `join_timeout`)
    /// until it is out.
    pub fn shutdown(mut self, leave: bool) -> Result<(), ClusterError> {
        let mut result = Ok(());
        if leave {
            result = self.leave(self.id()).and_then(|()| {
                let deadline = Instant::now() + self.shared.cfg.join_timeout;
                while Instant::now() < deadline {
                    if !self.view().members.contains_key(&self.id()) {
                        return Ok(());
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Err(ClusterError::Timeout {
                    what: "leaving the cluster",
                    after: self.shared.cfg.join_timeout,
                })
            });
        }
        self.stop();
        result
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.transport.shutdown();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn check_path(path: &str) -> Result<(), ClusterError> {
    if valid_path(path) {
        Ok(())
    } else {
        Err(ClusterError::InvalidPath(path.to_owned()))
    }
}

/// A learner is promoted once it is this close to the leader's last index.
const PROMOTE_LAG: u64 = 10;

struct Node {
    id: u64,
    cfg: ClusterConfig,
    raw: RawNode<DiskStorage>,
    store: DiskStorage,
    sm: StateMachine,
    applied: u64,
    snap_index: u64,
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    inbox: Receiver<Input>,
    events: SyncSender<ClusterEvent>,
    events_dropped: u64,
    next_seq: u64,
    /// The ReadIndex asked for the lease: its sequence number and when it was asked.
    lease_probe: Option<(u64, Instant)>,
    /// Raft messages from the network dropped as malformed or foreign (see `refuse_message`).
    /// Random per start of the process (never 0): tells this run's proposals from an earlier run's.
    incarnation: u64,
    pending: HashMap<u64, (Instant, Pending)>,
    /// ReadIndex results waiting for the state machine to reach their index: (index, seq).
    reads: Vec<(u64, u64)>,
    last_heard: HashMap<u64, Instant>,
    was_leader: bool,
    /// Housekeeping actions recently proposed, not to repeat them every tick.
    recently: HashMap<String, Instant>,
    peers_epoch: u64,
    published: (Option<u64>, u64, u64, u64, u64, Role),
    map_cache: (u64, Arc<VbucketMap>),
}

impl Node {
    fn new(
        id: u64,
        cfg: ClusterConfig,
        store: DiskStorage,
        shared: Arc<Shared>,
        transport: Arc<Transport>,
        inbox: Receiver<Input>,
        events: SyncSender<ClusterEvent>,
    ) -> Result<Self, ClusterError> {
        let snap = store.latest_snapshot();
        let snap_index = snap.get_metadata().index;
        let sm: StateMachine = if snap.data.is_empty() {
            StateMachine::default()
        } else {
            codec::decode(&snap.data)
                .map_err(|e| ClusterError::Corrupt(format!("snapshot state: {e}")))?
        };
        let config = raft::Config {
            id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: snap_index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(TracingDrain, slog::o!("raft_id" => id));
        let mut raw = RawNode::new(&config, store.clone(), &logger)?;
        // The only voter elects itself at once instead of after a randomized election timeout (1 to 2
        // election timeouts of nothing served on a single-node cluster's every start).
        let cs = store.conf_state();
        if cs.voters == [id] && cs.learners.is_empty() {
            raw.campaign()?;
        }
        transport.set_peers(&sm.peer_addrs());
        let map_cache = (sm.epoch, Arc::new(sm.map.clone()));
        let mut node = Node {
            id,
            cfg,
            raw,
            store,
            sm,
            applied: snap_index,
            snap_index,
            shared,
            transport,
            inbox,
            events,
            events_dropped: 0,
            next_seq: 1,
            lease_probe: None,
            incarnation: incarnation(),
            pending: HashMap::new(),
            reads: Vec::new(),
            last_heard: HashMap::new(),
            was_leader: false,
            recently: HashMap::new(),
            peers_epoch: 0,
            published: (None, 0, 0, 0, 0, Role::Follower),
            map_cache,
        };
        node.peers_epoch = node.sm.epoch;
        node.publish(true);
        Ok(node)
    }

    fn run(mut self) {
        let _alive = RaftAlive(self.shared.clone());
        let tick = self.cfg.tick;
        let mut next_tick = Instant::now() + tick;
        while !self.shared.stop.load(Ordering::Relaxed) {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(wait) {
                Ok(input) => {
                    self.handle(input);
                    for input in self.inbox.try_iter().take(1024).collect::<Vec<_>>() {
                        self.handle(input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = if now > next_tick + tick {
                    now + tick
                } else {
                    next_tick + tick
                };
                self.housekeeping(now);
                self.expire(now);
                self.probe_lease(now);
            }
            if let Err(e) = self.on_ready() {
                tracing::error!(node = self.id, error = %e, "cluster node stops: its storage failed");
                break;
            }
        }
        for (_, (_, p)) in self.pending.drain() {
            match p {
                Pending::Propose(r) => drop(r.try_send(Err(ClusterError::Stopped))),
                Pending::Join(r) => drop(r.try_send(Err(ClusterError::Stopped))),
                Pending::Read(_, r) => drop(r.try_send(Err(ClusterError::Stopped))),
            }
        }
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Why a raft message from the network must not be stepped, if it must not: raft-rs trusts its input
    /// (an empty MsgPropose or a heartbeat committing past the log ends the raft thread), so messages that
    /// could not come from a correct member are dropped and counted.
    fn refuse_message(&self, m: &raft::eraftpb::Message) -> Option<&'static str> {
        use raft::eraftpb::MessageType as T;
        if m.to != self.id {
            return Some("addressed to another node");
        }
        if m.from == raft::INVALID_ID || m.from == self.id {
            return Some("no valid sender");
        }
        // A member knows the configuration; a node still joining (no configuration yet) hears the leader.
        let prs = self.raw.raft.prs();
        if prs.iter().next().is_some() && prs.get(m.from).is_none() {
            return Some("the sender is not a member");
        }
        match m.get_msg_type() {
            T::MsgPropose if m.entries.is_empty() => Some("an empty proposal"),
            T::MsgHeartbeat if m.commit > self.raw.raft.raft_log.last_index() => {
                Some("a heartbeat committing past the log")
            }
            T::MsgHup | T::MsgBeat | T::MsgUnreachable | T::MsgSnapStatus | T::MsgCheckQuorum => {
                Some("a local message type")
            }
            _ => None,
        }
    }

    fn leader_known(&self) -> bool {
        self.raw.raft.leader_id != raft::INVALID_ID
    }

    /// A proposal of `cmd` by this run: its sequence number and the entry's payload.
    fn proposal(&mut self, cmd: Command) -> (u64, Vec<u8>) {
        let seq = self.seq();
        let data = codec::encode(&Proposal {
            origin: self.id,
            inc: self.incarnation,
            seq,
            cmd,
        });
        (seq, data)
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Raft(m) => {
                if let Some(why) = self.refuse_message(&m) {
                    // One count, shared with the transport's refusals of the same kind.
                    let refused = self.shared.refused_messages.fetch_add(1, Ordering::Relaxed) + 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            node = self.id,
                            from = m.from,
                            kind = ?m.get_msg_type(),
                            refused,
                            "raft message dropped: {why}"
                        );
                    }
                    return;
                }
                // Liveness is two-way contact: only an answer to this node's own appends or heartbeats
                // counts. A member that can send but not receive (its vote requests still arrive) is
                // failed over like a silent one.
                if matches!(
                    m.get_msg_type(),
                    MessageType::MsgAppendResponse | MessageType::MsgHeartbeatResponse
                ) {
                    self.last_heard.insert(m.from, Instant::now());
                }
                if let Err(e) = self.raw.step(m) {
                    tracing::trace!(node = self.id, error = %e, "raft message not stepped");
                }
            }
            Input::Report(Report::Unreachable(id)) => self.raw.report_unreachable(id),
            Input::Report(Report::Snapshot { to, sent }) => {
                let status = if sent {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Input::Propose(cmd, reply) => {
                if !self.leader_known() {
                    let _ = reply.try_send(Err(ClusterError::NoLeader));
                    return;
                }
                // A registry write this node's state already refuses (full) is refused before raft.
                if let Command::RegistryCreate {
                    path,
                    data,
                    limits: Some(l),
                } = &cmd
                {
                    if let Err(why) = self.sm.registry.would_create(path, data, l) {
                        let _ = reply.try_send(Err(ClusterError::Refused(why.0)));
                        return;
                    }
                }
                let (seq, data) = self.proposal(cmd);
                if data.len() > MAX_PROPOSAL {
                    let _ = reply.try_send(Err(ClusterError::Refused(format!(
                        "a proposal of {} bytes exceeds {MAX_PROPOSAL}",
                        data.len()
                    ))));
                    return;
                }
                match self.raw.propose(vec![], data) {
                    Ok(()) => {
                        self.pending
                            .insert(seq, (Instant::now(), Pending::Propose(reply)));
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.try_send(Err(ClusterError::NoLeader));
                    }
                    Err(e) => {
                        let _ = reply.try_send(Err(e.into()));
                    }
                }
            }
            Input::Join(info, reply) => self.join(info, reply),
            Input::Children(path, reply) => {
                if !self.leader_known() {
                    let _ = reply.try_send(Err(ClusterError::NoLeader));
                    return;
                }
                let seq = self.seq();
                self.raw.read_index(seq.to_le_bytes().to_vec());
                self.pending
                    .insert(seq, (Instant::now(), Pending::Read(path, reply)));
            }
        }
    }

    fn join(&mut self, info: MemberInfo, reply: Reply<Vec<(u64, String)>>) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.try_send(Err(self.shared.not_leader()));
            return;
        }
        if let Some(m) = self.sm.members.get(&info.id) {
            let r = if m.raft_addr == info.raft_addr {
                Ok(self.sm.peer_addrs())
            } else {
                Err(ClusterError::JoinRefused(format!(
                    "node id {} is already a member at {}; give the new node another id or data dir",
                    info.id, m.raft_addr
                )))
            };
            let _ = reply.try_send(r);
            return;
        }
        if self.sm.members.len() >= MAX_MEMBERS {
            let _ = reply.try_send(Err(ClusterError::ClusterFull(self.sm.members.len())));
            return;
        }
        if self.raw.raft.has_pending_conf() {
            // raft would turn the proposal into an empty entry: say so now, the joiner retries.
            let _ = reply.try_send(Err(ClusterError::Refused(
                "another membership change is being applied; retry".into(),
            )));
            return;
        }
        let seq = self.seq();
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddLearnerNode);
        cc.node_id = info.id;
        let ctx = ConfContext {
            origin: self.id,
            inc: self.incarnation,
            seq,
            member: Some(info),
        };
        cc.context = codec::encode(&ctx).into();
        match self.raw.propose_conf_change(vec![], cc) {
            Ok(()) => {
                self.pending
                    .insert(seq, (Instant::now(), Pending::Join(reply)));
            }
            Err(e) => {
                let _ = reply.try_send(Err(ClusterError::Refused(format!(
                    "another membership change is in progress ({e}); retry"
                ))));
            }
        }
    }

    /// Drops the waiters nobody waits for any more (their callers timed out).
    fn expire(&mut self, now: Instant) {
        let limit = self.cfg.request_timeout * 2;
        self.pending
            .retain(|_, (at, _)| now.duration_since(*at) < limit);
        let pending = &self.pending;
        let probe = self.lease_probe.map(|(seq, _)| seq);
        self.reads
            .retain(|(_, seq)| pending.contains_key(seq) || Some(*seq) == probe);
        self.recently
            .retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
    }

    /// Proposes `cmd` unless the same action was proposed within the last election timeout.
    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            self.transport.send(m);
        }
    }

    /// One round of raft's Ready: send, persist, send what needed persistence first, apply, advance.
    fn on_ready(&mut self) -> Result<(), ClusterError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        // A leader's messages may go out before its own append is durable (raft thesis 10.2.1).
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
        let committed = rd.take_committed_entries();
        self.apply(committed)?;
        if !rd.entries().is_empty() {
            self.store.append(rd.entries())?;
        }
        if let Some(hs) = rd.hs() {
            self.store.set_hard_state(hs)?;
        }
        for rs in rd.take_read_states() {
            if let Ok(b) = <[u8; 8]>::try_from(&rs.request_ctx[..]) {
                self.reads.push((rs.index, u64::from_le_bytes(b)));
            }
        }
        // Votes and append responses only once what they promise is on disk.
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit)?;
        }
        self.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.raw.advance_apply();
        // The view first, then the lease: a lease renewed while the published map is still the old one
        // would let a node woken from a pause serve, for a moment, by the map it had before (a lock on a
        // vbucket failed over while it slept).
        self.publish(false);
        self.finish_reads();
        self.maybe_compact()?;
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), ClusterError> {
        let sm: StateMachine = codec::decode(&snap.data)
            .map_err(|e| ClusterError::Corrupt(format!("snapshot from the leader: {e}")))?;
        self.store.apply_snapshot(snap)?;
        // A snapshot may give this node vbuckets taken over in history it never applied: fence them.
        for (vb, e) in sm.map.entries().iter().enumerate() {
            if e.owner == self.id && e.pending.is_none() {
                self.shared.fence(vb as u16, self.cfg.lock_fence);
            }
        }
        self.sm = sm;
        self.applied = snap.get_metadata().index;
        self.snap_index = self.applied;
        self.map_cache.0 = u64::MAX;
        self.peers_epoch = u64::MAX;
        tracing::info!(node = self.id, index = self.applied, "installed a snapshot");
        self.emit(ClusterEvent::MapChanged {
            epoch: self.sm.epoch,
        });
        Ok(())
    }

    fn emit(&mut self, ev: ClusterEvent) {
        if self.events.try_send(ev).is_err() {
            self.events_dropped += 1;
            if self.events_dropped.is_power_of_two() {
                tracing::warn!(
                    node = self.id,
                    dropped = self.events_dropped,
                    "cluster events not consumed; dropping"
                );
            }
        }
    }

    fn resolve(&mut self, origin: u64, inc: u64, seq: u64, r: Result<Outcome, ClusterError>) {
        if origin != self.id || inc != self.incarnation {
            return;
        }
        match self.pending.remove(&seq) {
            Some((_, Pending::Propose(reply))) => drop(reply.try_send(r)),
            Some((_, Pending::Join(reply))) => {
                drop(reply.try_send(r.map(|_| self.sm.peer_addrs())))
            }
            Some((at, p @ Pending::Read(..))) => {
                self.pending.insert(seq, (at, p));
            }
            None => {}
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), ClusterError> {
        let mut events = Vec::new();
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            if e.data.is_empty() {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => match codec::decode::<Proposal>(&e.data) {
                    Ok(p) => {
                        let out = self.sm.apply(&p.cmd, &mut events);
                        self.resolve(p.origin, p.inc, p.seq, Ok(out));
                    }
                    Err(err) => {
                        tracing::error!(node = self.id, index = e.index, %err, "unreadable log entry skipped")
                    }
                },
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| {
                        ClusterError::Corrupt(format!("conf change at {}: {err}", e.index))
                    })?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.store.set_conf_state(&cs)?;
                    let ctx: Option<ConfContext> = codec::decode(&cc.context).ok();
                    match cc.get_change_type() {
                        ConfChangeType::AddLearnerNode => {
                            let added = ctx
                                .as_ref()
                                .and_then(|c| c.member.as_ref())
                                .is_some_and(|m| self.sm.add_learner(m, &mut events));
                            if !added {
                                if let Some(c) = &ctx {
                                    let full = ClusterError::ClusterFull(self.sm.members.len());
                                    self.resolve(c.origin, c.inc, c.seq, Err(full));
                                }
                                tracing::error!(
                                    node = self.id,
                                    peer = cc.node_id,
                                    "no idgen worker id left for a new member"
                                );
                            }
                        }
                        ConfChangeType::AddNode => self.sm.promote(cc.node_id, &mut events),
                        ConfChangeType::RemoveNode => {
                            self.sm.remove(cc.node_id, &mut events);
                            if cc.node_id == self.id {
                                tracing::info!(
                                    node = self.id,
                                    "this node was removed from the cluster"
                                );
                            }
                        }
                    }
                    if let Some(c) = ctx {
                        self.resolve(c.origin, c.inc, c.seq, Ok(Outcome::Done));
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(
                        node = self.id,
                        index = e.index,
                        "ConfChangeV2 entries are not used; skipped"
                    )
                }
            }
        }
        // Publish the view these events describe before sending them, so that a listener reading the view
        // on an event sees the change it announces.
        // Fences before the view that gives this node the vbuckets is published.
        events.retain(|ev| match *ev {
            ClusterEvent::TakenOver { vbucket, owner } => {
                if owner == self.id {
                    self.shared.fence(vbucket, self.cfg.lock_fence);
                }
                false
            }
            _ => true,
        });
        if !events.is_empty() {
            self.publish(true);
        }
        for ev in events {
            self.emit(ev);
        }
        if self.sm.epoch != self.peers_epoch {
            self.peers_epoch = self.sm.epoch;
            self.transport.set_peers(&self.sm.peer_addrs());
        }
        Ok(())
    }

    /// Asks for a ReadIndex every tick (one at a time): once a quorum has confirmed it and the log is applied
    /// up to it, the lease runs from when it was asked. The leader fails a member over only after
    /// `failover_timeout` without hearing from it, and the lease is half that: a node cut off, paused or
    /// behind stops serving keyed calls before anyone else can take its vbuckets.
    fn maybe_compact(&mut self) -> Result<(), ClusterError> {
        let wanted = self.store.take_snapshot_request() && self.applied > self.snap_index;
        if !wanted && self.applied < self.snap_index + self.cfg.snapshot_every.max(1) {
            return Ok(());
        }
        let data = codec::encode(&self.sm);
        let cs = self.store.conf_state();
        self.store.compact(self.applied, &cs, data)?;
        self.snap_index = self.applied;
        tracing::debug!(
            node = self.id,
            index = self.applied,
            "log compacted into a snapshot"
        );
        Ok(())
    }

    fn publish(&mut self, force: bool) {
        let r = &self.raw.raft;
        let key = (
            (r.leader_id != raft::INVALID_ID).then_some(r.leader_id),
            r.term,
            r.raft_log.committed,
            self.applied,
            self.sm.epoch,
            Role::from(r.state),
        );
        if !force && key == self.published {
            return;
        }
        if self.map_cache.0 != self.sm.epoch {
            self.map_cache = (self.sm.epoch, Arc::new(self.sm.map.clone()));
        }
        self.shared.view.store(Arc::new(ClusterView {
            my_id: self.id,
            role: key.5,
            leader_id: key.0,
            term: key.1,
            commit_index: key.2,
            applied_index: key.3,
            epoch: key.4,
            members: self.sm.members.clone(),
            map: self.map_cache.1.clone(),
        }));
        self.published = key;
    }
}

#[cfg(test)]
mod incarnation_tests {
    use super::*;

    /// An entry from before incarnations (or from another run) decodes with another incarnation, so it
    /// cannot answer this run's waiter that happens to have the same sequence number.
    #[test]
    fn entries_carry_their_incarnation() {
        let old = br#"{"origin":1,"seq":1,"cmd":{"Leave":{"id":2}}}"#;
        let p: Proposal = codec::decode(old).unwrap();
        assert_eq!((p.origin, p.inc, p.seq), (1, 0, 1));
        let (a, b) = (incarnation(), incarnation());
        assert!(a != 0 && b != 0 && a != b);
    }
}
