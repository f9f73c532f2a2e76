//! An upstream's provider keys: chosen by smooth weighted round robin among those that may serve
//! the request — allowed for its model, not resting after a 429, not disabled by a 401/403,
//! under their concurrency cap, their circuit not open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use sluice_filters::glob::Glob;

use super::health::{BreakerSettings, KeyHealth, Permit};
use crate::telemetry::rolling::now_ms;

pub struct ProviderKey {
    /// For people (admin, logs, metrics): the policy's `name`, or `#<position>`.
    pub name: Arc<str>,
    /// The credential header's value, marked sensitive.
    pub credential: HeaderValue,
    pub weight: u32,
    /// Models (globs) this key may serve; empty: any.
    pub models: Vec<Glob>,
    pub max_concurrent: Option<u32>,
    /// Set by a 401/403 from the provider; only a reload (a new pool) clears it.
    disabled: AtomicBool,
    pub health: Arc<KeyHealth>,
}

impl std::fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderKey")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("max_concurrent", &self.max_concurrent)
            .finish_non_exhaustive()
    }
}

impl ProviderKey {
    pub fn new(
        name: Arc<str>,
        credential: HeaderValue,
        weight: u32,
        models: Vec<Glob>,
        max_concurrent: Option<u32>,
        health: Arc<KeyHealth>,
    ) -> Self {
        Self {
            name,
            credential,
            weight,
            models,
            max_concurrent,
            disabled: AtomicBool::new(false),
            health,
        }
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    /// Disables the key until the next reload; whether it was enabled until now.
    pub fn disable(&self) -> bool {
        !self.disabled.swap(true, Ordering::Relaxed)
    }

    /// Rests the key for `duration` (a 429).
    pub fn cool_down(&self, duration: Duration) {
        let until = now_ms() + duration.as_millis() as u64;
        self.health
            .cooling_until_ms
            .fetch_max(until, Ordering::Relaxed);
        self.health.cooldowns.fetch_add(1, Ordering::Relaxed);
    }

    /// How long the key still rests, if it does.
    pub fn cooling_for(&self) -> Option<Duration> {
        let until = self.health.cooling_until_ms.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    fn serves(&self, model: Option<&str>) -> bool {
        self.models.is_empty() || model.is_some_and(|m| self.models.iter().any(|g| g.matches(m)))
    }
}

/// Why no key of an upstream can take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoKey {
    /// Every key that could serve it rests after a 429 (or its circuit is open); the first is
    /// back after this long.
    Resting(Duration),
    /// Every key that could serve it is at its concurrency cap.
    AtCapacity,
    /// Every key that could serve it was disabled by a 401/403.
    Disabled,
    /// No key may serve this model.
    ModelNotAllowed,
}

/// A key in use by one request: its place under the concurrency cap, and its circuit permit.
/// Dropping it gives the place back.
#[derive(Debug)]
pub struct KeyLease {
    pub index: usize,
    health: Arc<KeyHealth>,
    pub permit: Option<Permit>,
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.health.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The keys of one upstream, and the smooth weighted round robin over them (nginx's: each
/// pick adds every eligible key's weight to its score, takes the highest, and takes the total
/// from the winner — weights 3:1 give a a b a a a b a, never bunched).
#[derive(Debug, Default)]
pub struct KeyPool {
    keys: Vec<ProviderKey>,
    scores: Mutex<Vec<i64>>,
}

impl KeyPool {
    pub fn new(keys: Vec<ProviderKey>) -> Self {
        let scores = Mutex::new(vec![0; keys.len()]);
        Self { keys, scores }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[ProviderKey] {
        &self.keys
    }

    pub fn get(&self, index: usize) -> &ProviderKey {
        &self.keys[index]
    }

    /// A key for a request for `model`.
    pub fn pick(&self, model: Option<&str>, breaker: &BreakerSettings) -> Result<KeyLease, NoKey> {
        let mut scores = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        let mut excluded = vec![false; self.keys.len()];
        let mut why = NoKey::ModelNotAllowed;
        let mut note = |reason: NoKey| {
            // The most hopeful reason wins: resting keys come back, disabled ones do not.
            why = match (why, reason) {
                (NoKey::Resting(a), NoKey::Resting(b)) => NoKey::Resting(a.min(b)),
                (NoKey::Resting(a), _) | (_, NoKey::Resting(a)) => NoKey::Resting(a),
                (NoKey::AtCapacity, _) | (_, NoKey::AtCapacity) => NoKey::AtCapacity,
                (_, other) => other,
            };
        };
        for (i, key) in self.keys.iter().enumerate() {
            if !key.serves(model) {
                excluded[i] = true;
            } else if key.is_disabled() {
                excluded[i] = true;
                note(NoKey::Disabled);
            } else if let Some(rest) = key.cooling_for() {
                excluded[i] = true;
                note(NoKey::Resting(rest));
            }
        }
        loop {
            let mut total = 0i64;
            let mut best: Option<usize> = None;
            for (i, key) in self.keys.iter().enumerate() {
                if excluded[i] {
                    continue;
                }
                scores[i] += i64::from(key.weight);
                total += i64::from(key.weight);
                if best.is_none_or(|b| scores[i] > scores[b]) {
                    best = Some(i);
                }
            }
            let Some(chosen) = best else {
                return Err(why);
            };
            scores[chosen] -= total;
            let key = &self.keys[chosen];
            let cap = key.max_concurrent.unwrap_or(u32::MAX);
            let placed = key
                .health
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < cap).then_some(n + 1)
                })
                .is_ok();
            if !placed {
                excluded[chosen] = true;
                note(NoKey::AtCapacity);
                continue;
            }
            let mut lease = KeyLease {
                index: chosen,
                health: key.health.clone(),
                permit: None,
            };
            match key.health.breaker.try_acquire(breaker) {
                Ok(permit) => {
                    lease.permit = Some(permit);
                    return Ok(lease);
                }
                // Dropping the lease gives the place back.
                Err(rest) => {
                    excluded[chosen] = true;
                    note(NoKey::Resting(rest));
                }
            }
        }
    }
}

/// How long a provider asks to be left alone after a 429 or 503: `retry-after-ms`,
/// `retry-after` (seconds or an HTTP date), else — for a 429 (`rate_limited`) only — OpenAI's
/// `x-ratelimit-reset-*` of the limit that ran out (`6m0s`, `20ms`), else Anthropic's
/// `anthropic-ratelimit-*-reset` (RFC 3339). On other statuses those headers only report the
/// key's quota; read as a pause they could end a request that a fallback would serve.
pub fn backoff_asked(headers: &HeaderMap, rate_limited: bool) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    if let Some(value) = text("retry-after") {
        if let Ok(secs) = value.trim().parse::<f64>() {
            return Some(Duration::from_secs_f64(secs.max(0.0)));
        }
        if let Ok(at) = httpdate_to_system(value) {
            return Some(at.duration_since(SystemTime::now()).unwrap_or_default());
        }
    }
    if !rate_limited {
        return None;
    }
    let mut longest: Option<Duration> = None;
    for kind in ["requests", "tokens"] {
        // The limit that ran out names itself with a zero; without a count at all, the reset
        // is the only word the provider gave, so it is taken (as for Anthropic's below).
        let exhausted =
            text(&format!("x-ratelimit-remaining-{kind}")).is_none_or(|v| v.trim() == "0");
        if let Some(reset) = text(&format!("x-ratelimit-reset-{kind}")).and_then(parse_reset) {
            if exhausted {
                longest = longest.max(Some(reset));
            }
        }
        let anthropic = format!("anthropic-ratelimit-{kind}-reset");
        if let Some(at) = text(&anthropic).and_then(|v| humantime::parse_rfc3339(v).ok()) {
            let remaining = text(&format!("anthropic-ratelimit-{kind}-remaining"));
            if remaining.is_none_or(|v| v.trim() == "0") {
                let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                longest = longest.max(Some(wait));
            }
        }
    }
    longest
}

