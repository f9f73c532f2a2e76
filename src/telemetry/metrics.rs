//! The process's Prometheus registry: the filters' metrics, the process's own, and gauges read
//! from live state when `/metrics` is scraped.
//!
//! Label values come from the policy (routes, upstreams, tiers, key names, the models it
//! names — others are `other`), so series stay few. Tenants are labels only when the policy
//! asks (`telemetry.metrics.tenant_labels`).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use sluice_filters::cache::CacheStats;
use sluice_filters::metrics::FilterMetrics;

use super::traces::ExportCounters;
use crate::policy::Policy;

/// Total and upstream latencies, and time to first token: 0.5 ms to 5 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];
/// Sluice's own time: fine enough to show tens of microseconds.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];
/// Gaps between streamed content events.
const GAP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const TOKENS_PER_SECOND_BUCKETS: &[f64] =
    &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// One per process, made before the first policy: counters outlive every reload.
pub struct Metrics {
    registry: Registry,
    pub filters: FilterMetrics,
    /// Requests by `route`, `upstream`, `model`, `status`, `cache`, `tier`, `tenant`.
    pub requests: IntCounterVec,
    /// The whole exchange, by `route` and `cache` (`hit` for an answer from the cache, empty
    /// otherwise): a hit's microseconds would hide the upstream's seconds in one distribution.
    pub request_duration: HistogramVec,
    /// Sluice's own time in an exchange (before the upstream, and between the upstream's
    /// head and the caller's), by `route`.
    pub overhead: HistogramVec,
    /// Time waiting in a limits queue, by `route`.
    pub queue_wait: HistogramVec,
    /// Time to the first content of a stream, by `route`.
    pub time_to_first_token: HistogramVec,
    /// Gaps between a stream's content events, by `route`.
    pub inter_token_gap: HistogramVec,
    /// Output tokens per second of generation, by `route`.
    pub output_tokens_per_second: HistogramVec,
    /// From an attempt's start to its response head, by `upstream`.
    pub upstream_first_byte: HistogramVec,
    /// Upstream connections by `upstream` and `reused` (true/false).
    pub upstream_connections: IntCounterVec,
    /// Time to open a new upstream connection (TCP and TLS), by `upstream`.
    pub upstream_connect: HistogramVec,
    /// Tokens by `route`, `model`, `kind` (input/output), `tenant`.
    pub tokens: IntCounterVec,
    /// USD spent by `route`, `model`, `tenant`.
    pub cost_usd: CounterVec,
    /// Policy reloads by `result`: `applied`, `unchanged`, `rejected`.
    pub reloads: IntCounterVec,
    /// Forward-listener (HTTPS_PROXY mode) connections and requests by `action`: intercept,
    /// tunnel, refuse, bad_request, handshake_failed (often a client that does not trust
    /// Sluice's CA), tunnel_failed (the target could not be reached).
    pub forward: IntCounterVec,
    /// 1 when the limits store answers (always, for `memory`), by `backend`.
    limits_store_up: IntGaugeVec,
    /// Redis settlements that failed and wait to be replayed when Redis answers again.
    limits_settlements_pending: IntGauge,
    /// Failed Redis settlements dropped (oldest first) because too many were waiting; read
    /// from the store's own count at each scrape, which the last figure seen turns into a rise.
    limits_settlements_dropped: IntCounter,
    settlements_dropped_seen: AtomicU64,
    /// Upstream attempts by `upstream` and `outcome` (ok, client_error, rate_limited,
    /// server_error, connect_error, timeout).
    pub upstream_attempts: IntCounterVec,
    /// Attempts after a request's first, by the `upstream` they went to and `kind` (retry,
    /// hedge).
    pub upstream_retries: IntCounterVec,
    /// Responses whose body broke after the head went downstream (reset, or a stream ended
    /// without its final event), by `upstream`: failures no attempt count shows.
    pub upstream_broke: IntCounterVec,
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
    /// SLA rules broken and healed, and whether each is met now (1) or not (0), by `rule`.
    pub sla_breaches: IntCounterVec,
    pub sla_recoveries: IntCounterVec,
    pub sla_ok: IntGaugeVec,
    /// What became of finished spans.
    pub spans: ExportCounters,
    /// The response cache's counters and size, read at scrape time.
    cache: CacheMetrics,
}

