//! What Sluice remembers about an upstream or a provider key between requests: circuit
//! breakers, retry budgets, latency. It lives outside the compiled policy (in the
//! [`HealthRegistry`]), so a reload does not forget that an upstream is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::telemetry::rolling::{now_ms, RollingCounts, RollingHistogram};

/// When a circuit opens and how it heals (the policy's `circuit_breaker`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    pub enabled: bool,
    /// Opens after this many failures in a row…
    pub consecutive_failures: u32,
    /// …or when at least `min_requests` were seen in `window` and this share of them failed.
    pub error_ratio: f64,
    pub min_requests: u32,
    pub window: Duration,
    /// How long it stays open before letting probes through.
    pub open_for: Duration,
    /// Requests let through at once while half-open; one success closes it.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 5,
            error_ratio: 0.5,
            min_requests: 20,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(15),
            half_open_probes: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open { until_ms: u64 },
    HalfOpen { probes: u32 },
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open { .. } => "open",
            CircuitState::HalfOpen { .. } => "half_open",
        }
    }

    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn level(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen { .. } => 1,
            CircuitState::Open { .. } => 2,
        }
    }
}

/// A circuit breaker: closed (all pass), open (none pass, until `open_for` has gone by),
/// half-open (a few probes pass; a success closes it, a failure opens it again).
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<CircuitState>,
    consecutive: AtomicU32,
    /// Successes (0) and failures (1) in the window.
    outcomes: RollingCounts,
    /// Times it opened, for metrics.
    pub opened: AtomicU64,
}

/// Leave to send one request through a breaker. Report how it went with `success` or
/// `failure`; dropped without a report (the caller left), it frees its probe place.
#[derive(Debug)]
pub struct Permit {
    breaker: Option<Arc<CircuitBreaker>>,
    probe: bool,
}

impl Permit {
    /// For a disabled breaker: passes, records nothing.
    pub fn unchecked() -> Self {
        Self {
            breaker: None,
            probe: false,
        }
    }

    pub fn success(mut self) {
        if let Some(breaker) = self.breaker.take() {
            breaker.on_success();
        }
    }

    /// Whether this failure opened the circuit.
    pub fn failure(mut self, settings: &BreakerSettings) -> bool {
        self.breaker
            .take()
            .is_some_and(|breaker| breaker.on_failure(settings))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let (Some(breaker), true) = (self.breaker.take(), self.probe) {
            let mut state = breaker.lock();
            if let CircuitState::HalfOpen { probes } = &mut *state {
                *probes = probes.saturating_sub(1);
            }
        }
    }
}

