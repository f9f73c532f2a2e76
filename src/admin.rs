//! The admin listener: health, readiness, metrics, reload and the active policy. Bind it to loopback or a
//! pod-internal address; it has no authentication of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use sluice_filters::cache::Purge;
use sluice_filters::limits::OnError;

use crate::policy::{PolicyStore, ReloadOutcome};
use crate::telemetry::rolling::now_ms;
use crate::telemetry::sla::Judgement;
use crate::telemetry::stats::Series;
use crate::upstream::health::CircuitState;

pub struct AdminApp {
    store: Arc<PolicyStore>,
    draining: Arc<AtomicBool>,
}

impl AdminApp {
    pub fn new(store: Arc<PolicyStore>, draining: Arc<AtomicBool>) -> Self {
        Self { store, draining }
    }

    async fn reload(&self) -> (StatusCode, serde_json::Value) {
        let store = self.store.clone();
        // Reading and compiling the file is blocking work; keep it off the async workers.
        let outcome = tokio::task::spawn_blocking(move || store.reload()).await;
        match outcome {
            Ok(Ok(ReloadOutcome::Applied { hash })) => {
                (StatusCode::OK, json!({"result": "applied", "hash": hash}))
            }
            Ok(Ok(ReloadOutcome::Unchanged { hash })) => {
                (StatusCode::OK, json!({"result": "unchanged", "hash": hash}))
            }
            Ok(Err(errors)) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "result": "rejected",
                    "active_hash": self.store.current().hash,
                    "errors": errors.errors,
                    "message": errors.to_string(),
                }),
            ),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"result": "failed", "message": e.to_string()}),
            ),
        }
    }

    /// Ready unless draining, or unless the shared limits store is down and the policy says
    /// to refuse requests then (`fail_closed`): such a replica cannot serve.
    fn readiness(&self) -> (StatusCode, serde_json::Value) {
        if self.draining.load(Ordering::Acquire) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "draining"}),
            );
        }
        let policy = self.store.current();
        let limits_store = match &policy.redis {
            None => "memory",
            Some(redis) if redis.is_healthy() => "redis",
            Some(redis) if redis.on_error == OnError::FailClosed => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "limits store unreachable", "on_error": "fail_closed", "policy_hash": policy.hash}),
                );
            }
            Some(_) => "redis unreachable: limits not enforced (fail_open)",
        };
        (
            StatusCode::OK,
            json!({"status": "ready", "policy_hash": policy.hash, "limits_store": limits_store}),
        )
    }

    /// Rolling percentiles and success rates per route and upstream, and the SLA rules' state.
    fn stats(&self) -> serde_json::Value {
        let policy = self.store.current();
        let windows = &policy.telemetry.stats_windows;
        let by_window = |series: &Series| {
            let mut out = serde_json::Map::new();
            for window in windows {
                if let Some(summary) = series.summary(*window) {
                    let name = humantime::format_duration(*window).to_string();
                    out.insert(name, json!(summary));
                }
            }
            serde_json::Value::Object(out)
        };
        let routes: serde_json::Map<String, serde_json::Value> = policy
            .routes
            .iter()
            .map(|route| (route.name.to_string(), by_window(&route.stats)))
            .collect();
        let upstreams: serde_json::Map<String, serde_json::Value> = policy
            .upstreams
            .values()
            .map(|upstream| (upstream.name.to_string(), by_window(&upstream.stats)))
            .collect();
        let sla: Vec<serde_json::Value> = policy
            .sla
            .iter()
            .map(|rule| {
                let (state, reasons) = match rule.judge() {
                    Judgement::Unjudged => ("unjudged", Vec::new()),
                    Judgement::Met => ("met", Vec::new()),
                    Judgement::Broken(reasons) => ("broken", reasons),
                };
                json!({
                    "name": &*rule.name,
                    "subject": rule.subject,
                    "window": humantime::format_duration(rule.window).to_string(),
                    "state": state,
                    "reasons": reasons,
                })
            })
            .collect();
        json!({ "routes": routes, "upstreams": upstreams, "sla": sla })
    }

    /// Every upstream's circuit, latency and keys (by name; never their values).
    fn upstreams(&self) -> serde_json::Value {
        let policy = self.store.current();
        let now = now_ms();
        let upstreams: Vec<serde_json::Value> = policy
            .upstreams
            .values()
            .map(|upstream| {
                let health = &upstream.health;
                let (samples, [p50, p95, p99]) =
                    health.first_byte.quantiles([0.5, 0.95, 0.99], now);
                let keys: Vec<serde_json::Value> = upstream
                    .keys
                    .keys()
                    .iter()
                    .map(|key| {
                        let circuit = key.health.breaker.state();
                        let state = if key.is_disabled() {
                            "disabled"
                        } else if key.cooling_for().is_some() {
                            "resting"
                        } else if circuit != CircuitState::Closed {
                            "circuit_open"
                        } else {
                            "ok"
                        };
                        json!({
                            "name": &*key.name,
                            "state": state,
                            "weight": key.weight,
                            "in_flight": key.health.in_flight.load(Ordering::Relaxed),
                            "max_concurrent": key.max_concurrent,
                            "resting_ms": key.cooling_for().map(|d| d.as_millis() as u64),
                            "cooldowns": key.health.cooldowns.load(Ordering::Relaxed),
                            "circuit": circuit.as_str(),
                        })
                    })
                    .collect();
                json!({
                    "name": &*upstream.name,
                    "provider": upstream.provider,
                    "address": format!("{}:{}", upstream.host, upstream.port),
                    "circuit": {
                        "state": health.breaker.state().as_str(),
                        "opened": health.breaker.opened.load(Ordering::Relaxed),
                    },
                    "first_byte_ms": {
                        "samples_last_minute": samples,
                        "p50": p50.as_secs_f64() * 1000.0,
                        "p95": p95.as_secs_f64() * 1000.0,
                        "p99": p99.as_secs_f64() * 1000.0,
                    },
                    "keys": keys,
                })
            })
            .collect();
        json!({ "upstreams": upstreams })
    }

    /// `GET /admin/cache`: the cache's size, counters and hit ratio, and the routes that use it.
    fn cache(&self) -> serde_json::Value {
        let policy = self.store.current();
        let routes: Vec<&str> = policy
            .routes
            .iter()
            .filter(|route| route.cache_rules.is_some())
            .map(|route| &*route.name)
            .collect();
        json!({
            "stats": policy.cache.stats(),
            "store": policy.cache.config(),
            "routes": routes,
        })
    }

    /// `POST /admin/cache/purge` with `{}` or no body (everything), `{"tenant": "t"}`,
    /// `{"route": "r"}` or both (the entries of that tenant on that route).
    async fn purge_cache(&self, body: &[u8]) -> (StatusCode, serde_json::Value) {
        let purge: Purge = if body.iter().all(u8::is_ascii_whitespace) {
            Purge::default()
        } else {
            match serde_json::from_slice(body) {
                Ok(purge) => purge,
                Err(e) => {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("expected {{\"tenant\": …, \"route\": …}} (both optional): {e}")}),
                    )
                }
            }
        };
        let policy = self.store.current();
        let purged = policy.cache.purge(&purge);
        let shared = match policy.cache.shared() {
            None => serde_json::Value::Null,
            Some(tier) => {
                match tokio::time::timeout(SHARED_PURGE_LIMIT, tier.purge(&purge)).await {
                    Ok(Ok(deleted)) => json!({"purged": deleted}),
                    Ok(Err(e)) => json!({"error": e.to_string()}),
                    Err(_) => json!({"error": "timed out; the purge goes on in Redis' own time"}),
                }
            }
        };
        tracing::info!(target: "sluice::cache", tenant = ?purge.tenant, route = ?purge.route, purged, "cache purged");
        (
            StatusCode::OK,
            json!({"purged": purged, "shared": shared, "tenant": purge.tenant, "route": purge.route}),
        )
    }

    fn policy(&self) -> serde_json::Value {
        let policy = self.store.current();
        let loaded_at = humantime::format_rfc3339_seconds(policy.loaded_at).to_string();
        json!({
            "hash": policy.hash,
            "loaded_at": loaded_at,
            "source": policy.source.display().to_string(),
            "summary": policy.summary(),
            "reloads": {
                "applied": self.store.reloads("applied"),
                "unchanged": self.store.reloads("unchanged"),
                "rejected": self.store.reloads("rejected"),
                "last_rejection": self.store.last_rejection(),
            },
            "policy": policy.redacted,
        })
    }
}