/// The cache keeps its own counters (they survive store rebuilds); these mirror them into the
/// registry when `/metrics` is read, so the cache's hot path pays for one atomic add, not two.
struct CacheMetrics {
    /// Lookups by `result`: hit, miss, bypass, refresh.
    lookups: IntCounterVec,
    /// Entries that left by `reason`: size (evicted for the byte bound), expired.
    removals: IntCounterVec,
    inserts: IntCounter,
    /// Requests that waited for an identical one by `result`: answered, timed_out.
    coalesced: IntCounterVec,
    /// Complete responses not stored for being over `max_entry`.
    too_large: IntCounter,
    /// Shared tier operations by `op`: hit, write, error.
    shared: IntCounterVec,
    entries: IntGauge,
    bytes: IntGauge,
    max_bytes: IntGauge,
    /// Two scrapes at once must not both add the same difference.
    mirroring: std::sync::Mutex<()>,
}

impl CacheMetrics {
    fn new(make: &Maker) -> Self {
        Self {
            lookups: make.counters(
                "sluice_cache_lookups_total",
                "Cache lookups by result (hit, miss, bypass, refresh).",
                &["result"],
            ),
            removals: make.counters(
                "sluice_cache_removals_total",
                "Cache entries removed, by reason (size, expired).",
                &["reason"],
            ),
            inserts: make.counter("sluice_cache_inserts_total", "Responses stored in the cache."),
            coalesced: make.counters(
                "sluice_cache_coalesced_total",
                "Requests that waited for an identical request's answer, by result (answered, timed_out).",
                &["result"],
            ),
            too_large: make.counter(
                "sluice_cache_too_large_total",
                "Complete responses not stored for being larger than max_entry.",
            ),
            shared: make.counters(
                "sluice_cache_shared_total",
                "Shared (Redis) cache tier operations by op (hit, write, error).",
                &["op"],
            ),
            entries: make.gauge("sluice_cache_entries", "Entries in the local cache."),
            bytes: make.gauge("sluice_cache_bytes", "Bytes held by the local cache."),
            max_bytes: make.gauge("sluice_cache_max_bytes", "The local cache's byte bound."),
            mirroring: std::sync::Mutex::new(()),
        }
    }

