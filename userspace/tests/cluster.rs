//! The cluster's acceptance checks (issue 4) against real faed processes on loopback: three nodes serving one
//! keyspace, locks and ids; `kill -9` of the leader and the node's return from its own disk; a fourth node
//! joining and a node leaving; a node cut off by SIGSTOP; the registry across a restart of every node.
//!
//! Every node is a real `faed` with its own ports, config and `--data-dir` under one temp dir (removed at the
//! end); each process is stopped by its pid when the test ends, panicking or not (the harness's `Faed`).
//! The tests run one at a time (they measure failover times on a small machine) and every wait is bounded.
//!
//! Which node owns a key is asked of the nodes themselves: a call with `sticky = true` (what a forwarding
//! node sends) is served only by the key's owner (or pending owner) and refused by the others.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{Faed, FaedSpec, TempDir, Val};
use fae::client::{
    self, fun_rpc::TCacheMissed, Client, Protocol, TFunServantSyncClient, Transport,
};
use fae::wire::HeaderKind;
use fae_cluster::{ClusterStatus, MemberState};

/// `cluster.failover_timeout_ms` of every node (the default is 2500; shorter keeps the tests quick).
const FAILOVER_MS: u64 = 2000;
/// `cluster.forward_timeout_ms` of every node (the default).
const FORWARD_MS: u64 = 2000;
/// Bound on a join, a rebalance, an election or a failover settling (a loaded 2-core machine, debug build).
const SETTLE: Duration = Duration::from_secs(60);
/// Bound on a node's ports opening (a joining node opens them once the leader has accepted it).
const READY: Duration = Duration::from_secs(60);
/// Timeout of one cluster status request and of one client call.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per test: enough for every node to own many of them.
const KEYS: usize = 400;

static SERIAL: Mutex<()> = Mutex::new(());

