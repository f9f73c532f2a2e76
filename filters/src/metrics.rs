//! The metrics filters record. One set per process, made before the first policy and kept across
//! reloads (a reload must not reset a counter); the process registers them with its Prometheus
//! registry and serves them at `/metrics`.
//!
//! Labels come from the policy (tier, limit and model names it declares), never from what a
//! caller sends, so their number is bounded. Tenant names are a label only when the policy asks
//! for it (`telemetry.metrics.tenant_labels`); otherwise the `tenant` label is empty.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct FilterMetrics {
    /// Requests refused by a limit: `limit` (`rps`, `requests_per_day`, …), `scope` (the tier,
    /// or `system`).
    pub limit_rejections: IntCounterVec,
    /// Budget thresholds crossed: `tier`, `threshold` (percent), `tenant`. Each fires once per
    /// tenant per month.
    pub budget_alerts: IntCounterVec,
    /// Requests whose model a budget rule rewrote: `tier`, `from`, `to`.
    pub model_downgrades: IntCounterVec,
    /// Requests the limits store could not be asked about: `on_error` (`fail_open`: admitted
    /// uncounted; `fail_closed`: refused with 503).
    pub limits_unavailable: IntCounterVec,
    /// Failed calls to the shared limits store (Redis).
    pub limits_store_errors: IntCounter,
}

impl std::fmt::Debug for FilterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FilterMetrics")
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric definition")
}

impl Default for FilterMetrics {
    fn default() -> Self {
        Self {
            limit_rejections: counter_vec(
                "sluice_limit_rejections_total",
                "Requests refused by a limit, by limit and scope (tier or system).",
                &["limit", "scope"],
            ),
            budget_alerts: counter_vec(
                "sluice_budget_alerts_total",
                "Budget thresholds crossed (once per tenant, threshold and month).",
                &["tier", "threshold", "tenant"],
            ),
            model_downgrades: counter_vec(
                "sluice_model_downgrades_total",
                "Requests whose model a budget downgrade rule rewrote.",
                &["tier", "from", "to"],
            ),
            limits_unavailable: counter_vec(
                "sluice_limits_unavailable_total",
                "Requests decided without the limits store (it could not be reached), by on_error.",
                &["on_error"],
            ),
            limits_store_errors: IntCounter::new(
                "sluice_limits_store_errors_total",
                "Failed calls to the shared limits store.",
            )
            .expect("a valid metric definition"),
        }
    }
}

impl FilterMetrics {
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.limit_rejections.clone()))?;
        registry.register(Box::new(self.budget_alerts.clone()))?;
        registry.register(Box::new(self.model_downgrades.clone()))?;
        registry.register(Box::new(self.limits_unavailable.clone()))?;
        registry.register(Box::new(self.limits_store_errors.clone()))?;
        Ok(())
    }
}