    fn mirror(&self, stats: &CacheStats) {
        let _one_at_a_time = self
            .mirroring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The cache's counters only grow, so the difference is what happened since last scrape.
        let follow = |counter: &IntCounter, value: u64| {
            counter.inc_by(value.saturating_sub(counter.get()));
        };
        for (result, value) in [
            ("hit", stats.hits),
            ("miss", stats.misses),
            ("bypass", stats.bypasses),
            ("refresh", stats.refreshes),
        ] {
            follow(&self.lookups.with_label_values(&[result]), value);
        }
        follow(&self.removals.with_label_values(&["size"]), stats.evictions);
        follow(
            &self.removals.with_label_values(&["expired"]),
            stats.expirations,
        );
        follow(&self.inserts, stats.inserts);
        let answered = stats
            .coalesced_waits
            .saturating_sub(stats.coalesced_timeouts);
        follow(&self.coalesced.with_label_values(&["answered"]), answered);
        follow(
            &self.coalesced.with_label_values(&["timed_out"]),
            stats.coalesced_timeouts,
        );
        follow(&self.too_large, stats.too_large);
        for (op, value) in [
            ("hit", stats.shared_hits),
            ("write", stats.shared_writes),
            ("error", stats.shared_errors),
        ] {
            follow(&self.shared.with_label_values(&[op]), value);
        }
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.entries.set(gauge(stats.entries));
        self.bytes.set(gauge(stats.bytes));
        self.max_bytes.set(gauge(stats.max_bytes));
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Makes metrics and registers each with the registry.
struct Maker<'a>(&'a Registry);

impl Maker<'_> {
    fn keep<C: Collector + Clone + 'static>(&self, collector: C) -> C {
        self.0
            .register(Box::new(collector.clone()))
            .expect("metric names are unique");
        collector
    }

    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.keep(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.keep(IntCounter::new(name, help).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.keep(IntGauge::new(name, help).expect("valid metric"))
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.keep(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn histograms(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.keep(HistogramVec::new(opts, labels).expect("valid metric"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let make = Maker(&registry);
        let filters = FilterMetrics::default();
        filters
            .register(&registry)
            .expect("metric names are unique");
        let reloads = make.counters(
            "sluice_policy_reloads_total",
            "Policy reloads by result.",
            &["result"],
        );
        for result in ["applied", "unchanged", "rejected"] {
            // Present from the start, so a rate over them has a zero to begin with.
            reloads.with_label_values(&[result]);
        }
        let forward = make.counters(
            "sluice_forward_total",
            "Forward-listener (HTTPS_PROXY) connections and requests by action.",
            &["action"],
        );
        Self {
            forward,
            requests: make.counters(
                "sluice_requests_total",
                "Requests by route, upstream, model, status, cache result, tier and tenant.",
                &[
                    "route", "upstream", "model", "status", "cache", "tier", "tenant",
                ],
            ),
            request_duration: make.histograms(
                "sluice_request_duration_seconds",
                "The whole exchange, as the caller sees it, by route and cache (hit, or empty).",
                &["route", "cache"],
                LATENCY_BUCKETS,
            ),
            overhead: make.histograms(
                "sluice_overhead_seconds",
                "Sluice's own time in an exchange (queueing and the upstream excluded).",
                &["route"],
                OVERHEAD_BUCKETS,
            ),
            queue_wait: make.histograms(
                "sluice_queue_wait_seconds",
                "Time a request waited in a limits queue.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            time_to_first_token: make.histograms(
                "sluice_time_to_first_token_seconds",
                "From the request to the first content of a stream.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            inter_token_gap: make.histograms(
                "sluice_inter_token_gap_seconds",
                "Gaps between a stream's content events.",
                &["route"],
                GAP_BUCKETS,
            ),
            output_tokens_per_second: make.histograms(
                "sluice_output_tokens_per_second",
                "Output tokens per second of generation.",
                &["route"],
                TOKENS_PER_SECOND_BUCKETS,
            ),
            upstream_first_byte: make.histograms(
                "sluice_upstream_first_byte_seconds",
                "From an upstream attempt's start to its response head.",
                &["upstream"],
                LATENCY_BUCKETS,
            ),
            upstream_connections: make.counters(
                "sluice_upstream_connections_total",
                "Upstream attempts by whether their connection was reused from the pool.",
                &["upstream", "reused"],
            ),
            upstream_connect: make.histograms(
                "sluice_upstream_connect_seconds",
                "Time to open a new upstream connection (TCP and TLS).",
                &["upstream"],
                LATENCY_BUCKETS,
            ),
            tokens: make.counters(
                "sluice_tokens_total",
                "Tokens reported by providers, by route, model, kind and tenant.",
                &["route", "model", "kind", "tenant"],
            ),
            cost_usd: make.keep(
                CounterVec::new(
                    Opts::new(
                        "sluice_cost_usd_total",
                        "USD spent, priced from the policy.",
                    ),
                    &["route", "model", "tenant"],
                )
                .expect("valid metric"),
            ),
            reloads,
            limits_store_up: make.gauges(
                "sluice_limits_store_up",
                "Whether the limits store answers (1) or not (0), by backend.",
                &["backend"],
            ),
            limits_settlements_pending: make.gauge(
                "sluice_limits_settlements_pending",
                "Failed Redis settlements waiting to be replayed.",
            ),
            limits_settlements_dropped: make.counter(
                "sluice_limits_settlements_dropped_total",
                "Failed Redis settlements dropped because too many were waiting.",
            ),
            settlements_dropped_seen: AtomicU64::new(0),
            upstream_attempts: make.counters(
                "sluice_upstream_attempts_total",
                "Upstream attempts by upstream and outcome.",
                &["upstream", "outcome"],
            ),
            upstream_retries: make.counters(
                "sluice_upstream_retries_total",
                "Attempts after a request's first, by the upstream they went to and kind.",
                &["upstream", "kind"],
            ),
            upstream_broke: make.counters(
                "sluice_upstream_broke_total",
                "Responses whose body broke after the head was sent, by upstream.",
                &["upstream"],
            ),
            retry_budget_exhausted: make.counters(
                "sluice_retry_budget_exhausted_total",
                "Retries not made because the upstream's retry budget was spent.",
                &["upstream"],
            ),
            hedges: make.counters(
                "sluice_hedges_total",
                "Hedged requests by route and result (launched, won).",
                &["route", "result"],
            ),
            key_cooldowns: make.counters(
                "sluice_key_cooldowns_total",
                "Provider keys rested after a 429.",
                &["upstream", "key"],
            ),
            keys_disabled: make.counters(
                "sluice_keys_disabled_total",
                "Provider keys disabled after a 401/403, until the next reload.",
                &["upstream", "key"],
            ),
            circuit_opens: make.counters(
                "sluice_circuit_opens_total",
                "Circuits opened, by upstream and key (empty for the upstream's own).",
                &["upstream", "key"],
            ),
            circuit_state: make.gauges(
                "sluice_circuit_state",
                "Circuit state: 0 closed, 1 half-open, 2 open.",
                &["upstream", "key"],
            ),
            sla_breaches: make.counters(
                "sluice_sla_breaches_total",
                "SLA rules broken.",
                &["rule"],
            ),
            sla_recoveries: make.counters(
                "sluice_sla_recoveries_total",
                "SLA rules healed after a breach.",
                &["rule"],
            ),
            sla_ok: make.gauges(
                "sluice_sla_ok",
                "Whether an SLA rule is met (1) or broken (0); absent until judged.",
                &["rule"],
            ),
            spans: ExportCounters {
                dropped: make.counter(
                    "sluice_otlp_spans_dropped_total",
                    "Finished spans dropped because the export queue was full.",
                ),
                exported: make.counter(
                    "sluice_otlp_spans_exported_total",
                    "Spans the collector accepted.",
                ),
                failed: make.counter(
                    "sluice_otlp_spans_failed_total",
                    "Spans whose export failed (collector unreachable or refusing).",
                ),
            },
            cache: CacheMetrics::new(&make),
            filters,
            registry,
        }
    }
}

/// A route's histograms, resolved once per policy so a request does not look them up.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// Exchanges not answered from the cache.
    pub duration: Histogram,
    /// Exchanges answered from the cache.
    pub cache_hit_duration: Histogram,
    pub overhead: Histogram,
    pub queue_wait: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_gap: Histogram,
    pub output_tokens_per_second: Histogram,
}

impl Metrics {
    pub fn for_route(&self, route: &str) -> RouteMetrics {
        let labels = [route];
        RouteMetrics {
            duration: self.request_duration.with_label_values(&[route, ""]),
            cache_hit_duration: self.request_duration.with_label_values(&[route, "hit"]),
            overhead: self.overhead.with_label_values(&labels),
            queue_wait: self.queue_wait.with_label_values(&labels),
            time_to_first_token: self.time_to_first_token.with_label_values(&labels),
            inter_token_gap: self.inter_token_gap.with_label_values(&labels),
            output_tokens_per_second: self.output_tokens_per_second.with_label_values(&labels),
        }
    }

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
        let (pending, dropped) = policy.redis.as_ref().map_or((0, 0), |redis| {
            (redis.pending_settlements(), redis.dropped_settlements())
        });
        self.limits_settlements_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        // A new store (changed Redis settings) counts from zero again.
        let seen = self
            .settlements_dropped_seen
            .swap(dropped, Ordering::Relaxed);
        self.limits_settlements_dropped
            .inc_by(dropped.saturating_sub(seen));
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
        self.cache.mirror(&policy.cache.stats());
        let mut text = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            tracing::error!("encoding metrics failed: {e}");
        }
        text
    }
}
