//! The cluster RPC between nodes and from tools (JSON in frames of the cluster port), and its clients.

use super::*;

/// The cluster RPC (JSON in frames of the cluster port).
#[derive(Serialize, Deserialize)]
pub(crate) enum RpcRequest {
    Join(MemberInfo),
    Leave { id: u64 },
    Status,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum RpcResponse {
    Joined { members: Vec<(u64, String)> },
    NotLeader { leader: Option<(u64, String)> },
    Refused { reason: String, retry: bool },
    Done,
    Status(Box<ClusterStatus>),
}

/// A cluster RPC request as it arrives (bounded by the transport's frame limit for requests).
pub(crate) fn decode_request(body: &[u8]) -> serde_json::Result<RpcRequest> {
    serde_json::from_slice(body)
}

pub(crate) fn decode_response(body: &[u8]) -> serde_json::Result<RpcResponse> {
    serde_json::from_slice(body)
}

/// A client for another node's cluster port: `fae cluster leave|status ADDR` use this.
pub fn remote_status(
    addr: &str,
    secret: Option<&ClusterSecret>,
    timeout: Duration,
) -> Result<ClusterStatus, ClusterError> {
    match remote(addr, secret, &RpcRequest::Status, timeout)? {
        RpcResponse::Status(s) => Ok(*s),
        _ => Err(ClusterError::Refused(format!(
            "{addr} gave an unexpected answer"
        ))),
    }
}

/// Asks the node at `addr` to have `node_id` leave the cluster.
pub fn remote_leave(
    addr: &str,
    secret: Option<&ClusterSecret>,
    node_id: u64,
    timeout: Duration,
) -> Result<(), ClusterError> {
    match remote(addr, secret, &RpcRequest::Leave { id: node_id }, timeout)? {
        RpcResponse::Done => Ok(()),
        RpcResponse::Refused { reason, .. } => Err(ClusterError::Refused(reason)),
        _ => Err(ClusterError::Refused(format!(
            "{addr} gave an unexpected answer"
        ))),
    }
}

/// A tool's request (`fae cluster status`): it authenticates as id 0, which is no member.
fn remote(
    addr: &str,
    secret: Option<&ClusterSecret>,
    req: &RpcRequest,
    timeout: Duration,
) -> Result<RpcResponse, ClusterError> {
    let auth = Auth {
        secret: secret.cloned(),
        me: 0,
    };
    let body = transport::rpc_call(
        addr,
        transport::KIND_RPC_REQUEST,
        &serde_json::to_vec(req).expect("requests encode"),
        timeout,
        &auth,
    )?;
    decode_response(&body)
        .map_err(|e| ClusterError::Refused(format!("malformed answer from {addr}: {e}")))
}
