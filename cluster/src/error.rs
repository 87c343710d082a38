//! The crate's one error type: every message says what failed and what to do about it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// An I/O error on the node's data dir.
    #[error("cluster storage: {what} {path}: {source}")]
    Storage {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The data dir holds something this version cannot read.
    #[error(
        "cluster storage is corrupt ({0}); move the data dir aside and rejoin the node with --join"
    )]
    Corrupt(String),
    /// Raft refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The configuration cannot work.
    #[error("cluster config: {0}")]
    Config(String),
    /// A network error talking to another node.
    #[error("cluster transport to {addr}: {source}")]
    Transport {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The cluster port cannot be bound.
    #[error("cannot listen on cluster address {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// No leader is known: an election is under way or this node is on the minority side of a partition.
    #[error("no raft leader is known (election in progress, or this node cannot reach a majority); retry later")]
    NoLeader,
    /// The operation must run on the leader, which is another node.
    #[error("node {me} is not the raft leader; the leader is {}", leader_text(.leader_id, .leader_addr))]
    NotLeader {
        me: u64,
        leader_id: Option<u64>,
        leader_addr: Option<String>,
    },
    /// The operation did not complete in time; it may still take effect.
    #[error("{what} did not complete within {after:?} (the leader may have changed, or a majority is unreachable); it may still take effect: check, then retry")]
    Timeout { what: &'static str, after: Duration },
    /// Each member needs one of the 32 idgen worker ids.
    #[error("the cluster already has {0} members: idgen worker ids are 5 bits, so a fae cluster holds at most 32 nodes")]
    ClusterFull(usize),
    /// The leader refused to let this node join.
    #[error("join refused: {0}")]
    JoinRefused(String),
    /// The state machine refused a command.
    #[error("refused: {0}")]
    Refused(String),
    /// A registry path that is not absolute, has an empty component or a trailing slash.
    #[error("invalid registry path {0:?}: absolute, no empty component, no trailing slash")]
    InvalidPath(String),
    /// The node has been shut down.
    #[error("the cluster node is shut down")]
    Stopped,
}

fn leader_text(id: &Option<u64>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("node {id} at {addr}"),
        (Some(id), None) => format!("node {id}"),
        _ => "unknown (election in progress)".to_owned(),
    }
}

impl ClusterError {
    pub(crate) fn storage(what: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        ClusterError::Storage {
            what,
            path: path.to_owned(),
            source,
        }
    }
}
