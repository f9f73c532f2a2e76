//! From the file a user wrote to the policy the proxy runs: every error collected, none fatal
//! until the end, so `sluice check` shows them all at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderName, HeaderValue, Uri};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};
use sluice_filters::auth::jwt::JwtMaterial;
use sluice_filters::auth::keys::{KeyHash, KEY_PREFIX};
use sluice_filters::auth::{Auth, AuthMode, AuthSpec, Directory};
use sluice_filters::cache::{CacheStore, RouteFacts};
use sluice_filters::glob::Glob;
use sluice_filters::limits::{
    warm_up_tokenizers, Backend, LimitTable, Limits, Prices, RedisCounters,
};
use sluice_filters::{BuildContext, Chain, Filter, FilterSpec, Stage};

use super::error::PolicyError;
use super::interpolate::interpolate;
use super::schema::{
    AwsCredentialsSpec, CircuitBreakerSpec, KeyEntrySpec, KeySpec, KeysFile, PolicyFile,
    ProviderKind, RouteSpec, SecretTemplate, StateBackend, TargetSpec, UpstreamSpec,
};
use super::{
    ListenAddrs, ModelLabels, ModelTargets, Policy, RedisSettings, RetryPolicy, Route,
    ServerRuntime, SharedState, Target, Targets, TelemetryPolicy,
};
use crate::telemetry::sla::SlaRule;
use crate::telemetry::traces::OtlpSettings;
use crate::upstream::health::{BreakerSettings, RetryBudgetSettings};
use crate::upstream::{
    bedrock_base_url, AwsCredentials, AzureSettings, KeyPool, ProviderKey, SigV4Signer, Upstream,
};

mod forward;
pub use forward::MissingCa;

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn compile_text(
    text: &str,
    source: &Path,
    env: Env,
    shared: &SharedState,
) -> Result<Policy, Vec<PolicyError>> {
    let file: PolicyFile = parse_document(text).map_err(|e| vec![located_parse_error(&e, text)])?;
    let mut errors = Vec::new();
    let mut sources = Sources::new(source, text);
    let directory = Arc::new(compile_directory(&file, &mut sources, &mut errors));
    let listen = ListenAddrs {
        proxy: socket_addr(&file.listen.proxy, "listen.proxy", &mut errors),
        admin: socket_addr(&file.listen.admin, "listen.admin", &mut errors),
        forward: file
            .listen
            .forward
            .as_ref()
            .map(|addr| socket_addr(addr, "listen.forward", &mut errors)),
    };
    if listen.proxy == listen.admin && listen.proxy.port() != 0 {
        errors.push(
            PolicyError::new("listen.admin", "must differ from listen.proxy")
                .at(file.listen.admin.referenced),
        );
    }
    if let (Some(forward), Some(spec)) = (listen.forward, &file.listen.forward) {
        if forward.port() != 0 && (forward == listen.proxy || forward == listen.admin) {
            errors.push(
                PolicyError::new(
                    "listen.forward",
                    "must differ from listen.proxy and listen.admin",
                )
                .at(spec.referenced),
            );
        }
    }
    let resolve = forward::compile_resolve(&file, &mut errors);
    let forward = forward::compile_forward(&file, shared, &mut sources, &mut errors);
    let server = ServerRuntime {
        threads: file.server.threads,
        drain_timeout: file.server.drain_timeout.0,
        upstream_pool_size: file.server.upstream_pool_size,
        upstream_idle_timeout: file.server.upstream_idle_timeout.0,
        client_body_timeout: file.server.client_body_timeout.0,
        max_header_bytes: file.server.max_header_bytes.0,
    };
    if server.threads == 0 {
        errors.push(PolicyError::new("server.threads", "must be at least 1"));
    }

    let telemetry = compile_telemetry(&file, env, &mut errors);
    let mut upstreams = BTreeMap::new();
    for (name, spec) in &file.upstreams {
        let path = format!("upstreams.{name}");
        let context = UpstreamContext {
            env,
            shared,
            stats_windows: &telemetry.stats_windows,
        };
        let upstream = compile_upstream(name, spec, &path, &context, &mut sources, &mut errors);
        if let Some(mut upstream) = upstream {
            upstream.address_override = resolve.get(&upstream.host, upstream.port);
            upstreams.insert(name.clone(), Arc::new(upstream));
        }
    }

    let redis = compile_state(&file, env, shared, &mut errors);
    let prices = compile_prices(&file, &mut errors);
    let limits = compile_limits(&file, &prices, shared, redis.clone(), &mut errors);
    let cache = compile_cache_store(&file, redis.as_ref(), shared, &mut errors);
    let context = RouteContext {
        upstreams: &upstreams,
        declared: &file.upstreams,
        directory: &directory,
        limits,
        cache: &cache,
        shared,
        stats_windows: &telemetry.stats_windows,
    };
    let mut routes = Vec::with_capacity(file.routes.len());
    let mut names = HashSet::new();
    for (index, spec) in file.routes.iter().enumerate() {
        let path = format!("routes[{index}]");
        if !names.insert(spec.value.name.as_str()) {
            errors.push(
                PolicyError::new(
                    &path,
                    format!("route name `{}` is used twice", spec.value.name),
                )
                .at(spec.referenced),
            );
        }
        if let Some(route) = compile_route(spec, &path, &context, &mut sources, &mut errors) {
            routes.push(route);
        }
    }
    if file.routes.is_empty() {
        errors.push(PolicyError::new(
            "routes",
            "no routes: every request would get 404",
        ));
    }

    let sla = compile_sla(&file, &routes, &upstreams, shared, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let (hash, watched) = sources.finish();
    let redacted = serde_json::value::to_raw_value(&file)
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
    Ok(Policy {
        hash,
        loaded_at: SystemTime::now(),
        source: source.to_path_buf(),
        listen,
        server,
        routes,
        upstreams,
        redacted,
        directory,
        watched,
        redis,
        cache,
        forward,
        resolve,
        telemetry,
        sla,
        prices,
    })
}

/// The price table (USD per million tokens), for budgets and the cost metrics.
fn compile_prices(file: &PolicyFile, errors: &mut Vec<PolicyError>) -> Arc<Prices> {
    let mut prices = Prices::default();
    for (model, price) in &file.prices {
        let valid = |usd: f64| usd.is_finite() && usd >= 0.0;
        if !(valid(price.input) && valid(price.output)) {
            errors.push(PolicyError::new(
                format!("prices.{model}"),
                "prices are non-negative USD per million tokens",
            ));
        }
        prices.add(model, *price);
    }
    Arc::new(prices)
}

/// `telemetry`: stats windows, the access log, OTLP settings, and the models metrics name.
fn compile_telemetry(
    file: &PolicyFile,
    env: Env,
    errors: &mut Vec<PolicyError>,
) -> TelemetryPolicy {
    let spec = &file.telemetry;
    let mut stats_windows: Vec<std::time::Duration> =
        spec.stats.windows.iter().map(|w| w.0).collect();
    if stats_windows.is_empty() || stats_windows.iter().any(|w| w.as_millis() < 10) {
        errors.push(PolicyError::new(
            "telemetry.stats.windows",
            "list at least one window, each at least 10ms",
        ));
    }
    // SLA rules are judged over their own windows: those are kept too.
    for rule in &spec.sla {
        if !stats_windows.contains(&rule.value.window.0) {
            stats_windows.push(rule.value.window.0);
        }
    }
    let otlp = spec.otlp.as_ref().and_then(|otlp| {
        let at = otlp.referenced;
        let otlp = &otlp.value;
        let endpoint = resolve(&otlp.endpoint.0, "telemetry.otlp.endpoint", env, errors)?;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            errors.push(
                PolicyError::new(
                    "telemetry.otlp.endpoint",
                    "must start with http:// or https://",
                )
                .at(at),
            );
        }
        let mut headers = Vec::with_capacity(otlp.headers.len());
        for (name, value) in &otlp.headers {
            let path = format!("telemetry.otlp.headers.{name}");
            if let Some(value) = resolve(&value.0, &path, env, errors) {
                headers.push((name.clone(), value));
            }
        }
        if !(0.0..=1.0).contains(&otlp.sampling_ratio) {
            errors.push(
                PolicyError::new("telemetry.otlp.sampling_ratio", "must be from 0 to 1").at(at),
            );
        }
        if otlp.queue_size == 0 || otlp.batch_size == 0 {
            errors.push(
                PolicyError::new(
                    "telemetry.otlp",
                    "`queue_size` and `batch_size` must be at least 1",
                )
                .at(at),
            );
        }
        Some(OtlpSettings {
            endpoint,
            protocol: otlp.protocol,
            headers,
            sampling_ratio: otlp.sampling_ratio,
            queue_size: otlp.queue_size,
            batch_size: otlp.batch_size,
            export_interval: otlp.export_interval.0,
            timeout: otlp.timeout.0,
            service_name: otlp.service_name.clone(),
        })
    });
    TelemetryPolicy {
        tenant_labels: spec.metrics.tenant_labels,
        stats_windows,
        log_bodies: spec.access_log.bodies,
        otlp,
        models: model_labels(file),
    }
}

