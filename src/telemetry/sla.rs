//! SLA rules: latency ceilings and a success-rate floor over a rolling window of a route or an
//! upstream. A background monitor checks them every second and reports each change — broken,
//! then healed — once: a log line on `sluice::sla`, metrics, and a span when tracing is on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::stats::{Series, Summary};
use crate::policy::schema::LatencyKind;
use crate::policy::PolicyStore;

/// How often rules are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct SlaRule {
    pub name: Arc<str>,
    /// What it watches, for messages: `route openai`, `upstream azure`.
    pub subject: String,
    pub series: Arc<Series>,
    pub window: Duration,
    pub latency: LatencyKind,
    /// (percentile, ceiling).
    pub ceilings: Vec<(u8, Duration)>,
    /// Percent.
    pub success_rate: Option<f64>,
    pub min_requests: u64,
}

/// A rule's judgement.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    /// Too few requests in the window to say.
    Unjudged,
    Met,
    /// Broken, and why (each limit crossed).
    Broken(Vec<String>),
}

impl SlaRule {
    pub fn judge(&self) -> Judgement {
        let Some(summary) = self.series.summary(self.window) else {
            return Judgement::Unjudged;
        };
        self.judge_summary(&summary)
    }

    fn judge_summary(&self, summary: &Summary) -> Judgement {
        if summary.requests < self.min_requests {
            return Judgement::Unjudged;
        }
        let latencies = match self.latency {
            LatencyKind::Total => summary.total_ms,
            LatencyKind::FirstByte => summary.first_byte_ms,
        };
        let mut broken = Vec::new();
        for (percentile, ceiling) in &self.ceilings {
            let ceiling_ms = ceiling.as_secs_f64() * 1000.0;
            if let Some(value) = latencies.get(*percentile).filter(|v| *v > ceiling_ms) {
                broken.push(format!("p{percentile} {value:.1}ms > {ceiling_ms:.1}ms"));
            }
        }
        if let Some(floor) = self.success_rate.filter(|f| summary.success_rate < *f) {
            broken.push(format!(
                "success rate {:.2}% < {floor}% ({} of {} failed)",
                summary.success_rate, summary.failures, summary.requests
            ));
        }
        if broken.is_empty() {
            Judgement::Met
        } else {
            Judgement::Broken(broken)
        }
    }
}

/// Checks the active policy's rules and reports changes.
pub struct SlaMonitor {
    store: Arc<PolicyStore>,
}

impl SlaMonitor {
    pub fn new(store: Arc<PolicyStore>) -> Self {
        Self { store }
    }

    /// One pass over the rules; `broken` holds each rule's last reported state.
    fn check(&self, broken: &mut HashMap<Arc<str>, bool>) {
        let policy = self.store.current();
        let metrics = self.store.metrics();
        for rule in &policy.sla {
            let was_broken = broken.get(&rule.name).copied().unwrap_or(false);
            let ok_gauge = metrics.sla_ok.with_label_values(&[&rule.name]);
            match rule.judge() {
                Judgement::Broken(reasons) if !was_broken => {
                    let why = reasons.join(", ");
                    tracing::warn!(target: "sluice::sla", rule = %rule.name, subject = %rule.subject, window = ?rule.window, "SLA broken: {why}");
                    metrics.sla_breaches.with_label_values(&[&rule.name]).inc();
                    ok_gauge.set(0);
                    self.store.tracer().sla_event(rule, "sla.broken", &why);
                    broken.insert(rule.name.clone(), true);
                }
                Judgement::Met if was_broken => {
                    tracing::info!(target: "sluice::sla", rule = %rule.name, subject = %rule.subject, "SLA recovered");
                    metrics
                        .sla_recoveries
                        .with_label_values(&[&rule.name])
                        .inc();
                    ok_gauge.set(1);
                    self.store.tracer().sla_event(rule, "sla.recovered", "");
                    broken.insert(rule.name.clone(), false);
                }
                Judgement::Met => ok_gauge.set(1),
                _ => {}
            }
        }
        broken.retain(|name, _| policy.sla.iter().any(|rule| rule.name == *name));
    }
}

#[async_trait]
impl BackgroundService for SlaMonitor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut broken = HashMap::new();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => self.check(&mut broken),
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::stats::{Sample, StatsRegistry};

    fn rule(series: Arc<Series>) -> SlaRule {
        SlaRule {
            name: "r".into(),
            subject: "route r".to_owned(),
            series,
            window: Duration::from_secs(60),
            latency: LatencyKind::Total,
            ceilings: vec![(95, Duration::from_millis(100))],
            success_rate: Some(99.0),
            min_requests: 10,
        }
    }

    #[test]
    fn rules_judge_latency_and_success_once_enough_requests_came() {
        let registry = StatsRegistry::default();
        let series = registry.series("route:r", &[Duration::from_secs(60)]);
        let slow = rule(series.clone());
        let sample = |ms, failed| Sample {
            first_byte: None,
            total: Duration::from_millis(ms),
            failed,
        };
        for _ in 0..9 {
            series.record(sample(500, true));
        }
        assert_eq!(slow.judge(), Judgement::Unjudged);
        series.record(sample(500, true));
        let Judgement::Broken(reasons) = slow.judge() else {
            panic!("slow and failing")
        };
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].starts_with("p95 "), "{reasons:?}");
        let fast = registry.series("route:fast", &[Duration::from_secs(60)]);
        for _ in 0..100 {
            fast.record(sample(10, false));
        }
        assert_eq!(rule(fast).judge(), Judgement::Met);
    }
}
