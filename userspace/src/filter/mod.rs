//! Filters: every call passes through the node's chain of filters before it runs, and tells them how it ended.
//! Flow control, graceful degrade and the sampled call log are filters; they are fae's plugins (FAE's users
//! knew "plugins"): a new one is one file implementing [`Filter`], listed in [`Chain::build`].
//!
//! The chain holds only the filters the configuration turns on (no limit, no degraded method, no sampling:
//! an empty chain, one atomic load per call), and is rebuilt when the configuration or the admin API changes
//! it. A call rejected by a filter is answered at once with a `TApplicationException` saying why, and counted
//! by reason; it never reaches its servant or back end. Calls forwarded by a peer (`sticky`) passed the chain
//! on the node the client reached and are not filtered again.
//!
//! Writing a filter: implement `admit` (cheap: it runs on the event loop for every call; no blocking, no lock
//! shared by all cores if it can be helped) and, if it keeps count of calls in flight or watches outcomes,
//! `done`, which the engine calls exactly once for every admitted call — when its reply is written, when a
//! deferred call's answer comes back, or when the session closes with the call still out.

mod adaptive;
mod degrade;
mod inflight;
mod rate;
mod sample;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::{Config, LimitsConfig};
use crate::servant::Method;

pub use degrade::degraded_methods;

/// A call, as filters see it.
#[derive(Debug, Clone, Copy)]
pub struct CallInfo {
    pub method: Method,
    /// The client's address (unspecified when the transport does not say).
    pub peer: IpAddr,
    /// When the call was admitted.
    pub admitted: Instant,
    /// The calling service, when a header frame named it (Kitex's FromService, a `caller` info header).
    pub caller: Caller,
}

/// A caller's service name from a header frame's info headers, kept inline (at most 32 bytes; a longer one
/// is cut), so that a call's filter record allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caller {
    len: u8,
    bytes: [u8; 32],
}

impl Caller {
    pub fn new(name: &[u8]) -> Caller {
        let mut c = Caller::default();
        let n = name.len().min(c.bytes.len());
        c.bytes[..n].copy_from_slice(&name[..n]);
        c.len = n as u8;
        c
    }

    /// The name as sent (lossy UTF-8), empty when the call named none.
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.bytes[..usize::from(self.len)])
    }
}

/// Why a filter refused a call; each is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RateLimited,
    MethodInflight,
    Overloaded,
    Degraded,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::RateLimited,
        Reason::MethodInflight,
        Reason::Overloaded,
        Reason::Degraded,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Reason::RateLimited => "rate_limited",
            Reason::MethodInflight => "method_inflight",
            Reason::Overloaded => "overloaded",
            Reason::Degraded => "degraded",
        }
    }
}

/// A refusal: its reason and the message the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
}

/// How a call ended, for `done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    pub took: Duration,
    /// Answered with its result (not an exception).
    pub ok: bool,
}

pub trait Filter: Send + Sync {
    fn name(&self) -> &'static str;
    /// Before the call runs.
    fn admit(&self, call: &CallInfo) -> Result<(), Rejection>;
    /// After an admitted call ended (exactly once).
    fn done(&self, _call: &CallInfo, _ending: Ending) {}
    /// Every second, from the admin sampler (housekeeping).
    fn tick(&self) {}
    /// What the filter would show the operator (the admin API), if anything.
    fn status(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The node's filters and what they refused.
pub struct Chain {
    active: ArcSwap<Vec<Arc<dyn Filter>>>,
    /// The settings the chain was built from (for the admin API and reloads).
    settings: Mutex<Settings>,
    pub rejected: [AtomicU64; 4],
}

/// What the chain is built from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settings {
    pub limits: LimitsConfig,
    pub degraded: Vec<String>,
    pub sample_per_10000: u32,
}

impl Settings {
    pub fn of(cfg: &Config) -> Settings {
        Settings {
            limits: cfg.limits.clone(),
            degraded: cfg.degrade.methods.clone(),
            sample_per_10000: cfg.metrics.sample_per_10000,
        }
    }
}

impl Chain {
    pub fn new(settings: Settings) -> Result<Chain, String> {
        let chain = Chain {
            active: ArcSwap::from_pointee(Vec::new()),
            settings: Mutex::new(Settings::default()),
            rejected: Default::default(),
        };
        chain.apply(settings)?;
        Ok(chain)
    }

