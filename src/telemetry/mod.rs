//! What Sluice tells operators about itself: Prometheus metrics at the admin listener's
//! `/metrics` (and, with later work, traces and latency statistics).

mod metrics;
pub mod rolling;

pub use metrics::Metrics;
