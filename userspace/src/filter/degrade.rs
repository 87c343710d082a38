//! Graceful degrade: methods put out of service by the operator (config `degrade.methods`, the admin API,
//! the dashboard) are answered at once with a "degraded" error, their servant and back end untouched.

use super::{CallInfo, Filter, Reason, Rejection};
use crate::servant::Method;

/// The servants, by the names FAE's users know, and their methods.
const SERVANTS: &[(&str, &[&str])] = &[
    ("misc", &["noop", "ping"]),
    ("idgen", &["id_next", "id_next_with_tag", "id_decode"]),
    ("lcache", &["lc_set", "lc_get", "lc_del"]),
    ("lock", &["lock", "unlock"]),
    (
        "memcache",
        &["mc_set", "mc_get", "mc_add", "mc_delete", "mc_increment"],
    ),
    ("redis", &["rd_call"]),
    (
        "mysql",
        &[
            "my_query",
            "my_bulk_exec",
            "my_query_shards",
            "my_merge",
            "my_evict",
        ],
    ),
    ("registry", &["zk_create", "zk_children", "zk_del"]),
];

/// The methods `names` (methods or servants) stand for; an error names one that is neither.
pub fn degraded_methods(names: &[String]) -> Result<Vec<Method>, String> {
    let mut out = Vec::new();
    for name in names {
        if let Some(m) = Method::from_name(name.as_bytes()) {
            out.push(m);
        } else if let Some((_, methods)) = SERVANTS.iter().find(|(s, _)| s == name) {
            out.extend(
                methods
                    .iter()
                    .filter_map(|m| Method::from_name(m.as_bytes())),
            );
        } else {
            let servants: Vec<&str> = SERVANTS.iter().map(|(s, _)| *s).collect();
            return Err(format!(
                "{name:?} is neither a method nor a servant ({})",
                servants.join(", ")
            ));
        }
    }
    out.sort_by_key(|m| *m as usize);
    out.dedup();
    Ok(out)
}

pub struct Degrade {
    /// Bit `Method as usize` set for a degraded method.
    mask: u64,
}

impl Degrade {
    pub fn new(methods: Vec<Method>) -> Degrade {
        Degrade {
            mask: methods.iter().fold(0, |m, &x| m | 1 << (x as usize)),
        }
    }
}

impl Filter for Degrade {
    fn name(&self) -> &'static str {
        "degrade"
    }

    fn admit(&self, call: &CallInfo) -> Result<(), Rejection> {
        if self.mask & (1 << (call.method as usize)) == 0 {
            return Ok(());
        }
        Err(Rejection {
            reason: Reason::Degraded,
            message: format!(
                "degraded: {} is out of service by the operator's choice (degrade); retry later",
                call.method.name()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_expand_to_methods() {
        let m = degraded_methods(&["memcache".into(), "lc_get".into(), "mc_get".into()]).unwrap();
        assert_eq!(m.len(), 6);
        assert!(m.contains(&Method::LcGet) && m.contains(&Method::McIncrement));
        assert!(degraded_methods(&["nope".into()])
            .unwrap_err()
            .contains("nope"));
        assert!(
            Method::ALL.len() <= 64,
            "the degrade mask holds every method"
        );
    }
}
