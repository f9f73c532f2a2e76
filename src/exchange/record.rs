//! What an exchange leaves behind: its request span (GenAI attributes), the `server-timing`
//! header, Prometheus metrics, rolling statistics and the access log line.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use opentelemetry::trace::{Span as _, SpanContext, Status};
use opentelemetry::KeyValue;
use sluice_filters::{CacheStatus, Exchange, Outcome};

use crate::policy::{Policy, Route};
use crate::telemetry::stats::Sample;
use crate::telemetry::traces::{Span, Tracer};
use crate::telemetry::Metrics;
use crate::upstream::ProviderKind;

/// The most of a request or response body the access log keeps, when it logs bodies.
pub const LOGGED_BODY_LIMIT: usize = 64 * 1024;

/// The response text kept for the access log (`telemetry.access_log.bodies`).
#[derive(Clone)]
pub struct LoggedResponse(pub Bytes);

/// The GenAI operation a request path names (`gen_ai.operation.name`).
pub fn operation(path: &str) -> Option<&'static str> {
    let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
    if path.ends_with("/chat/completions")
        || path.ends_with("/messages")
        || path.ends_with("/converse")
        || path.ends_with("/converse-stream")
        || path.ends_with("/responses")
    {
        Some("chat")
    } else if path.ends_with("/completions")
        || path.ends_with("/invoke")
        || path.ends_with("/invoke-with-response-stream")
    {
        Some("text_completion")
    } else if path.ends_with("/embeddings") {
        Some("embeddings")
    } else {
        None
    }
}

/// `http.request.method`: the usual methods as static text, without an allocation.
fn method_name(method: &http::Method) -> opentelemetry::Value {
    use http::Method;
    match *method {
        Method::POST => "POST".into(),
        Method::GET => "GET".into(),
        Method::PUT => "PUT".into(),
        Method::DELETE => "DELETE".into(),
        Method::HEAD => "HEAD".into(),
        Method::OPTIONS => "OPTIONS".into(),
        Method::PATCH => "PATCH".into(),
        _ => method.to_string().into(),
    }
}

/// `gen_ai.system` for a provider.
pub fn gen_ai_system(provider: ProviderKind) -> &'static str {
    match provider {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => "openai",
        ProviderKind::AzureOpenai => "azure.ai.openai",
        ProviderKind::Anthropic => "anthropic",
        ProviderKind::Bedrock => "aws.bedrock",
    }
}

/// A span's name after the GenAI conventions: `{operation} {model}`, else method and route.
pub fn span_name(ex: &Exchange) -> String {
    match (operation(ex.request.uri.path()), ex.facts.model.as_deref()) {
        (Some(operation), Some(model)) => format!("{operation} {model}"),
        (Some(operation), None) => operation.to_owned(),
        (None, _) => format!("{} {}", ex.request.method, ex.route),
    }
}

/// The request's server span, started when the request arrived.
pub fn start_span(
    tracer: &Tracer,
    ex: &Exchange,
    route: &Route,
    arrived: SystemTime,
) -> Option<Span> {
    let mut attributes = vec![
        KeyValue::new("http.request.method", method_name(&ex.request.method)),
        KeyValue::new("url.path", ex.request.uri.path().to_owned()),
        KeyValue::new("sluice.route", route.name.clone()),
        KeyValue::new("gen_ai.system", gen_ai_system(route.provider)),
    ];
    if let Some(operation) = operation(ex.request.uri.path()) {
        attributes.push(KeyValue::new("gen_ai.operation.name", operation));
    }
    if let Some(model) = &ex.facts.model {
        attributes.push(KeyValue::new("gen_ai.request.model", model.clone()));
    }
    if let Some(max_tokens) = ex.facts.max_tokens {
        attributes.push(KeyValue::new(
            "gen_ai.request.max_tokens",
            max_tokens as i64,
        ));
    }
    tracer.request_span(&ex.request, span_name(ex), arrived, attributes)
}

