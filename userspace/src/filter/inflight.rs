//! Calls of a method in flight at once (`limits.method_inflight`): past the limit, "overloaded" at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CallInfo, Ending, Filter, Reason, Rejection};
use crate::servant::Method;

pub struct MethodInflight {
    /// Limit by `Method as usize`; 0: none.
    limits: Vec<u64>,
    counts: Vec<AtomicU64>,
}

impl MethodInflight {
    pub fn new(limits: &BTreeMap<String, u64>) -> Result<MethodInflight, String> {
        let mut l = vec![0; Method::ALL.len()];
        for (name, &n) in limits {
            let m =
                Method::from_name(name.as_bytes()).ok_or_else(|| format!("no method {name:?}"))?;
            l[m as usize] = n;
        }
        Ok(MethodInflight {
            limits: l,
            counts: (0..Method::ALL.len()).map(|_| AtomicU64::new(0)).collect(),
        })
    }
}

impl Filter for MethodInflight {
    fn name(&self) -> &'static str {
        "method_inflight"
    }

    fn admit(&self, call: &CallInfo) -> Result<(), Rejection> {
        let i = call.method as usize;
        let limit = self.limits[i];
        if limit == 0 {
            return Ok(());
        }
        let before = self.counts[i].fetch_add(1, Ordering::AcqRel);
        if before < limit {
            return Ok(());
        }
        self.counts[i].fetch_sub(1, Ordering::AcqRel);
        Err(Rejection {
            reason: Reason::MethodInflight,
            message: format!(
                "overloaded: {limit} {} calls are in flight (limits.method_inflight)",
                call.method.name()
            ),
        })
    }

    fn done(&self, call: &CallInfo, _ending: Ending) {
        let i = call.method as usize;
        if self.limits[i] > 0 {
            // Never below zero, even for a call admitted before this filter was put in place.
            let _ = self.counts[i]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn bounds_calls_of_one_method() {
        let f = MethodInflight::new(&[("mc_get".to_string(), 2)].into_iter().collect()).unwrap();
        let call = |m| CallInfo {
            method: m,
            peer: std::net::Ipv4Addr::LOCALHOST.into(),
            admitted: Instant::now(),
            caller: Default::default(),
        };
        let end = Ending {
            took: std::time::Duration::ZERO,
            ok: true,
        };
        assert!(f.admit(&call(Method::McGet)).is_ok());
        assert!(f.admit(&call(Method::McGet)).is_ok());
        assert_eq!(
            f.admit(&call(Method::McGet)).unwrap_err().reason,
            Reason::MethodInflight
        );
        assert!(
            f.admit(&call(Method::Noop)).is_ok(),
            "other methods are not limited"
        );
        f.done(&call(Method::McGet), end);
        assert!(f.admit(&call(Method::McGet)).is_ok());
        for _ in 0..5 {
            f.done(&call(Method::McGet), end);
        }
        assert_eq!(f.counts[Method::McGet as usize].load(Ordering::Relaxed), 0);
    }
}
