//! In-process clusters over real TCP on 127.0.0.1. Timeouts are generous and every wait is bounded: these run
//! on a loaded 2-core machine.

use std::collections::BTreeSet;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use fae_cluster::{Cluster, ClusterConfig, ClusterError, Handoff, MemberState};

const PATIENCE: Duration = Duration::from_secs(90);
/// Every test cluster but one proves this secret on its connections.
const SECRET: &[u8] = b"test-cluster-secret-0123456789";

fn limits() -> fae_cluster::RegistryLimits {
    fae_cluster::RegistryLimits::default()
}

fn secret() -> fae_cluster::ClusterSecret {
    fae_cluster::ClusterSecret::new(SECRET).unwrap()
}

fn config(dir: &Path, id: Option<u64>, raft_addr: &str) -> ClusterConfig {
    logs();
    let mut c = ClusterConfig::new(
        raft_addr,
        format!("127.0.0.1:{}", 19000 + id.unwrap_or(99)),
        dir,
    );
    c.node_id = id;
    c.tick = Duration::from_millis(50);
    c.election_ticks = 10;
    c.heartbeat_ticks = 2;
    c.failover_timeout = Duration::from_secs(3);
    c.request_timeout = Duration::from_secs(10);
    c.join_timeout = Duration::from_secs(60);
    c.snapshot_every = 16;
    c.handoff = Handoff::Auto;
    c.secret = Some(secret());
    c
}

/// `RUST_LOG=fae_cluster=debug,raft=debug cargo test -p fae-cluster` shows what the nodes do.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn start(dir: &Path, id: Option<u64>, bootstrap: bool, seeds: &[&str]) -> Cluster {
    start_with(dir, id, bootstrap, seeds, |_| ())
}