/// Every model name or pattern the policy mentions: the only model labels metrics use.
fn model_labels(file: &PolicyFile) -> ModelLabels {
    let mut labels = ModelLabels::default();
    for model in file.prices.keys() {
        labels.add(model);
    }
    for tier in file.tiers.values() {
        for model in &tier.value.models {
            if model != "*" {
                labels.add(model);
            }
        }
        if let Some(downgrade) = &tier.value.limits.downgrade {
            for (from, to) in &downgrade.models {
                labels.add(from);
                labels.add(to);
            }
        }
    }
    for upstream in file.upstreams.values() {
        for model in upstream.value.deployments.keys() {
            labels.add(model);
        }
    }
    for route in &file.routes {
        for (model, targets) in &route.value.model_targets {
            labels.add(model);
            for target in targets.iter().chain(&route.value.targets) {
                if let Some(mapped) = &target.value.model {
                    labels.add(mapped);
                }
            }
        }
        for target in &route.value.targets {
            if let Some(mapped) = &target.value.model {
                labels.add(mapped);
            }
        }
    }
    labels
}

/// SLA rules, each over the series of the route or upstream it names.
fn compile_sla(
    file: &PolicyFile,
    routes: &[Route],
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    shared: &SharedState,
    errors: &mut Vec<PolicyError>,
) -> Vec<SlaRule> {
    let mut rules = Vec::with_capacity(file.telemetry.sla.len());
    let mut names = HashSet::new();
    for (i, spec) in file.telemetry.sla.iter().enumerate() {
        let path = format!("telemetry.sla[{i}]");
        let at = spec.referenced;
        let spec = &spec.value;
        let mut error = |message: String| errors.push(PolicyError::new(&path, message).at(at));
        if !names.insert(spec.name.as_str()) {
            error(format!("rule name `{}` is used twice", spec.name));
        }
        let series = match (&spec.route, &spec.upstream) {
            (Some(route), None) => match routes.iter().find(|r| &*r.name == route) {
                Some(route) => Some((route.stats.clone(), format!("route {}", route.name))),
                None => {
                    error(format!("unknown route `{route}`"));
                    None
                }
            },
            (None, Some(name)) => match upstreams.get(name) {
                Some(upstream) => Some((
                    upstream.stats.clone(),
                    format!("upstream {}", upstream.name),
                )),
                None => {
                    error(format!("unknown upstream `{name}`"));
                    None
                }
            },
            _ => {
                error("name exactly one of `route` and `upstream`".to_owned());
                None
            }
        };
        let ceilings: Vec<(u8, std::time::Duration)> =
            [(50, spec.p50), (95, spec.p95), (99, spec.p99)]
                .into_iter()
                .filter_map(|(p, ceiling)| ceiling.map(|c| (p, c.0)))
                .collect();
        if ceilings.is_empty() && spec.success_rate.is_none() {
            error("sets no limit: give p50, p95, p99 or success_rate".to_owned());
        }
        if spec
            .success_rate
            .is_some_and(|rate| !(0.0..=100.0).contains(&rate))
        {
            error("`success_rate` is a percentage, 0 to 100".to_owned());
        }
        let _ = shared;
        if let Some((series, subject)) = series {
            rules.push(SlaRule {
                name: spec.name.as_str().into(),
                subject,
                series,
                window: spec.window.0,
                latency: spec.latency,
                ceilings,
                success_rate: spec.success_rate,
                min_requests: spec.min_requests,
            });
        }
    }
    rules
}

/// Parses a policy or keys file. serde-saphyr's default budget (250,000 nodes, 1,000,000
/// events) refuses a policy of about 50,000 tenants; the budget here grows with the text, which
/// the file size limits bound: a real document spends several bytes per node, while one that
/// expands far beyond its size (an alias bomb) is still stopped.
fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = budget.max_nodes.max(text.len() / 2);
    budget.max_events = budget.max_events.max(text.len());
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    serde_saphyr::from_str_with_options(text, options)
}

/// A document at least this large that is JSON is read by serde_json: a policy or keys file
/// that size is generated by a tool (tens of thousands of tenants or keys), and serde_json reads
/// it ten times faster than the YAML parser — 100,000 tenants in tens of milliseconds instead of
/// most of a second. Smaller documents are hand-written and keep the YAML parser's line numbers.
const JSON_FAST_PATH_BYTES: usize = 64 * 1024;

/// Parses a policy or keys file, taking the JSON fast path when it applies. It reads a document
/// as the YAML parser would: JSON is YAML, serde_json is the stricter of the two (no coercion of
/// scalars), and a document with a repeated key (an error in YAML, the last one wins in
/// serde_json) does not take it. Anything it refuses goes to the YAML parser, which decides and
/// reports the error with its line. What it accepts carries no line numbers: compile errors then
/// name the place by path (`tenants[41]`).
fn parse_document<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    if text.len() >= JSON_FAST_PATH_BYTES
        && text.trim_start().starts_with('{')
        && json_keys_are_unique(text)
    {
        if let Ok(document) = serde_json::from_str(text) {
            return Ok(document);
        }
    }
    parse_yaml(text)
}