impl CircuitBreaker {
    pub fn new(settings: &BreakerSettings) -> Self {
        Self {
            state: Mutex::new(CircuitState::Closed),
            consecutive: AtomicU32::new(0),
            outcomes: RollingCounts::new(settings.window),
            opened: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CircuitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> CircuitState {
        *self.lock()
    }

    /// Leave to send a request, or `Err(how long until it may be asked again)`.
    pub fn try_acquire(self: &Arc<Self>, settings: &BreakerSettings) -> Result<Permit, Duration> {
        if !settings.enabled {
            return Ok(Permit::unchecked());
        }
        let mut state = self.lock();
        let now = now_ms();
        match *state {
            CircuitState::Closed => Ok(Permit {
                breaker: Some(self.clone()),
                probe: false,
            }),
            CircuitState::Open { until_ms } if now < until_ms => {
                Err(Duration::from_millis(until_ms - now))
            }
            CircuitState::Open { .. } => {
                *state = CircuitState::HalfOpen { probes: 1 };
                Ok(Permit {
                    breaker: Some(self.clone()),
                    probe: true,
                })
            }
            CircuitState::HalfOpen { probes } if probes < settings.half_open_probes => {
                *state = CircuitState::HalfOpen { probes: probes + 1 };
                Ok(Permit {
                    breaker: Some(self.clone()),
                    probe: true,
                })
            }
            // Probes are out; ask again shortly.
            CircuitState::HalfOpen { .. } => Err(Duration::from_secs(1)),
        }
    }

    fn on_success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.outcomes.add(0, now_ms());
        let mut state = self.lock();
        if matches!(*state, CircuitState::HalfOpen { .. }) {
            *state = CircuitState::Closed;
        }
    }

    /// A failure, also one seen after the permit was spent (a stream that broke midway);
    /// whether it opened the circuit.
    pub fn on_failure(&self, settings: &BreakerSettings) -> bool {
        if !settings.enabled {
            return false;
        }
        let now = now_ms();
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        self.outcomes.add(1, now);
        let mut state = self.lock();
        let trips = match *state {
            CircuitState::HalfOpen { .. } => true,
            CircuitState::Open { .. } => false,
            CircuitState::Closed => {
                let [ok, failed] = self.outcomes.totals(now);
                let seen = ok + failed;
                consecutive >= settings.consecutive_failures
                    || (seen >= u64::from(settings.min_requests)
                        && failed as f64 >= settings.error_ratio * seen as f64)
            }
        };
        if trips {
            *state = CircuitState::Open {
                until_ms: now + settings.open_for.as_millis() as u64,
            };
            self.opened.fetch_add(1, Ordering::Relaxed);
            self.consecutive.store(0, Ordering::Relaxed);
        }
        trips
    }
}

/// How many retries an upstream's requests may cause (the policy's `retry_budget`): over the
/// window, retries ≤ `ratio` × requests + `min_per_second` × window seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetSettings {
    pub ratio: f64,
    pub min_per_second: f64,
    pub window: Duration,
}

impl Default for RetryBudgetSettings {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 1.0,
            window: Duration::from_secs(10),
        }
    }
}

/// Requests (0) and retries (1) over the window, so an outage cannot multiply traffic.
#[derive(Debug)]
pub struct RetryBudget {
    counts: RollingCounts,
}

impl RetryBudget {
    pub fn new(settings: &RetryBudgetSettings) -> Self {
        Self {
            counts: RollingCounts::new(settings.window),
        }
    }

    pub fn request(&self) {
        self.counts.add(0, now_ms());
    }

    /// Takes one retry from the budget, if one is left.
    pub fn try_retry(&self, settings: &RetryBudgetSettings) -> bool {
        let now = now_ms();
        let [requests, retries] = self.counts.totals(now);
        let allowed = settings.ratio * requests as f64
            + settings.min_per_second * settings.window.as_secs_f64();
        if (retries as f64) < allowed.floor() {
            self.counts.add(1, now);
            true
        } else {
            false
        }
    }
}

/// The health of one upstream.
#[derive(Debug)]
pub struct UpstreamHealth {
    pub breaker: Arc<CircuitBreaker>,
    pub retry_budget: RetryBudget,
    /// Time to the response head of recent attempts (for hedging after the running p95).
    pub first_byte: RollingHistogram,
}

/// The health of one provider key.
#[derive(Debug)]
pub struct KeyHealth {
    pub breaker: Arc<CircuitBreaker>,
    /// Until when (in [`now_ms`] time) the key rests after a 429; 0 when it does not.
    pub cooling_until_ms: AtomicU64,
    /// Requests using the key right now (open streams included).
    pub in_flight: AtomicU32,
    pub cooldowns: AtomicU64,
}

/// Window of the first-byte latencies hedging reads its p95 from.
const FIRST_BYTE_WINDOW: Duration = Duration::from_secs(60);

/// Health by identity, shared by every policy: an upstream by its name and address, a key by
/// its upstream and a hash of its value. A reload that keeps them keeps their health.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    upstreams: Mutex<HashMap<String, Arc<UpstreamHealth>>>,
    keys: Mutex<HashMap<String, Arc<KeyHealth>>>,
}

