//! The process's Prometheus registry: the filters' metrics, the process's own, and gauges read
//! from live state when `/metrics` is scraped.

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use sluice_filters::metrics::FilterMetrics;

use crate::policy::Policy;

/// One per process, made before the first policy: counters outlive every reload.
pub struct Metrics {
    registry: Registry,
    pub filters: FilterMetrics,
    /// Policy reloads by `result`: `applied`, `unchanged`, `rejected`.
    pub reloads: IntCounterVec,
    /// 1 when the limits store answers (always, for `memory`), by `backend`.
    limits_store_up: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let filters = FilterMetrics::default();
        let reloads = IntCounterVec::new(
            Opts::new("sluice_policy_reloads_total", "Policy reloads by result."),
            &["result"],
        )
        .expect("a valid metric definition");
        let limits_store_up = IntGaugeVec::new(
            Opts::new(
                "sluice_limits_store_up",
                "Whether the limits store answers (1) or not (0), by backend.",
            ),
            &["backend"],
        )
        .expect("a valid metric definition");
        let registered = filters
            .register(&registry)
            .and_then(|()| registry.register(Box::new(reloads.clone())))
            .and_then(|()| registry.register(Box::new(limits_store_up.clone())));
        registered.expect("metric names are unique");
        for result in ["applied", "unchanged", "rejected"] {
            // Present from the start, so a rate over them has a zero to begin with.
            reloads.with_label_values(&[result]);
        }
        Self {
            registry,
            filters,
            reloads,
            limits_store_up,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric, with live gauges read from `policy`.
    pub fn render(&self, policy: &Policy) -> Vec<u8> {
        self.limits_store_up.reset();
        let (backend, up) = match &policy.redis {
            None => ("memory", true),
            Some(redis) => ("redis", redis.is_healthy()),
        };
        self.limits_store_up
            .with_label_values(&[backend])
            .set(i64::from(up));
        let mut text = Vec::with_capacity(8 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            tracing::error!("encoding metrics failed: {e}");
        }
        text
    }
}
