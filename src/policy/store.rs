use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use sluice_filters::cache::{CacheConfig, Purge};

use super::{load, Policy, PolicyErrors, SharedState};
use crate::telemetry::traces::Tracer;
use crate::telemetry::Metrics;

/// Holds the active policy. A request takes an `Arc` once and keeps it to the end, so a reload
/// never changes a request midway; the swap itself is a single atomic pointer store.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<Policy>,
    path: PathBuf,
    /// What every policy this store loads shares (limit counters).
    shared: SharedState,
    /// Serialises reloads (watcher, SIGHUP and admin may ask at once).
    reloading: Mutex<()>,
    last_rejection: Mutex<Option<PolicyErrors>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied {
        hash: String,
    },
    /// The file's bytes are those of the active policy.
    Unchanged {
        hash: String,
    },
}

impl PolicyStore {
    pub fn new(path: &Path, policy: Policy, shared: SharedState) -> Self {
        Self {
            shared,
            current: ArcSwap::from_pointee(policy),
            path: path.to_path_buf(),
            reloading: Mutex::new(()),
            last_rejection: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// The process's metrics (they outlive every policy).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The process's tracer (off until the server sets it).
    pub fn tracer(&self) -> &Tracer {
        static OFF: std::sync::OnceLock<Tracer> = std::sync::OnceLock::new();
        self.shared
            .tracer
            .get()
            .unwrap_or_else(|| OFF.get_or_init(Tracer::default))
    }

    /// State every policy shares.
    pub fn shared(&self) -> &SharedState {
        &self.shared
    }

    /// Reloads so far with this result (`applied`, `unchanged`, `rejected`).
    pub fn reloads(&self, result: &str) -> u64 {
        self.shared
            .metrics
            .reloads
            .with_label_values(&[result])
            .get()
    }

    fn count_reload(&self, result: &str) {
        self.shared
            .metrics
            .reloads
            .with_label_values(&[result])
            .inc();
    }

    /// The errors of the last rejected reload, if the last reload attempt was rejected.
    pub fn last_rejection(&self) -> Option<PolicyErrors> {
        self.last_rejection.lock().ok()?.clone()
    }

    /// Reads the file again; a valid, different policy replaces the active one, anything else
    /// leaves it in place.
    pub fn reload(&self) -> Result<ReloadOutcome, PolicyErrors> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let active = self.current();
        let result = load(&self.path, &self.shared);
        let mut last = self
            .last_rejection
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(policy) if policy.hash == active.hash => {
                self.count_reload("unchanged");
                *last = None;
                Ok(ReloadOutcome::Unchanged { hash: policy.hash })
            }
            Ok(policy) => {
                if policy.listen != active.listen || policy.server.threads != active.server.threads
                {
                    tracing::warn!(
                        "policy changes `listen` or `server.threads`; they take effect at the next restart"
                    );
                }
                if policy.telemetry.otlp != active.telemetry.otlp {
                    tracing::warn!(
                        "policy changes `telemetry.otlp`; it takes effect at the next restart"
                    );
                }
                let hash = policy.hash.clone();
                purge_changed_cache_rules(&active, &policy);
                tracing::info!(summary = %policy.summary(), "policy reloaded");
                self.current.store(Arc::new(policy));
                self.count_reload("applied");
                *last = None;
                Ok(ReloadOutcome::Applied { hash })
            }
            Err(errors) => {
                tracing::error!(
                    "policy reload rejected, keeping sha256 {}: {errors}",
                    &active.hash[..12]
                );
                self.count_reload("rejected");
                *last = Some(errors.clone());
                Err(errors)
            }
        }
    }
}

/// Entries made under a route's old cache rules are never served under its new ones (the
/// rules' fingerprint is in every key); a reload that changes (adds, removes) a route's rules
/// also purges that route, here and in the shared tier, so their memory is freed at once.
/// Changing only `charge_hits` or `coalesce_wait` keeps the entries (see
/// [`CacheConfig::fingerprint`]).
fn purge_changed_cache_rules(active: &Policy, next: &Policy) {
    let rules = |policy: &Policy| -> std::collections::BTreeMap<String, Option<[u8; 32]>> {
        policy
            .routes
            .iter()
            .map(|route| {
                let rules = route.cache_rules.as_ref().map(CacheConfig::fingerprint);
                (route.name.to_string(), rules)
            })
            .collect()
    };
    let (before, after) = (rules(active), rules(next));
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for name in names {
        let old = before.get(name).cloned().flatten();
        let new = after.get(name).cloned().flatten();
        if old == new {
            continue;
        }
        let purge = Purge::route(name);
        let removed = next.cache.purge(&purge);
        tracing::info!(target: "sluice::cache", route = %name, removed, "cache rules changed: route purged");
        if let (Some(shared), Ok(runtime)) =
            (next.cache.shared(), tokio::runtime::Handle::try_current())
        {
            let shared = shared.clone();
            runtime.spawn(async move {
                if let Err(e) = shared.purge(&purge).await {
                    tracing::warn!(target: "sluice::cache", "shared cache purge of route failed: {e}");
                }
            });
        }
    }
}
