//! `zk_*` in a cluster: the registry lives in the replicated state (`fae_cluster::registry`); calls are
//! checked against the node's `[registry]` limits here, then proposed (writes) or read by ReadIndex on a
//! forwarding worker, since they wait on raft.

use std::sync::Arc;

use fae_cluster::Cluster;

use super::forward::{RegistryBackend, Work};
use super::route::defer;
use crate::backend::Ticket;
use crate::engine::session::Env;
use crate::servant::Method;
use crate::wire::{Args, Call, Dialect, Reply, Transport};

/// A zk_* call on the cluster's registry: validated here, run on a worker (it waits on raft), answered in
/// its place in the stream.
pub(super) fn call(
    c: &Call<'_>,
    args: &Args<'_>,
    method: Method,
    reg: Arc<dyn RegistryBackend>,
    ticket: Ticket,
    env: &Env,
) -> Option<Result<(), String>> {
    let ctx = args.context().ok()?;
    if ctx.rid == 0 || ctx.reason.is_empty() {
        return None; // the local call refuses it with the usual message
    }
    let fwd = env.forwarder.as_ref()?;
    let path = args.bytes(2, "path").ok()?;
    let data = if method == Method::ZkCreate {
        Some(args.bytes(3, "data").ok()?)
    } else {
        None
    };
    // The node's own [registry] limits and path rules, before anything reaches raft: an oversized or
    // invalid call is refused at once.
    let path = match env.servants.registry.check(path, data) {
        Ok(p) => p.to_owned(),
        Err(e) => return Some(Err(format!("{}: {}", method.name(), e.message))),
    };
    let data = data.map(<[u8]>::to_vec).unwrap_or_default();
    let limits = env.servants.registry.limits();
    let (name, seqid) = (method.name(), c.header.seqid);
    // The bare message, in the call's protocol: the session puts it in the client's transport.
    let dialect = Dialect::plain(Transport::Buffered, c.dialect.protocol);
    let work = Work::Run(Box::new(move || {
        let mut out = Vec::new();
        let mut reply = Reply::begin(&mut out, dialect, name.as_bytes(), seqid);
        let e = reply.enc();
        match method {
            Method::ZkCreate => e.field_bool(0, reg.create(&path, &data, &limits)?),
            Method::ZkDel => e.field_bool(0, reg.delete(&path)?),
            _ => crate::servant::registry::encode_children(e, &reg.children(&path)?),
        }
        reply.finish();
        Ok(out)
    }));
    defer(fwd, ticket, work);
    Some(Ok(()))
}

pub(super) struct ClusterRegistry {
    pub(super) cluster: Arc<Cluster>,
}

impl RegistryBackend for ClusterRegistry {
    fn create(
        &self,
        path: &str,
        data: &[u8],
        limits: &fae_cluster::RegistryLimits,
    ) -> Result<bool, String> {
        self.cluster
            .registry_create(path, data, limits)
            .map_err(|e| e.to_string())
    }
    fn children(&self, path: &str) -> Result<Vec<String>, String> {
        self.cluster
            .registry_children(path)
            .map_err(|e| e.to_string())
    }
    fn delete(&self, path: &str) -> Result<bool, String> {
        self.cluster
            .registry_delete(path)
            .map_err(|e| e.to_string())
    }
}