/// Whether `text` is JSON in which no object repeats a key.
fn json_keys_are_unique(text: &str) -> bool {
    use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};

    struct UniqueKeys;
    impl<'de> DeserializeSeed<'de> for UniqueKeys {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for UniqueKeys {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !seen.insert(key) {
                    return Err(A::Error::custom("repeated key"));
                }
                map.next_value_seed(UniqueKeys)?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(UniqueKeys)?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    UniqueKeys.deserialize(&mut deserializer).is_ok() && deserializer.end().is_ok()
}

/// A parse error with the YAML path of its line, when the document's layout shows it.
fn located_parse_error(error: &serde_saphyr::Error, text: &str) -> PolicyError {
    let mut located = parse_error(error);
    if let Some(line) = located.line {
        located.path = yaml_path_at(text, line as usize);
    }
    located
}

/// The path (`routes[1].match.hosts`) of the key on `line` (1-based) of a block-style YAML
/// document, read from indentation. Flow collections (`{ … }`) are not entered: a key inside one
/// gets the path of the collection.
fn yaml_path_at(text: &str, line: usize) -> String {
    // (indent, segment) from the root down; list items are segments like `[2]`.
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut item_counts: std::collections::HashMap<(String, usize), usize> =
        std::collections::HashMap::new();
    let path_of = |stack: &[(usize, String)]| {
        stack.iter().fold(String::new(), |mut path, (_, segment)| {
            if !path.is_empty() && !segment.starts_with('[') {
                path.push('.');
            }
            path.push_str(segment);
            path
        })
    };
    for raw in text.lines().take(line) {
        let mut indent = raw.len() - raw.trim_start_matches(' ').len();
        let mut rest = raw.trim_start_matches(' ');
        if rest.is_empty() || rest.starts_with('#') || rest.starts_with("---") {
            continue;
        }
        while let Some(after) = rest
            .strip_prefix("- ")
            .or_else(|| (rest == "-").then_some(""))
        {
            stack.retain(|(depth, _)| *depth < indent);
            let parent = path_of(&stack);
            let count = item_counts.entry((parent, indent)).or_insert(0);
            stack.push((indent, format!("[{count}]")));
            *count += 1;
            let spaces = after.len() - after.trim_start_matches(' ').len();
            indent += 2 + spaces;
            rest = after.trim_start_matches(' ');
        }
        if rest.starts_with(['{', '[', '"', '\'']) {
            continue;
        }
        if let Some((key, _)) = rest.split_once(':') {
            if !key.is_empty() && !key.contains([' ', '{', '[', ',']) {
                stack.retain(|(depth, _)| *depth < indent);
                stack.push((indent, key.to_owned()));
            }
        }
    }
    path_of(&stack)
}

/// serde-saphyr stops at the first structural error (unknown field, wrong type, bad syntax);
/// it comes with its line and column.
fn parse_error(error: &serde_saphyr::Error) -> PolicyError {
    let message = error.to_string();
    // The message may carry a rendered source snippet after its first line; the location is
    // reported separately, so keep the sentence.
    let first_line = message.lines().next().unwrap_or("invalid YAML").trim();
    // Drop serde-saphyr's own `error: line L column C:` lead; the location is reported apart.
    let sentence = first_line
        .strip_prefix("error:")
        .unwrap_or(first_line)
        .trim();
    let sentence = match sentence
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((_, text)) => text,
        None => sentence,
    };
    let mut out = PolicyError::new("", sentence.to_owned());
    if let Some(location) = error.location() {
        out = out.at(location);
    }
    out
}

