//! `noop` and `ping`.

use std::time::Instant;

use crate::wire::Encoder;

/// The build's identity: a git revision when the build could read one.
pub const BUILD_ID: &str = env!("FAE_BUILD_ID_OR_DEV");
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct Misc {
    /// Set once a cluster node knows its id (after it joined); `node.id` before.
    node_id: std::sync::atomic::AtomicU64,
    started: Instant,
}

impl Misc {
    pub fn new(node_id: u64) -> Self {
        Misc {
            node_id: std::sync::atomic::AtomicU64::new(node_id),
            started: Instant::now(),
        }
    }

    /// The node id `ping` reports (a cluster node learns it when it joins).
    pub fn set_node_id(&self, id: u64) {
        self.node_id.store(id, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// `"ver:<version>, build:<id>, myid:<node id>, uptime:<secs>"`, formatted straight into the reply.
    pub fn ping(&self, out: &mut Encoder<'_>) {
        out.field_fmt(
            0,
            format_args!(
                "ver:{VERSION}, build:{BUILD_ID}, myid:{}, uptime:{}",
                self.node_id.load(std::sync::atomic::Ordering::Relaxed),
                self.uptime_secs()
            ),
        );
    }
}