/// Prometheus's text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        // Only a purge reads its body; others are drained so the connection stays usable.
        let request_body = if method == Method::POST && path == "/admin/cache/purge" {
            match read_small_body(session).await {
                Ok(body) => body,
                Err(status) => {
                    return json_response(
                        status,
                        &json!({"error": "request body too large or unreadable"}),
                    )
                }
            }
        } else {
            let _ = session.drain_request_body().await;
            Vec::new()
        };
        let (status, body) = match (method, path.as_str()) {
            (Method::GET, "/metrics") => {
                let policy = self.store.current();
                return respond(
                    StatusCode::OK,
                    PROMETHEUS_TEXT,
                    self.store.metrics().render(&policy),
                );
            }
            (Method::GET, "/healthz") => (StatusCode::OK, json!({"status": "ok"})),
            (Method::GET, "/readyz") => self.readiness(),
            (Method::POST, "/admin/reload") => self.reload().await,
            (Method::GET, "/admin/policy") => (StatusCode::OK, self.policy()),
            (Method::GET, "/admin/upstreams") => (StatusCode::OK, self.upstreams()),
            (Method::GET, "/admin/stats") => (StatusCode::OK, self.stats()),
            (Method::GET, "/admin/cache") => (StatusCode::OK, self.cache()),
            (Method::POST, "/admin/cache/purge") => self.purge_cache(&request_body).await,
            (
                _,
                "/healthz" | "/readyz" | "/metrics" | "/admin/reload" | "/admin/policy"
                | "/admin/upstreams" | "/admin/stats" | "/admin/cache" | "/admin/cache/purge",
            ) => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method not allowed"}),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                json!({"error": format!("no admin endpoint {path}")}),
            ),
        };
        json_response(status, &body)
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Vec<u8>> {
    respond(
        status,
        "application/json",
        serde_json::to_vec_pretty(body).unwrap_or_default(),
    )
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

/// Largest admin request body read (a purge's JSON).
const MAX_ADMIN_BODY: usize = 64 * 1024;
/// How long a purge waits for the shared tier before answering.
const SHARED_PURGE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

async fn read_small_body(session: &mut ServerSession) -> Result<Vec<u8>, StatusCode> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_ADMIN_BODY => {
                body.extend_from_slice(&chunk)
            }
            Ok(Some(_)) => return Err(StatusCode::PAYLOAD_TOO_LARGE),
            Ok(None) => return Ok(body),
            Err(_) => return Err(StatusCode::BAD_REQUEST),
        }
    }
}