/// Prints how long a test took when it ends (passing or not).
struct Took(&'static str, Instant);

impl Drop for Took {
    fn drop(&mut self) {
        eprintln!("{} took {:?}", self.0, self.1.elapsed());
    }
}

/// One cluster test at a time (they time elections and failovers on a machine with two cores); the test's
/// duration is printed when it ends.
fn serial(test: &'static str) -> (MutexGuard<'static, ()>, Took) {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    (guard, Took(test, Instant::now()))
}

// ---- clients --------------------------------------------------------------------------------------------

fn ctx() -> client::Context {
    client::context("cluster-test")
}

/// The context a forwarding node sends: only the key's owner serves it.
fn sticky_ctx() -> client::Context {
    let mut c = ctx();
    c.sticky = Some(true);
    c
}

/// Why a call did not return a value.
#[derive(Debug, Clone, PartialEq)]
enum Fail {
    /// `TCacheMissed`: the key is not cached (a normal answer).
    Missed,
    /// A `TApplicationException` (or another declared exception), with its message.
    App(String),
    /// The connection failed or timed out (it is dropped; the next call reconnects).
    Io(String),
}

/// A client of one node that reconnects after a transport error.
struct Peer {
    addr: String,
    c: Option<Client>,
}

impl Peer {
    fn new(addr: String) -> Peer {
        Peer { addr, c: None }
    }

    fn with<T>(&mut self, f: impl FnOnce(&mut Client) -> thrift::Result<T>) -> Result<T, Fail> {
        if self.c.is_none() {
            let c = client::connect(&self.addr, Transport::Buffered, CALL_TIMEOUT)
                .map_err(|e| Fail::Io(format!("{}: {e}", self.addr)))?;
            self.c = Some(c);
        }
        match f(self.c.as_mut().expect("connected")) {
            Ok(v) => Ok(v),
            Err(thrift::Error::User(e)) if e.downcast_ref::<TCacheMissed>().is_some() => {
                Err(Fail::Missed)
            }
            Err(thrift::Error::User(e)) => Err(Fail::App(format!("user exception: {e}"))),
            Err(thrift::Error::Application(e)) => Err(Fail::App(e.message)),
            Err(e) => {
                self.c = None;
                Err(Fail::Io(format!("{}: {e}", self.addr)))
            }
        }
    }

    /// `lc_get`: `Ok(None)` when the key is not cached.
    /// `lc_del`.
    fn del(&mut self, key: &str) -> Result<(), Fail> {
        self.with(|c| c.lc_del(ctx(), key.to_owned()))
    }

    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, Fail> {
        match self.with(|c| c.lc_get(ctx(), key.to_owned())) {
            Ok(v) => Ok(Some(v)),
            Err(Fail::Missed) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), Fail> {
        match self.with(|c| c.lc_set(ctx(), key.to_owned(), value.to_vec()))? {
            true => Ok(()),
            false => Err(Fail::App(format!("lc_set {key} returned false"))),
        }
    }

    /// The keys of `keys` this node owns.
    fn owned(&mut self, keys: &[String]) -> Vec<String> {
        keys.iter()
            .filter(|k| self.owns(k).expect("owns"))
            .cloned()
            .collect()
    }

    /// Whether this node owns `key` (serves a sticky call for it); `Err` on anything but a served call or a
    /// "does not own" refusal.
    fn owns(&mut self, key: &str) -> Result<bool, Fail> {
        match self.with(|c| c.lc_get(sticky_ctx(), key.to_owned())) {
            Ok(_) | Err(Fail::Missed) => Ok(true),
            Err(Fail::App(m)) if m.contains("does not own") => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn lock(&mut self, key: &str) -> Result<bool, Fail> {
        self.with(|c| c.lock(ctx(), "cluster-test".into(), key.to_owned()))
    }

    fn unlock(&mut self, key: &str) -> Result<(), Fail> {
        self.with(|c| c.unlock(ctx(), "cluster-test".into(), key.to_owned()))
    }

    fn zk_create(&mut self, path: &str, data: &str) -> Result<bool, Fail> {
        self.with(|c| c.zk_create(ctx(), path.to_owned(), data.to_owned()))
    }

    fn zk_del(&mut self, path: &str) -> Result<bool, Fail> {
        self.with(|c| c.zk_del(ctx(), path.to_owned()))
    }

    fn zk_children(&mut self, path: &str) -> Result<Vec<String>, Fail> {
        self.with(|c| c.zk_children(ctx(), path.to_owned()))
    }
}

/// Calls `f` until it returns `Ok`, every 50 ms, up to `within`; panics with the last error after that.
/// Returns the value and how long it took.
fn wait_for<T, E: std::fmt::Debug>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> (T, Duration) {
    let t = Instant::now();
    loop {
        match f() {
            Ok(v) => return (v, t.elapsed()),
            Err(e) if t.elapsed() >= within => {
                panic!("{what}: not done within {within:?}; last: {e:?}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Checks whose failures are reported together at the end of a test, so that the checks after them still
/// run (for behaviour that is wrong but does not stop the rest of the scenario).
#[derive(Default)]
struct Soft(Vec<String>);

impl Soft {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let m = what();
            eprintln!("CHECK FAILED: {m}");
            self.0.push(m);
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

// ---- keys -----------------------------------------------------------------------------------------------

fn keys(prefix: &str) -> Vec<String> {
    (0..KEYS).map(|i| format!("{prefix}:{i}")).collect()
}

fn value(key: &str, round: &str) -> Vec<u8> {
    let mut v = format!("{key}={round}|").into_bytes();
    // Some binary bytes, not only text.
    v.extend((0..=255u8).step_by(7));
    v
}

// ---- nodes ----------------------------------------------------------------------------------------------

/// One cluster member: a faed with fixed RPC, admin and cluster ports and a data dir, so it can be restarted.
struct Node {
    name: char,
    spec: FaedSpec,
    raft_port: u16,
    data_dir: PathBuf,
    faed: Option<Faed>,
    /// The raft node id (known once it has started).
    id: u64,
    /// The cluster secret file (every node of a test root shares one), if the node has one.
    secret_file: Option<PathBuf>,
    sections: String,
    /// The address of the cluster listener, when not `spec.ip` (a second address in its namespace).
    raft_ip: Option<std::net::Ipv4Addr>,
}

/// The secret shared by the nodes under `root` (written once).
fn secret_file(root: &Path) -> PathBuf {
    let path = root.join("cluster.secret");
    if !path.exists() {
        std::fs::write(&path, format!("secret-of-{}\n", root.display())).unwrap();
    }
    path
}

impl Node {
    /// A node whose config also holds `sections` (whole TOML tables).
    fn new(root: &Path, name: char, sections: &str) -> Node {
        let dir = root.join(name.to_string());
        let mut spec = FaedSpec::new(&dir);
        // Cluster events in the log that the harness prints when a test fails.
        spec.log_level = "warn,fae_cluster=info,fae::cluster=info".into();
        let mut node = Node {
            name,
            spec,
            raft_port: common::free_port(),
            data_dir: dir.join("data"),
            faed: None,
            id: 0,
            secret_file: None,
            sections: sections.to_owned(),
            raft_ip: None,
        };
        node.set_secret(Some(secret_file(root)));
        node
    }

    /// Gives the node another cluster secret file, or none.
    fn set_secret(&mut self, file: Option<PathBuf>) {
        // Locks outlive the tests unless a test sets its own TTL.
        let lock = if self.sections.contains("[lock]") {
            ""
        } else {
            "[lock]\nttl_ms = 300000\n\n"
        };
        let secret = file.as_ref().map_or(String::new(), |f| {
            format!("secret_file = {:?}\n", f.display().to_string())
        });
        self.spec.sections = format!(
            "[cluster]\nfailover_timeout_ms = {FAILOVER_MS}\nforward_timeout_ms = {FORWARD_MS}\n{secret}\n\
             {lock}{}",
            self.sections
        );
        self.secret_file = file;
    }

    fn raft_addr(&self) -> String {
        format!(
            "{}:{}",
            self.raft_ip.unwrap_or(self.spec.ip),
            self.raft_port
        )
    }

    fn rpc_addr(&self) -> String {
        format!("{}:{}", self.spec.ip, self.spec.port)
    }

    fn sock_addr(&self) -> SocketAddr {
        self.spec.addr()
    }

    fn peer(&self) -> Peer {
        Peer::new(self.rpc_addr())
    }

    /// Starts faed on this node's ports and data dir, with `extra` flags (`--bootstrap`, `--join ADDR`;
    /// none when restarting: the data dir is all a node needs to rejoin). Does not wait (see `wait_ready`).
    fn spawn(&mut self, extra: &[String]) {
        assert!(self.faed.is_none(), "node {} is already running", self.name);
        let mut spec = self.spec.clone();
        spec.args = vec![
            "--cluster-listen".into(),
            self.raft_addr(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
        ];
        spec.args.extend(extra.iter().cloned());
        self.faed = Some(Faed::spawn(&spec));
    }

    /// Waits for the ports, then learns the node id (or checks it is the one this node had before).
    fn wait_ready(&mut self) {
        let f = self.faed.as_mut().expect("node started");
        if let Err(log) = f.wait_ready(READY) {
            panic!("node {} did not start:\n{log}", self.name);
        }
        // Its ports open before it joins (or recovers): ready once its own view holds it.
        let (st, _) = wait_for(
            &format!("node {} to be a member in its own view", self.name),
            READY,
            || {
                let st = self.status()?;
                if st.members.iter().any(|m| m.member.id == st.my_id) {
                    Ok(st)
                } else {
                    Err(brief(&st))
                }
            },
        );
        if self.id == 0 {
            self.id = st.my_id;
        } else {
            assert_eq!(
                st.my_id, self.id,
                "node {} came back with another id: it did not recover from its data dir",
                self.name
            );
        }
    }

    fn status(&self) -> Result<ClusterStatus, String> {
        let secret = self
            .secret_file
            .as_ref()
            .map(|f| fae_cluster::ClusterSecret::from_file(f).expect("the test's secret file"));
        fae_cluster::remote_status(&self.raft_addr(), secret.as_ref(), STATUS_TIMEOUT)
            .map_err(|e| format!("node {}: {e}", self.name))
    }

    /// faed's log since its latest start.
    fn log_since_start(&self) -> String {
        let log = self.faed.as_ref().map(Faed::log).unwrap_or_default();
        match log.rfind("==== faed") {
            Some(at) => log[at..].to_owned(),
            None => log,
        }
    }

    fn faed(&mut self) -> &mut Faed {
        self.faed.as_mut().expect("node running")
    }

    fn signal(&mut self, sig: libc::c_int) {
        self.faed().signal(sig);
    }

    /// `kill -9`, and reaps it.
    fn kill9(&mut self) {
        let name = self.name;
        let f = self.faed();
        f.signal(libc::SIGKILL);
        assert!(
            f.wait_exit(Duration::from_secs(10)).is_some(),
            "node {name} survived SIGKILL"
        );
        self.faed = None;
    }

    /// SIGTERM and wait for the drain to finish; returns the exit status.
    fn stop(&mut self) -> ExitStatus {
        let name = self.name;
        let f = self.faed();
        f.signal(libc::SIGTERM);
        let st = f
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("node {name} did not exit within 20 s of SIGTERM"));
        self.faed = None;
        st
    }
}

/// Members as a status shows them: id → (state, vbuckets).
fn members_of(st: &ClusterStatus) -> BTreeMap<u64, (MemberState, usize)> {
    st.members
        .iter()
        .map(|m| (m.member.id, (m.member.state, m.vbuckets)))
        .collect()
}

fn brief(st: &ClusterStatus) -> String {
    let members: Vec<String> = st
        .members
        .iter()
        .map(|m| {
            format!(
                "{}:{:?}/{}vb/w{}",
                m.member.id % 10_000,
                m.member.state,
                m.vbuckets,
                m.member.worker_id
            )
        })
        .collect();
    format!(
        "[node {} {:?} leader={:?} term={} epoch={} commit={} applied={} pending={} members={}]",
        st.my_id % 10_000,
        st.role,
        st.leader_id.map(|l| l % 10_000),
        st.term,
        st.epoch,
        st.commit_index,
        st.applied_index,
        st.pending_moves,
        members.join(",")
    )
}

/// The nodes, and the directory holding their configs, logs and data (removed after the nodes stop).
struct Cluster {
    nodes: Vec<Node>,
    root: TempDir,
}

impl Cluster {
    /// `n` nodes: the first bootstraps, the others join through it side by side; returns once every node
    /// agrees on an even map with no move pending.
    fn start(n: usize) -> Cluster {
        Self::start_with(n, "")
    }

    /// As [`Cluster::start`], every node's config also holding `sections`.
    fn start_with(n: usize, sections: &str) -> Cluster {
        Self::start_as(n, sections, |_, _| ())
    }

    /// As [`Cluster::start_with`], `tweak(i, node)` changing each node before it starts.
    fn start_as(n: usize, sections: &str, tweak: impl Fn(usize, &mut Node)) -> Cluster {
        let root = TempDir::new();
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let mut node = Node::new(root.path(), (b'A' + i as u8) as char, sections);
                tweak(i, &mut node);
                node
            })
            .collect();
        let t = Instant::now();
        nodes[0].spawn(&["--bootstrap".into()]);
        nodes[0].wait_ready();
        let seed = nodes[0].raft_addr();
        for node in &mut nodes[1..] {
            node.spawn(&["--join".into(), seed.clone()]);
        }
        for node in &mut nodes[1..] {
            node.wait_ready();
        }
        let c = Cluster { nodes, root };
        let all: Vec<usize> = (0..n).collect();
        c.wait_settled(&all, &all, &[], &even(n));
        eprintln!("{n}-node cluster up and balanced in {:?}", t.elapsed());
        c
    }

    fn statuses(&self, of: &[usize]) -> Result<Vec<ClusterStatus>, String> {
        of.iter().map(|&i| self.nodes[i].status()).collect()
    }

    /// Waits until the nodes `asked` all report the same map: members exactly `voters` (state Voter) and
    /// `failed` (state Failed), a leader among the voters, no pending move, one epoch, and vbucket counts
    /// (voters', sorted) equal to `counts`. Returns the statuses.
    fn wait_settled(
        &self,
        asked: &[usize],
        voters: &[usize],
        failed: &[usize],
        counts: &[usize],
    ) -> Vec<ClusterStatus> {
        let voter_ids: Vec<u64> = voters.iter().map(|&i| self.nodes[i].id).collect();
        let mut want: BTreeMap<u64, MemberState> = voter_ids
            .iter()
            .map(|&id| (id, MemberState::Voter))
            .collect();
        for &i in failed {
            want.insert(self.nodes[i].id, MemberState::Failed);
        }
        let what = format!(
            "nodes {:?} to agree on voters {:?} and failed {:?} with {counts:?} vbuckets",
            names(&self.nodes, asked),
            names(&self.nodes, voters),
            names(&self.nodes, failed)
        );
        wait_for(&what, SETTLE, || {
            let sts = self.statuses(asked)?;
            let show = || sts.iter().map(brief).collect::<Vec<_>>().join(" ");
            for st in &sts {
                let m = members_of(st);
                let states: BTreeMap<u64, MemberState> =
                    m.iter().map(|(&id, &(s, _))| (id, s)).collect();
                if states != want {
                    return Err(format!("members differ: {}", show()));
                }
                let mut got: Vec<usize> = voter_ids.iter().map(|id| m[id].1).collect();
                got.sort_unstable();
                if got != counts {
                    return Err(format!("vbuckets {got:?}: {}", show()));
                }
                if failed.iter().any(|&i| m[&self.nodes[i].id].1 != 0) {
                    return Err(format!("a failed node owns vbuckets: {}", show()));
                }
                if st.pending_moves != 0 {
                    return Err(format!("moves pending: {}", show()));
                }
                if !st.lease {
                    return Err(format!("node {} holds no lease yet: {}", st.my_id, show()));
                }
                if !st.leader_id.is_some_and(|l| voter_ids.contains(&l)) {
                    return Err(format!("no leader among the voters: {}", show()));
                }
            }
            let first = &sts[0];
            if sts.iter().any(|s| {
                s.epoch != first.epoch
                    || s.leader_id != first.leader_id
                    || members_of(s) != members_of(first)
            }) {
                return Err(format!("nodes disagree: {}", show()));
            }
            Ok(sts)
        })
        .0
    }

    /// The index of the node the nodes `asked` agree is the leader.
    fn leader(&self, asked: &[usize]) -> usize {
        let sts = self.statuses(asked).expect("statuses");
        let id = sts[0].leader_id.expect("a leader");
        assert!(sts.iter().all(|s| s.leader_id == Some(id)));
        self.index_of(id)
    }

    fn index_of(&self, id: u64) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node has id {id}"))
    }

    /// For each key, the index of the one node among `among` that serves it as its owner. Panics if not
    /// exactly one does (the map is meant to be settled).
    fn owners(&self, among: &[usize], keys: &[String]) -> Vec<usize> {
        let mut peers: Vec<Peer> = among.iter().map(|&i| self.nodes[i].peer()).collect();
        keys.iter()
            .map(|k| {
                let owning: Vec<usize> = among
                    .iter()
                    .zip(peers.iter_mut())
                    .filter_map(|(&i, p)| {
                        p.owns(k)
                            .unwrap_or_else(|e| panic!("ownership probe of {k}: {e:?}"))
                            .then_some(i)
                    })
                    .collect();
                assert_eq!(
                    owning.len(),
                    1,
                    "{k}: served as its owner by nodes {:?}",
                    names(&self.nodes, &owning)
                );
                owning[0]
            })
            .collect()
    }

    /// Every key through every node of `through` must read `expect(key index)`.
    fn assert_values(
        &self,
        through: &[usize],
        keys: &[String],
        expect: impl Fn(usize) -> Option<Vec<u8>>,
        when: &str,
    ) {
        for &n in through {
            let mut p = self.nodes[n].peer();
            for (i, k) in keys.iter().enumerate() {
                let got = p.get(k).unwrap_or_else(|e| {
                    panic!(
                        "{when}: lc_get {k} through node {}: {e:?}",
                        self.nodes[n].name
                    )
                });
                assert_eq!(
                    got.as_deref().map(String::from_utf8_lossy),
                    expect(i).as_deref().map(String::from_utf8_lossy),
                    "{when}: lc_get {k} through node {}",
                    self.nodes[n].name
                );
            }
        }
    }
}

fn even(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n)
        .map(|i| fae_cluster::VBUCKETS / n + usize::from(i < fae_cluster::VBUCKETS % n))
        .collect();
    v.sort_unstable();
    v
}

fn names(nodes: &[Node], idx: &[usize]) -> String {
    idx.iter().map(|&i| nodes[i].name).collect()
}

fn count_by_owner(owners: &[usize]) -> BTreeMap<usize, usize> {
    let mut m = BTreeMap::new();
    for &o in owners {
        *m.entry(o).or_insert(0) += 1;
    }
    m
}

/// `lc_get`, `lc_set` and `lc_get` again of every key through the nodes in turn, until every key has worked
/// once (keys whose vbucket is being failed over are refused meanwhile). The first read must give
/// `value(key, prev)`, or nothing where `may_be_lost(key index)`; the second the value just written.
/// Returns how long it took and how many keys had lost their value.
fn serve_every_key(
    cl: &Cluster,
    through: &[usize],
    keys: &[String],
    prev: &str,
    may_be_lost: impl Fn(usize) -> bool,
    round: &str,
) -> (Duration, usize) {
    let mut lost = 0;
    let mut peers: Vec<Peer> = through.iter().map(|&i| cl.nodes[i].peer()).collect();
    let mut todo: Vec<usize> = (0..keys.len()).collect();
    let mut turn = 0;
    let ((), took) = wait_for(
        &format!(
            "lc_set/lc_get of every key through {}",
            names(&cl.nodes, through)
        ),
        SETTLE,
        || {
            let mut last = None;
            todo.retain(|&i| {
                turn += 1;
                let p = &mut peers[turn % through.len()];
                let v = value(&keys[i], round);
                let old = match p.get(&keys[i]) {
                    Ok(old) => old,
                    Err(e) => {
                        last = Some((keys[i].clone(), e));
                        return true;
                    }
                };
                match old {
                    None if may_be_lost(i) => lost += 1,
                    old => assert_eq!(
                        old.as_deref().map(String::from_utf8_lossy),
                        Some(String::from_utf8_lossy(&value(&keys[i], prev))),
                        "lc_get {} before rewriting it",
                        keys[i]
                    ),
                }
                let r = p.set(&keys[i], &v).and_then(|()| p.get(&keys[i]));
                match r {
                    Ok(Some(got)) => {
                        assert_eq!(got, v, "lc_get {} right after lc_set", keys[i]);
                        false
                    }
                    Ok(None) => panic!("lc_get {} right after lc_set: missed", keys[i]),
                    Err(e) => {
                        last = Some((keys[i].clone(), e));
                        true
                    }
                }
            });
            match last {
                None => Ok(()),
                Some(e) => Err(format!("{} keys left; e.g. {e:?}", todo.len())),
            }
        },
    );
    (took, lost)
}

/// `per_conn` zk_create calls (`{prefix}/c{j}/n{i}`) from each of `conns` connections at once, spread over
/// the nodes `through`; every one must create its path.
fn registry_writes(cl: &Cluster, through: &[usize], prefix: &str, conns: usize, per_conn: usize) {
    std::thread::scope(|s| {
        for j in 0..conns {
            let addr = cl.nodes[through[j % through.len()]].rpc_addr();
            s.spawn(move || {
                let mut p = Peer::new(addr);
                for i in 0..per_conn {
                    let path = format!("{prefix}/c{j}/n{i}");
                    assert!(
                        p.zk_create(&path, &format!("d{i}")).expect("zk_create"),
                        "{path}"
                    );
                }
            });
        }
    });
}

/// Registry writes during a fault: a zk_create of `{prefix}/{tag}-{n}` through `peer`, its path kept when
/// acknowledged (an unacknowledged one may or may not have happened).
struct Acked {
    prefix: String,
    paths: Vec<String>,
}

impl Acked {
    fn new(prefix: &str) -> Acked {
        Acked {
            prefix: prefix.to_owned(),
            paths: Vec::new(),
        }
    }

    fn write(&mut self, peer: &mut Peer, tag: &str, n: usize) {
        let path = format!("{}/{tag}-{n}", self.prefix);
        if let Ok(true) = peer.zk_create(&path, "w") {
            self.paths.push(path);
        }
    }

    /// Every acknowledged write is there, read through each of `peers`.
    fn check(&self, peers: &mut [Peer]) {
        for (i, p) in peers.iter_mut().enumerate() {
            let children = p.zk_children(&self.prefix).expect("zk_children");
            for path in &self.paths {
                let name = &path[self.prefix.len() + 1..];
                assert!(
                    children.iter().any(|c| c == name),
                    "{path} was acknowledged but peer {i} does not have it"
                );
            }
        }
        eprintln!(
            "{} acknowledged registry writes all there",
            self.paths.len()
        );
    }
}

// ---- ids ------------------------------------------------------------------------------------------------

/// `n` ids from `addr` on one connection, pipelined 500 at a time.
fn take_ids(addr: SocketAddr, n: usize) -> Vec<i64> {
    let mut c = common::Conn::open(addr, Transport::Buffered);
    let mut out = Vec::with_capacity(n);
    let mut seq = 0i32;
    while out.len() < n {
        let batch = (n - out.len()).min(500);
        let mut bytes = Vec::new();
        for i in 0..batch {
            bytes.extend(common::call("id_next", seq + i as i32, common::ctx_arg));
        }
        c.send_raw(&bytes);
        for i in 0..batch {
            let m = c.recv().expect("id_next reply");
            match m.success("id_next", seq + i as i32) {
                Val::I64(id) => out.push(*id),
                other => panic!("id_next returned {other:?}"),
            }
        }
        seq += batch as i32;
    }
    out
}

// ---- the tests ------------------------------------------------------------------------------------------

#[test]
fn three_nodes_share_keys_locks_ids_and_the_registry() {
    let _serial = serial("three_nodes_share_keys_locks_ids_and_the_registry");
    // Every node's memcache, Redis and MySQL pools hold the same stores.
    let (mc, rd) = (
        common::stores::Store::memcached(),
        common::stores::Store::redis(),
    );
    let db = common::stores::Mariadb::start();
    let pools = format!(
        "[[memcache.pools]]\nname = \"default\"\nservers = [\"{}\"]\n\n\
         [[redis.pools]]\nname = \"default\"\nservers = [\"{}\"]\n\n{}",
        mc.addr(),
        rd.addr(),
        db.config()
    );
    let cl = Cluster::start_with(3, &pools);
    let [a, b, c] = [0, 1, 2];
    let st = cl.statuses(&[a, b, c]).expect("statuses");

    // `fae cluster status --json` shows the same cluster.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fae"))
        .args(["cluster", "status", &cl.nodes[b].raft_addr(), "--json"])
        .arg("--secret-file")
        .arg(cl.nodes[b].secret_file.as_ref().expect("a secret"))
        .output()
        .expect("run fae cluster status");
    assert!(out.status.success(), "fae cluster status: {out:?}");
    let cli: ClusterStatus =
        serde_json::from_slice(&out.stdout).expect("fae cluster status --json parses");
    assert_eq!(cli.my_id, cl.nodes[b].id);
    assert_eq!(members_of(&cli), members_of(&st[b]));

    // Each member has its own idgen worker id.
    let workers: BTreeMap<u64, u8> = st[a]
        .members
        .iter()
        .map(|m| (m.member.id, m.member.worker_id))
        .collect();
    let distinct: HashSet<u8> = workers.values().copied().collect();
    assert_eq!(distinct.len(), 3, "worker ids {workers:?}");

    // lc_set through A, lc_get through B and C: the same value, for keys on every owner.
    let keys = keys("shared");
    let mut pa = cl.nodes[a].peer();
    for k in &keys {
        pa.set(k, &value(k, "a")).expect("lc_set through A");
    }
    cl.assert_values(
        &[b, c],
        &keys,
        |i| Some(value(&keys[i], "a")),
        "set through A",
    );
    let owners = cl.owners(&[a, b, c], &keys);
    let per = count_by_owner(&owners);
    assert_eq!(per.len(), 3, "keys per owner {per:?}: some node owns none");
    assert!(
        per.values().all(|&n| n > KEYS / 6),
        "keys per owner {per:?}"
    );
    eprintln!("keys per owner (A, B, C): {per:?}");
    // A sticky call at a node that does not own the key is refused with the owner its map names, which
    // the sending node follows once (its map was stale).
    let (k0, o0) = (&keys[0], owners[0]);
    let other = (o0 + 1) % 3;
    match cl.nodes[other]
        .peer()
        .with(|x| x.lc_get(sticky_ctx(), k0.clone()))
    {
        Err(Fail::App(m)) => assert!(
            m.contains(&format!("[owner {}]", cl.nodes[o0].rpc_addr())),
            "{m}"
        ),
        other => panic!("a sticky call at a non-owner: {other:?}"),
    }
    // And the other way round: written through C, read through A and B.
    let mut pc = cl.nodes[c].peer();
    for k in keys.iter().step_by(3) {
        pc.set(k, &value(k, "c")).expect("lc_set through C");
    }
    cl.assert_values(
        &[a, b],
        &keys,
        |i| Some(value(&keys[i], if i % 3 == 0 { "c" } else { "a" })),
        "set through C",
    );
    // Forwarded calls in the compact protocol and in header frames come back the way they went: the node
    // re-encodes the sticky call in the call's own protocol and the owner answers in it.
    let dialects = [
        (Transport::Buffered, Protocol::Compact),
        (Transport::Framed, Protocol::Compact),
        (Transport::Header(HeaderKind::THeader), Protocol::Compact),
        (Transport::Header(HeaderKind::TTHeader), Protocol::Binary),
    ];
    for (transport, protocol) in dialects {
        let addr = cl.nodes[b].sock_addr().to_string();
        let mut cli =
            client::connect_as(&addr, transport, protocol, CALL_TIMEOUT).expect("connect");
        let remote: Vec<usize> = (0..keys.len())
            .filter(|&i| owners[i] != b)
            .take(20)
            .collect();
        assert!(remote.len() >= 10, "keys B does not own: {remote:?}");
        for i in remote {
            let want = value(&keys[i], if i % 3 == 0 { "c" } else { "a" });
            let got = cli
                .lc_get(ctx(), keys[i].clone())
                .unwrap_or_else(|e| panic!("{transport:?} {protocol:?} lc_get {}: {e}", keys[i]));
            assert_eq!(got, want, "{transport:?} {protocol:?} {}", keys[i]);
        }
    }

    // mc_* and rd_call run on the node the client reached, straight to the store: never forwarded.
    let forwarded = |i: usize| -> u64 {
        let body = common::admin_get(cl.nodes[i].spec.admin_port, "/api/stats");
        let v: serde_json::Value = serde_json::from_str(&body).expect("stats json");
        v["forwarded"].as_u64().unwrap_or(0)
    };
    let before: Vec<u64> = [a, b, c].iter().map(|&i| forwarded(i)).collect();
    let mut pb = cl.nodes[b].peer();
    let data = |v: &str| client::fun_rpc::TMemcacheData::new(v.as_bytes().to_vec(), 0);
    for k in keys.iter().take(40) {
        let stored = pa.with(|cl| cl.mc_set(ctx(), "default".into(), k.clone(), data(k), 0));
        assert_eq!(stored, Ok(true), "mc_set {k} through A");
        let set = pb.with(|cl| {
            cl.rd_call(
                ctx(),
                "SET".into(),
                "default".into(),
                vec![k.clone(), k.clone()],
            )
        });
        assert_eq!(set.as_deref(), Ok("OK"), "rd_call SET {k} through B");
    }
    for k in keys.iter().take(40) {
        let got = pc
            .with(|cl| cl.mc_get(ctx(), "default".into(), k.clone()))
            .map(|d| d.data);
        assert_eq!(got, Ok(k.as_bytes().to_vec()), "mc_get {k} through C");
        let got = pa.with(|cl| cl.rd_call(ctx(), "GET".into(), "default".into(), vec![k.clone()]));
        assert_eq!(got.as_deref(), Ok(k.as_str()), "rd_call GET {k} through A");
    }
    let after: Vec<u64> = [a, b, c].iter().map(|&i| forwarded(i)).collect();
    assert_eq!(before, after, "back-end calls were forwarded");

    // my_query with a cacheKey runs on the owner of the key's vbucket, wherever the client is: a read
    // cached through A, an exec with the same cacheKey through B, and the next read through C sees the new
    // row (the owner's cached copy was evicted). my_evict through any node reaches it too.
    let query = |p: &mut Peer, sql: &str, args: Vec<String>| {
        p.with(|cl| {
            cl.my_query(
                ctx(),
                "global".into(),
                "kv".into(),
                0,
                sql.into(),
                args,
                "cl:ck".into(),
            )
        })
        .map(|r| r.rows)
    };
    let read = "SELECT v FROM kv WHERE k = ?";
    let row = |v: &str| Ok(vec![vec![v.to_string()]]);
    assert_eq!(
        query(
            &mut pa,
            "INSERT INTO kv (k, v) VALUES (?, ?)",
            vec!["ck".into(), "one".into()]
        ),
        Ok(vec![])
    );
    assert_eq!(query(&mut pa, read, vec!["ck".into()]), row("one"));
    db.sql("UPDATE fae_global.kv SET v = 'behind' WHERE k = 'ck'");
    assert_eq!(
        query(&mut pc, read, vec!["ck".into()]),
        row("one"),
        "cached on the owner"
    );
    assert_eq!(
        query(
            &mut pb,
            "UPDATE kv SET v = ? WHERE k = ?",
            vec!["two".into(), "ck".into()]
        ),
        Ok(vec![])
    );
    assert_eq!(query(&mut pc, read, vec!["ck".into()]), row("two"));
    db.sql("UPDATE fae_global.kv SET v = 'three' WHERE k = 'ck'");
    assert_eq!(query(&mut pa, read, vec!["ck".into()]), row("two"));
    assert_eq!(pb.with(|cl| cl.my_evict(ctx(), "cl:ck".into())), Ok(()));
    assert_eq!(query(&mut pc, read, vec!["ck".into()]), row("three"));

    // A lock taken through A is refused through C (and B) until it is released; one key per owner.
    let lock_keys: Vec<String> = (0..40).map(|i| format!("lock:{i}")).collect();
    let lock_owners = cl.owners(&[a, b, c], &lock_keys);
    for owner in [a, b, c] {
        let i = lock_owners
            .iter()
            .position(|&o| o == owner)
            .expect("a lock key on every owner");
        let k = &lock_keys[i];
        assert!(pa.lock(k).expect("lock through A"), "{k}: first lock");
        assert!(
            !pc.lock(k).expect("lock through C"),
            "{k}: held, yet granted through C"
        );
        assert!(
            !pb.lock(k).expect("lock through B"),
            "{k}: held, yet granted through B"
        );
        assert!(
            !pa.lock(k).expect("lock through A"),
            "{k}: held, yet granted again through A"
        );
        pa.unlock(k).expect("unlock through A");
        assert!(
            pc.lock(k).expect("lock through C"),
            "{k}: released, yet refused through C"
        );
        assert!(
            !pa.lock(k).expect("lock through A"),
            "{k}: held through C, yet granted through A"
        );
        pc.unlock(k).expect("unlock through C");
    }

    // 100 000 ids from six connections, two per node, at once: no duplicates, and each carries the worker
    // id of the node that made it.
    let t = Instant::now();
    let per_conn = [16_667, 16_667, 16_667, 16_667, 16_666, 16_666];
    let batches: Vec<(usize, Vec<i64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = per_conn
            .iter()
            .enumerate()
            .map(|(j, &n)| {
                let node = j % 3;
                let addr = cl.nodes[node].sock_addr();
                s.spawn(move || (node, take_ids(addr, n)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("id thread"))
            .collect()
    });
    let mut all = HashSet::new();
    for (node, ids) in &batches {
        let worker = workers[&cl.nodes[*node].id];
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "ids from one connection not increasing: {w:?}");
        }
        for &id in ids {
            assert_eq!(
                ((id >> 12) & 31) as u8,
                worker,
                "id {id} from node {} carries another worker id",
                cl.nodes[*node].name
            );
            assert!(all.insert(id), "duplicate id {id}");
        }
    }
    assert_eq!(all.len(), 100_000);
    eprintln!(
        "100000 ids from 3 nodes, no duplicate, in {:?}",
        t.elapsed()
    );

    // Registry writes through one node are read through the others (linearizable: no waiting).
    let mut peers = [pa, pb, pc];
    for (i, name) in ["x", "y", "z"].iter().enumerate() {
        let path = format!("/services/web/{name}");
        assert!(
            peers[i].zk_create(&path, name).expect("zk_create"),
            "{path}"
        );
        assert!(
            !peers[(i + 1) % 3]
                .zk_create(&path, name)
                .expect("zk_create"),
            "{path} created twice"
        );
    }
    for p in &mut peers {
        assert_eq!(
            p.zk_children("/services/web").expect("zk_children"),
            ["x", "y", "z"]
        );
    }
    assert!(peers[2].zk_del("/services/web/y").expect("zk_del"));
    assert_eq!(
        peers[0].zk_children("/services/web").expect("zk_children"),
        ["x", "z"]
    );
    assert_eq!(
        peers[1].zk_children("/services").expect("zk_children"),
        ["web"]
    );
}

#[test]
fn kill9_of_the_leader_fails_over_and_the_node_rejoins_from_its_disk() {
    let _serial = serial("kill9_of_the_leader_fails_over_and_the_node_rejoins_from_its_disk");
    let mut soft = Soft::default();
    let mut cl = Cluster::start(3);
    let all = [0, 1, 2];
    let keys = keys("k9");
    let mut p = cl.nodes[0].peer();
    for k in &keys {
        p.set(k, &value(k, "before")).expect("lc_set");
    }
    let owners = cl.owners(&all, &keys);
    let dead = cl.leader(&all);
    let dead_id = cl.nodes[dead].id;
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != dead).collect();
    let survivor_ids: Vec<u64> = survivors.iter().map(|&i| cl.nodes[i].id).collect();
    eprintln!("kill -9 of the leader, node {}", cl.nodes[dead].name);
    cl.nodes[dead].kill9();
    let t = Instant::now();

    // Keys the survivors own keep being served, with their values, while the cluster elects and fails over.
    for &s in &survivors {
        let mut p = cl.nodes[s].peer();
        for (i, k) in keys.iter().enumerate() {
            if owners[i] != dead {
                let (got, _) =
                    wait_for(&format!("lc_get {k}"), Duration::from_secs(10), || p.get(k));
                assert_eq!(
                    got,
                    Some(value(k, "before")),
                    "{k} through node {}",
                    cl.nodes[s].name
                );
            }
        }
    }

    // A new leader.
    let (leader, _) = wait_for("a new leader", SETTLE, || {
        let sts = cl.statuses(&survivors)?;
        match sts[0].leader_id {
            Some(l) if survivor_ids.contains(&l) && sts.iter().all(|s| s.leader_id == Some(l)) => {
                Ok(l)
            }
            _ => Err(sts.iter().map(brief).collect::<Vec<_>>().join(" ")),
        }
    });
    let elected = t.elapsed();

    // Every key served again: the dead node's vbuckets failed over to the survivors. Its cached values died
    // with it (a crash); a key that is read back must hold what was written.
    let (took, lost) = serve_every_key(
        &cl,
        &survivors,
        &keys,
        "before",
        |i| owners[i] == dead,
        "after",
    );
    let serving = t.elapsed();
    let dead_keys = owners.iter().filter(|&&o| o == dead).count();
    let sts = cl.wait_settled(&survivors, &survivors, &[dead], &[512, 512]);
    assert!(survivor_ids.contains(&sts[0].leader_id.expect("leader")));
    eprintln!(
        "kill -9 of the leader: new leader (node {}) elected after {elected:?}; every key served again \
         after {serving:?} ({took:?} of it in the lc_set/lc_get rounds); {lost} of the dead node's \
         {dead_keys} keys lost their value",
        cl.nodes[cl.index_of(leader)].name
    );

    // While it is down, more registry entries than a snapshot holds back: it catches up by snapshot.
    let t = Instant::now();
    registry_writes(&cl, &survivors, "/down", 4, 300);
    eprintln!(
        "1200 registry writes while the node is down in {:?}",
        t.elapsed()
    );

    // The node comes back with nothing but its data dir: it rejoins as itself and catches up.
    let t = Instant::now();
    cl.nodes[dead].spawn(&[]);
    cl.nodes[dead].wait_ready();
    // Right away, before it has caught up, it must not answer from its old map with what it no longer
    // has: every answer is the current value or an error (retryable), never a miss or an old value.
    let mut p = cl.nodes[dead].peer();
    let (mut refused, mut wrong) = (0, Vec::new());
    for k in &keys {
        match p.get(k) {
            Ok(got) if got == Some(value(k, "after")) => {}
            Ok(got) => wrong.push(format!(
                "{k} -> {:?}",
                got.as_deref().map(String::from_utf8_lossy)
            )),
            Err(_) => refused += 1,
        }
    }
    soft.check(wrong.is_empty(), || {
        format!(
            "right after its restart (before catching up), the restarted node answered {} of {KEYS} \
             keys from its stale map, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        )
    });
    let sts = cl.wait_settled(&all, &all, &[], &even(3));
    let back = t.elapsed();
    let mine = members_of(&sts[dead])[&dead_id];
    assert_eq!(mine.0, MemberState::Voter);
    assert!(mine.1 >= 341, "{mine:?}");
    let leader_commit = sts.iter().map(|s| s.commit_index).max().unwrap_or(0);
    assert!(
        sts[dead].applied_index + 10 >= leader_commit,
        "the restarted node has not caught up: {}",
        brief(&sts[dead])
    );
    eprintln!(
        "restarted node {} rejoined from its disk and the map rebalanced (342/341/341) in {back:?} \
         ({refused} calls refused right after the restart; caught up by a snapshot: {})",
        cl.nodes[dead].name,
        cl.nodes[dead]
            .log_since_start()
            .contains("installed a snapshot")
    );
    // Its vbuckets came back by planned moves, which hand the survivors' entries over: nothing lost.
    cl.assert_values(
        &all,
        &keys,
        |i| Some(value(&keys[i], "after")),
        "after the rejoin",
    );
    let owners = cl.owners(&all, &keys);
    assert!(
        owners.contains(&dead),
        "the restarted node owns none of {KEYS} keys"
    );
    let mut p = cl.nodes[dead].peer();
    assert_eq!(
        p.zk_children("/down")
            .expect("zk_children through the restarted node"),
        ["c0", "c1", "c2", "c3"]
    );
    for j in 0..4 {
        let names = p.zk_children(&format!("/down/c{j}")).expect("zk_children");
        assert_eq!(names.len(), 300, "/down/c{j} through the restarted node");
    }
    soft.finish();
}

#[test]
fn a_fourth_node_takes_a_quarter_and_a_leaving_node_hands_its_keys_over() {
    let _serial = serial("a_fourth_node_takes_a_quarter_and_a_leaving_node_hands_its_keys_over");
    let mut cl = Cluster::start(3);
    let [a, b, c, d] = [0, 1, 2, 3];
    let keys = keys("k4");
    let mut pa = cl.nodes[a].peer();
    for k in &keys {
        pa.set(k, &value(k, "v")).expect("lc_set");
    }
    // Locks held across the moves must stay held (they move with their vbucket).
    let mut pb = cl.nodes[b].peer();
    let held: Vec<String> = keys
        .iter()
        .step_by(10)
        .map(|k| format!("lock-{k}"))
        .collect();
    for k in &held {
        assert!(pb.lock(k).expect("lock"), "{k}");
    }
    let before = cl.owners(&[a, b, c], &keys);
    let held_before = cl.owners(&[a, b, c], &held);

    // A fourth node joins (through a node that need not be the leader).
    let t = Instant::now();
    let mut node = Node::new(cl.root.path(), 'D', "");
    node.spawn(&["--join".into(), cl.nodes[b].raft_addr()]);
    cl.nodes.push(node);
    cl.nodes[d].wait_ready();
    cl.wait_settled(&[a, b, c, d], &[a, b, c, d], &[], &[256, 256, 256, 256]);
    eprintln!(
        "fourth node joined, map settled at 256 each in {:?}",
        t.elapsed()
    );

    let after = cl.owners(&[a, b, c, d], &keys);
    let moved: Vec<usize> = (0..keys.len()).filter(|&i| before[i] != after[i]).collect();
    assert!(
        moved.len() > KEYS / 8,
        "only {} of {KEYS} keys moved to the new node",
        moved.len()
    );
    // The fewest moves: vbuckets only go to the new node, never between the old ones.
    for &i in &moved {
        assert_eq!(
            after[i], d,
            "{} moved from node {} to node {}",
            keys[i], before[i], after[i]
        );
    }
    // No key set before the move is lost: the moved ones are served by the new owner with their value.
    cl.assert_values(
        &[a, b, c, d],
        &keys,
        |i| Some(value(&keys[i], "v")),
        "after the join",
    );
    let held_after = cl.owners(&[a, b, c, d], &held);
    assert!(
        held_before.iter().zip(&held_after).any(|(x, y)| x != y),
        "none of {} held locks moved with their vbucket",
        held.len()
    );
    let mut pd = cl.nodes[d].peer();
    for k in &held {
        assert!(
            !pd.lock(k).expect("lock through D"),
            "{k}: held, yet granted after the move"
        );
    }

    // Node B leaves (`fae cluster leave`, asked of node C).
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fae"))
        .args([
            "cluster",
            "leave",
            &cl.nodes[c].raft_addr(),
            &cl.nodes[b].id.to_string(),
        ])
        .arg("--secret-file")
        .arg(cl.nodes[c].secret_file.as_ref().expect("a secret"))
        .output()
        .expect("run fae cluster leave");
    assert!(
        out.status.success(),
        "fae cluster leave: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    cl.wait_settled(&[a, c, d], &[a, c, d], &[], &even(3));
    eprintln!(
        "node B left, map settled at 342/341/341 in {:?}",
        t.elapsed()
    );
    let last = cl.owners(&[a, c, d], &keys);
    for i in 0..keys.len() {
        if after[i] != b {
            assert_eq!(
                last[i], after[i],
                "{} moved although its owner stayed",
                keys[i]
            );
        }
    }
    cl.assert_values(
        &[a, c, d],
        &keys,
        |i| Some(value(&keys[i], "v")),
        "after the leave",
    );
    let mut pc = cl.nodes[c].peer();
    for k in &held {
        assert!(
            !pc.lock(k).expect("lock through C"),
            "{k}: held, yet granted after the leave"
        );
        pd.unlock(k).expect("unlock through D");
        assert!(
            pc.lock(k).expect("lock through C"),
            "{k}: released, yet refused"
        );
    }
}

#[test]
fn a_node_cut_off_by_sigstop_is_failed_over_and_cannot_change_the_map() {
    let _serial = serial("a_node_cut_off_by_sigstop_is_failed_over_and_cannot_change_the_map");
    let mut soft = Soft::default();
    let mut cl = Cluster::start(3);
    let all = [0, 1, 2];
    let keys = keys("stop");
    let mut p = cl.nodes[0].peer();
    for k in &keys {
        p.set(k, &value(k, "before")).expect("lc_set");
    }
    let owners = cl.owners(&all, &keys);
    // Cut off the leader: the hard case (it believes it leads when it wakes up).
    let cut = cl.leader(&all);
    let cut_id = cl.nodes[cut].id;
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != cut).collect();
    let epoch_before = cl.nodes[cut].status().expect("status").epoch;
    eprintln!("SIGSTOP of the leader, node {}", cl.nodes[cut].name);
    cl.nodes[cut].signal(libc::SIGSTOP);
    let t = Instant::now();

    // Meanwhile (own thread): a key of the cut-off node fails, with an error within the forward timeout.
    let i = owners
        .iter()
        .position(|&o| o == cut)
        .expect("a key of the cut node");
    let probe_key = keys[i].clone();
    let mut probe = cl.nodes[others[0]].peer();
    let (probe, failed_over, survivors_served) = std::thread::scope(|s| {
        let probe = s.spawn(move || {
            let t = Instant::now();
            (probe.get(&probe_key), t.elapsed())
        });
        // The two others serve the keys they own.
        for &s in &others {
            let mut p = cl.nodes[s].peer();
            for (i, k) in keys.iter().enumerate() {
                if owners[i] != cut {
                    let got = p
                        .get(k)
                        .unwrap_or_else(|e| panic!("{k} through node {}: {e:?}", cl.nodes[s].name));
                    assert_eq!(
                        got,
                        Some(value(k, "before")),
                        "{k} through node {}",
                        cl.nodes[s].name
                    );
                }
            }
        }
        let survivors_served = t.elapsed();
        // Failed over after the timeout.
        cl.wait_settled(&others, &others, &[cut], &[512, 512]);
        let failed_over = t.elapsed();
        (
            probe.join().expect("probe thread"),
            failed_over,
            survivors_served,
        )
    });
    let (r, refused_after) = probe;
    assert!(
        matches!(r, Err(Fail::App(_))),
        "{} (owned by the stopped node) before the failover: {r:?}",
        keys[i]
    );
    soft.check(
        refused_after < Duration::from_millis(FORWARD_MS + 1500),
        || {
            format!(
                "a call for a key of the stopped node was refused only after {refused_after:?} \
                 (forward_timeout_ms = {FORWARD_MS})"
            )
        },
    );
    assert!(
        failed_over >= Duration::from_millis(FAILOVER_MS - 500),
        "failed over after {failed_over:?}, before the {FAILOVER_MS} ms timeout"
    );
    let epoch_majority = cl.nodes[others[0]].status().expect("status").epoch;
    assert!(epoch_majority > epoch_before);
    let (_, lost) = serve_every_key(&cl, &others, &keys, "before", |i| owners[i] == cut, "after");
    eprintln!(
        "SIGSTOP of the leader: the survivors served their {} keys within {survivors_served:?}; a key of \
         the stopped node was refused after {refused_after:?} ({r:?}); failed over after \
         {failed_over:?}; every key served {:?} after the stop ({lost} values of the stopped node's \
         vbuckets lost)",
        owners.iter().filter(|&&o| o != cut).count(),
        t.elapsed()
    );

    // Wake it: whatever it believes, it cannot commit a change; it adopts the majority's map (and gets its
    // share back by planned moves). Watch every node's map while it does.
    cl.nodes[cut].signal(libc::SIGCONT);
    let t = Instant::now();
    let mut last_epoch: BTreeMap<usize, u64> = BTreeMap::new();
    let mut seen = 0;
    let deadline = Instant::now() + SETTLE;
    let mut settled = false;
    while Instant::now() < deadline && !settled {
        let sts: Vec<(usize, ClusterStatus)> = all
            .iter()
            .filter_map(|&i| cl.nodes[i].status().ok().map(|s| (i, s)))
            .collect();
        for (i, st) in &sts {
            seen += 1;
            let m = members_of(st);
            for &o in &others {
                let state = m.get(&cl.nodes[o].id).map(|x| x.0);
                assert_ne!(
                    state,
                    Some(MemberState::Failed),
                    "node {} shows node {} failed: the cut-off side changed the map: {}",
                    cl.nodes[*i].name,
                    cl.nodes[o].name,
                    brief(st)
                );
            }
            let prev = last_epoch.insert(*i, st.epoch).unwrap_or(0);
            assert!(
                st.epoch >= prev,
                "node {}'s epoch went back from {prev} to {}",
                cl.nodes[*i].name,
                st.epoch
            );
        }
        settled = sts.len() == 3
            && sts.iter().all(|(_, s)| {
                s.pending_moves == 0
                    && s.epoch == sts[0].1.epoch
                    && members_of(s) == members_of(&sts[0].1)
                    && members_of(s)
                        .values()
                        .all(|&(st, n)| st == MemberState::Voter && n >= 341)
            });
        std::thread::sleep(Duration::from_millis(20));
    }
    let sts = cl.wait_settled(&all, &all, &[], &even(3));
    let woken = &sts[cut];
    assert_eq!(woken.my_id, cut_id);
    assert!(woken.epoch > epoch_majority, "{}", brief(woken));
    eprintln!(
        "SIGCONT: the woken node adopted the majority's map and took its share back in {:?} \
         ({seen} statuses watched)",
        t.elapsed()
    );
    cl.assert_values(
        &all,
        &keys,
        |i| Some(value(&keys[i], "after")),
        "after the wake-up",
    );
    soft.finish();
}

#[test]
fn registry_writes_survive_a_restart_of_every_node() {
    let _serial = serial("registry_writes_survive_a_restart_of_every_node");
    let mut cl = Cluster::start(3);
    let all = [0, 1, 2];
    let before = cl.statuses(&all).expect("statuses");
    let workers: BTreeMap<u64, u8> = before[0]
        .members
        .iter()
        .map(|m| (m.member.id, m.member.worker_id))
        .collect();

    // Writes through every node, from a few connections per node at once.
    let t = Instant::now();
    // More entries than a node applies between snapshots (1000): the restart recovers from a snapshot
    // and the log after it.
    let per_conn = 200;
    registry_writes(&cl, &all, "/reg", 6, per_conn);
    let mut p = cl.nodes[1].peer();
    assert!(p.zk_del("/reg/c5").expect("zk_del"));
    assert!(p.zk_create("/reg/last", "x").expect("zk_create"));
    let writes = 6 * per_conn + 2;
    eprintln!("{writes} registry writes in {:?}", t.elapsed());
    let want_top: Vec<String> = ["c0", "c1", "c2", "c3", "c4", "last"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut want_c2: Vec<String> = (0..per_conn).map(|i| format!("n{i}")).collect();
    want_c2.sort();

    // SIGTERM every node (each drains and keeps its membership), then start them again from their data dirs.
    for n in &mut cl.nodes {
        let st = n.stop();
        assert!(
            st.success(),
            "node {} exited with {st} after SIGTERM",
            n.name
        );
    }
    let t = Instant::now();
    for n in &mut cl.nodes {
        n.spawn(&[]);
    }
    for n in &mut cl.nodes {
        n.wait_ready();
    }
    let after = cl.wait_settled(&all, &all, &[], &even(3));
    eprintln!(
        "all three restarted and agreed on the map in {:?}",
        t.elapsed()
    );
    let workers_after: BTreeMap<u64, u8> = after[0]
        .members
        .iter()
        .map(|m| (m.member.id, m.member.worker_id))
        .collect();
    assert_eq!(
        workers_after, workers,
        "members or worker ids changed across the restart"
    );

    for n in &cl.nodes {
        let mut p = n.peer();
        let (top, _) = wait_for(
            &format!("zk_children /reg through node {}", n.name),
            SETTLE,
            || p.zk_children("/reg"),
        );
        assert_eq!(top, want_top, "through node {}", n.name);
        assert_eq!(
            p.zk_children("/reg/c2").expect("zk_children"),
            want_c2,
            "through node {}",
            n.name
        );
        assert!(
            !p.zk_create("/reg/c0/n7", "again").expect("zk_create"),
            "/reg/c0/n7 was lost"
        );
    }
}

/// A node whose admin port (or RPC port) is taken stops before it joins: the cluster never gets a voter that
/// cannot serve (three nodes started on the default admin port left a two-voter cluster with one dead).
#[test]
fn a_node_that_cannot_bind_its_ports_never_joins() {
    let _serial = serial("a_node_that_cannot_bind_its_ports_never_joins");
    let root = TempDir::new();
    let mut a = Node::new(root.path(), 'A', "");
    a.spawn(&["--bootstrap".into()]);
    a.wait_ready();
    for (what, clash) in [("admin", true), ("rpc", false)] {
        let mut b = Node::new(root.path(), if clash { 'B' } else { 'C' }, "");
        // The RPC port held by a plain listener (no SO_REUSEPORT): faed cannot share it.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        if clash {
            b.spec.admin_port = a.spec.admin_port;
        } else {
            b.spec.port = held.local_addr().unwrap().port();
        }
        b.spawn(&["--join".into(), a.raft_addr()]);
        let status = b
            .faed()
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("the node with a taken {what} port kept running"));
        assert!(!status.success(), "{what}: {status}");
        let log = b.log_since_start();
        assert!(
            log.contains("cannot") || log.contains("in use"),
            "{what}: {log}"
        );
        b.faed = None;
        drop(held);
        let st = a.status().unwrap();
        assert_eq!(
            st.members.len(),
            1,
            "{what}: the node joined before failing: {}",
            brief(&st)
        );
    }
}

/// Every test cluster runs with a secret. A faed without it, and one with another secret, cannot join: each
/// exits non-zero at once saying why; the members count the refused connections, `fae cluster status`
/// needs the secret, and the cluster carries on.
#[test]
fn a_node_without_the_secret_cannot_join() {
    let _serial = serial("a_node_without_the_secret_cannot_join");
    let root = TempDir::new();
    let mut a = Node::new(root.path(), 'A', "");
    a.spawn(&["--bootstrap".into()]);
    a.wait_ready();
    let wrong = root.path().join("wrong.secret");
    std::fs::write(&wrong, "another secret, as long as needed\n").unwrap();
    for (name, secret, says) in [('B', None, "secret"), ('C', Some(wrong), "secrets differ")] {
        let mut b = Node::new(root.path(), name, "");
        b.set_secret(secret);
        b.spawn(&["--join".into(), a.raft_addr()]);
        let t = Instant::now();
        let status = b
            .faed()
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("node {name} kept running:\n{}", b.log_since_start()));
        assert!(!status.success(), "{name}: {status}");
        assert!(
            b.log_since_start().contains(says),
            "{name}: {}",
            b.log_since_start()
        );
        eprintln!("node {name} refused in {:?}", t.elapsed());
        b.faed = None;
    }
    let st = a.status().unwrap();
    assert_eq!(st.members.len(), 1, "{}", brief(&st));
    assert!(st.refused_connections >= 2, "{st:?}");
    // `fae cluster status` without the secret is refused; with it, it answers.
    let fae = env!("CARGO_BIN_EXE_fae");
    let out = std::process::Command::new(fae)
        .args(["cluster", "status", &a.raft_addr()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = std::process::Command::new(fae)
        .args(["cluster", "status", &a.raft_addr(), "--secret-file"])
        .arg(a.secret_file.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut p = a.peer();
    assert!(p.zk_create("/after/refusals", "ok").unwrap());
}

/// A zk_create far over `[registry]` limits (a 15 MiB path, 2 MiB of data, an invalid path) is refused at
/// once, before raft sees it, and the next zk_create commits on every node. The node count (checked when
/// the entry is applied, with the limits the entry carries) refuses the write that would pass it, through
/// any node, and a delete makes room again.
#[test]
fn an_oversized_registry_call_is_refused_at_once_and_the_log_carries_on() {
    let _serial = serial("an_oversized_registry_call_is_refused_at_once_and_the_log_carries_on");
    let cl = Cluster::start_with(3, "[registry]\nmax_nodes = 40\n");
    let mut p = cl.nodes[1].peer();
    let huge = format!("/{}", "x".repeat(15 << 20));
    let t = Instant::now();
    match p.zk_create(&huge, "d") {
        Err(Fail::App(m)) => assert!(m.contains("exceeds 1024"), "{m}"),
        other => panic!("a 15 MiB path: {other:?}"),
    }
    eprintln!("15 MiB path refused in {:?}", t.elapsed());
    match p.zk_create("/big-data", &"d".repeat(2 << 20)) {
        Err(Fail::App(m)) => assert!(m.contains("registry data of"), "{m}"),
        other => panic!("2 MiB of data: {other:?}"),
    }
    for bad in ["relative", "/a//b", "/trailing/"] {
        match p.zk_create(bad, "d") {
            Err(Fail::App(m)) => assert!(m.contains("invalid registry path"), "{bad}: {m}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(p.zk_create("/after/oversized", "ok").unwrap());
    for node in &cl.nodes {
        let mut q = node.peer();
        let (children, _) = wait_for("the write on every node", Duration::from_secs(10), || {
            q.zk_children("/after")
                .map_err(|e| format!("{e:?}"))
                .and_then(|c| {
                    if c.is_empty() {
                        Err("not yet".to_owned())
                    } else {
                        Ok(c)
                    }
                })
        });
        assert_eq!(children, vec!["oversized".to_owned()]);
    }
    // 2 nodes exist (/after, /after/oversized); /full plus 37 children make 40.
    let mut through: Vec<Peer> = cl.nodes.iter().map(Node::peer).collect();
    for i in 0..37 {
        assert!(through[i % 3]
            .zk_create(&format!("/full/n{i}"), "x")
            .unwrap());
    }
    for q in &mut through {
        match q.zk_create("/full/one-too-many", "x") {
            Err(Fail::App(m)) => assert!(m.contains("registry is full (40 nodes)"), "{m}"),
            other => panic!("the 41st node: {other:?}"),
        }
    }
    assert!(through[2].zk_del("/full/n0").unwrap());
    assert!(through[0].zk_create("/full/one-too-many", "x").unwrap());
}

// ---- lock safety ------------------------------------------------------------------------------------------

/// A lock grant as a client saw it: the call's time window.
#[derive(Debug, Clone, Copy)]
struct Grant {
    sent: Instant,
    answered: Instant,
}

/// The lock checker (in the spirit of Jepsen's): a client whose lock call `[sent, answered]` was granted
/// holds the lock, as far as it can tell, from `answered` until `sent + ttl` (nobody unlocks here; the
/// server's TTL started at the grant, after `sent`). Two grants of one key whose such intervals overlap are
/// a lock held twice.
fn check_locks(history: &BTreeMap<String, Vec<Grant>>, ttl: Duration) -> Vec<String> {
    let mut bad = Vec::new();
    for (key, grants) in history {
        let held: Vec<(Instant, Instant)> = grants
            .iter()
            .map(|g| (g.answered, g.sent + ttl))
            .filter(|(from, to)| from < to)
            .collect();
        for (i, a) in held.iter().enumerate() {
            for b in &held[i + 1..] {
                if a.0 < b.1 && b.0 < a.1 {
                    let (first, second) = if a.0 <= b.0 { (a, b) } else { (b, a) };
                    bad.push(format!(
                        "{key}: granted again {:?} after a grant whose TTL ({ttl:?}) had not run out",
                        second.0.duration_since(first.0)
                    ));
                }
            }
        }
    }
    bad
}

/// One register operation as a client saw it (a cache key: lc_set, lc_del, lc_get), with its time window;
/// `ok` false when the call failed (a failed write may or may not have happened).
#[derive(Debug, Clone)]
struct RegOp {
    key: String,
    kind: RegKind,
    sent: Instant,
    answered: Instant,
    ok: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum RegKind {
    Set(Vec<u8>),
    Del,
    Get(Option<Vec<u8>>),
}

/// The register checker: a successful read of a value must come from a write of that value (values are
/// unique), and no successful delete or overwrite may have begun after that write was acknowledged and
/// finished before the read began (then the read saw a value deleted or replaced before it started). A
/// cache may lose values (a read of nothing is always allowed); it must never bring one back.
fn check_registers(ops: &[RegOp]) -> Vec<String> {
    let mut bad = Vec::new();
    for r in ops {
        let RegKind::Get(Some(v)) = &r.kind else {
            continue;
        };
        if !r.ok {
            continue;
        }
        let same_key = || ops.iter().filter(|o| o.key == r.key);
        let Some(w) = same_key().find(|o| o.kind == RegKind::Set(v.clone())) else {
            bad.push(format!(
                "{}: read {:?}, which nobody wrote",
                r.key,
                String::from_utf8_lossy(v)
            ));
            continue;
        };
        if !w.ok {
            continue; // the write's outcome is unknown: its value may show up whenever
        }
        let gone = same_key().find(|o| {
            o.ok && matches!(&o.kind, RegKind::Del | RegKind::Set(_))
                && o.kind != w.kind
                && o.sent > w.answered
                && o.answered < r.sent
        });
        if let Some(g) = gone {
            bad.push(format!(
                "{}: read {:?} {:?} after a {:?} that ended before the read began",
                r.key,
                String::from_utf8_lossy(v),
                r.sent.duration_since(g.answered),
                g.kind
            ));
        }
    }
    bad
}

/// Runs one register operation through `peer` and records it.
fn reg_op(peer: &mut Peer, key: &str, kind: RegKind, ops: &mut Vec<RegOp>) {
    let sent = Instant::now();
    let (kind, ok) = match kind {
        RegKind::Set(v) => {
            let ok = peer.set(key, &v).is_ok();
            (RegKind::Set(v), ok)
        }
        RegKind::Del => (RegKind::Del, peer.del(key).is_ok()),
        RegKind::Get(_) => match peer.get(key) {
            Ok(v) => (RegKind::Get(v), true),
            Err(_) => (RegKind::Get(None), false),
        },
    };
    ops.push(RegOp {
        key: key.to_owned(),
        kind,
        sent,
        answered: Instant::now(),
        ok,
    });
}

#[test]
fn the_register_checker_finds_a_stale_read() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let op = |kind: RegKind, sent: u64, answered: u64| RegOp {
        key: "k".into(),
        kind,
        sent: at(sent),
        answered: at(answered),
        ok: true,
    };
    let v = |s: &str| s.as_bytes().to_vec();
    let good = [
        op(RegKind::Set(v("a")), 0, 1),
        op(RegKind::Get(Some(v("a"))), 2, 3),
        op(RegKind::Del, 4, 5),
        op(RegKind::Get(None), 6, 7),
        // Concurrent with the delete: either answer is fine.
        op(RegKind::Get(Some(v("a"))), 4, 6),
    ];
    assert!(check_registers(&good).is_empty());
    let stale = [
        op(RegKind::Set(v("a")), 0, 1),
        op(RegKind::Del, 2, 3),
        op(RegKind::Get(Some(v("a"))), 4, 5),
    ];
    assert_eq!(check_registers(&stale).len(), 1);
    let never = [op(RegKind::Get(Some(v("z"))), 0, 1)];
    assert_eq!(check_registers(&never).len(), 1);
    let overwritten = [
        op(RegKind::Set(v("a")), 0, 1),
        op(RegKind::Set(v("b")), 2, 3),
        op(RegKind::Get(Some(v("a"))), 4, 5),
    ];
    assert_eq!(check_registers(&overwritten).len(), 1);
}

/// kill -9 of an owner while clients hold its locks and keep asking for them through the survivors: after
/// the failover no lock is granted again before its TTL has run out, and after that the locks are granted
/// again (the fence ends).
#[test]
fn kill9_of_an_owner_never_grants_a_held_lock_twice() {
    let _serial = serial("kill9_of_an_owner_never_grants_a_held_lock_twice");
    const TTL: Duration = Duration::from_millis(4000);
    let mut cl = Cluster::start_with(3, &format!("[lock]\nttl_ms = {}\n", TTL.as_millis()));
    let keys: Vec<String> = (0..60).map(|i| format!("safe-lock:{i}")).collect();
    let mut history: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    let mut through = cl.nodes[0].peer();
    for k in &keys {
        let sent = Instant::now();
        assert!(through.lock(k).expect("lock"), "{k} was free");
        history.entry(k.clone()).or_default().push(Grant {
            sent,
            answered: Instant::now(),
        });
    }
    // The victim: the node (not the one the client talks to) owning the most of the keys.
    let mut owned: Vec<Vec<String>> = vec![Vec::new(); 3];
    for (i, node) in cl.nodes.iter().enumerate() {
        let mut p = node.peer();
        for k in &keys {
            if p.owns(k).expect("owns") {
                owned[i].push(k.clone());
            }
        }
    }
    let victim = if owned[1].len() >= owned[2].len() {
        1
    } else {
        2
    };
    let theirs = owned[victim].clone();
    assert!(
        theirs.len() >= 10,
        "the victim owns {} of the keys",
        theirs.len()
    );
    let mut acked = Acked::new("/kill");
    for n in 0..3 {
        acked.write(&mut through, "before", n);
    }
    let killed = Instant::now();
    cl.nodes[victim].kill9();
    // Keep asking for the victim's locks through both survivors until well past failover + TTL.
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let mut peers: Vec<Peer> = survivors.iter().map(|&i| cl.nodes[i].peer()).collect();
    let mut round = 0;
    let until = killed + Duration::from_millis(FAILOVER_MS) + TTL + Duration::from_secs(6);
    let mut refusals = BTreeMap::<String, usize>::new();
    while Instant::now() < until {
        for (j, k) in theirs.iter().enumerate() {
            let n = peers.len();
            let p = &mut peers[j % n];
            let sent = Instant::now();
            match p.lock(k) {
                Ok(true) => history.entry(k.clone()).or_default().push(Grant {
                    sent,
                    answered: Instant::now(),
                }),
                Ok(false) => {}
                Err(Fail::App(m)) => {
                    let why = m.split(':').nth(1).unwrap_or("").trim().to_owned();
                    *refusals.entry(why.chars().take(40).collect()).or_default() += 1;
                }
                Err(e) => panic!("{k}: {e:?}"),
            }
        }
        acked.write(&mut peers[round % 2], "during", round);
        round += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("refusals by reason: {refusals:?}");
    let bad = check_locks(&history, TTL);
    assert!(bad.is_empty(), "locks held twice:\n{}", bad.join("\n"));
    // Liveness: once the fence ended, the failed node's locks were granted again.
    let regranted = theirs.iter().filter(|k| history[*k].len() > 1).count();
    assert_eq!(
        regranted,
        theirs.len(),
        "locks never granted again after the TTL"
    );
    acked.check(&mut peers);
    cl.wait_settled(&survivors, &survivors, &[victim], &even(2));
}

/// SIGSTOP of an owner: it is failed over, its locks are granted again through the survivors once the fence
/// ends, and when it wakes up its clients' new lock calls are refused (its lease ran out while it slept)
/// rather than granted by its stale map.
#[test]
fn an_owner_woken_from_sigstop_grants_no_lock_it_lost() {
    let _serial = serial("an_owner_woken_from_sigstop_grants_no_lock_it_lost");
    const TTL: Duration = Duration::from_millis(3000);
    let mut cl = Cluster::start_with(3, &format!("[lock]\nttl_ms = {}\n", TTL.as_millis()));
    let keys: Vec<String> = (0..60).map(|i| format!("stop-lock:{i}")).collect();
    let victim = 2;
    let mut p = cl.nodes[victim].peer();
    let theirs = p.owned(&keys);
    assert!(
        theirs.len() >= 10,
        "the victim owns {} of the keys",
        theirs.len()
    );
    let mut history: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    let mut record = |k: &str, sent: Instant, r: Result<bool, Fail>, refused: &mut usize| match r {
        Ok(true) => history.entry(k.to_owned()).or_default().push(Grant {
            sent,
            answered: Instant::now(),
        }),
        Ok(false) => {}
        Err(Fail::App(_)) | Err(Fail::Io(_)) => *refused += 1,
        Err(e) => panic!("{k}: {e:?}"),
    };
    let mut acked = Acked::new("/stop");
    for n in 0..3 {
        acked.write(&mut p, "before", n);
    }
    cl.nodes[victim].signal(libc::SIGSTOP);
    let stopped = Instant::now();
    // Lock calls queued to the stopped owner: the kernel takes the connection and the bytes; the owner
    // reads them only when it wakes, long after the survivors took its vbuckets over.
    let mut queued = common::Conn::open(cl.nodes[victim].sock_addr(), Transport::Buffered);
    let calls: Vec<u8> = theirs
        .iter()
        .enumerate()
        .flat_map(|(i, k)| lock_call(i as i32, k.as_bytes()))
        .collect();
    queued.send_raw(&calls);
    // Through the survivors: refused while the owner is silent, then fenced, then granted.
    let mut survivors = [cl.nodes[0].peer(), cl.nodes[1].peer()];
    let mut refused = 0;
    let mut round = 0;
    let until = stopped + Duration::from_millis(FAILOVER_MS) + TTL + Duration::from_secs(3);
    let mut granted: HashSet<String> = HashSet::new();
    while Instant::now() < until && granted.len() < theirs.len() {
        for (j, k) in theirs.iter().enumerate() {
            if granted.contains(k) {
                continue;
            }
            let sent = Instant::now();
            let r = survivors[j % 2].lock(k);
            if matches!(r, Ok(true)) {
                granted.insert(k.clone());
            }
            record(k, sent, r, &mut refused);
        }
        acked.write(&mut survivors[round % 2], "during", round);
        round += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        granted.len(),
        theirs.len(),
        "the survivors never granted the locks"
    );
    // The owner wakes: its clients ask at once, on connections of their own.
    cl.nodes[victim].signal(libc::SIGCONT);
    let woke = Instant::now();
    // Its queued calls are answered: refused (no lease, its map behind), or, once it has caught up,
    // forwarded to the new owner, which may grant a lock whose TTL has run out since. Each grant goes into
    // the history with the time the call was sent, before the stop: the checker judges it.
    queued.set_read_timeout(CALL_TIMEOUT);
    let (mut queued_refused, mut queued_granted) = (0, 0);
    for k in &theirs {
        let m = queued.recv().expect("an answer to a queued lock call");
        let r = match (m.field(0), m.app_error()) {
            (Some(Val::Bool(b)), _) => Ok(*b),
            (_, Some((text, _))) => Err(Fail::App(text)),
            _ => panic!("{k}: {m:?}"),
        };
        queued_granted += usize::from(matches!(r, Ok(true)));
        record(k, stopped, r, &mut queued_refused);
    }
    eprintln!(
        "queued lock calls at the stopped owner: {queued_refused} refused, {queued_granted} granted, of {}",
        theirs.len()
    );
    let mut at_victim = cl.nodes[victim].peer();
    let mut victim_refused = 0;
    while woke.elapsed() < Duration::from_secs(3) {
        for k in &theirs {
            let sent = Instant::now();
            let r = at_victim.lock(k);
            record(k, sent, r, &mut victim_refused);
        }
    }
    eprintln!(
        "refused through the survivors: {refused}; through the woken owner: {victim_refused}"
    );
    let bad = check_locks(&history, TTL);
    assert!(bad.is_empty(), "locks held twice:\n{}", bad.join("\n"));
    cl.wait_settled(&[0, 1, 2], &[0, 1, 2], &[], &even(3));
    let mut all: Vec<Peer> = cl.nodes.iter().map(Node::peer).collect();
    acked.check(&mut all);
}

/// Unmounts a tmpfs when dropped (the test passing or not).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The data dir on a small tmpfs that fills up: the raft thread's write fails, the node stops serving keyed
/// calls at once (its lease ends with the thread) and faed exits non-zero, so that its supervisor notices.
#[test]
fn a_full_disk_ends_the_lease_and_faed_exits_non_zero() {
    let _serial = serial("a_full_disk_ends_the_lease_and_faed_exits_non_zero");
    let root = TempDir::new();
    let mut a = Node::new(root.path(), 'A', "");
    let _fs = Tmpfs::mount(&a.data_dir, "4m");
    a.spawn(&["--bootstrap".into()]);
    a.wait_ready();
    let mut p = a.peer();
    wait_for("a first write", Duration::from_secs(10), || {
        p.zk_create("/disk/first", "x")
    });
    p.set("disk:key", b"v")
        .expect("lc_set before the disk fills");
    let mut acked = vec!["first".to_owned()];
    for i in 0..20 {
        assert!(p.zk_create(&format!("/disk/b{i}"), "x").unwrap());
        acked.push(format!("b{i}"));
    }
    // Fill the file system, leaving nothing for the log.
    let filler = a.data_dir.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    // Writes until the log cannot take one more (a few may still fit in what the filler left).
    let t = Instant::now();
    let mut last = Ok(true);
    for i in 0..200 {
        last = p.zk_create(&format!("/disk/n{i}"), &"d".repeat(4096));
        match last {
            Ok(true) => acked.push(format!("n{i}")),
            Ok(false) => {}
            Err(_) => break,
        }
    }
    assert!(last.is_err(), "the registry kept committing on a full disk");
    let status = a
        .faed()
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "faed kept running without its raft thread:\n{}",
                a.log_since_start()
            )
        });
    eprintln!(
        "faed exited {status} {:?} after the disk filled",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(3), "{}", a.log_since_start());
    assert!(
        a.log_since_start().contains("raft thread ended"),
        "{}",
        a.log_since_start()
    );
    a.faed = None;
    // Room again, and a restart: every write acknowledged before the disk filled is there.
    std::fs::remove_file(&filler).expect("remove the filler");
    a.spawn(&[]);
    a.wait_ready();
    let mut p = a.peer();
    let (children, _) = wait_for(
        "the registry after the restart",
        Duration::from_secs(20),
        || p.zk_children("/disk").map_err(|e| format!("{e:?}")),
    );
    for name in &acked {
        assert!(
            children.contains(name),
            "/disk/{name} was acknowledged, then lost"
        );
    }
    eprintln!(
        "{} acknowledged writes there after the restart",
        acked.len()
    );
}

// ---- a source killed during a move -----------------------------------------------------------------------

/// A key that is not UTF-8 (0xff never is), as PHP clients may send.
fn binary_key(kind: u8, i: u32) -> Vec<u8> {
    let mut k = vec![0xff, kind];
    k.extend_from_slice(&i.to_be_bytes());
    k.push(0);
    k
}

fn binary_value(i: u32) -> Vec<u8> {
    let mut v = format!("value-{i}|").into_bytes();
    v.extend_from_slice(&[0x80, 0x00, 0xc3]);
    v.resize(200, b'.');
    v
}

fn lock_call(seqid: i32, key: &[u8]) -> Vec<u8> {
    common::call("lock", seqid, |e| {
        common::ctx_arg(e);
        e.field_bytes(2, b"cluster-test");
        e.field_bytes(3, key);
    })
}

/// The owner (node id) of each vbucket, as `node` sees the map.
fn vbucket_owners(node: &Node) -> Vec<u64> {
    let (status, body) = common::http(node.spec.admin_port, "GET", "/api/cluster", &[], "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/api/cluster is JSON");
    let owners: Vec<u64> = v["vbuckets"]
        .as_array()
        .expect("vbuckets")
        .iter()
        .map(|o| o.as_u64().expect("an owner id"))
        .collect();
    assert_eq!(owners.len(), fae_cluster::VBUCKETS);
    owners
}

/// Sends `calls` to `addr` pipelined (128 at a time) and returns the replies in order.
fn pipelined(addr: SocketAddr, calls: &[Vec<u8>]) -> Vec<common::Msg> {
    let mut c = common::Conn::open(addr, Transport::Buffered);
    c.set_read_timeout(CALL_TIMEOUT);
    let mut out = Vec::with_capacity(calls.len());
    for chunk in calls.chunks(128) {
        let mut bytes = Vec::new();
        for m in chunk {
            bytes.extend_from_slice(m);
        }
        c.send_raw(&bytes);
        for _ in chunk {
            out.push(c.recv().expect("a reply"));
        }
    }
    out
}

/// The calls `make(i, key)` for `keys`, each sent to the node owning its key (by `owners`), in parallel;
/// the replies come back by key index.
fn by_owner(
    cl: &Cluster,
    owners: &[u64],
    keys: &[Vec<u8>],
    make: impl Fn(usize, &[u8]) -> Vec<u8> + Sync,
) -> Vec<common::Msg> {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        let owner = owners[usize::from(fae_cluster::vbucket_of(k))];
        groups.entry(cl.index_of(owner)).or_default().push(i);
    }
    let mut replies: Vec<Option<common::Msg>> = vec![None; keys.len()];
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .map(|(&node, idx)| {
                let addr = cl.nodes[node].sock_addr();
                let calls: Vec<Vec<u8>> = idx.iter().map(|&i| make(i, &keys[i])).collect();
                s.spawn(move || pipelined(addr, &calls))
            })
            .collect();
        for ((_, idx), h) in groups.iter().zip(handles) {
            for (&i, m) in idx.iter().zip(h.join().expect("a client thread")) {
                replies[i] = Some(m);
            }
        }
    });
    replies
        .into_iter()
        .map(|m| m.expect("every key answered"))
        .collect()
}

/// kill -9 of a source node while vbuckets move from it (and from the others) to a joining node, with
/// 100,000 cache entries and 1,000 held locks under binary keys: afterwards no vbucket stays pending, every
/// entry of a vbucket that did not belong to the killed node reads back with its value (so the handoffs
/// carried binary keys whole), no lock is granted again within its TTL anywhere, and no key reads a value it
/// never had.
#[test]
fn kill9_of_a_source_during_a_move_of_100k_binary_entries_and_1000_locks() {
    let _serial = serial("kill9_of_a_source_during_a_move_of_100k_binary_entries_and_1000_locks");
    const TTL: Duration = Duration::from_secs(60);
    let sections = format!("[lock]\nttl_ms = {}\n", TTL.as_millis());
    let mut cl = Cluster::start_with(3, &sections);
    let owners = vbucket_owners(&cl.nodes[0]);
    let entries: Vec<Vec<u8>> = (0..100_000).map(|i| binary_key(b'e', i)).collect();
    let t = Instant::now();
    for m in by_owner(&cl, &owners, &entries, |i, k| {
        common::lc_set_call(i as i32, k, &binary_value(i as u32))
    }) {
        assert_eq!(m.field(0), Some(&Val::Bool(true)), "lc_set: {m:?}");
    }
    eprintln!("100,000 entries written in {:?}", t.elapsed());
    let locks: Vec<Vec<u8>> = (0..1000).map(|i| binary_key(b'l', i)).collect();
    let mut history: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    let name = |k: &[u8]| format!("{k:02x?}");
    let sent = Instant::now();
    for (k, m) in locks.iter().zip(by_owner(&cl, &owners, &locks, |i, k| {
        lock_call(i as i32, k)
    })) {
        assert_eq!(m.field(0), Some(&Val::Bool(true)), "lock: {m:?}");
        history.entry(name(k)).or_default().push(Grant {
            sent,
            answered: Instant::now(),
        });
    }

    let mut acked = Acked::new("/move");
    let mut via = cl.nodes[0].peer();
    for n in 0..3 {
        acked.write(&mut via, "before", n);
    }
    // D joins: vbuckets move from A, B and C to it. B is killed as soon as a move is pending.
    let (b, victim_id) = (1, cl.nodes[1].id);
    let mut d = Node::new(cl.root.path(), 'D', &sections);
    d.spawn(&["--join".into(), cl.nodes[0].raft_addr()]);
    let (pending, _) = wait_for("a move pending at B", SETTLE, || {
        let st = cl.nodes[b].status()?;
        if st.pending_moves > 0 {
            Ok(st.pending_moves)
        } else {
            Err(format!("no move yet: {}", brief(&st)))
        }
    });
    cl.nodes[b].kill9();
    eprintln!("B killed with {pending} moves pending");
    d.wait_ready();
    cl.nodes.push(d);
    let (a, c, d) = (0, 2, 3);
    cl.wait_settled(&[a, c, d], &[a, c, d], &[b], &even(3));
    for n in 0..3 {
        acked.write(&mut via, "after", n);
    }
    acked.check(&mut [a, c, d].map(|i| cl.nodes[i].peer()));

    // Locks: asked again through every survivor; none may be granted within its TTL.
    let survivors = [a, c, d];
    let mut refused = 0;
    for (round, &n) in survivors.iter().enumerate() {
        let replies = pipelined(
            cl.nodes[n].sock_addr(),
            &locks
                .iter()
                .enumerate()
                .map(|(i, k)| lock_call((round * 1000 + i) as i32, k))
                .collect::<Vec<_>>(),
        );
        let answered = Instant::now();
        for (k, m) in locks.iter().zip(replies) {
            match m.field(0) {
                Some(Val::Bool(true)) => history.entry(name(k)).or_default().push(Grant {
                    sent: answered,
                    answered,
                }),
                Some(Val::Bool(false)) => {}
                _ => refused += 1,
            }
        }
    }
    eprintln!("lock calls refused (fenced, retry): {refused}");
    let bad = check_locks(&history, TTL);
    assert!(
        bad.is_empty(),
        "locks held twice:\n{}",
        bad[..bad.len().min(20)].join("\n")
    );

    // Entries: every key not on one of B's vbuckets reads its value; B's may be gone, never wrong.
    let now = vbucket_owners(&cl.nodes[a]);
    let replies = by_owner(&cl, &now, &entries, |i, k| common::lc_get_call(i as i32, k));
    let (mut kept, mut lost, mut missing) = (0, 0, Vec::new());
    for (i, (k, m)) in entries.iter().zip(replies).enumerate() {
        let was_b = owners[usize::from(fae_cluster::vbucket_of(k))] == victim_id;
        match m.field(0) {
            Some(Val::Bin(v)) => {
                assert_eq!(
                    v,
                    &binary_value(i as u32),
                    "{}: a value it never had",
                    name(k)
                );
                kept += 1;
            }
            _ if m.app_error().is_some() => panic!("{}: {m:?}", name(k)),
            _ if was_b => lost += 1,
            _ => missing.push(name(k)),
        }
    }
    eprintln!("entries: {kept} kept, {lost} lost with B");
    assert!(
        missing.is_empty(),
        "{} entries of vbuckets B did not own are gone, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

// ---- a partition between network namespaces ------------------------------------------------------------

/// Runs a command, panicking with its output if it fails.
fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One network namespace per node, each joined by a veth pair to a bridge in the test's own namespace
/// (10.213.S.254), so the test reaches every node; a partition is cut and healed with blackhole routes
/// inside the namespaces (the test still reaches both sides). Dropping it deletes the namespaces (their
/// veth pairs go with them) and the bridge, the test passing or not.
struct Net {
    tag: String,
    subnet: u8,
    nodes: usize,
}

impl Net {
    fn new(nodes: usize) -> Net {
        let pid = std::process::id();
        let net = Net {
            tag: format!("{}", pid % 100_000),
            subnet: (20 + pid % 200) as u8,
            nodes,
        };
        let br = net.bridge();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &br])
            .output();
        sh(&["ip", "link", "add", &br, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.213.{}.254/24", net.subnet),
            "dev",
            &br,
        ]);
        sh(&["ip", "link", "set", &br, "up"]);
        for i in 0..nodes {
            let (ns, outer, inner) = (net.ns(i), net.outer(i), format!("fi{}n{i}", net.tag));
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns])
                .output();
            sh(&["ip", "netns", "add", &ns]);
            sh(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            sh(&["ip", "link", "set", &inner, "netns", &ns]);
            sh(&["ip", "link", "set", &outer, "master", &br]);
            sh(&["ip", "link", "set", &outer, "up"]);
            let ip = format!("{}/24", net.ip(i));
            sh(&["ip", "-n", &ns, "addr", "add", &ip, "dev", &inner]);
            sh(&["ip", "-n", &ns, "link", "set", &inner, "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn bridge(&self) -> String {
        format!("fbr{}", self.tag)
    }

    fn ns(&self, i: usize) -> String {
        format!("fae-part-{}-{i}", self.tag)
    }

    fn outer(&self, i: usize) -> String {
        format!("fo{}n{i}", self.tag)
    }

    fn ip(&self, i: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 213, self.subnet, i as u8 + 1)
    }

    /// A second address for node `i` (10.213.S.101 + i), e.g. for its cluster listener alone.
    fn second_ip(&self, i: usize) -> std::net::Ipv4Addr {
        let ip = std::net::Ipv4Addr::new(10, 213, self.subnet, 101 + i as u8);
        let dev = format!("fi{}n{i}", self.tag);
        sh(&[
            "ip",
            "-n",
            &self.ns(i),
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &dev,
        ]);
        ip
    }

    /// Makes (or unmakes) `to` unreachable from every node but `except`.
    fn blackhole(&self, to: std::net::Ipv4Addr, except: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for j in (0..self.nodes).filter(|&j| j != except) {
            sh(&[
                "ip",
                "-n",
                &self.ns(j),
                "route",
                verb,
                "blackhole",
                &format!("{to}/32"),
            ]);
        }
    }

    /// Cuts (or heals) every path between node `i` and the other nodes; the test's own address stays
    /// reachable from all.
    fn isolate(&self, i: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for j in (0..self.nodes).filter(|&j| j != i) {
            for (from, to) in [(i, j), (j, i)] {
                sh(&[
                    "ip",
                    "-n",
                    &self.ns(from),
                    "route",
                    verb,
                    "blackhole",
                    &format!("{}/32", self.ip(to)),
                ]);
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}

/// A lock grant through `peer`, recorded; `None` when refused (a fence, no lease, unreachable).
fn try_lock(
    peer: &mut Peer,
    key: &str,
    history: &mut BTreeMap<String, Vec<Grant>>,
) -> Option<bool> {
    let sent = Instant::now();
    match peer.lock(key) {
        Ok(true) => {
            history.entry(key.to_owned()).or_default().push(Grant {
                sent,
                answered: Instant::now(),
            });
            Some(true)
        }
        Ok(false) => Some(false),
        Err(_) => None,
    }
}

/// Three nodes, each in its own network namespace on a bridge. Node C is cut off from A and B (the test
/// still reaches it) while clients keep asking for the same locks through every node and keep writing to
/// the registry: the minority side grants nothing it lost (its lease runs out), the majority fails C over
/// and grants only once the fence ran out, and after the heal C rejoins, the map is even again, no lock was
/// held twice and every acknowledged registry write is there on every node.
#[test]
fn a_partition_with_lock_contention_on_both_sides_grants_no_lock_twice() {
    let _serial = serial("a_partition_with_lock_contention_on_both_sides_grants_no_lock_twice");
    const TTL: Duration = Duration::from_millis(3000);
    let net = Net::new(3);
    let sections = format!("[lock]\nttl_ms = {}\n", TTL.as_millis());
    let cl = Cluster::start_as(3, &sections, |i, n| {
        n.spec.ip = net.ip(i);
        n.spec.netns = Some(net.ns(i));
        n.spec.admin_keys = "token = \"partition-test-token-0123456789\"\n".into();
    });

    let keys: Vec<String> = (0..90).map(|i| format!("part-lock:{i}")).collect();
    let mut history: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    let mut peers: Vec<Peer> = cl.nodes.iter().map(Node::peer).collect();
    for (i, k) in keys.iter().enumerate() {
        let got = try_lock(&mut peers[i % 3], k, &mut history);
        assert_eq!(got, Some(true), "{k} before the partition");
    }
    // Registers: cache keys written, deleted and read through every node, before, during and after.
    let regs: Vec<String> = (0..30).map(|i| format!("part-reg:{i}")).collect();
    let mut reg_ops: Vec<RegOp> = Vec::new();
    let mut version = 0u32;
    let mut reg_round = |peers: &mut Vec<Peer>, reg_ops: &mut Vec<RegOp>, round: usize| {
        for (i, k) in regs.iter().enumerate() {
            let via = (i + round) % 3;
            let kind = match (i + round) % 4 {
                0 | 1 => {
                    version += 1;
                    RegKind::Set(format!("{k}=v{version}").into_bytes())
                }
                2 => RegKind::Del,
                _ => RegKind::Get(None),
            };
            reg_op(&mut peers[via], k, kind, reg_ops);
            reg_op(&mut peers[(via + 1) % 3], k, RegKind::Get(None), reg_ops);
        }
    };
    for round in 0..4 {
        reg_round(&mut peers, &mut reg_ops, round);
    }
    let mut acked = Acked::new("/part");
    for n in 0..6 {
        acked.write(&mut peers[n % 3], "before", n);
    }

    net.isolate(2, true);
    let cut = Instant::now();
    let mut granted_by = [0usize; 3];
    let mut n = 0;
    while cut.elapsed() < Duration::from_millis(FAILOVER_MS) + TTL + Duration::from_secs(3) {
        for (i, k) in keys.iter().enumerate() {
            // Every key through the minority node and through one majority node.
            for via in [2, i % 2] {
                if try_lock(&mut peers[via], k, &mut history) == Some(true) {
                    granted_by[via] += 1;
                }
            }
        }
        acked.write(&mut peers[n % 3], "during", n);
        reg_round(&mut peers, &mut reg_ops, n);
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("grants during the partition by node: {granted_by:?}");
    assert_eq!(granted_by[2], 0, "the cut-off node granted locks");
    assert!(
        granted_by[0] + granted_by[1] > 0,
        "the majority never granted the locks again after the fence"
    );
    net.isolate(2, false);
    cl.wait_settled(&[0, 1, 2], &[0, 1, 2], &[], &even(3));
    for (i, k) in keys.iter().enumerate() {
        try_lock(&mut peers[i % 3], k, &mut history);
    }
    let bad = check_locks(&history, TTL);
    assert!(bad.is_empty(), "locks held twice:\n{}", bad.join("\n"));
    for round in 0..4 {
        reg_round(&mut peers, &mut reg_ops, round);
    }
    let stale = check_registers(&reg_ops);
    let reads = reg_ops
        .iter()
        .filter(|o| o.ok && matches!(o.kind, RegKind::Get(Some(_))))
        .count();
    eprintln!(
        "{} register operations, {reads} reads of a value",
        reg_ops.len()
    );
    assert!(stale.is_empty(), "stale reads:\n{}", stale.join("\n"));
    for n in 0..3 {
        acked.write(&mut peers[n % 3], "after", n);
    }
    acked.check(&mut peers);
}

/// Every node killed at once (SIGKILL, one after the other without waiting), a torn record appended to one
/// node's raft log (a header promising more than was written, as a crash mid-append leaves), then all
/// restarted from their data dirs: the torn tail is truncated, the cluster comes back with an even map and
/// nothing pending, every acknowledged registry write is there on every node, and no lock granted before the
/// crash is granted again within its TTL (every vbucket is fenced after a restart).
#[test]
fn every_node_killed_at_once_with_a_torn_log_tail_comes_back_whole() {
    use std::io::Write as _;
    let _serial = serial("every_node_killed_at_once_with_a_torn_log_tail_comes_back_whole");
    const TTL: Duration = Duration::from_millis(4000);
    let mut cl = Cluster::start_with(3, &format!("[lock]\nttl_ms = {}\n", TTL.as_millis()));
    let mut peers: Vec<Peer> = cl.nodes.iter().map(Node::peer).collect();
    let mut acked = Acked::new("/crash");
    for n in 0..30 {
        acked.write(&mut peers[n % 3], "w", n);
    }
    assert_eq!(acked.paths.len(), 30, "writes before the crash");
    let keys: Vec<String> = (0..60).map(|i| format!("crash-lock:{i}")).collect();
    let mut history: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            try_lock(&mut peers[i % 3], k, &mut history),
            Some(true),
            "{k}"
        );
    }
    drop(peers);
    for node in &mut cl.nodes {
        node.faed().signal(libc::SIGKILL);
    }
    for node in &mut cl.nodes {
        node.kill9();
    }
    // A torn record: a header for 4 KiB of payload, and 100 bytes of it.
    let log = cl.nodes[1].data_dir.join("raft.log");
    let before = std::fs::metadata(&log).expect("B's raft log").len();
    let mut torn = 4096u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    torn.extend_from_slice(&[7u8; 100]);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(&torn)
        .unwrap();
    for node in &mut cl.nodes {
        node.spawn(&[]);
    }
    for node in &mut cl.nodes {
        node.wait_ready();
    }
    cl.wait_settled(&[0, 1, 2], &[0, 1, 2], &[], &even(3));
    assert!(
        cl.nodes[1].log_since_start().contains("torn or corrupt"),
        "{}",
        cl.nodes[1].log_since_start()
    );
    assert!(std::fs::metadata(&log).unwrap().len() >= before);
    let mut peers: Vec<Peer> = cl.nodes.iter().map(Node::peer).collect();
    // Locks: asked again through every node until past the TTL; the fence refuses them until then.
    let t = Instant::now();
    while t.elapsed() < TTL + Duration::from_secs(2) {
        for (i, k) in keys.iter().enumerate() {
            try_lock(&mut peers[(i + 1) % 3], k, &mut history);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let bad = check_locks(&history, TTL);
    assert!(bad.is_empty(), "locks held twice:\n{}", bad.join("\n"));
    let regranted = keys.iter().filter(|k| history[*k].len() > 1).count();
    assert_eq!(
        regranted,
        keys.len(),
        "locks never granted again after the fence"
    );
    acked.check(&mut peers);
}

/// Node C listens for raft on an address of its own, and the other nodes lose their route to it: C can
/// still send to them (its vote requests, its read-index requests arrive) but hears nothing back. The
/// leader counts only answers to its own appends and heartbeats as contact, so C is failed over like a
/// silent node, and C, which no quorum confirms any more, gives up its lease. Healed, it comes back.
#[test]
fn a_node_that_can_send_but_not_receive_is_failed_over() {
    let _serial = serial("a_node_that_can_send_but_not_receive_is_failed_over");
    let net = Net::new(3);
    let deaf = net.second_ip(2);
    let cl = Cluster::start_as(3, "", |i, n| {
        n.spec.ip = net.ip(i);
        n.spec.netns = Some(net.ns(i));
        n.spec.admin_keys = "token = \"partition-test-token-0123456789\"\n".into();
        if i == 2 {
            n.raft_ip = Some(deaf);
        }
    });
    let t = Instant::now();
    net.blackhole(deaf, 2, true);
    cl.wait_settled(&[0, 1], &[0, 1], &[2], &even(2));
    eprintln!("the deaf node was failed over after {:?}", t.elapsed());
    let st = cl.nodes[2].status().expect("the deaf node's status");
    assert!(
        !st.lease,
        "the deaf node still holds a lease: {}",
        brief(&st)
    );
    let mut p = cl.nodes[2].peer();
    match p.set("deaf:key", b"v") {
        // No lease, or no leader heard: either way it serves nothing by its stale map.
        Err(Fail::App(m)) => assert!(m.contains("lease") || m.contains("catching up"), "{m}"),
        other => panic!("a keyed call at the deaf node: {other:?}"),
    }
    net.blackhole(deaf, 2, false);
    cl.wait_settled(&[0, 1, 2], &[0, 1, 2], &[], &even(3));
}

/// A node failed for longer than `cluster.remove_after_ms` is removed; restarted later with its old data dir
/// it is no member any more (the others drop its messages), so instead of waiting for a leader for ever it
/// exits non-zero saying to start it with an empty data dir. The two others carry on as a cluster of two.
#[test]
fn a_removed_node_restarted_with_its_old_data_dir_exits_saying_so() {
    let _serial = serial("a_removed_node_restarted_with_its_old_data_dir_exits_saying_so");
    let mut cl = Cluster::start_as(3, "", |_, n| {
        n.spec.sections =
            n.spec
                .sections
                .replacen("[cluster]\n", "[cluster]\nremove_after_ms = 3000\n", 1);
    });
    cl.nodes[2].kill9();
    let (a, b) = (0, 1);
    wait_for("C removed", SETTLE, || {
        let st = cl.nodes[a].status()?;
        if st.members.len() == 2 && st.pending_moves == 0 {
            Ok(())
        } else {
            Err(brief(&st))
        }
    });
    cl.wait_settled(&[a, b], &[a, b], &[], &even(2));
    cl.nodes[2].spawn(&[]);
    let status = cl.nodes[2]
        .faed()
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the removed node kept running:\n{}",
                cl.nodes[2].log_since_start()
            )
        });
    assert!(!status.success());
    let log = cl.nodes[2].log_since_start();
    assert!(
        log.contains("not a member of the cluster any more") && log.contains("empty data dir"),
        "{log}"
    );
    cl.nodes[2].faed = None;
    let mut p = cl.nodes[a].peer();
    assert!(p.zk_create("/removed/after", "x").unwrap());
}

/// kill -9 of an owner, then a replacement joins while the survivors still fence the dead owner's
/// vbuckets: the vbuckets handed to the newcomer arrive with the fence's time left, so it grants none of
/// the dead owner's locks before their TTL has run out either.
#[test]
fn a_replacement_joining_within_the_ttl_grants_no_lock_the_dead_owner_held() {
    let _serial = serial("a_replacement_joining_within_the_ttl_grants_no_lock_the_dead_owner_held");
    const TTL: Duration = Duration::from_millis(8000);
    let sections = format!("[lock]\nttl_ms = {}\n", TTL.as_millis());
    let mut cl = Cluster::start_with(3, &sections);
    let keys: Vec<String> = (0..120).map(|i| format!("replace-lock:{i}")).collect();
    let mut history: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    let mut through = cl.nodes[0].peer();
    for k in &keys {
        assert_eq!(try_lock(&mut through, k, &mut history), Some(true), "{k}");
    }
    let victim = 2;
    let theirs = cl.nodes[victim].peer().owned(&keys);
    let killed = Instant::now();
    cl.nodes[victim].kill9();
    cl.wait_settled(&[0, 1], &[0, 1], &[victim], &even(2));
    let mut d = Node::new(cl.root.path(), 'D', &sections);
    d.spawn(&["--join".into(), cl.nodes[0].raft_addr()]);
    d.wait_ready();
    cl.nodes.push(d);
    cl.wait_settled(&[0, 1, 3], &[0, 1, 3], &[victim], &even(3));
    let joined = killed.elapsed();
    assert!(
        joined < TTL,
        "the replacement took {joined:?} to settle; the test needs it within the TTL"
    );
    let mut at_d = cl.nodes[3].peer();
    let moved = at_d.owned(&theirs);
    eprintln!(
        "{} of the dead owner's {} keys moved on to the replacement, {joined:?} after the kill",
        moved.len(),
        theirs.len()
    );
    assert!(
        !moved.is_empty(),
        "no key of the dead owner moved to the replacement"
    );
    let mut peers: Vec<Peer> = [0, 1, 3].iter().map(|&i| cl.nodes[i].peer()).collect();
    // The fence runs from the failover (a failover timeout after the kill) for a TTL.
    while killed.elapsed() < Duration::from_millis(FAILOVER_MS) + TTL + Duration::from_secs(3) {
        for (i, k) in keys.iter().enumerate() {
            try_lock(&mut peers[i % 3], k, &mut history);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let bad = check_locks(&history, TTL);
    assert!(bad.is_empty(), "locks held twice:\n{}", bad.join("\n"));
    let regranted = moved.iter().filter(|k| history[*k].len() > 1).count();
    assert_eq!(
        regranted,
        moved.len(),
        "the moved locks were never granted again after the TTL"
    );
}