fn socket_addr(spec: &Spanned<String>, path: &str, errors: &mut Vec<PolicyError>) -> SocketAddr {
    spec.value.parse().unwrap_or_else(|_| {
        errors.push(
            PolicyError::new(
                path,
                format!("`{}` is not an address like 127.0.0.1:8787", spec.value),
            )
            .at(spec.referenced),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// Interpolates one string, recording every problem at the string's location.
fn resolve(
    template: &Spanned<String>,
    path: &str,
    env: Env,
    errors: &mut Vec<PolicyError>,
) -> Option<String> {
    match interpolate(&template.value, env) {
        Ok(value) => Some(value),
        Err(problems) => {
            errors.extend(
                problems
                    .into_iter()
                    .map(|p| PolicyError::new(path, p.to_string()).at(template.referenced)),
            );
            None
        }
    }
}

/// What every upstream is compiled with.
struct UpstreamContext<'a> {
    env: Env<'a>,
    shared: &'a SharedState,
    stats_windows: &'a [std::time::Duration],
}

fn compile_upstream(
    name: &str,
    spec: &Spanned<UpstreamSpec>,
    path: &str,
    context: &UpstreamContext,
    sources: &mut Sources,
    errors: &mut Vec<PolicyError>,
) -> Option<Upstream> {
    let (env, shared) = (context.env, context.shared);
    let before = errors.len();
    let at = spec.referenced;
    let spec = &spec.value;

    let is_bedrock = spec.provider == ProviderKind::Bedrock;
    let region = compile_region(spec, path, at, env, errors);
    let base_url_path = format!("{path}.base_url");
    let base_url = match (&spec.base_url, &region) {
        (Some(url), _) => resolve(url, &base_url_path, env, errors).map(|u| (u, url.referenced)),
        (None, Some(region)) => Some((bedrock_base_url(region), at)),
        (None, None) => {
            if !is_bedrock {
                errors.push(
                    PolicyError::new(&base_url_path, "is required (only bedrock has a default)")
                        .at(at),
                );
            }
            None
        }
    };
    let base =
        base_url.and_then(|(url, url_at)| parse_base_url(&url, &base_url_path, url_at, errors));
    if is_bedrock && !spec.keys.is_empty() {
        errors.push(
            PolicyError::new(
                format!("{path}.keys"),
                "bedrock signs its requests with AWS credentials (`aws:`, or the AWS environment variables); `keys` do not apply",
            )
            .at(at),
        );
    }
    if !is_bedrock && spec.aws.is_some() {
        errors.push(
            PolicyError::new(format!("{path}.aws"), "applies to provider bedrock only").at(at),
        );
    }
    let aws_credentials = if is_bedrock {
        compile_aws_credentials(spec.aws.as_ref(), path, at, env, errors)
    } else {
        None
    };

    let breaker = breaker_settings(
        &spec.circuit_breaker,
        &format!("{path}.circuit_breaker"),
        at,
        errors,
    );
    let retry_budget = RetryBudgetSettings {
        ratio: spec.retry_budget.ratio,
        min_per_second: spec.retry_budget.min_per_second,
        window: spec.retry_budget.window.0,
    };
    let valid = |n: f64| n.is_finite() && n >= 0.0;
    if !(valid(retry_budget.ratio) && valid(retry_budget.min_per_second))
        || retry_budget.window.is_zero()
    {
        errors.push(
            PolicyError::new(
                format!("{path}.retry_budget"),
                "`ratio` and `min_per_second` are non-negative numbers, `window` more than 0",
            )
            .at(at),
        );
    }
    // Health follows the upstream's name and address (as written: a secret in it stays out).
    let address = match (&spec.base_url, &region) {
        (Some(url), _) => url.value.clone(),
        (None, region) => region.clone().unwrap_or_default(),
    };
    let identity = format!("{name}\0{address}");
    let keys = compile_keys(
        spec, path, &identity, &breaker, env, shared, sources, errors,
    );

    let mut extra_headers = Vec::with_capacity(spec.headers.len());
    for (header, template) in &spec.headers {
        let header_path = format!("{path}.headers.{header}");
        let Ok(header_name) = HeaderName::from_bytes(header.as_bytes()) else {
            errors.push(
                PolicyError::new(&header_path, "invalid header name").at(template.0.referenced),
            );
            continue;
        };
        if let Some(value) = resolve(&template.0, &header_path, env, errors) {
            if value.is_empty() {
                // `${OPTIONAL:-}` unset: no header rather than an empty one.
                continue;
            }
            match HeaderValue::from_str(&value) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    extra_headers.push((header_name, value));
                }
                Err(_) => errors.push(
                    PolicyError::new(
                        &header_path,
                        "the value has characters not allowed in a header",
                    )
                    .at(template.0.referenced),
                ),
            }
        }
    }

    let is_azure = spec.provider == ProviderKind::AzureOpenai;
    if !is_azure && (spec.api_version.is_some() || !spec.deployments.is_empty()) {
        errors.push(
            PolicyError::new(
                path,
                "`api_version` and `deployments` apply to provider azure_openai only",
            )
            .at(at),
        );
    }
    let api_version = match &spec.api_version {
        Some(version) => resolve(version, &format!("{path}.api_version"), env, errors),
        None => is_azure.then(|| "2024-10-21".to_owned()),
    };

    let ca = spec.tls.ca_file.as_ref().and_then(|file| {
        let ca_path = format!("{path}.tls.ca_file");
        if base.as_ref().is_some_and(|(tls, ..)| !tls) {
            errors.push(
                PolicyError::new(&ca_path, "applies to https:// upstreams only")
                    .at(file.referenced),
            );
            return None;
        }
        load_ca(&file.value)
            .map_err(|message| errors.push(PolicyError::new(&ca_path, message).at(file.referenced)))
            .ok()
    });

    if errors.len() > before {
        return None;
    }
    let signer = match (region, aws_credentials) {
        (Some(region), Some(credentials)) => Some(SigV4Signer::new(region, credentials)),
        _ => None,
    };
    let (tls, host, port, base_path) = base?;
    let authority = Upstream::authority_for(tls, &host, port)
        .map_err(|e| errors.push(PolicyError::new(&base_url_path, e.to_string()).at(at)))
        .ok()?;
    let anthropic_version = match (&spec.anthropic_version, spec.provider) {
        (Some(version), ProviderKind::Anthropic) => HeaderValue::from_str(version)
            .map_err(|_| {
                errors.push(
                    PolicyError::new(format!("{path}.anthropic_version"), "not a header value")
                        .at(at),
                )
            })
            .ok(),
        (None, ProviderKind::Anthropic) => Some(HeaderValue::from_static("2023-06-01")),
        (Some(_), _) => {
            errors.push(
                PolicyError::new(
                    format!("{path}.anthropic_version"),
                    "applies to provider anthropic only",
                )
                .at(at),
            );
            None
        }
        (None, _) => None,
    };
    let health = shared.health.upstream(&identity, &breaker, &retry_budget);
    let stats = shared
        .stats
        .series(&format!("upstream:{name}"), context.stats_windows);
    let metrics = &shared.metrics;
    Some(Upstream {
        stats,
        first_byte_seconds: metrics.upstream_first_byte.with_label_values(&[name]),
        connect_seconds: metrics.upstream_connect.with_label_values(&[name]),
        name: name.into(),
        provider: spec.provider,
        tls,
        host,
        port,
        authority,
        base_path,
        keys: KeyPool::new(keys?),
        key_cooldown: spec.key_cooldown.0,
        breaker,
        retry_budget,
        health,
        anthropic_version,
        extra_headers,
        connect_timeout: spec.timeouts.connect.0,
        first_byte_timeout: spec.timeouts.first_byte.0,
        idle_timeout: spec.timeouts.idle.0,
        azure: AzureSettings {
            api_version,
            deployments: spec.deployments.clone(),
        },
        signer,
        ca,
        address_override: None,
    })
}

fn breaker_settings(
    spec: &CircuitBreakerSpec,
    path: &str,
    at: serde_saphyr::Location,
    errors: &mut Vec<PolicyError>,
) -> BreakerSettings {
    if spec.enabled
        && (spec.consecutive_failures == 0
            || spec.half_open_probes == 0
            || !(spec.error_ratio > 0.0 && spec.error_ratio <= 1.0)
            || spec.window.0.is_zero())
    {
        errors.push(
            PolicyError::new(
                path,
                "`consecutive_failures` and `half_open_probes` must be at least 1, `error_ratio` in (0, 1], `window` more than 0",
            )
            .at(at),
        );
    }
    BreakerSettings {
        enabled: spec.enabled,
        consecutive_failures: spec.consecutive_failures,
        error_ratio: spec.error_ratio,
        min_requests: spec.min_requests,
        window: spec.window.0,
        open_for: spec.open_for.0,
        half_open_probes: spec.half_open_probes,
    }
}

/// An upstream's provider keys: from the policy (`${VAR}` allowed) or files, each with its
/// health (kept across reloads by the key's hash). `None` when any key is invalid.
#[allow(clippy::too_many_arguments)]
fn compile_keys(
    spec: &UpstreamSpec,
    path: &str,
    upstream_identity: &str,
    breaker: &BreakerSettings,
    env: Env,
    shared: &SharedState,
    sources: &mut Sources,
    errors: &mut Vec<PolicyError>,
) -> Option<Vec<ProviderKey>> {
    let before = errors.len();
    let mut keys = Vec::with_capacity(spec.keys.len());
    let mut names = HashSet::new();
    for (i, entry) in spec.keys.iter().enumerate() {
        let key_path = format!("{path}.keys[{i}]");
        let at = entry.referenced;
        let error = |path: String, message: String| PolicyError::new(path, message).at(at);
        let (template, detail) = match &entry.value {
            KeyEntrySpec::Plain(template) => (Some(template), None),
            KeyEntrySpec::Detailed(detail) => (detail.key.as_ref(), Some(detail)),
        };
        let file = detail.and_then(|d| d.file.as_deref());
        let value = match (template, file) {
            (Some(template), None) => {
                // A plain string entry has its location on the entry.
                let mut located = template.0.clone();
                if located.referenced == serde_saphyr::Location::UNKNOWN {
                    located.referenced = at;
                }
                resolve(&located, &key_path, env, errors)
            }
            (None, Some(file)) => match sources.read(file) {
                Ok((_, bytes)) => Some(String::from_utf8_lossy(&bytes).trim().to_owned()),
                Err(message) => {
                    errors.push(error(format!("{key_path}.file"), message));
                    None
                }
            },
            _ => {
                let message = "give exactly one of `key` and `file`".to_owned();
                errors.push(error(key_path.clone(), message));
                None
            }
        };
        let Some(value) = value else { continue };
        if value.trim().is_empty() {
            errors.push(error(key_path.clone(), "the key is empty".to_owned()));
            continue;
        }
        let Ok(credential) = spec.provider.credential_value(&value) else {
            let message = "the key has characters not allowed in a header".to_owned();
            errors.push(error(key_path.clone(), message));
            continue;
        };
        let name: Arc<str> = match detail.and_then(|d| d.name.as_deref()) {
            Some(name) => name.into(),
            None => format!("#{i}").into(),
        };
        if !names.insert(name.clone()) {
            let message = format!("key name `{name}` is used twice");
            errors.push(error(format!("{key_path}.name"), message));
        }
        let weight = detail.map_or(1, |d| d.weight);
        if weight == 0 {
            let message = "must be at least 1 (remove the key to stop using it)".to_owned();
            errors.push(error(format!("{key_path}.weight"), message));
        }
        if detail.and_then(|d| d.max_concurrent) == Some(0) {
            let message = "must be at least 1".to_owned();
            errors.push(error(format!("{key_path}.max_concurrent"), message));
        }
        let models = detail.map_or_else(Vec::new, |d| {
            d.models.iter().map(|m| Glob::new(m)).collect()
        });
        let fingerprint = hex::encode(Sha256::digest(value.as_bytes()));
        let health = shared
            .health
            .key(&format!("{upstream_identity}\0{fingerprint}"), breaker);
        keys.push(ProviderKey::new(
            name,
            credential,
            weight,
            models,
            detail.and_then(|d| d.max_concurrent),
            health,
        ));
    }
    (errors.len() == before).then_some(keys)
}

/// Bedrock's `region` (required there, refused elsewhere).
fn compile_region(
    spec: &UpstreamSpec,
    path: &str,
    at: serde_saphyr::Location,
    env: Env,
    errors: &mut Vec<PolicyError>,
) -> Option<String> {
    let region_path = format!("{path}.region");
    let is_bedrock = spec.provider == ProviderKind::Bedrock;
    let Some(template) = &spec.region else {
        if is_bedrock {
            errors.push(PolicyError::new(&region_path, "is required for provider bedrock").at(at));
        }
        return None;
    };
    if !is_bedrock {
        errors.push(
            PolicyError::new(&region_path, "applies to provider bedrock only")
                .at(template.referenced),
        );
        return None;
    }
    let region = resolve(template, &region_path, env, errors)?;
    let valid = !region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        errors.push(
            PolicyError::new(
                &region_path,
                format!("`{region}` is not an AWS region like us-east-1"),
            )
            .at(template.referenced),
        );
        return None;
    }
    Some(region)
}

