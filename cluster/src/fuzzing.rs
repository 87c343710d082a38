//! The cluster port's decoders on arbitrary bytes, for the cargo-fuzz target `cluster_inbound` and the
//! test that replays its corpus (cluster/tests/fuzz_corpus.rs). Must never panic, whatever the input.

use protobuf::Message as _;
use raft::prelude::Message;

use crate::auth;
use crate::transport::{self, KIND_RAFT, KIND_RPC_REQUEST, KIND_RPC_RESPONSE};

/// Reads `data` as a stream of cluster frames, as an inbound connection would, and decodes each payload
/// with the decoder of its kind.
pub fn inbound(data: &[u8]) {
    let mut rest = data;
    while let Some(head) = rest.first_chunk::<5>() {
        let Ok((kind, len)) = transport::frame_head(head) else {
            return;
        };
        let Some(body) = rest.get(5..5 + len) else {
            return;
        };
        rest = &rest[5 + len..];
        match kind {
            KIND_RAFT => {
                if let Ok(m) = Message::parse_from_bytes(body) {
                    // What the node looks at before stepping it.
                    let _ = (m.get_msg_type(), m.from, m.to, m.commit, m.entries.len());
                }
            }
            KIND_RPC_REQUEST => drop(crate::node::decode_request(body)),
            KIND_RPC_RESPONSE => drop(crate::node::decode_response(body)),
            auth::KIND_HELLO => {
                let _ = auth::client_hello(body);
                let _ = auth::server_hello(body);
            }
            _ => {}
        }
    }
}