/// An upstream attempt's client span, under the request's.
pub fn attempt_span(
    tracer: &Tracer,
    parent: Option<&SpanContext>,
    ex: &Exchange,
    attempt: u32,
    launched: &super::attempts::Launched,
) -> Option<Span> {
    let parent = parent?;
    let upstream = &launched.target.upstream;
    let mut attributes = vec![
        KeyValue::new("gen_ai.system", gen_ai_system(upstream.provider)),
        KeyValue::new("server.address", upstream.host.clone()),
        KeyValue::new("server.port", i64::from(upstream.port)),
        KeyValue::new("sluice.upstream", upstream.name.clone()),
        KeyValue::new("sluice.attempt", i64::from(attempt)),
        KeyValue::new("sluice.hedge", launched.hedge),
    ];
    if let Some(operation) = operation(ex.request.uri.path()) {
        attributes.push(KeyValue::new("gen_ai.operation.name", operation));
    }
    if let Some(model) = &launched.model {
        attributes.push(KeyValue::new("gen_ai.request.model", model.clone()));
    }
    if let Some(lease) = &launched.lease {
        attributes.push(KeyValue::new(
            "sluice.key",
            upstream.keys.get(lease.index).name.clone(),
        ));
    }
    let name = match (operation(ex.request.uri.path()), launched.model.as_deref()) {
        (Some(operation), Some(model)) => format!("{operation} {model}"),
        _ => format!("{} {}", ex.request.method, upstream.name),
    };
    tracer.attempt_span(parent, name, attributes)
}

/// `server-timing` for a response head about to go out: Sluice's own time, the upstream's
/// (also when every attempt failed: that time was the provider's, not Sluice's) and, when an
/// answer comes whole, the time to its first token.
pub fn server_timing(ex: &Exchange, streamed: bool) -> Option<HeaderValue> {
    let mut timings = ex.timings;
    timings.head_sent = Some(Instant::now());
    let sluice = timings.overhead(ex.started)?;
    let mut text = String::with_capacity(64);
    push_metric(&mut text, "sluice;dur=", sluice);
    match timings.upstream() {
        Some(upstream) if !streamed && timings.upstream_head.is_some() => {
            push_metric(&mut text, ", upstream;dur=", upstream);
            push_metric(&mut text, ", ttft;dur=", upstream);
        }
        Some(upstream) => push_metric(&mut text, ", upstream;dur=", upstream),
        None => {
            if let Some(status) = ex.cache {
                text.push_str(", cache;desc=");
                text.push_str(status.as_str());
            }
        }
    }
    HeaderValue::try_from(text).ok()
}

/// `server-timing` for an answer made before any exchange began (no route, bad framing):
/// everything since the request arrived was Sluice's.
pub fn own_timing(started: Instant) -> Option<HeaderValue> {
    let mut text = String::with_capacity(24);
    push_metric(&mut text, "sluice;dur=", started.elapsed());
    HeaderValue::try_from(text).ok()
}

/// Appends `label` and a duration in milliseconds with three decimals (`1.234`), as
/// `server-timing` writes it: integer arithmetic on the microseconds, and no `format!`, because
/// formatting (floats first, then `fmt` itself) took more of the hot path than the rest of the
/// header (callgrind).
fn push_metric(text: &mut String, label: &str, duration: Duration) {
    // Rounded to the nearest microsecond, as `{:.3}` of the milliseconds would be.
    let micros = (duration.as_nanos() + 500) / 1000;
    text.push_str(label);
    text.push_str(itoa::Buffer::new().format(micros / 1000));
    let fraction = (micros % 1000) as u32;
    text.push('.');
    for digit in [fraction / 100, fraction / 10 % 10, fraction % 10] {
        text.push(char::from_digit(digit, 10).expect("a decimal digit"));
    }
}