impl HealthRegistry {
    pub fn upstream(
        &self,
        identity: &str,
        breaker: &BreakerSettings,
        budget: &RetryBudgetSettings,
    ) -> Arc<UpstreamHealth> {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        upstreams
            .entry(identity.to_owned())
            .or_insert_with(|| {
                Arc::new(UpstreamHealth {
                    breaker: Arc::new(CircuitBreaker::new(breaker)),
                    retry_budget: RetryBudget::new(budget),
                    first_byte: RollingHistogram::new(FIRST_BYTE_WINDOW),
                })
            })
            .clone()
    }

    pub fn key(&self, identity: &str, breaker: &BreakerSettings) -> Arc<KeyHealth> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.entry(identity.to_owned())
            .or_insert_with(|| {
                Arc::new(KeyHealth {
                    breaker: Arc::new(CircuitBreaker::new(breaker)),
                    cooling_until_ms: AtomicU64::new(0),
                    in_flight: AtomicU32::new(0),
                    cooldowns: AtomicU64::new(0),
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            open_for: Duration::from_millis(50),
            ..BreakerSettings::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_and_closes() {
        let settings = settings();
        let breaker = Arc::new(CircuitBreaker::new(&settings));
        for _ in 0..3 {
            breaker.try_acquire(&settings).unwrap().failure(&settings);
        }
        assert!(matches!(breaker.state(), CircuitState::Open { .. }));
        assert!(breaker.try_acquire(&settings).is_err());
        std::thread::sleep(Duration::from_millis(60));
        let probe = breaker.try_acquire(&settings).unwrap();
        assert!(
            breaker.try_acquire(&settings).is_err(),
            "one probe at a time"
        );
        probe.success();
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(breaker.opened.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_a_dropped_one_frees_its_place() {
        let settings = settings();
        let breaker = Arc::new(CircuitBreaker::new(&settings));
        for _ in 0..3 {
            breaker.try_acquire(&settings).unwrap().failure(&settings);
        }
        std::thread::sleep(Duration::from_millis(60));
        drop(breaker.try_acquire(&settings).unwrap());
        let probe = breaker.try_acquire(&settings).expect("the place was freed");
        probe.failure(&settings);
        assert!(matches!(breaker.state(), CircuitState::Open { .. }));
    }

    #[test]
    fn a_success_resets_the_run_of_failures() {
        let settings = BreakerSettings {
            error_ratio: 0.9,
            ..settings()
        };
        let breaker = Arc::new(CircuitBreaker::new(&settings));
        for _ in 0..10 {
            breaker.try_acquire(&settings).unwrap().failure(&settings);
            breaker.try_acquire(&settings).unwrap().failure(&settings);
            breaker.try_acquire(&settings).unwrap().success();
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[test]
    fn a_high_error_ratio_opens_it_once_enough_requests_were_seen() {
        let settings = BreakerSettings {
            consecutive_failures: 100,
            ..settings()
        };
        let breaker = Arc::new(CircuitBreaker::new(&settings));
        let mut seen = 0;
        while let Ok(permit) = breaker.try_acquire(&settings) {
            if seen % 2 == 0 {
                permit.failure(&settings);
            } else {
                permit.success();
            }
            seen += 1;
            assert!(seen < 100, "never opened");
        }
        // Not before `min_requests` (20): the first failure after them.
        assert_eq!(seen, 21);
    }

    #[test]
    fn a_disabled_breaker_never_opens() {
        let settings = BreakerSettings {
            enabled: false,
            ..settings()
        };
        let breaker = Arc::new(CircuitBreaker::new(&settings));
        for _ in 0..10 {
            breaker.try_acquire(&settings).unwrap().failure(&settings);
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[test]
    fn the_retry_budget_is_a_share_of_requests() {
        let settings = RetryBudgetSettings {
            ratio: 0.2,
            min_per_second: 0.0,
            window: Duration::from_secs(10),
        };
        let budget = RetryBudget::new(&settings);
        for _ in 0..50 {
            budget.request();
        }
        let granted = (0..50).filter(|_| budget.try_retry(&settings)).count();
        assert_eq!(granted, 10);
    }
}
