//! The kernel-bypass data path, without any knowledge of Thrift: fae's XDP program steers the RPC port's
//! packets into AF_XDP sockets, and a smoltcp TCP stack over those sockets yields byte streams that the
//! daemon feeds to the same sessions as its kernel-socket path.
//!
//! - [`xdp`]: loads and attaches the XDP program (built from ../ebpf), fills its port map, registers
//!   sockets in its XSKMAP and reads its counters. The program detaches when the loader is dropped or
//!   the process exits.
//! - [`xsk`]: one AF_XDP socket (xsk-rs) with its UMEM and rings, as a smoltcp `Device`.
//! - [`stack`]: a smoltcp `Interface` over one such socket, with a pool of listening sockets.
//! - [`pipe`]: an in-memory wire between two smoltcp devices, for the tests that run without root.
//! - [`sys`]: what the kernel knows of an interface (MAC, IPv4 address, neighbours).

pub mod admission;
pub mod fuzzing;
pub mod pipe;
pub mod stack;
pub mod sys;
pub mod xdp;
pub mod xsk;

/// Why the bypass path could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface {0}: {1}")]
    Interface(String, String),
    #[error("the XDP program was not built into this faed: {0}; run scripts/install-bpf-toolchain, then rebuild")]
    NoProgram(&'static str),
    #[error("XDP program: {0}")]
    Program(String),
    #[error("AF_XDP socket on {iface} queue {queue}: {reason}")]
    Socket {
        iface: String,
        queue: u32,
        reason: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
