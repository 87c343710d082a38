//! The fuzz target's entry point for what faces the network in this crate: the admission's look at every
//! received packet, and the stack's (`fuzz/fuzz_targets/xdp_admission.rs`; `cargo test` replays its
//! corpus through `netstack/tests/fuzz_corpus.rs`).

use std::net::Ipv4Addr;

use crate::admission::{Admission, Connections, Verdict};

/// Classifies `data` as a received IPv4 packet under every state the admission can be in: its port served
/// or not, the packet's own connection unknown, in its handshake, established, and held by
/// another queue. Must never panic, and must let through whatever is not TCP to a served port.
pub fn admission(data: &[u8]) {
    let shared = std::sync::Arc::new(Connections::default());
    let mut a = Admission::new(0);
    a.share(shared.clone());
    let mut other = Admission::new(1);
    other.share(shared);
    let tuple = (data.len() >= 24).then(|| {
        let src = Ipv4Addr::new(data[12], data[13], data[14], data[15]);
        let ihl = usize::from(data[0] & 0x0f) * 4;
        let at = |i: usize| data.get(ihl + i).copied().unwrap_or(0);
        (
            src,
            u16::from_be_bytes([at(0), at(1)]),
            u16::from_be_bytes([at(2), at(3)]),
        )
    });
    let port = tuple.map_or(9002, |t| t.2);
    for ports in [&[][..], &[port][..]] {
        a.set_ports(ports);
        let v = a.classify(data);
        if data.len() < 20 || data[9] != 6 || ports.is_empty() {
            assert_eq!(
                v,
                Verdict::Pass,
                "a packet not TCP to a served port is not ours to judge"
            );
        }
    }
    // What the stack reads of the segments it sends (smoltcp's, bounded all the same).
    let _ = crate::stack::sent_segment(data);
    let _ = crate::stack::window_scale(data);
    if let Some(t) = tuple {
        for half_open in [true, false] {
            a.track(t, half_open);
            let _ = a.classify(data);
            let mut seen = Vec::new();
            a.take_repeated(&mut seen);
            assert!(
                seen.len() <= 1
                    && seen
                        .iter()
                        .all(|r| r.tuple == t && r.half_open == half_open)
            );
            a.untrack(t);
            other.track(t, half_open);
            let _ = a.classify(data);
            other.untrack(t);
        }
    }
}
