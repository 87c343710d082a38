//! The admin port's routes: what each path answers, and the actions.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use super::http::{Request, Response};
use super::{history, metrics, AdminState};
use crate::config::LimitsConfig;
use crate::filter::Reason;

const DASHBOARD: &str = include_str!("dashboard.html");
const UPLOT_JS: &[u8] = include_bytes!("assets/uPlot.iife.min.js");
const UPLOT_CSS: &[u8] = include_bytes!("assets/uPlot.min.css");
const UPLOT_LICENSE: &[u8] = include_bytes!("assets/uPlot.LICENSE");

pub fn handle(state: &AdminState, req: Request) -> Response {
    let action = matches!(
        req.path.as_str(),
        "/api/degrade"
            | "/api/restore"
            | "/api/limits"
            | "/api/drain"
            | "/api/cluster/leave"
            | "/api/reload"
            | "/api/rebalance"
    );
    match (req.method.as_str(), action) {
        ("POST", true) => {
            if let Err(r) = authorize(state, &req) {
                return r;
            }
            act(state, &req)
        }
        ("GET" | "HEAD", false) => read(state, &req),
        (_, true) => Response::text(405, "actions are POST only"),
        _ => Response::text(405, "GET only (actions: POST with the admin token)"),
    }
}

/// Actions need the token, and no foreign Origin (a web page acting through a browser on the host).
fn authorize(state: &AdminState, req: &Request) -> Result<(), Response> {
    if let Some(origin) = req.header("origin") {
        let host = req.header("host").unwrap_or("");
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
        if !same {
            return Err(Response::text(
                403,
                format!("refused: Origin {origin} is not this admin port ({host})"),
            ));
        }
    }
    let Some(token) = &state.token else {
        return Err(Response::text(
            401,
            "admin actions are off: set admin.token (or admin.token_file) to turn them on",
        ));
    };
    let given = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        let mut r = Response::text(
            401,
            "admin actions need Authorization: Bearer <admin.token>",
        );
        r.headers.push(("WWW-Authenticate", "Bearer".into()));
        return Err(r);
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read(state: &AdminState, req: &Request) -> Response {
    match req.path.as_str() {
        "/" | "/index.html" => Response::new(200, "text/html; charset=utf-8", DASHBOARD),
        "/assets/uPlot.iife.min.js" => Response::new(200, "text/javascript", UPLOT_JS),
        "/assets/uPlot.min.css" => Response::new(200, "text/css", UPLOT_CSS),
        "/assets/uPlot.LICENSE" => Response::new(200, "text/plain; charset=utf-8", UPLOT_LICENSE),
        "/metrics" => Response::new(200, "text/plain; version=0.0.4", metrics::prometheus(state)),
        "/api/stats" => Response::json(&stats(state)),
        "/api/backends" => Response::json(&metrics::backends_all_json(&state.servants.backends())),
        "/api/cluster" => match cluster(state) {
            Some(v) => Response::json(&v),
            None => Response::text(404, "this node is not in a cluster"),
        },
        "/api/config" => Response::json(&config(state)),
        "/api/filters" => Response::json(&filters(state)),
        "/api/history" => {
            let since = query_param(&req.query, "since")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Response::json(&json!({
                "rejected_names": history::rejected_names(),
                "points": state.history.since(since),
            }))
        }
        _ => Response::text(404, "not found"),
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

fn stats(state: &AdminState) -> serde_json::Value {
    let mut v = metrics::stats_json(state);
    v["rejected"] = Reason::ALL
        .iter()
        .map(|r| {
            (
                r.name().to_owned(),
                json!(state.filters.rejected[*r as usize].load(Ordering::Relaxed)),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    v["filters"] = state.filters.status();
    v["rss_kib"] = json!(history::rss_kib());
    v["max_sessions"] = json!(state.gate.max());
    v["generation"] = json!(state.config.read().map(|g| g.1).unwrap_or(0));
    v
}

/// The cluster as this node sees it: members and roles, leader and term, the 1,024 vbuckets' owners with
/// their pending moves, the map's epoch.
fn cluster(state: &AdminState) -> Option<serde_json::Value> {
    let c = state.cluster.as_ref()?.upgrade()?;
    let v = c.view();
    let counts = v.vbucket_counts();
    let members: Vec<serde_json::Value> = v
        .members
        .values()
        .map(|m| {
            json!({
                "id": m.id,
                "rpc_addr": m.rpc_addr,
                "raft_addr": m.raft_addr,
                "admin_addr": m.admin_addr,
                "state": format!("{:?}", m.state),
                "voter": m.voter,
                "worker_id": m.worker_id,
                "role": if v.leader_id == Some(m.id) { "leader" } else if m.voter { "follower" } else { "learner" },
                "vbuckets": counts.get(&m.id).copied().unwrap_or(0),
            })
        })
        .collect();
    let n = fae_cluster::VBUCKETS as u16;
    let owners: Vec<u64> = (0..n).map(|vb| v.map.get(vb).owner).collect();
    let pending: Vec<serde_json::Value> = (0..n)
        .filter_map(|vb| v.map.get(vb).pending.map(|to| json!([vb, to])))
        .collect();
    Some(json!({
        "my_id": v.my_id,
        "role": format!("{:?}", v.role),
        "leader_id": v.leader_id,
        "term": v.term,
        "commit_index": v.commit_index,
        "applied_index": v.applied_index,
        "epoch": v.epoch,
        "members": members,
        "vbuckets": owners,
        "pending": pending,
    }))
}

/// The configuration in force, its generation, secrets replaced.
fn config(state: &AdminState) -> serde_json::Value {
    let g = state.config.read().unwrap_or_else(|p| p.into_inner());
    let mut v = serde_json::to_value(&g.0).unwrap_or_default();
    redact(&mut v);
    json!({"generation": g.1, "config": v})
}

/// Replaces every secret (a key named `password` or `token` with a value) in a config tree.
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let secret = matches!(k.as_str(), "password" | "token");
                let set = match val {
                    serde_json::Value::String(s) => !s.is_empty(),
                    serde_json::Value::Null => false,
                    _ => true,
                };
                if secret && set {
                    *val = json!("(redacted)");
                } else {
                    redact(val);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

fn filters(state: &AdminState) -> serde_json::Value {
    let s = state.filters.settings();
    json!({
        "limits": s.limits,
        "degraded": s.degraded,
        "sample_per_10000": s.sample_per_10000,
        "active": state.filters.status(),
    })
}

fn body_json(req: &Request) -> Result<serde_json::Value, Response> {
    if req.body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::text(400, format!("the body is not JSON: {e}")))
}

/// `{"method": "mc_get"}`, `{"methods": [...]}`, `{"servant": "memcache"}`: the names an action is about.
fn names(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for key in ["method", "servant"] {
        if let Some(s) = v.get(key).and_then(|x| x.as_str()) {
            out.push(s.to_owned());
        }
    }
    if let Some(a) = v.get("methods").and_then(|x| x.as_array()) {
        out.extend(a.iter().filter_map(|x| x.as_str().map(str::to_owned)));
    }
    out
}

/// The running limits with the keys of `body` changed (`{"client_calls_per_sec": 500}`); unknown keys refused.
fn merge_limits(
    current: &LimitsConfig,
    body: &serde_json::Value,
) -> Result<LimitsConfig, Response> {
    let mut limits =
        serde_json::to_value(current).map_err(|e| Response::text(400, e.to_string()))?;
    let Some(from) = body.as_object() else {
        return Err(Response::text(400, "limits: send a JSON object"));
    };
    if let Some(into) = limits.as_object_mut() {
        for (k, v) in from {
            if !into.contains_key(k) {
                return Err(Response::text(400, format!("limits: unknown key {k}")));
            }
            into.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(limits).map_err(|e| Response::text(400, format!("limits: {e}")))
}

/// The routes' parsing of a request that needs no running server (the fuzz target's second half).
pub(crate) fn fuzz_request(req: &Request) {
    let _ = query_param(&req.query, "since").and_then(|v| v.parse::<u64>().ok());
    if let Ok(body) = body_json(req) {
        let _ = names(&body);
        let _ = merge_limits(&LimitsConfig::default(), &body);
    }
}

fn act(state: &AdminState, req: &Request) -> Response {
    let body = match body_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match req.path.as_str() {
        "/api/degrade" | "/api/restore" => {
            let names = names(&body);
            let mut s = state.filters.settings();
            if req.path == "/api/degrade" {
                if names.is_empty() {
                    return Response::text(
                        400,
                        "say what to degrade: {\"method\": ...} or {\"servant\": ...}",
                    );
                }
                for n in names {
                    if !s.degraded.contains(&n) {
                        s.degraded.push(n);
                    }
                }
            } else if names.is_empty() {
                s.degraded.clear();
            } else {
                s.degraded.retain(|d| !names.contains(d));
            }
            let degraded = s.degraded.clone();
            match state.filters.apply(s) {
                Ok(()) => {
                    tracing::warn!(degraded = ?degraded, "admin: degraded methods changed");
                    Response::json(&json!({"degraded": degraded}))
                }
                Err(e) => Response::text(400, e),
            }
        }
        "/api/limits" => {
            let mut s = state.filters.settings();
            s.limits = match merge_limits(&s.limits, &body) {
                Ok(l) => l,
                Err(r) => return r,
            };
            let applied = s.limits.clone();
            match state.filters.apply(s) {
                Ok(()) => {
                    tracing::warn!(limits = ?applied, "admin: limits changed");
                    Response::json(&json!({"limits": applied}))
                }
                Err(e) => Response::text(400, e),
            }
        }
        "/api/drain" => drain(state),
        "/api/rebalance" => rebalance(state),
        "/api/cluster/leave" => {
            let Some(c) = state.cluster.as_ref().and_then(|w| w.upgrade()) else {
                return Response::text(404, "this node is not in a cluster");
            };
            match c.leave(c.id()) {
                Ok(()) => Response::text(200, "leaving the cluster"),
                Err(e) => Response::text(409, e.to_string()),
            }
        }
        "/api/reload" => match &state.reload {
            Some(reload) => match reload() {
                Ok(what) => Response::json(&json!({"reloaded": what})),
                Err(why) => Response::text(409, why),
            },
            None => Response::text(
                404,
                "this faed runs on built-in defaults: there is no file to reload",
            ),
        },
        _ => Response::text(404, "not found"),
    }
}

/// Rebalance: the raft state machine plans moves on every change of its voters (a join, a leave, a failed or
/// returning member), so the map is always on its way to even shares; this action checks that it is and
/// reports what is still moving. A plan left over (which would be a bug) is reported, not hidden.
fn rebalance(state: &AdminState) -> Response {
    let Some(c) = state.cluster.as_ref().and_then(|w| w.upgrade()) else {
        return Response::text(404, "this node is not in a cluster");
    };
    let v = c.view();
    let voters: Vec<u64> = v
        .members
        .values()
        .filter(|m| m.state == fae_cluster::MemberState::Voter)
        .map(|m| m.id)
        .collect();
    let left = fae_cluster::rebalance::plan(&v.map, &voters).len();
    Response::json(&json!({
        "automatic": true,
        "pending_moves": v.map.pending().count(),
        "moves_left_to_plan": left,
        "balanced": left == 0,
        "vbuckets": v.vbucket_counts(),
    }))
}

/// Drain: a cluster member hands its vbuckets to the others first; then faed stops accepting, finishes the
/// calls it has and exits 0.
fn drain(state: &AdminState) -> Response {
    let stopper = state.stopper.clone();
    let cluster = state.cluster.clone();
    let spawned = std::thread::Builder::new()
        .name("fae-drain".into())
        .spawn(move || {
            if let Some(c) = cluster.as_ref().and_then(|w| w.upgrade()) {
                if let Err(e) = c.leave(c.id()) {
                    tracing::warn!(error = %e, "drain: cannot leave the cluster; stopping anyway");
                } else {
                    let until = std::time::Instant::now() + Duration::from_secs(120);
                    while std::time::Instant::now() < until {
                        let v = c.view();
                        let mine = v.vbucket_counts().get(&v.my_id).copied().unwrap_or(0);
                        let pending = (0..fae_cluster::VBUCKETS as u16)
                            .any(|vb| v.map.get(vb).pending.is_some());
                        if mine == 0 && !pending {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                drop(c);
            }
            tracing::warn!(
                "admin: draining: no new sessions, finishing in-flight calls, then exiting"
            );
            stopper.stop();
        });
    match spawned {
        Ok(_) => Response::new(
            202,
            "application/json",
            json!({"draining": true}).to_string(),
        ),
        Err(e) => Response::text(409, format!("cannot drain: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_wherever_they_are() {
        let mut v = json!({
            "admin": {"token": "s3cret", "token_file": "/etc/fae/token"},
            "redis": {"pools": [{"name": "a", "password": "pw1", "password_file": null}]},
            "mysql": {"servers": [{"pool": "g", "password": null}, {"pool": "h", "password": "pw2"}]},
        });
        redact(&mut v);
        let text = v.to_string();
        assert!(
            !text.contains("s3cret") && !text.contains("pw1") && !text.contains("pw2"),
            "{text}"
        );
        assert!(text.contains("/etc/fae/token"));
        assert_eq!(
            v["mysql"]["servers"][0]["password"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