/// A bedrock upstream's credentials: its `aws:` block, or else the standard AWS environment
/// variables. Missing ones are an error that names them; values are never shown.
fn compile_aws_credentials(
    spec: Option<&Spanned<AwsCredentialsSpec>>,
    path: &str,
    at: serde_saphyr::Location,
    env: Env,
    errors: &mut Vec<PolicyError>,
) -> Option<AwsCredentials> {
    let before = errors.len();
    let credentials = match spec {
        Some(block) => {
            let aws = &block.value;
            let mut field = |template: &SecretTemplate, name: &str, required: bool| {
                let field_path = format!("{path}.aws.{name}");
                let value = resolve(&template.0, &field_path, env, errors)?;
                credential_value(value, required, &field_path, template.0.referenced, errors)
            };
            let access_key_id = field(&aws.access_key_id, "access_key_id", true);
            let secret_access_key = field(&aws.secret_access_key, "secret_access_key", true);
            let session_token = aws
                .session_token
                .as_ref()
                .and_then(|token| field(token, "session_token", false));
            AwsCredentials {
                access_key_id: access_key_id.unwrap_or_default(),
                secret_access_key: secret_access_key.unwrap_or_default(),
                session_token,
            }
        }
        None => {
            let var = |name: &str| env(name).filter(|value| !value.is_empty());
            let missing: Vec<&str> = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
                .into_iter()
                .filter(|name| var(name).is_none())
                .collect();
            if !missing.is_empty() {
                errors.push(
                    PolicyError::new(
                        path,
                        format!(
                            "no AWS credentials: give the upstream an `aws:` block (access_key_id, secret_access_key) or set {} in Sluice's environment",
                            missing.join(" and ")
                        ),
                    )
                    .at(at),
                );
                return None;
            }
            let mut from_env = |name: &str| {
                credential_value(var(name).unwrap_or_default(), true, name, at, errors)
            };
            AwsCredentials {
                access_key_id: from_env("AWS_ACCESS_KEY_ID").unwrap_or_default(),
                secret_access_key: from_env("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
                session_token: var("AWS_SESSION_TOKEN").and_then(|token| {
                    credential_value(token, false, "AWS_SESSION_TOKEN", at, errors)
                }),
            }
        }
    };
    (errors.len() == before).then_some(credentials)
}

/// A credential that can travel in a header (the access key id and session token do). An
/// empty value is an error when `required`, and none at all otherwise (`${TOKEN:-}` unset).
fn credential_value(
    value: String,
    required: bool,
    path: &str,
    at: serde_saphyr::Location,
    errors: &mut Vec<PolicyError>,
) -> Option<String> {
    if value.is_empty() {
        if required {
            errors.push(PolicyError::new(path, "is empty").at(at));
        }
        return None;
    }
    if HeaderValue::from_str(&value).is_err() {
        errors.push(PolicyError::new(path, "has characters not allowed in a header").at(at));
        return None;
    }
    Some(value)
}

/// The files a policy is made of: the policy itself and the files it names (keys file, JWT key
/// material). Each is read once, hashed into the policy's hash (so a change to any of them is a
/// new policy) and watched for reload.
pub(super) struct Sources {
    folder: PathBuf,
    hasher: Sha256,
    watched: Vec<PathBuf>,
}

impl Sources {
    fn new(policy: &Path, text: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(text.as_bytes());
        Self {
            folder: policy.parent().unwrap_or(Path::new(".")).to_path_buf(),
            hasher,
            watched: vec![policy.to_path_buf()],
        }
    }

    /// Reads a file the policy names; relative paths are from the policy's folder.
    fn read(&mut self, name: &str) -> Result<(PathBuf, Vec<u8>), String> {
        let path = self.folder.join(name);
        self.watched.push(path.clone());
        let bytes = super::read_limited(&path, super::MAX_REFERENCED_BYTES)
            .map_err(|e| format!("`{}`: {e}", path.display()))?;
        self.hasher.update(b"\0");
        self.hasher.update(path.as_os_str().as_encoded_bytes());
        self.hasher.update(b"\0");
        self.hasher.update(&bytes);
        Ok((path, bytes))
    }

    fn finish(self) -> (String, Vec<PathBuf>) {
        (hex::encode(self.hasher.finalize()), self.watched)
    }
}

/// The limits of every tier and of the system, as one filter over the shared counters, or
/// none when the policy sets no limit (so routes pay nothing for it).
fn compile_limits(
    file: &PolicyFile,
    prices: &Arc<Prices>,
    shared: &SharedState,
    redis: Option<Arc<RedisCounters>>,
    errors: &mut Vec<PolicyError>,
) -> Option<Arc<dyn Filter>> {
    let mut table = LimitTable::default();
    for (name, tier) in &file.tiers {
        for problem in tier.value.limits.problems() {
            errors.push(
                PolicyError::new(format!("tiers.{name}.limits"), problem).at(tier.referenced),
            );
        }
        table
            .tiers
            .insert(name.as_str().into(), tier.value.limits.clone());
    }
    if let Some(system) = &file.system_limits {
        for problem in system.value.problems() {
            errors.push(PolicyError::new("system_limits", problem).at(system.referenced));
        }
        table.system = Some(system.value.clone());
    }
    table.prices = prices.clone();
    let budgets = file
        .tiers
        .values()
        .filter(|t| t.value.limits.budget_usd_per_month.is_some())
        .count();
    if budgets > 0 && file.prices.is_empty() {
        errors.push(PolicyError::new(
            "prices",
            "tiers have `budget_usd_per_month` but no model has a price: spend would never move",
        ));
    }
    if table.is_empty() {
        return None;
    }
    let measures_prompts = table
        .tiers
        .values()
        .chain(table.system.as_ref())
        .any(|limits| limits.counts_tokens() || limits.max_input_tokens.is_some());
    if measures_prompts {
        warm_up_tokenizers();
    }
    let backend = match redis {
        Some(redis) => Backend::Redis(redis),
        None => Backend::Memory(shared.limits.clone()),
    };
    let metrics = shared.metrics.filters.clone();
    let tenant_labels = file.telemetry.metrics.tenant_labels;
    Some(Arc::new(
        Limits::new(Arc::new(table), backend).with_metrics(metrics, tenant_labels),
    ))
}

/// The cache store: the process's, kept across reloads while the top-level `cache` block (and
/// the Redis connection of its shared tier) stays the same.
fn compile_cache_store(
    file: &PolicyFile,
    redis: Option<&Arc<RedisCounters>>,
    shared: &SharedState,
    errors: &mut Vec<PolicyError>,
) -> Arc<CacheStore> {
    let config = file
        .cache
        .as_ref()
        .map(|spec| spec.value.clone())
        .unwrap_or_default();
    let at = file
        .cache
        .as_ref()
        .map_or(serde_saphyr::Location::UNKNOWN, |spec| spec.referenced);
    for problem in config.problems() {
        errors.push(PolicyError::new("cache", problem).at(at));
    }
    if config.shared.enabled && file.state.backend != StateBackend::Redis {
        errors.push(
            PolicyError::new(
                "cache.shared.enabled",
                "the shared tier lives in Redis: it needs `state: { backend: redis, url: … }`",
            )
            .at(at),
        );
    }
    shared.cache(&config, redis)
}

/// The shared Redis counters when `state.backend` is `redis`.
fn compile_state(
    file: &PolicyFile,
    env: Env,
    shared: &SharedState,
    errors: &mut Vec<PolicyError>,
) -> Option<Arc<RedisCounters>> {
    let state = &file.state;
    match (state.backend, &state.url) {
        (StateBackend::Memory, None) => None,
        (StateBackend::Memory, Some(url)) => {
            errors.push(
                PolicyError::new("state.url", "applies to backend redis only").at(url.0.referenced),
            );
            None
        }
        (StateBackend::Redis, None) => {
            errors.push(PolicyError::new("state", "backend redis needs `url`"));
            None
        }
        (StateBackend::Redis, Some(url)) => {
            let resolved = resolve(&url.0, "state.url", env, errors)?;
            let settings = RedisSettings {
                url: resolved,
                prefix: state.prefix.clone(),
                timeout: state.timeout.0,
                on_error: state.on_error,
            };
            shared
                .redis(&settings)
                .map_err(|message| {
                    errors.push(PolicyError::new("state.url", message).at(url.0.referenced))
                })
                .ok()
        }
    }
}

/// Where a route sends: `upstream` or `targets`, and `model_targets`. All targets must speak
/// the same API (a caller's SDK speaks one); targets of different providers need keys of
/// their own, since the caller's credential fits only one of them.
fn compile_targets(
    spec: &RouteSpec,
    path: &str,
    context: &RouteContext,
    at: serde_saphyr::Location,
    errors: &mut Vec<PolicyError>,
) -> Option<Targets> {
    let before = errors.len();
    let target = |spanned: &Spanned<TargetSpec>, target_path: String, errors: &mut Vec<_>| {
        let target = &spanned.value;
        let upstream = context.upstreams.get(&target.upstream).cloned();
        if upstream.is_none() && !context.declared.contains_key(&target.upstream) {
            let known: Vec<&str> = context.declared.keys().map(String::as_str).collect();
            errors.push(
                PolicyError::new(
                    target_path,
                    format!(
                        "unknown upstream `{}` (declared: {})",
                        target.upstream,
                        known.join(", ")
                    ),
                )
                .at(spanned.referenced),
            );
        }
        Some(Target {
            upstream: upstream?,
            model: target.model.as_deref().map(Arc::from),
        })
    };
    let default = match (&spec.upstream, spec.targets.is_empty()) {
        (Some(name), true) => {
            let single = Spanned::new(
                TargetSpec {
                    upstream: name.value.clone(),
                    model: None,
                },
                name.referenced,
                name.defined,
            );
            let compiled = target(&single, format!("{path}.upstream"), errors);
            vec![compiled]
        }
        (None, false) => spec
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| target(t, format!("{path}.targets[{i}]"), errors))
            .collect(),
        (Some(_), false) => {
            errors.push(PolicyError::new(path, "give `upstream` or `targets`, not both").at(at));
            return None;
        }
        (None, true) => {
            errors.push(PolicyError::new(path, "needs `upstream` or `targets`").at(at));
            return None;
        }
    };
    let mut by_model = ModelTargets::default();
    for (model, list) in &spec.model_targets {
        let model_path = format!("{path}.model_targets.{model}");
        if list.is_empty() {
            errors.push(PolicyError::new(&model_path, "lists no target").at(at));
        }
        let compiled: Vec<Option<Target>> = list
            .iter()
            .enumerate()
            .map(|(i, t)| target(t, format!("{model_path}[{i}]"), errors))
            .collect();
        by_model.add(model, compiled.into_iter().flatten().collect());
    }
    if errors.len() > before {
        return None;
    }
    let targets = Targets {
        default: default.into_iter().flatten().collect(),
        by_model,
    };
    let all: Vec<&Target> = targets.all().collect();
    let first = all.first()?.upstream.provider;
    if all
        .iter()
        .any(|t| t.upstream.provider.dialect() != first.dialect())
    {
        errors.push(
            PolicyError::new(
                path,
                "targets speak different APIs (e.g. OpenAI and Anthropic): a caller's SDK speaks one",
            )
            .at(at),
        );
        return None;
    }
    let mixed = all.iter().any(|t| t.upstream.provider != first);
    if let Some(keyless) = all
        .iter()
        .find(|t| mixed && !t.upstream.has_own_credentials())
    {
        errors.push(
            PolicyError::new(
                path,
                format!(
                    "targets of different providers need keys of their own: upstream `{}` has none, and the caller's credential fits only one provider",
                    keyless.upstream.name
                ),
            )
            .at(at),
        );
        return None;
    }
    Some(targets)
}