/// As [`start`], `tweak` changing the config first.
fn start_with(
    dir: &Path,
    id: Option<u64>,
    bootstrap: bool,
    seeds: &[&str],
    tweak: impl FnOnce(&mut ClusterConfig),
) -> Cluster {
    let mut c = config(dir, id, "127.0.0.1:0");
    c.bootstrap = bootstrap;
    c.seeds = seeds.iter().map(|s| s.to_string()).collect();
    tweak(&mut c);
    Cluster::start(c).expect("node starts")
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while t0.elapsed() < PATIENCE {
        if ok() {
            eprintln!("{what}: {:?}", t0.elapsed());
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {PATIENCE:?}");
}

/// Retries while the cluster has no leader or a request timed out (an election under way).
fn retry<T>(what: &str, mut f: impl FnMut() -> Result<T, ClusterError>) -> T {
    let t0 = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(
                e @ (ClusterError::NoLeader
                | ClusterError::Timeout { .. }
                | ClusterError::NotLeader { .. }),
            ) if t0.elapsed() < PATIENCE => {
                eprintln!("{what}: {e}; retrying");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Every node sees `n` voters, the same epoch, no move under way, and the map spread as `spread` (sorted).
fn settled(nodes: &[&Cluster], spread: &[usize]) -> bool {
    let views: Vec<_> = nodes.iter().map(|c| c.view()).collect();
    let epoch = views[0].epoch;
    views.iter().all(|v| {
        let mut counts: Vec<usize> = v
            .vbucket_counts()
            .values()
            .copied()
            .filter(|&c| c > 0)
            .collect();
        counts.sort_unstable();
        v.epoch == epoch
            && v.members.len() == spread.len()
            && v.members.values().all(|m| m.state == MemberState::Voter)
            && v.map.pending().count() == 0
            && counts == spread
    })
}

fn all(n: &[Option<Cluster>]) -> Vec<&Cluster> {
    n.iter().flatten().collect()
}

fn unique_worker_ids(c: &Cluster) -> usize {
    let v = c.view();
    let ids: BTreeSet<u8> = v.members.values().map(|m| m.worker_id).collect();
    assert_eq!(
        ids.len(),
        v.members.len(),
        "worker ids collide: {:?}",
        v.members
    );
    ids.len()
}

#[test]
fn three_nodes_fail_over_restart_and_grow() {
    let t0 = Instant::now();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), Some(1), true, &[]);
    wait_until("bootstrap leader", || a.view().is_leader());
    let b = start(dirs[1].path(), Some(2), false, &[a.raft_addr()]);
    // C knows only B, a follower: B answers "the leader is A" and C asks there.
    let c = start(dirs[2].path(), None, false, &[b.raft_addr()]);
    let mut nodes = vec![Some(a), Some(b), Some(c)];
    wait_until("3 voters at 342/341/341", || {
        settled(&all(&nodes), &[341, 341, 342])
    });
    assert_eq!(unique_worker_ids(nodes[0].as_ref().unwrap()), 3);

    // Registry writes through any node, linearizable reads through any other.
    let (a, b, c) = (
        nodes[0].as_ref().unwrap(),
        nodes[1].as_ref().unwrap(),
        nodes[2].as_ref().unwrap(),
    );
    assert!(retry("create via B", || b.registry_create(
        "/svc/a",
        b"1",
        &limits()
    )));
    assert!(!retry("create via C", || c.registry_create(
        "/svc/a",
        b"2",
        &limits()
    )));
    assert!(retry("create via A", || a.registry_create(
        "/svc/b",
        b"",
        &limits()
    )));
    assert_eq!(
        retry("children via C", || c.registry_children("/svc")),
        vec!["a", "b"]
    );
    assert_eq!(
        retry("children via A", || a.registry_children("/")),
        vec!["svc"]
    );
    // Enough entries for several snapshots and compactions (snapshot_every = 16).
    for i in 0..40 {
        let node = nodes[i % 3].as_ref().unwrap();
        assert!(retry("bulk create", || node.registry_create(
            &format!("/bulk/{i:02}"),
            b"x",
            &limits()
        )));
    }
    assert!(retry("delete", || b.registry_delete("/bulk/00")));
    assert_eq!(
        retry("bulk children", || a.registry_children("/bulk")).len(),
        39
    );

    // Kill the leader.
    let li = nodes
        .iter()
        .position(|n| n.as_ref().unwrap().view().is_leader())
        .expect("a leader");
    let dead = nodes[li].take().unwrap();
    let (dead_id, dead_addr) = (dead.id(), dead.raft_addr().to_owned());
    let killed = Instant::now();
    drop(dead);
    wait_until("a new leader", || {
        let v: Vec<_> = all(&nodes).iter().map(|n| n.view()).collect();
        v.iter().all(|x| {
            x.leader_id.is_some() && x.leader_id != Some(dead_id) && x.leader_id == v[0].leader_id
        })
    });
    eprintln!(
        "leader {dead_id} killed; new leader after {:?}",
        killed.elapsed()
    );
    let survivor = all(&nodes)[0];
    assert!(retry("write after failover", || survivor.registry_create(
        "/after/kill",
        b"k",
        &limits()
    )));
    wait_until("dead node failed over: 512/512", || {
        let n = all(&nodes);
        n.iter()
            .all(|c| c.view().members.get(&dead_id).map(|m| m.state) == Some(MemberState::Failed))
            && n.iter().all(|c| {
                let counts = c.view().vbucket_counts();
                counts.get(&dead_id) == Some(&0)
                    && counts.values().filter(|&&v| v == 512).count() == 2
            })
    });

    // Restart it from its data dir alone: it catches up and gets its share back.
    let mut cfg = config(dirs[li].path(), None, &dead_addr);
    cfg.bootstrap = li == 0; // ignored: the data dir holds state
    let restarted = retry("restart on the same port", || {
        Cluster::start(cfg.clone()).map_err(|e| {
            eprintln!("restart: {e}");
            ClusterError::NoLeader
        })
    });
    assert_eq!(restarted.id(), dead_id);
    nodes[li] = Some(restarted);
    wait_until("restarted node caught up, 342/341/341 again", || {
        settled(&all(&nodes), &[341, 341, 342])
    });
    let r = nodes[li].as_ref().unwrap();
    assert_eq!(
        retry("children via restarted", || r.registry_children("/after")),
        vec!["kill"]
    );
    assert_eq!(
        retry("bulk via restarted", || r.registry_children("/bulk")).len(),
        39
    );

    // A fourth node: 256 each.
    let d = start(
        dirs[3].path(),
        Some(4),
        false,
        &[all(&nodes)[1].raft_addr()],
    );
    nodes.push(Some(d));
    wait_until("4 voters at 256 each", || {
        settled(&all(&nodes), &[256, 256, 256, 256])
    });
    assert_eq!(unique_worker_ids(nodes[3].as_ref().unwrap()), 4);
    let d = nodes[3].as_ref().unwrap();
    assert_eq!(
        retry("children via D", || d.registry_children("/svc")),
        vec!["a", "b"]
    );
    let status = d.status();
    assert_eq!(status.members.len(), 4);
    assert!(status.members.iter().all(|m| m.vbuckets == 256));
    let json = serde_json::to_string(&status).unwrap();
    assert!(json.contains("\"worker_id\""), "{json}");
    eprintln!("whole scenario: {:?}", t0.elapsed());
    for n in nodes.into_iter().flatten() {
        n.shutdown(false).unwrap();
    }
}

#[test]
fn a_follower_then_the_leader_leave() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), Some(11), true, &[]);
    wait_until("bootstrap leader", || a.view().is_leader());
    let b = start(dirs[1].path(), Some(12), false, &[a.raft_addr()]);
    let c = start(dirs[2].path(), Some(13), false, &[a.raft_addr()]);
    wait_until("3 voters", || settled(&[&a, &b, &c], &[341, 341, 342]));
    // `fae cluster status|leave ADDR` talk to any member's cluster port.
    let status =
        fae_cluster::remote_status(b.raft_addr(), Some(&secret()), Duration::from_secs(10))
            .unwrap();
    assert_eq!((status.my_id, status.members.len()), (12, 3));
    retry("remote leave", || {
        fae_cluster::remote_leave(b.raft_addr(), Some(&secret()), 13, Duration::from_secs(15))
            .map_err(|e| {
                eprintln!("remote leave: {e}");
                ClusterError::NoLeader
            })
    });
    wait_until("C handed over and removed", || {
        settled(&[&a, &b], &[512, 512])
    });
    wait_until("C knows it is out", || !c.view().members.contains_key(&13));
    c.shutdown(false).unwrap();
    // The leader leaves: it hands leadership over, then the new leader removes it.
    assert!(a.view().is_leader());
    a.shutdown(true).expect("the leader leaves cleanly");
    wait_until("B alone owns everything", || settled(&[&b], &[1024]));
    assert!(b.view().is_leader());
    assert!(
        matches!(b.leave(12), Err(ClusterError::Refused(_))),
        "the last member cannot leave"
    );
    // A data dir without state and without bootstrap or seeds is a configuration error.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Cluster::start(config(empty.path(), None, "127.0.0.1:0")),
        Err(ClusterError::Config(_))
    ));
    b.shutdown(false).unwrap();
}

