//! The process's Prometheus registry: the filters' metrics, the process's own, and gauges read
//! from live state when `/metrics` is scraped.

use prometheus::core::Collector;
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
    /// Upstream attempts by `upstream` and `outcome` (ok, client_error, rate_limited,
    /// server_error, connect_error, timeout).
    pub upstream_attempts: IntCounterVec,
    /// Attempts after a request's first, by the `upstream` they went to and `kind` (retry,
    /// hedge).
    pub upstream_retries: IntCounterVec,
    /// Retries not made because the `upstream`'s retry budget was spent.
    pub retry_budget_exhausted: IntCounterVec,
    /// Hedged requests by `route` and `result`: launched, won (the hedge answered first).
    pub hedges: IntCounterVec,
    /// Provider keys rested after a 429, by `upstream` and `key` (its policy name).
    pub key_cooldowns: IntCounterVec,
    /// Provider keys disabled after a 401/403, by `upstream` and `key`.
    pub keys_disabled: IntCounterVec,
    /// Circuits opened, by `upstream` and `key` (empty for the upstream's own circuit).
    pub circuit_opens: IntCounterVec,
    /// 0 closed, 1 half-open, 2 open, by `upstream` and `key`; read at scrape time.
    circuit_state: IntGaugeVec,
}

fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric definition")
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
        let upstream_attempts = counters(
            "sluice_upstream_attempts_total",
            "Upstream attempts by upstream and outcome.",
            &["upstream", "outcome"],
        );
        let upstream_retries = counters(
            "sluice_upstream_retries_total",
            "Attempts after a request's first, by the upstream they went to and kind.",
            &["upstream", "kind"],
        );
        let retry_budget_exhausted = counters(
            "sluice_retry_budget_exhausted_total",
            "Retries not made because the upstream's retry budget was spent.",
            &["upstream"],
        );
        let hedges = counters(
            "sluice_hedges_total",
            "Hedged requests by route and result (launched, won).",
            &["route", "result"],
        );
        let key_cooldowns = counters(
            "sluice_key_cooldowns_total",
            "Provider keys rested after a 429.",
            &["upstream", "key"],
        );
        let keys_disabled = counters(
            "sluice_keys_disabled_total",
            "Provider keys disabled after a 401/403, until the next reload.",
            &["upstream", "key"],
        );
        let circuit_opens = counters(
            "sluice_circuit_opens_total",
            "Circuits opened, by upstream and key (empty for the upstream's own).",
            &["upstream", "key"],
        );
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "sluice_circuit_state",
                "Circuit state: 0 closed, 1 half-open, 2 open.",
            ),
            &["upstream", "key"],
        )
        .expect("a valid metric definition");
        let collectors: [Box<dyn Collector>; 10] = [
            Box::new(reloads.clone()),
            Box::new(limits_store_up.clone()),
            Box::new(upstream_attempts.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(retry_budget_exhausted.clone()),
            Box::new(hedges.clone()),
            Box::new(key_cooldowns.clone()),
            Box::new(keys_disabled.clone()),
            Box::new(circuit_opens.clone()),
            Box::new(circuit_state.clone()),
        ];
        let registered = collectors
            .into_iter()
            .try_for_each(|collector| registry.register(collector))
            .and_then(|()| filters.register(&registry));
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
            upstream_attempts,
            upstream_retries,
            retry_budget_exhausted,
            hedges,
            key_cooldowns,
            keys_disabled,
            circuit_opens,
            circuit_state,
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
        self.circuit_state.reset();
        for upstream in policy.upstreams.values() {
            let state = upstream.health.breaker.state();
            self.circuit_state
                .with_label_values(&[&upstream.name, ""])
                .set(state.level());
            for key in upstream.keys.keys() {
                self.circuit_state
                    .with_label_values(&[&upstream.name, &key.name])
                    .set(key.health.breaker.state().level());
            }
        }
        let mut text = Vec::with_capacity(8 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            tracing::error!("encoding metrics failed: {e}");
        }
        text
    }
}