fn compile_retry(
    spec: &RouteSpec,
    path: &str,
    targets: Option<&Targets>,
    at: serde_saphyr::Location,
    errors: &mut Vec<PolicyError>,
) -> RetryPolicy {
    let written = spec.retry.clone().unwrap_or_default();
    let longest = targets.map_or(1, Targets::longest_list) as u32;
    let attempts = written.attempts.unwrap_or(longest + 1);
    if attempts == 0 {
        errors.push(
            PolicyError::new(
                format!("{path}.retry.attempts"),
                "must be at least 1 (1: no retry)",
            )
            .at(at),
        );
    }
    if written.backoff.base.0 > written.backoff.max.0 {
        errors.push(
            PolicyError::new(
                format!("{path}.retry.backoff"),
                "`base` must not exceed `max`",
            )
            .at(at),
        );
    }
    RetryPolicy {
        attempts: attempts.max(1),
        on: written.on,
        attempt_timeout: written.attempt_timeout.map(|d| d.0),
        backoff_base: written.backoff.base.0,
        backoff_max: written.backoff.max.0,
        retry_after_max: written.retry_after_max.0,
    }
}

/// The route's `auth` filter: as declared, or `required` by default once tenants exist.
fn compile_auth(
    spec: &RouteSpec,
    path: &str,
    targets: &Targets,
    directory: &Arc<Directory>,
    sources: &mut Sources,
    at: serde_saphyr::Location,
    errors: &mut Vec<PolicyError>,
) -> Option<Arc<dyn Filter>> {
    let auth_path = format!("{path}.auth");
    let declared = spec.auth.clone();
    let auth = declared
        .clone()
        .or_else(|| (!directory.is_empty()).then_some(AuthSpec::Mode(AuthMode::Required)))?;
    if auth.mode() == AuthMode::Required && directory.is_empty() {
        errors.push(
            PolicyError::new(
                &auth_path,
                "`required` needs tenants with keys; the policy declares none",
            )
            .at(at),
        );
        return None;
    }
    let keyless = targets.all().find(|t| !t.upstream.has_own_credentials());
    if let (true, Some(Target { upstream, .. })) = (auth.mode() != AuthMode::Passthrough, keyless) {
        let why = if declared.is_some() {
            ""
        } else {
            " (required is the default once tenants exist)"
        };
        errors.push(
            PolicyError::new(
                &auth_path,
                format!(
                    "`{mode}`{why} but upstream `{}` has no `keys`: callers would send Sluice credentials and no provider key would reach the provider; give the upstream keys or use `auth: passthrough`",
                    upstream.name,
                    mode = auth.mode().as_str(),
                ),
            )
            .at(at),
        );
        return None;
    }
    let mut jwt_material = None;
    if let Some(jwt) = auth.jwt() {
        let mut read = |file: &Option<String>, field: &str| {
            let name = file.as_deref()?;
            sources
                .read(name)
                .map(|(_, bytes)| bytes)
                .map_err(|message| {
                    errors
                        .push(PolicyError::new(format!("{auth_path}.jwt.{field}"), message).at(at))
                })
                .ok()
        };
        let hs256_secret = read(&jwt.hs256_secret_file, "hs256_secret_file")
            .map(|secret| String::from_utf8_lossy(&secret).trim().as_bytes().to_vec());
        let jwks = read(&jwt.jwks_file, "jwks_file")
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        jwt_material = Some(JwtMaterial { hs256_secret, jwks });
    }
    match Auth::new(
        &auth,
        targets.provider().caller_credential(),
        directory.clone(),
        jwt_material,
    ) {
        Ok(auth) => Some(Arc::new(auth)),
        Err(e) => {
            errors.push(PolicyError::new(&auth_path, e.to_string()).at(at));
            None
        }
    }
}