    /// Whether any filter is on (the engine skips the chain entirely when not).
    pub fn is_empty(&self) -> bool {
        self.active.load().is_empty()
    }

    /// Admits a call through every filter; on a refusal, the filters that admitted it are told it is done.
    pub fn admit(&self, call: &CallInfo) -> Result<(), Rejection> {
        let active = self.active.load();
        for (i, f) in active.iter().enumerate() {
            if let Err(r) = f.admit(call) {
                let ending = Ending {
                    took: Duration::ZERO,
                    ok: false,
                };
                for earlier in &active[..i] {
                    earlier.done(call, ending);
                }
                self.rejected[r.reason as usize].fetch_add(1, Ordering::Relaxed);
                return Err(r);
            }
        }
        Ok(())
    }

    /// An admitted call ended.
    pub fn done(&self, call: &CallInfo, ending: Ending) {
        for f in self.active.load().iter() {
            f.done(call, ending);
        }
    }

    pub fn settings(&self) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the chain from `settings`: filters whose settings did not change keep their state (counters,
    /// buckets, the adaptive limit); calls admitted by a replaced filter end on it.
    pub fn apply(&self, settings: Settings) -> Result<(), String> {
        check_limits(&settings.limits)?;
        let degraded = degraded_methods(&settings.degraded)?;
        let mut current = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.active.load_full();
        let keep = |name: &str| old.iter().find(|f| f.name() == name).cloned();
        let l = &settings.limits;
        let ol = &current.limits;
        let mut next: Vec<Arc<dyn Filter>> = Vec::new();
        if !degraded.is_empty() {
            next.push(Arc::new(degrade::Degrade::new(degraded)));
        }
        if l.client_calls_per_sec > 0 {
            let same = ol.client_calls_per_sec == l.client_calls_per_sec
                && ol.client_burst == l.client_burst;
            next.push(match keep("rate").filter(|_| same) {
                Some(f) => f,
                None => Arc::new(rate::ClientRate::new(
                    l.client_calls_per_sec,
                    l.client_burst,
                )),
            });
        }
        if !l.method_inflight.is_empty() {
            let same = ol.method_inflight == l.method_inflight;
            next.push(match keep("method_inflight").filter(|_| same) {
                Some(f) => f,
                None => Arc::new(inflight::MethodInflight::new(&l.method_inflight)?),
            });
        }
        if l.adaptive {
            let same = ol.adaptive
                && ol.adaptive_min == l.adaptive_min
                && ol.adaptive_max == l.adaptive_max;
            next.push(match keep("adaptive").filter(|_| same) {
                Some(f) => f,
                None => Arc::new(adaptive::Adaptive::new(l.adaptive_min, l.adaptive_max)),
            });
        }
        if settings.sample_per_10000 > 0 {
            next.push(Arc::new(sample::Sample::new(settings.sample_per_10000)));
        }
        self.active.store(Arc::new(next));
        *current = settings;
        Ok(())
    }

    /// The active filters and what they show.
    pub fn status(&self) -> serde_json::Value {
        let active = self.active.load();
        serde_json::Value::Object(
            active
                .iter()
                .map(|f| {
                    (
                        f.name().to_owned(),
                        f.status().unwrap_or(serde_json::Value::Bool(true)),
                    )
                })
                .collect(),
        )
    }

    /// Periodic housekeeping (the admin sampler calls it every second).
    pub fn tick(&self) {
        for f in self.active.load().iter() {
            f.tick();
        }
    }
}

/// Checks limit settings: method names and bounds.
pub fn check_limits(l: &LimitsConfig) -> Result<(), String> {
    for (name, &n) in &l.method_inflight {
        if Method::from_name(name.as_bytes()).is_none() {
            return Err(format!("method_inflight: no method {name:?}"));
        }
        if n == 0 {
            return Err(format!("method_inflight.{name}: at least 1"));
        }
    }
    if l.adaptive && (l.adaptive_min > l.adaptive_max || l.adaptive_max == 0) {
        return Err(
            "adaptive_min must be at most adaptive_max, and adaptive_max at least 1".into(),
        );
    }
    Ok(())
}