fn httpdate_to_system(value: &str) -> Result<SystemTime, humantime::TimestampError> {
    // `Wed, 21 Oct 2015 07:28:00 GMT` (IMF-fixdate) → RFC 3339 for humantime.
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return humantime::parse_rfc3339("invalid");
    };
    let month = match *month {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => 0,
    };
    humantime::parse_rfc3339(&format!("{year}-{month:02}-{day:0>2}T{time}Z"))
}

/// OpenAI's reset durations: `1s`, `6m0s`, `20ms`, `1.5s`, `1h2m3s`.
fn parse_reset(text: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * factor;
        rest = &rest[unit..];
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::health::HealthRegistry;

    fn pool(specs: &[(&str, u32, &[&str], Option<u32>)]) -> KeyPool {
        let registry = HealthRegistry::default();
        KeyPool::new(
            specs
                .iter()
                .map(|(name, weight, models, cap)| {
                    ProviderKey::new(
                        (*name).into(),
                        HeaderValue::from_static("x"),
                        *weight,
                        models.iter().map(|m| Glob::new(m)).collect(),
                        *cap,
                        registry.key(name, &BreakerSettings::default()),
                    )
                })
                .collect(),
        )
    }

    fn names(pool: &KeyPool, model: Option<&str>, n: usize) -> String {
        (0..n)
            .map(|_| {
                let lease = pool.pick(model, &BreakerSettings::default()).unwrap();
                pool.get(lease.index).name.to_string()
            })
            .collect()
    }

    #[test]
    fn weights_spread_picks_smoothly() {
        let pool = pool(&[("a", 3, &[], None), ("b", 1, &[], None)]);
        assert_eq!(names(&pool, None, 8), "aabaaaba");
    }

    #[test]
    fn keys_serve_only_their_models() {
        let pool = pool(&[
            ("a", 1, &["gpt-4o-mini"], None),
            ("b", 1, &["claude-*"], None),
        ]);
        assert_eq!(names(&pool, Some("gpt-4o-mini"), 3), "aaa");
        assert_eq!(names(&pool, Some("claude-3"), 2), "bb");
        assert_eq!(
            pool.pick(Some("o1"), &BreakerSettings::default())
                .unwrap_err(),
            NoKey::ModelNotAllowed
        );
        assert_eq!(
            pool.pick(None, &BreakerSettings::default()).unwrap_err(),
            NoKey::ModelNotAllowed
        );
    }

    #[test]
    fn resting_disabled_and_full_keys_are_passed_over() {
        let pool = pool(&[("a", 5, &[], None), ("b", 1, &[], Some(1))]);
        pool.get(0).cool_down(Duration::from_secs(30));
        let held = pool.pick(None, &BreakerSettings::default()).unwrap();
        assert_eq!(pool.get(held.index).name.as_ref(), "b");
        // b is at its cap while held; a rests: the answer says when a returns.
        match pool.pick(None, &BreakerSettings::default()) {
            Err(NoKey::Resting(rest)) => assert!(rest > Duration::from_secs(29)),
            other => panic!("{other:?}"),
        }
        drop(held);
        assert!(pool.get(1).disable());
        assert!(!pool.get(1).disable(), "disabled once");
        assert!(matches!(
            pool.pick(None, &BreakerSettings::default()),
            Err(NoKey::Resting(_))
        ));
        let only_disabled = self::pool(&[("c", 1, &[], None)]);
        only_disabled.get(0).disable();
        assert_eq!(
            only_disabled
                .pick(None, &BreakerSettings::default())
                .unwrap_err(),
            NoKey::Disabled
        );
    }

    #[test]
    fn a_key_whose_circuit_is_open_is_passed_over() {
        let pool = pool(&[("a", 10, &[], None), ("b", 1, &[], None)]);
        let settings = BreakerSettings {
            consecutive_failures: 1,
            ..BreakerSettings::default()
        };
        assert!(pool.get(0).health.breaker.on_failure(&settings), "a opens");
        // a outweighs b ten to one, yet b serves every pick while a's circuit is open.
        assert_eq!(names(&pool, None, 5), "bbbbb");
        let only_a = self::pool(&[("a", 1, &[], None)]);
        only_a.get(0).health.breaker.on_failure(&settings);
        match only_a.pick(None, &settings) {
            Err(NoKey::Resting(rest)) => assert!(rest > Duration::from_secs(14), "{rest:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn concurrency_caps_hold_and_leases_give_places_back() {
        let pool = pool(&[("a", 1, &[], Some(2))]);
        let first = pool.pick(None, &BreakerSettings::default()).unwrap();
        let _second = pool.pick(None, &BreakerSettings::default()).unwrap();
        assert_eq!(
            pool.pick(None, &BreakerSettings::default()).unwrap_err(),
            NoKey::AtCapacity
        );
        drop(first);
        assert!(pool.pick(None, &BreakerSettings::default()).is_ok());
    }

    #[test]
    fn provider_backoff_headers_are_read() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            map
        };
        assert_eq!(
            backoff_asked(&headers(&[("retry-after", "7")]), false),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            backoff_asked(&headers(&[("retry-after-ms", "250")]), true),
            Some(Duration::from_millis(250))
        );
        let openai = headers(&[
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(backoff_asked(&openai, true), Some(Duration::from_secs(360)));
        let reset_only = headers(&[("x-ratelimit-reset-requests", "20s")]);
        assert_eq!(
            backoff_asked(&reset_only, true),
            Some(Duration::from_secs(20))
        );
        // On a 503 the same header reports the key's quota, not a pause for the request.
        assert_eq!(backoff_asked(&openai, false), None);
        assert_eq!(backoff_asked(&reset_only, false), None);
        let not_exhausted = headers(&[
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "20s"),
        ]);
        assert_eq!(backoff_asked(&not_exhausted, true), None);
        let date = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(90));
        let anthropic = headers(&[("anthropic-ratelimit-requests-reset", &date.to_string())]);
        let wait = backoff_asked(&anthropic, true).unwrap();
        assert!(wait > Duration::from_secs(80) && wait <= Duration::from_secs(90));
        assert_eq!(backoff_asked(&headers(&[]), true), None);
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_reset("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_reset("soon"), None);
        let far = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(
            backoff_asked(&far, true),
            Some(Duration::ZERO),
            "a past date"
        );
    }
}
