//! Where a keyed call runs: here, deferred to its owner (forwarded) or to a worker (a registry call that
//! waits on raft), or refused. The engine asks once per call and gets one outcome; the cluster's rules
//! (vbucket ownership, the lease, lock fences, stale maps) live here, not in the engine.

use std::time::Instant;

use super::forward::{ForwardJob, Forwarder, Route, Router, Work};
use crate::backend::Ticket;
use crate::engine::session::Env;
use crate::servant::Method;
use crate::wire::{Args, Call};

/// What became of a call.
pub enum Routed {
    /// Run it here.
    Local,
    /// Handed to a forwarding worker; its reply comes back through the session's loop.
    Deferred,
    /// Refused with this message (a TApplicationException).
    Refused(String),
}

impl From<Option<Result<(), String>>> for Routed {
    fn from(r: Option<Result<(), String>>) -> Self {
        match r {
            None => Routed::Local,
            Some(Ok(())) => Routed::Deferred,
            Some(Err(why)) => Routed::Refused(why),
        }
    }
}

/// Routes `c` by the cluster's map; `Local` on a single node.
pub fn route(c: &Call<'_>, args: &Args<'_>, method: Method, ticket: Ticket, env: &Env) -> Routed {
    match &env.router {
        Some(router) => route_keyed(c, args, method, router.as_ref(), ticket, env).into(),
        None => Routed::Local,
    }
}

/// The argument holding the key that routes a call to its vbucket's owner (API.md, Routing): `my_query`
/// routes by its cacheKey when it has one (so that the cached copy and its evictions meet on one node).
fn routed_key(m: Method) -> Option<i16> {
    match m {
        Method::LcSet | Method::LcGet | Method::LcDel | Method::MyEvict => Some(2),
        Method::Lock | Method::Unlock => Some(3),
        Method::MyQuery => Some(7),
        _ => None,
    }
}

/// Routes a keyed call (or a registry call): `None` to run it here; `Some(Ok)` when it was forwarded to its owner;
/// `Some(Err)` when it must be refused.
fn route_keyed(
    c: &Call<'_>,
    args: &Args<'_>,
    method: Method,
    router: &dyn Router,
    ticket: Ticket,
    env: &Env,
) -> Option<Result<(), String>> {
    // (Asked only for zk_* calls: `registry()` hands out a new handle.)
    if matches!(
        method,
        Method::ZkCreate | Method::ZkChildren | Method::ZkDel
    ) {
        if let Some(reg) = router.registry() {
            return super::registry::call(c, args, method, reg, ticket, env);
        }
    }
    let key_id = routed_key(method)?;
    // Malformed arguments and invalid contexts are refused by the local call, as for any other call.
    let key = args.bytes(key_id, "key").ok()?;
    if method == Method::MyQuery && key.is_empty() {
        return None; // no cacheKey: runs where the client reached
    }
    let ctx = args.context().ok()?;
    if ctx.rid == 0 || ctx.reason.is_empty() {
        return None;
    }
    if ctx.sticky {
        // Forwarded here by a peer: run here, never forward again; refuse if the sender's map is stale.
        return if router.accepts_forwarded(key) {
            router
                .refuse_local(method, key)
                .map(|why| Err(format!("{}: {why}", method.name())))
        } else {
            // The sender re-routes once to the owner this node's map names (it never forwards again).
            let hint = match router.route(key) {
                Route::Remote { node, addr } => {
                    format!(
                        " node {node} owns it here {}{addr}]",
                        crate::cluster::forward::OWNER_HINT
                    )
                }
                _ => String::new(),
            };
            Some(Err(format!(
                "{}: forwarded here, but this node does not own the key's vbucket (the sender's map is \
                 stale);{hint} retry",
                method.name()
            )))
        };
    }
    match router.route(key) {
        Route::Local => router
            .refuse_local(method, key)
            .map(|why| Err(format!("{}: {why}", method.name()))),
        Route::Unavailable(why) => Some(Err(format!("{}: {why}", method.name()))),
        Route::Remote { node, addr } => {
            let Some(fwd) = &env.forwarder else {
                return Some(Err(format!(
                    "{}: owned by node {node}, and forwarding is off",
                    method.name()
                )));
            };
            let ctx_bytes = args.structure(1, "ctx").ok()?;
            let request = crate::cluster::forward::sticky_request(
                c.message,
                ctx_bytes,
                &ctx,
                c.dialect.protocol,
            );
            let work = Work::Forward {
                node,
                addr,
                request,
            };
            defer(fwd, ticket, work);
            Some(Ok(()))
        }
    }
}

/// Hands a call's work to a forwarding worker.
pub(super) fn defer(fwd: &Forwarder, ticket: Ticket, work: Work) {
    fwd.submit(ForwardJob {
        ticket,
        work,
        submitted: Instant::now(),
    });
}
