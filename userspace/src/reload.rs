//! Hot reload: SIGHUP, a change of the config file (watched, debounced) or `POST /api/reload` reads the file
//! again and applies what changed without a restart: limits, degrade, call sampling, the slow-call
//! threshold, the log level, and the back ends (pools, servers, breaker settings: new ones are put in service,
//! the calls out finish on the old ones, which then close). A change that needs a restart (listen addresses,
//! the data dir, threads, ...) is refused with a log line naming the keys, and an invalid file keeps the running
//! configuration and says why: in both cases nothing of the file is applied.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::config::Config;

/// What asks for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// A change of the file.
    File,
}

/// How long a change of the file settles before the reload (an editor writes in several steps).
const DEBOUNCE: Duration = Duration::from_millis(300);
use crate::engine::session::Env;
use crate::engine::Returns;
use crate::filter::{Chain, Settings};
use crate::servant::Servants;

/// Sets the log filter (tracing's reload handle, in faed).
pub type SetLogLevel = dyn Fn(&str) -> Result<(), String> + Send + Sync;

pub struct Reloader {
    path: PathBuf,
    /// Applies the command line's overrides (--listen, ...) to a configuration read from the file.
    overrides: Box<dyn Fn(&mut Config) + Send + Sync>,
    pub state: Arc<RwLock<(Config, u64)>>,
    filters: Arc<Chain>,
    env: Arc<Env>,
    servants: Arc<Servants>,
    returns: Returns,
    log: Box<SetLogLevel>,
    one_at_a_time: Mutex<()>,
}

/// The keys whose change needs a restart, as `section.key` (every key not reloaded below).
fn needs_restart(cur: &Config, next: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let mut section = |name: &str, a: serde_json::Value, b: serde_json::Value| {
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, v) in a {
                if b.get(k) != Some(v) {
                    keys.push(format!("{name}.{k}"));
                }
            }
        }
    };
    let v = |x: &dyn erased::Ser| x.value();
    section("server", v(&cur.server), v(&next.server));
    section("listener", v(&cur.listener), v(&next.listener));
    section("admin", v(&cur.admin), v(&next.admin));
    section("node", v(&cur.node), v(&next.node));
    section("idgen", v(&cur.idgen), v(&next.idgen));
    section("lcache", v(&cur.lcache), v(&next.lcache));
    section("lock", v(&cur.lock), v(&next.lock));
    section("registry", v(&cur.registry), v(&next.registry));
    section("cluster", v(&cur.cluster), v(&next.cluster));
    keys
}

/// A config section as JSON, for comparing key by key.
mod erased {
    pub trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}

impl Reloader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: PathBuf,
        overrides: Box<dyn Fn(&mut Config) + Send + Sync>,
        state: Arc<RwLock<(Config, u64)>>,
        filters: Arc<Chain>,
        env: Arc<Env>,
        servants: Arc<Servants>,
        returns: Returns,
        log: Box<SetLogLevel>,
    ) -> Reloader {
        Reloader {
            path,
            overrides,
            state,
            filters,
            env,
            servants,
            returns,
            log,
            one_at_a_time: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file and applies it: what changed, or why nothing was applied.
    pub fn reload(&self) -> Result<String, String> {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        let refuse = |why: String| {
            tracing::error!(file = %self.path.display(), "reload refused: {why}; the running configuration stays");
            Err(format!("{why}; the running configuration stays"))
        };
        let mut next = match Config::load(&self.path) {
            Ok(c) => c,
            Err(e) => return refuse(e.to_string()),
        };
        (self.overrides)(&mut next);
        if let Err(e) = next.validate() {
            return refuse(e.to_string());
        }
        let cur = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone();
        let restart = needs_restart(&cur, &next);
        if !restart.is_empty() {
            return refuse(format!(
                "{} changed, which needs a restart",
                restart.join(", ")
            ));
        }
        let mut changed = Vec::new();
        let backends_changed = cur.backend != next.backend
            || cur.memcache != next.memcache
            || cur.redis != next.redis
            || cur.mysql != next.mysql;
        // Everything that can fail first, so that a refusal applies nothing.
        let new_backends = if backends_changed {
            match crate::backend::Backends::start(&next) {
                Ok(b) => Some(b),
                Err(e) => return refuse(format!("back ends: {e}")),
            }
        } else {
            None
        };
        let settings = Settings::of(&next);
        if settings != self.filters.settings() {
            if let Err(e) = self.filters.apply(settings) {
                return refuse(e);
            }
            changed.push("limits, degrade or sampling");
        }
        if cur.log.level != next.log.level {
            if let Err(e) = (self.log)(&next.log.level) {
                tracing::error!(error = %e, "reload: cannot set the log level");
            } else {
                changed.push("log.level");
            }
        }
        if cur.metrics.slow_call_ms != next.metrics.slow_call_ms {
            self.env.slow_call_ns.store(
                next.metrics.slow_call_ms.saturating_mul(1_000_000),
                std::sync::atomic::Ordering::Relaxed,
            );
            changed.push("metrics.slow_call_ms");
        }
        if let Some(b) = new_backends {
            b.set_sink(Arc::new(self.returns.clone()));
            let old = self.servants.replace_backends(b);
            old.retire();
            changed.push("back ends");
        }
        let mut g = self.state.write().unwrap_or_else(|p| p.into_inner());
        g.1 += 1;
        g.0 = next;
        let what = if changed.is_empty() {
            "nothing changed".to_owned()
        } else {
            changed.join(", ")
        };
        tracing::warn!(generation = g.1, changed = %what, "configuration reloaded");
        Ok(what)
    }

    /// Reloads on SIGHUP (sent to the returned channel by faed's signal thread) and when the file changes
    /// (a watcher on its directory, debounced: editors write files in several steps).
    pub fn watch(self: &Arc<Self>) -> Result<crossbeam_channel::Sender<Trigger>, String> {
        let (tx, rx) = crossbeam_channel::unbounded::<Trigger>();
        let file = self
            .path
            .canonicalize()
            .unwrap_or_else(|_| self.path.clone());
        let dir = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let fs_tx = tx.clone();
        // Only writes, creations, renames and removals of the file count: inotify also reports opening
        // and closing it, and a reload reads the file, so counting those made any read of it (an operator's
        // `cat`) start a reload every 300 ms, for good.
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(ev) = res else {
                return;
            };
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return;
            }
            if ev
                .paths
                .iter()
                .any(|p| *p == file || p.file_name() == file.file_name())
            {
                let _ = fs_tx.send(Trigger::File);
            }
        })
        .map_err(|e| format!("cannot watch the config file: {e}"))?;
        notify::Watcher::watch(&mut watcher, &dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("fae-reload".into())
            .spawn(move || {
                let _keep = watcher;
                while let Ok(t) = rx.recv() {
                    if t == Trigger::File {
                        // Debounce: editors write a file in several steps.
                        std::thread::sleep(DEBOUNCE);
                    }
                    // Several triggers at once make one reload.
                    while rx.try_recv().is_ok() {}
                    let _ = me.reload();
                }
            })
            .map_err(|e| format!("cannot start the reload thread: {e}"))?;
        Ok(tx)
    }
}