#[test]
fn the_registry_survives_a_restart_of_every_node() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), Some(21), true, &[]);
    wait_until("bootstrap leader", || a.view().is_leader());
    let b = start(dirs[1].path(), Some(22), false, &[a.raft_addr()]);
    let c = start(dirs[2].path(), Some(23), false, &[b.raft_addr()]);
    wait_until("3 voters", || settled(&[&a, &b, &c], &[341, 341, 342]));
    let nodes = [a, b, c];
    for i in 0..50 {
        let n = &nodes[i % 3];
        assert!(retry("create", || n.registry_create(
            &format!("/cfg/k{i:02}"),
            b"v",
            &limits()
        )));
    }
    let addrs: Vec<String> = nodes.iter().map(|n| n.raft_addr().to_owned()).collect();
    let epoch = nodes[0].view().epoch;
    for n in nodes {
        n.shutdown(false).unwrap();
    }
    let nodes: Vec<Cluster> = dirs
        .iter()
        .zip(&addrs)
        .map(|(d, addr)| {
            retry("restart", || {
                Cluster::start(config(d.path(), None, addr)).map_err(|e| {
                    eprintln!("restart: {e}");
                    ClusterError::NoLeader
                })
            })
        })
        .collect();
    let refs: Vec<&Cluster> = nodes.iter().collect();
    wait_until("a leader after a full restart", || {
        refs.iter().any(|n| n.view().is_leader())
    });
    wait_until("the map as before", || settled(&refs, &[341, 341, 342]));
    assert!(nodes[0].view().epoch >= epoch);
    for n in &nodes {
        assert_eq!(retry("children", || n.registry_children("/cfg")).len(), 50);
    }
    assert!(retry("write after restart", || nodes[2].registry_create(
        "/cfg/new",
        b"",
        &limits()
    )));
    for n in nodes {
        n.shutdown(false).unwrap();
    }
}