/// Everything the exchange leaves behind once it is over.
pub fn finish(
    policy: &Policy,
    route: &Route,
    ex: &Exchange,
    span: Option<Span>,
    metrics: &Metrics,
) {
    let telemetry = &policy.telemetry;
    let ended = Instant::now();
    let total = ended.saturating_duration_since(ex.started);
    let timings = &ex.timings;
    let model = ex.served_model.as_deref().or(ex.facts.model.as_deref());
    let model_label = telemetry.models.label(model);
    let tenant_label = if telemetry.tenant_labels {
        ex.tenant.as_deref().unwrap_or("")
    } else {
        ""
    };
    let status = ex.status.map_or(0, |s| s.as_u16());
    let cache = ex.cache.map_or("", |c| c.as_str());
    metrics
        .requests
        .with_label_values(&[
            &*route.name,
            ex.upstream.as_deref().unwrap_or(""),
            model_label,
            ex.status.as_ref().map_or("0", http::StatusCode::as_str),
            cache,
            ex.tier.as_deref().unwrap_or(""),
            tenant_label,
        ])
        .inc();
    let route_metrics = &route.metrics;
    let hit = ex.cache == Some(CacheStatus::Hit);
    // A hit's latency is the cache's: kept apart from the upstream's in the histogram and the
    // rolling percentiles (and the SLA rules judged on them).
    if hit {
        route_metrics
            .cache_hit_duration
            .observe(total.as_secs_f64());
    } else {
        route_metrics.duration.observe(total.as_secs_f64());
    }
    if let Some(overhead) = timings.overhead(ex.started) {
        route_metrics.overhead.observe(overhead.as_secs_f64());
    }
    if !timings.queued.is_zero() {
        route_metrics
            .queue_wait
            .observe(timings.queued.as_secs_f64());
    }
    let ttft = timings
        .first_content
        .map(|first| first.saturating_duration_since(ex.started));
    if let Some(ttft) = ttft {
        route_metrics
            .time_to_first_token
            .observe(ttft.as_secs_f64());
    }
    let generation = match (timings.first_content, timings.last_content) {
        (Some(first), Some(last)) if timings.content_events > 1 => Some(last - first),
        _ => None,
    };
    let tokens_per_second = match (generation, ex.usage) {
        (Some(generation), Some(usage)) if !generation.is_zero() && usage.output_tokens > 0 => {
            Some(usage.output_tokens as f64 / generation.as_secs_f64())
        }
        _ => None,
    };
    if let Some(rate) = tokens_per_second {
        route_metrics.output_tokens_per_second.observe(rate);
    }
    let cost_usd = match (ex.usage, model) {
        (Some(usage), Some(model)) if ex.cache != Some(CacheStatus::Hit) => policy
            .prices
            .cost_micros(model, &usage)
            .map(|m| m as f64 / 1e6),
        _ => None,
    };
    // A hit costs the provider nothing: its tokens are not counted again.
    if let Some(usage) = ex.usage.filter(|_| ex.cache != Some(CacheStatus::Hit)) {
        for (kind, count) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            metrics
                .tokens
                .with_label_values(&[&route.name, model_label, kind, tenant_label])
                .inc_by(count);
        }
        if let Some(cost) = cost_usd {
            metrics
                .cost_usd
                .with_label_values(&[&route.name, model_label, tenant_label])
                .inc_by(cost);
        }
    }
    let failed = status >= 500 || ex.outcome == Outcome::UpstreamBroke;
    if hit {
        route.stats.record_cache_hit(total);
    } else {
        route.stats.record(Sample {
            first_byte: timings
                .head_sent
                .map(|head| head.saturating_duration_since(ex.started)),
            total,
            failed,
        });
    }
    if let Some(mut span) = span {
        annotate(&mut span, ex, model, cost_usd, status, failed);
        span.end();
    }
    log_exchange(policy, ex, total, ttft, cost_usd);
}

/// The request span's closing attributes: who answered, what it cost, how it ended.
fn annotate(
    span: &mut Span,
    ex: &Exchange,
    model: Option<&str>,
    cost_usd: Option<f64>,
    status: u16,
    failed: bool,
) {
    let mut attributes = vec![
        KeyValue::new("http.response.status_code", i64::from(status)),
        KeyValue::new("sluice.attempts", i64::from(ex.attempts)),
        KeyValue::new("sluice.outcome", ex.outcome.as_str()),
        KeyValue::new("gen_ai.request.stream", ex.facts.stream),
    ];
    // Only an answer has a response model: a failed request names the upstream it tried.
    let answered = ex.timings.upstream_head.is_some() || ex.cache == Some(CacheStatus::Hit);
    // The provider's own name for it when it gave one (e.g. a dated snapshot), else the one asked.
    let response_model = ex.response_model.as_deref().or(model);
    if let Some(model) = response_model.filter(|_| answered) {
        attributes.push(KeyValue::new("gen_ai.response.model", model.to_owned()));
    }
    if let Some(upstream) = &ex.upstream {
        attributes.push(KeyValue::new("sluice.upstream", upstream.clone()));
    }
    if let Some(tenant) = &ex.tenant {
        attributes.push(KeyValue::new("sluice.tenant", tenant.clone()));
    }
    if let Some(tier) = &ex.tier {
        attributes.push(KeyValue::new("sluice.tier", tier.clone()));
    }
    if let Some(cache) = ex.cache {
        attributes.push(KeyValue::new("sluice.cache", cache.as_str()));
    }
    if let Some(usage) = ex.usage {
        attributes.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            usage.input_tokens as i64,
        ));
        attributes.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            usage.output_tokens as i64,
        ));
    }
    if let Some(cost) = cost_usd {
        attributes.push(KeyValue::new("sluice.cost_usd", cost));
    }
    if !ex.timings.queued.is_zero() {
        attributes.push(KeyValue::new(
            "sluice.queued_ms",
            ex.timings.queued.as_secs_f64() * 1000.0,
        ));
    }
    if let Some(first) = ex.timings.first_content {
        span.add_event_with_timestamp(
            "gen_ai.first_token",
            SystemTime::now() - first.elapsed(),
            Vec::new(),
        );
    }
    if ex.outcome == Outcome::Refused && status == 429 {
        span.add_event("sluice.limited", Vec::new());
    }
    span.set_attributes(attributes);
    if failed {
        span.set_status(Status::error(ex.outcome.as_str()));
    }
}