/// Tiers, tenants and keys (the policy's and the keys file's), every problem recorded.
fn compile_directory(
    file: &PolicyFile,
    sources: &mut Sources,
    errors: &mut Vec<PolicyError>,
) -> Directory {
    let mut directory = Directory::default();
    let keys_in_policy = file.tenants.iter().map(|t| t.value.keys.len()).sum();
    directory.reserve(file.tenants.len(), keys_in_policy);
    for (name, tier) in &file.tiers {
        if let Err(e) = directory.add_tier(name, &tier.value.routes, &tier.value.models) {
            errors
                .push(PolicyError::new(format!("tiers.{name}"), e.to_string()).at(tier.referenced));
        }
    }
    // Paths are written only for errors: a policy may hold 100,000 tenants.
    for (index, tenant) in file.tenants.iter().enumerate() {
        let spec = &tenant.value;
        if let Err(e) = directory.add_tenant(&spec.name, &spec.tier.value) {
            errors.push(
                PolicyError::new(format!("tenants[{index}]"), e.to_string())
                    .at(spec.tier.referenced),
            );
            continue;
        }
        for (k, key) in spec.keys.iter().enumerate() {
            let key_path = || format!("tenants[{index}].keys[{k}]");
            if key.value.tenant.is_some() {
                errors.push(
                    PolicyError::new(
                        key_path(),
                        "`tenant` belongs in a keys file; here the key is the tenant's",
                    )
                    .at(key.referenced),
                );
                continue;
            }
            add_key(
                &mut directory,
                &spec.name,
                &key.value,
                key_path,
                key.referenced,
                errors,
            );
        }
    }
    let Some(keys_file) = &file.keys_file else {
        return directory;
    };
    let located = |message: String| PolicyError::new("keys_file", message).at(keys_file.referenced);
    let (keys_path, text) = match sources.read(&keys_file.value) {
        Ok(read) => read,
        Err(message) => {
            errors.push(located(message));
            return directory;
        }
    };
    let text = String::from_utf8_lossy(&text);
    let keys: KeysFile = match parse_document(&text) {
        Ok(keys) => keys,
        Err(e) => {
            let problem = located_parse_error(&e, &text);
            let at = problem.line.map_or(String::new(), |line| {
                format!(":{line}:{}", problem.column.unwrap_or(0))
            });
            errors.push(located(format!(
                "{}{at}: {}",
                keys_path.display(),
                problem.message
            )));
            return directory;
        }
    };
    directory.reserve(0, keys.keys.len());
    for (k, key) in keys.keys.iter().enumerate() {
        let key_path = || format!("keys_file({}).keys[{k}]", keys_path.display());
        match &key.value.tenant {
            Some(tenant) => add_key(
                &mut directory,
                tenant,
                &key.value,
                key_path,
                key.referenced,
                errors,
            ),
            None => errors.push(
                PolicyError::new(key_path(), "a key in a keys file must name its `tenant`")
                    .at(key.referenced),
            ),
        }
    }
    directory
}

fn add_key(
    directory: &mut Directory,
    tenant: &str,
    key: &KeySpec,
    path: impl Fn() -> String,
    at: serde_saphyr::Location,
    errors: &mut Vec<PolicyError>,
) {
    let hash = match KeyHash::parse(&key.hash) {
        Ok(hash) => hash,
        Err(e) => {
            let hint = if key.hash.starts_with(KEY_PREFIX) {
                " (this looks like a key itself: store its hash, never the key)"
            } else {
                ""
            };
            errors.push(PolicyError::new(path(), format!("{e}{hint}")).at(at));
            return;
        }
    };
    let expires = match key.expires.as_deref().map(parse_expiry).transpose() {
        Ok(expires) => expires,
        Err(message) => {
            errors.push(PolicyError::new(path(), message).at(at));
            return;
        }
    };
    if let Err(e) = directory.add_key(tenant, hash, key.label.as_deref(), expires, key.revoked) {
        errors.push(PolicyError::new(path(), e.to_string()).at(at));
    }
}

/// `2027-01-31T00:00:00Z` (RFC 3339) or `2027-01-31` (midnight UTC).
fn parse_expiry(text: &str) -> Result<std::time::SystemTime, String> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    humantime::parse_rfc3339_weak(&full)
        .map_err(|e| format!("`expires: {text}` is not an RFC 3339 time or a date: {e}"))
}

/// The certificates of a PEM file, for an upstream's trust store.
fn load_ca(file: &str) -> Result<Arc<pingora::protocols::tls::CaType>, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read `{file}`: {e}"))?;
    let certificates = pingora::tls::x509::X509::stack_from_pem(&pem)
        .map_err(|e| format!("`{file}` is not PEM certificates: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("`{file}` holds no certificate"));
    }
    Ok(Arc::new(certificates.into_boxed_slice()))
}

