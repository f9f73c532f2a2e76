//! What Sluice tells operators about itself: Prometheus metrics at the admin listener's
//! `/metrics`, rolling percentiles at `/admin/stats`, SLA alerts, OTLP traces.

pub mod metrics;
mod otlp_encode;
pub mod panics;
pub mod rolling;
pub mod sla;
pub mod stats;
pub mod traces;

pub use metrics::Metrics;