/// Raft messages raft-rs would die on, sent on a raw connection with a member's id: an empty MsgPropose to
/// the leader and a heartbeat committing past the log to a follower, and messages from a stranger. The
/// cluster runs without a secret (so the raw connection is heard, as a member's buggy or hostile
/// connection would be): the messages are dropped and counted, the term stays, both nodes live, and the next
/// registry write commits.
#[test]
fn forged_raft_messages_are_dropped_not_stepped() {
    use protobuf::Message as _;
    use raft::prelude::{Message, MessageType};
    use std::io::Write;

    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let open = |dir: &Path, id: u64, bootstrap: bool, seeds: &[&str]| {
        start_with(dir, Some(id), bootstrap, seeds, |c| c.secret = None)
    };
    let a = open(dirs[0].path(), 1, true, &[]);
    wait_until("bootstrap leader", || a.view().is_leader());
    let b = open(dirs[1].path(), 2, false, &[a.raft_addr()]);
    wait_until("2 voters", || settled(&[&a, &b], &[512, 512]));
    retry("a first write", || {
        a.registry_create("/forged/before", b"x", &limits())
    });
    let term = a.view().term;
    let send = |to: &Cluster, m: Message| {
        let body = m.write_to_bytes().unwrap();
        let mut s = std::net::TcpStream::connect(to.raft_addr()).unwrap();
        s.write_all(&((body.len() + 1) as u32).to_be_bytes())
            .unwrap();
        s.write_all(&[1]).unwrap();
        s.write_all(&body).unwrap();
        s.flush().unwrap();
        thread::sleep(Duration::from_millis(200));
    };
    let msg = |kind: MessageType, from: u64, to: u64| {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = from;
        m.to = to;
        m.term = term;
        m
    };
    // An empty proposal to the leader, "from" the follower.
    send(&a, msg(MessageType::MsgPropose, 2, 1));
    // A heartbeat "from" the leader, committing far past the follower's log.
    let mut hb = msg(MessageType::MsgHeartbeat, 1, 2);
    hb.commit = 1_000_000;
    send(&b, hb);
    // A stranger's vote request with a higher term: it would depose the leader if stepped.
    let mut vote = msg(MessageType::MsgRequestVote, 77, 1);
    vote.term = term + 5;
    vote.index = 1_000_000;
    vote.log_term = term + 5;
    send(&a, vote);
    // A local-only message type from the network.
    send(&a, msg(MessageType::MsgHup, 2, 1));
    assert_eq!(a.view().term, term, "a forged message changed the term");
    assert!(a.view().is_leader());
    retry("a write after the forged messages", || {
        a.registry_create("/forged/after", b"y", &limits())
    });
    retry("the write read through the follower", || {
        b.registry_children("/forged")
    });
    assert_eq!(
        b.registry_children("/forged").unwrap(),
        vec!["after".to_owned(), "before".to_owned()]
    );
    assert_eq!(b.view().term, term);
    assert!(a.status().refused_messages >= 3, "{:?}", a.status());
    assert!(b.status().refused_messages >= 1, "{:?}", b.status());
}