/// `(tls, host, port, base_path)` from `http(s)://host[:port][/path]`.
fn parse_base_url(
    url: &str,
    path: &str,
    at: serde_saphyr::Location,
    errors: &mut Vec<PolicyError>,
) -> Option<(bool, String, u16, String)> {
    let mut fail = |message: String| {
        errors.push(PolicyError::new(path, message).at(at));
        None
    };
    let Ok(uri) = url.parse::<Uri>() else {
        return fail(format!("`{url}` is not a URL"));
    };
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return fail(format!(
                "`{url}` must start with https:// (or http:// for a local server)"
            ))
        }
    };
    let Some(authority) = uri.authority() else {
        return fail(format!("`{url}` has no host"));
    };
    if authority.as_str().contains('@') {
        return fail("credentials in the URL are not allowed; use `keys`".to_owned());
    }
    if uri.query().is_some() {
        return fail(format!("`{url}` must not have a query string"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Some((tls, host, port, base_path))
}

/// What every route is compiled against.
struct RouteContext<'a> {
    upstreams: &'a BTreeMap<String, Arc<Upstream>>,
    declared: &'a BTreeMap<String, Spanned<UpstreamSpec>>,
    directory: &'a Arc<Directory>,
    /// The limits filter, shared by all routes, when the policy sets any limit.
    limits: Option<Arc<dyn Filter>>,
    cache: &'a Arc<CacheStore>,
    shared: &'a SharedState,
    stats_windows: &'a [std::time::Duration],
}

fn compile_route(
    spec: &Spanned<RouteSpec>,
    path: &str,
    context: &RouteContext,
    sources: &mut Sources,
    errors: &mut Vec<PolicyError>,
) -> Option<Route> {
    let before = errors.len();
    let at = spec.referenced;
    let spec = &spec.value;
    if spec.name.trim().is_empty() {
        errors.push(PolicyError::new(format!("{path}.name"), "must not be empty").at(at));
    }
    let prefix = &spec.matcher.path_prefix;
    if !prefix.starts_with('/') {
        errors.push(
            PolicyError::new(
                format!("{path}.match.path_prefix"),
                format!("`{prefix}` must start with /"),
            )
            .at(at),
        );
    }
    if !spec.rewrite_prefix.is_empty() && !spec.rewrite_prefix.starts_with('/') {
        errors.push(
            PolicyError::new(
                format!("{path}.rewrite_prefix"),
                format!("`{}` must be empty or start with /", spec.rewrite_prefix),
            )
            .at(at),
        );
    }
    if spec.max_body.0 == 0 {
        errors.push(PolicyError::new(format!("{path}.max_body"), "must be more than 0").at(at));
    }
    let targets = compile_targets(spec, path, context, at, errors);
    let retry = compile_retry(spec, path, targets.as_ref(), at, errors);
    let specs = spec.filters.clone().unwrap_or_else(FilterSpec::defaults);
    for problem in FilterSpec::validate_order(&specs) {
        errors.push(PolicyError::new(format!("{path}.filters"), problem.to_string()).at(at));
    }
    // Filters run by stage; the ones a route declares keep their order within it.
    let mut staged: Vec<(Stage, Arc<dyn Filter>)> = Vec::with_capacity(specs.len() + 2);
    // The cache keys a request by its route's first target (whichever target answers).
    let first = targets.as_ref().and_then(|targets| targets.all().next());
    let build = BuildContext {
        cache: context.cache,
        route: RouteFacts {
            route: spec.name.as_str().into(),
            upstream: first.map_or("-", |t| &*t.upstream.name).into(),
            api: first.map_or("-", |t| t.upstream.provider.as_str()).into(),
            // A caller's own provider key is part of the key when it reaches the provider.
            credential_scoped: targets
                .as_ref()
                .is_none_or(|targets| targets.all().any(|t| !t.upstream.has_own_credentials())),
        },
    };
    for (i, filter) in specs.iter().enumerate() {
        match filter.build(&build) {
            Ok(built) => staged.push((filter.stage(), built)),
            Err(e) => errors.push(
                PolicyError::new(
                    format!("{path}.filters[{i}].{}", filter.name()),
                    e.to_string(),
                )
                .at(at),
            ),
        }
    }
    let cache_rules = specs.iter().find_map(|filter| match filter {
        FilterSpec::Cache(rules) => Some(rules.clone()),
        _ => None,
    });
    let auth = targets.as_ref().and_then(|targets| {
        compile_auth(spec, path, targets, context.directory, sources, at, errors)
    });
    if let Some(auth) = auth {
        staged.push((Stage::Authenticate, auth));
    }
    if let Some(limits) = &context.limits {
        staged.push((Stage::Limit, limits.clone()));
    }
    staged.sort_by_key(|(stage, _)| *stage);
    let filters = staged.into_iter().map(|(_, filter)| filter).collect();
    if errors.len() > before {
        return None;
    }
    Some(Route {
        metrics: context.shared.metrics.for_route(&spec.name),
        stats: context
            .shared
            .stats
            .series(&format!("route:{}", spec.name), context.stats_windows),
        name: spec.name.as_str().into(),
        hosts: spec
            .matcher
            .hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        path_prefix: prefix.trim_end_matches('/').to_owned(),
        rewrite_prefix: spec.rewrite_prefix.trim_end_matches('/').to_owned(),
        // Absent only after errors, which were recorded.
        provider: targets.as_ref()?.provider(),
        targets: targets?,
        retry,
        hedge: spec.hedge.map(|hedge| hedge.after),
        max_body: spec.max_body.0,
        chain: Chain::new(filters),
        cache_rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    /// A keys file of `count` keys as one line of JSON, each key's entry ending in `extra`.
    fn json_keys(count: usize, extra: &str) -> String {
        let entries: Vec<String> = (0..count)
            .map(|i| format!(r#"{{"tenant":"t{i}","hash":"{HASH}"{extra}}}"#))
            .collect();
        format!(r#"{{"keys":[{}]}}"#, entries.join(","))
    }

    #[test]
    fn a_large_json_document_is_read_by_serde_json_and_anything_else_by_yaml() {
        let large = json_keys(1000, r#","revoked":true"#);
        assert!(large.len() >= JSON_FAST_PATH_BYTES);
        let keys: KeysFile = parse_document(&large).unwrap();
        assert_eq!(keys.keys.len(), 1000);
        assert!(keys.keys[999].value.revoked);
        // serde_json leaves no location: this came the fast way.
        assert_eq!(keys.keys[0].referenced, serde_saphyr::Location::UNKNOWN);

        // Small: YAML, with locations.
        let small: KeysFile = parse_document(&json_keys(2, "")).unwrap();
        assert_ne!(small.keys[0].referenced, serde_saphyr::Location::UNKNOWN);

        // What serde_json refuses, the YAML parser decides, as it would have alone.
        for extra in [
            r#","revoked":"true""#,
            r#","owner":"x""#,
            r#","revoked":yes"#,
        ] {
            let text = json_keys(1000, extra);
            assert_eq!(
                parse_document::<KeysFile>(&text)
                    .map(|k| k.keys[0].value.revoked)
                    .ok(),
                parse_yaml::<KeysFile>(&text)
                    .map(|k| k.keys[0].value.revoked)
                    .ok(),
                "{extra}"
            );
        }
    }

    #[test]
    fn a_repeated_key_is_refused_in_json_as_in_yaml() {
        let padding = "x".repeat(JSON_FAST_PATH_BYTES);
        let text = format!(
            r#"{{"prices":{{"m":{{"input":1,"output":1}},"m":{{"input":2,"output":2}}}},"tenants":[],"x":"{padding}"}}"#
        );
        assert!(!json_keys_are_unique(&text));
        assert!(json_keys_are_unique(
            r#"{"a":{"b":1},"c":{"b":[{"b":1},{"b":2}]}}"#
        ));
        assert!(parse_document::<serde_json::Value>(&text).is_err());
    }

    #[test]
    fn the_yaml_budget_grows_with_the_document() {
        // 60,000 tenants: 300,000 nodes, over serde-saphyr's default budget of 250,000.
        let tenants: String = (0..60_000)
            .map(|i| format!("  - {{ name: t{i}, tier: free }}\n"))
            .collect();
        let text = format!("tenants:\n{tenants}");
        assert!(serde_saphyr::from_str::<PolicyFile>(&text).is_err());
        let file: PolicyFile = parse_yaml(&text).unwrap();
        assert_eq!(file.tenants.len(), 60_000);
        // An alias bomb is still stopped.
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n";
        assert!(parse_yaml::<serde_json::Value>(bomb).is_err());
    }
}