/// One access log line per exchange, on the `sluice::access` target. Prompts and completions
/// only when the policy asks (`telemetry.access_log.bodies`).
fn log_exchange(
    policy: &Policy,
    ex: &Exchange,
    total: Duration,
    ttft: Option<Duration>,
    cost_usd: Option<f64>,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let timings = &ex.timings;
    let logged = |bytes: &[u8]| {
        String::from_utf8_lossy(&bytes[..bytes.len().min(LOGGED_BODY_LIMIT)]).into_owned()
    };
    let (request_body, response_body) = if policy.telemetry.log_bodies {
        let response = ex
            .extensions
            .get::<LoggedResponse>()
            .map(|logged_response| logged(&logged_response.0));
        (Some(logged(ex.body())), response)
    } else {
        (None, None)
    };
    tracing::info!(
        target: "sluice::access",
        route = %ex.route,
        method = %ex.request.method,
        path = ex.request.uri.path(),
        status = ex.status.map_or(0, |s| s.as_u16()),
        upstream = ex.upstream.as_deref().unwrap_or("-"),
        attempts = ex.attempts,
        model = ex.facts.model.as_deref().unwrap_or("-"),
        served_model = ex.served_model.as_deref().unwrap_or("-"),
        tenant = ex.tenant.as_deref().unwrap_or("-"),
        tier = ex.tier.as_deref().unwrap_or("-"),
        stream = ex.facts.stream,
        request_bytes = ex.body_len(),
        input_tokens = ex.usage.map(|u| u.input_tokens),
        output_tokens = ex.usage.map(|u| u.output_tokens),
        cost_usd,
        response_bytes = ex.response_bytes,
        outcome = ?ex.outcome,
        // hit | miss | bypass | refresh: hit durations are the cache's, not the upstream's.
        cache = ex.cache.map_or("-", |status| status.as_str()),
        duration_ms = ms(total),
        sluice_ms = timings.overhead(ex.started).map(ms),
        queued_ms = (!timings.queued.is_zero()).then(|| ms(timings.queued)),
        upstream_ms = timings.upstream().map(ms),
        ttft_ms = ttft.map(ms),
        connection_reused = timings.connection_reused,
        request_id = ex.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
        request_body,
        response_body,
    );
}

/// Counts a request refused before its exchange began (no route, bad framing, body too large
/// or too slow).
pub fn count_early_rejection(metrics: &Metrics, route: &str, status: http::StatusCode) {
    metrics
        .requests
        .with_label_values(&[route, "", "", status.as_str(), "", "", ""])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_have_three_rounded_decimals() {
        let text = |nanos: u64| {
            let mut text = String::new();
            push_metric(&mut text, "", Duration::from_nanos(nanos));
            text
        };
        assert_eq!(text(0), "0.000");
        assert_eq!(text(1_499), "0.001");
        assert_eq!(text(1_500), "0.002");
        assert_eq!(text(123_456_789), "123.457");
        assert_eq!(text(2_000_000_000), "2000.000");
        // The same text as formatting the float milliseconds, away from exact half-microseconds.
        for nanos in [7_321u64, 999_999, 41_000_400, 5_555_555_555] {
            let float = format!("{:.3}", Duration::from_nanos(nanos).as_secs_f64() * 1000.0);
            assert_eq!(text(nanos), float, "{nanos} ns");
        }
    }

    #[test]
    fn operations_follow_the_path() {
        assert_eq!(operation("/v1/chat/completions"), Some("chat"));
        assert_eq!(operation("/v1/messages?beta=true"), Some("chat"));
        assert_eq!(operation("/model/x/converse-stream"), Some("chat"));
        assert_eq!(operation("/v1/completions"), Some("text_completion"));
        assert_eq!(operation("/v1/embeddings"), Some("embeddings"));
        assert_eq!(operation("/v1/models"), None);
    }
}