/// A member failed for longer than `remove_after` is removed: the cluster goes back to two voters, and a
/// replacement makes three again (not four, whose quorum would need three of them).
#[test]
fn a_member_failed_for_long_is_removed_and_a_replacement_does_not_grow_the_quorum() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let with_removal = |dir: &Path, id: u64, bootstrap: bool, seeds: &[&str]| {
        start_with(dir, Some(id), bootstrap, seeds, |c| {
            c.remove_after = Duration::from_secs(5)
        })
    };
    let a = with_removal(dirs[0].path(), 41, true, &[]);
    wait_until("bootstrap leader", || a.view().is_leader());
    let b = with_removal(dirs[1].path(), 42, false, &[a.raft_addr()]);
    let c = with_removal(dirs[2].path(), 43, false, &[a.raft_addr()]);
    wait_until("3 voters", || settled(&[&a, &b, &c], &[341, 341, 342]));
    drop(c);
    wait_until("C failed over", || {
        a.view()
            .members
            .get(&43)
            .is_some_and(|m| m.state == MemberState::Failed)
    });
    wait_until("C removed", || {
        [&a, &b].iter().all(|n| n.view().members.len() == 2)
    });
    let d = with_removal(dirs[3].path(), 44, false, &[a.raft_addr()]);
    wait_until("3 voters again", || {
        settled(&[&a, &b, &d], &[341, 341, 342])
    });
    // Two of three make a quorum: with B gone too, A and D still commit.
    drop(b);
    retry("a write with one voter of three down", || {
        a.registry_create("/removal/after", b"x", &limits())
    });
}

/// With a cluster secret: a raw connection that skips the handshake is closed before anything it sends is
/// read as raft, a node without the secret and a node with another one are refused at once when they try
/// to join (not after the join timeout), a tool needs the secret for `status`, and the cluster carries on.
#[test]
fn only_holders_of_the_secret_speak_on_the_cluster_port() {
    use protobuf::Message as _;
    use raft::prelude::{Message, MessageType};
    use std::io::{Read, Write};

    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), Some(21), true, &[]);
    wait_until("bootstrap leader", || a.view().is_leader());
    let b = start(dirs[1].path(), Some(22), false, &[a.raft_addr()]);
    wait_until("2 voters", || settled(&[&a, &b], &[512, 512]));
    retry("a first write", || {
        a.registry_create("/secret/before", b"x", &limits())
    });
    let term = a.view().term;

    // A vote request with a higher term on a raw connection: it would depose the leader if stepped.
    let mut vote = Message::default();
    vote.set_msg_type(MessageType::MsgRequestVote);
    vote.from = 22;
    vote.to = 21;
    vote.term = term + 5;
    vote.index = 1_000_000;
    vote.log_term = term + 5;
    let body = vote.write_to_bytes().unwrap();
    let mut s = std::net::TcpStream::connect(a.raft_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(1);
    frame.extend_from_slice(&body);
    s.write_all(&frame).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(
        answer.get(4),
        Some(&6),
        "a REFUSED frame, then a close: {answer:?}"
    );
    assert!(
        String::from_utf8_lossy(&answer).contains("no cluster handshake"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let join = |dir: &Path, id: u64, secret: Option<fae_cluster::ClusterSecret>| {
        let mut c = config(dir, Some(id), "127.0.0.1:0");
        c.secret = secret;
        c.seeds = vec![a.raft_addr().to_owned()];
        let t0 = Instant::now();
        let r = Cluster::start(c).map(|_| ()).map_err(|e| e.to_string());
        (r, t0.elapsed())
    };
    let (none, took) = join(dirs[2].path(), 23, None);
    let none = none.unwrap_err();
    assert!(none.contains("secret"), "{none}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    let other = fae_cluster::ClusterSecret::new(*b"another-secret-0123456789").unwrap();
    let (wrong, took) = join(dirs[3].path(), 24, Some(other.clone()));
    let wrong = wrong.unwrap_err();
    assert!(wrong.contains("secrets differ"), "{wrong}");
    assert!(took < Duration::from_secs(30), "{took:?}");

    let status = |secret: Option<&fae_cluster::ClusterSecret>| {
        fae_cluster::remote_status(a.raft_addr(), secret, Duration::from_secs(10))
    };
    assert!(status(None).is_err());
    assert!(status(Some(&other)).is_err());
    let st = status(Some(&secret())).expect("status with the secret");
    assert_eq!(st.members.len(), 2, "{st:?}");
    assert!(st.refused_connections >= 4, "{st:?}");
    assert_eq!(a.view().term, term, "the raw vote changed the term");
    retry("a write after the refusals", || {
        a.registry_create("/secret/after", b"y", &limits())
    });
    retry("the write read through the follower", || {
        b.registry_children("/secret")
    });
    assert_eq!(
        b.registry_children("/secret").unwrap(),
        vec!["after".to_owned(), "before".to_owned()]
    );
}
