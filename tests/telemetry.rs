//! Telemetry through the real binary: OTLP spans received and decoded by a collector inside the
//! test (HTTP/protobuf and gRPC), `/metrics` read by a Prometheus parser, `server-timing`,
//! `/admin/stats`, SLA alerts, the JSON access log, and secrets kept out of all of them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use sluice_filters::auth::keys::KeyHash;
use sluice_mock::Fault;

/// What a collector received: every span, with its resource's `service.name`, and the
/// headers of each export (HTTP collector).
#[derive(Clone, Default)]
struct Received(
    Arc<Mutex<Vec<(String, Span)>>>,
    Arc<Mutex<Vec<axum::http::HeaderMap>>>,
);

impl Received {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
    }

    /// The `service.name` of the resource each span came under.
    fn services(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(s, _)| s.clone())
            .collect()
    }

    fn spans(&self) -> Vec<Span> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Waits until `pred` holds over the spans received so far.
    async fn wait_for(&self, what: &str, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {:#?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An OTLP/HTTP collector: `POST /v1/traces` with protobuf bodies.
async fn http_collector() -> (String, Received) {
    let received = Received::default();
    let state = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    state.1.lock().unwrap().push(headers);
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    state.take(request);
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// An OTLP/gRPC collector.
struct GrpcCollector(Received);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_collector() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::new(GrpcCollector(received.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    (url, received)
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attribute(span, key)? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key)? {
        Value::IntValue(v) => Some(*v),
        _ => None,
    }
}

const CALLER_KEY: &str = "sk-sluice-canary-caller-7f3e9a";
const PROVIDER_KEY: &str = "sk-canary-provider-a81c4d";

fn traced_policy(
    primary: &MockServer,
    backup: &MockServer,
    collector: &str,
    protocol: &str,
) -> String {
    format!(
        r#"
telemetry:
  otlp: {{ endpoint: "{collector}", protocol: {protocol}, export_interval: 100ms, service_name: sluice-test }}
prices:
  gpt-4o-mini: {{ input: 1000000, output: 1000000 }}
upstreams:
  primary: {{ provider: openai, base_url: "{p}", keys: ["{PROVIDER_KEY}"] }}
  backup: {{ provider: openai, base_url: "{b}", keys: ["{PROVIDER_KEY}"] }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    targets: [primary, backup]
    retry: {{ attempts: 3 }}
tiers:
  free: {{ limits: {{ requests_per_minute: 100 }} }}
tenants:
  - {{ name: team, tier: free, keys: [{{ hash: "{hash}" }}] }}
"#,
        p = primary.url(),
        b = backup.url(),
        hash = KeyHash::of(CALLER_KEY).to_text(),
    )
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const SNAPSHOT: &str = "gpt-4o-mini-2024-07-18";

async fn traced_call(sidecar: &Sidecar, body: &serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(CALLER_KEY)
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        // The answer names a dated snapshot, as providers do: the span's response model.
        .header("x-mock-model", SNAPSHOT)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A request whose first attempt fails (503) and whose fallback serves: a server span
/// continuing the caller's trace, two client spans under it, GenAI attributes, and the
/// upstream receiving the trace through the attempt's span.
async fn spans_show_retries_fallbacks_and_genai_attributes(protocol: &str) {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_fault(Some(Fault::Status {
        status: 503,
        retry_after: None,
    }));
    let (url, collector) = match protocol {
        "grpc" => grpc_collector().await,
        _ => http_collector().await,
    };
    let sidecar = Sidecar::start(&traced_policy(&primary, &backup, &url, protocol)).await;
    let response = traced_call(&sidecar, &chat_body("trace me", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "backup");

    let spans = collector
        .wait_for("a server span and two attempt spans", |spans| {
            spans.len() >= 3
        })
        .await;
    let trace_id = hex::decode(TRACE_ID).unwrap();
    assert!(
        spans.iter().all(|s| s.trace_id == trace_id),
        "one trace, the caller's"
    );
    let services = collector.services();
    assert!(
        services.iter().all(|s| s == "sluice-test"),
        "every span under the policy's service name: {services:?}"
    );
    let server = spans
        .iter()
        .find(|s| s.kind == 2) // SPAN_KIND_SERVER
        .expect("a server span");
    assert_eq!(server.name, "chat gpt-4o-mini");
    assert_eq!(server.parent_span_id, hex::decode(CALLER_SPAN).unwrap());
    assert_eq!(
        string_attribute(server, "gen_ai.operation.name"),
        Some("chat")
    );
    assert_eq!(string_attribute(server, "gen_ai.system"), Some("openai"));
    assert_eq!(
        string_attribute(server, "gen_ai.request.model"),
        Some("gpt-4o-mini")
    );
    assert_eq!(
        string_attribute(server, "gen_ai.response.model"),
        Some(SNAPSHOT)
    );
    assert!(int_attribute(server, "gen_ai.usage.input_tokens").unwrap() > 0);
    assert!(int_attribute(server, "gen_ai.usage.output_tokens").unwrap() > 0);
    assert_eq!(
        int_attribute(server, "http.response.status_code"),
        Some(200)
    );
    assert_eq!(int_attribute(server, "sluice.attempts"), Some(2));
    assert_eq!(string_attribute(server, "sluice.tenant"), Some("team"));
    assert_eq!(string_attribute(server, "sluice.tier"), Some("free"));

    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == 3).collect(); // CLIENT
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "one span per attempt");
    for attempt in &attempts {
        assert_eq!(
            attempt.parent_span_id, server.span_id,
            "attempts are children"
        );
        assert_eq!(attempt.name, "chat gpt-4o-mini");
    }
    assert_eq!(
        string_attribute(attempts[0], "sluice.upstream"),
        Some("primary")
    );
    assert_eq!(
        int_attribute(attempts[0], "http.response.status_code"),
        Some(503)
    );
    assert_eq!(attempts[0].status.as_ref().map(|s| s.code), Some(2)); // ERROR
    assert_eq!(
        string_attribute(attempts[1], "sluice.upstream"),
        Some("backup")
    );
    assert_eq!(
        int_attribute(attempts[1], "http.response.status_code"),
        Some(200)
    );

    // The backup saw the caller's trace continue through its attempt's span.
    let sent = backup.requests().remove(0);
    let traceparent = sent
        .headers
        .iter()
        .find(|(n, _)| n == "traceparent")
        .map(|(_, v)| v.clone())
        .expect("traceparent upstream");
    assert_eq!(
        traceparent,
        format!("00-{TRACE_ID}-{}-01", hex::encode(&attempts[1].span_id))
    );
}

#[tokio::test]
async fn spans_over_http_protobuf() {
    spans_show_retries_fallbacks_and_genai_attributes("http/protobuf").await;
}

#[tokio::test]
async fn spans_over_grpc() {
    spans_show_retries_fallbacks_and_genai_attributes("grpc").await;
}

#[tokio::test]
async fn metrics_count_what_was_sent_and_timings_are_reported() {
    let (primary, backup) = (mock().await, mock().await);
    let (url, _collector) = http_collector().await;
    let policy = traced_policy(&primary, &backup, &url, "http/protobuf").replace(
        "requests_per_minute: 100",
        "requests_per_minute: 100, concurrent: 1, queue: { max_wait: 5s }",
    );
    let sidecar = Sidecar::start(&policy).await;
    for i in 0..5 {
        let response = traced_call(&sidecar, &chat_body(&format!("count {i}"), i % 2 == 0)).await;
        assert_eq!(response.status(), 200);
        let timing = response.headers()["server-timing"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            timing.starts_with("sluice;dur=") && timing.contains("upstream;dur="),
            "{timing}"
        );
        // A whole answer's first token came with its head; a stream's head goes out first.
        let streamed = i % 2 == 0;
        assert_eq!(timing.contains("ttft;dur="), !streamed, "{timing}");
        response.bytes().await.unwrap();
    }
    let refused = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth("sk-sluice-unknown")
        .json(&chat_body("who", false))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers()["server-timing"]
        .to_str()
        .unwrap()
        .starts_with("sluice;dur="));

    // Metrics are recorded as the exchange ends, just after the caller has its answer.
    let deadline = Instant::now() + Duration::from_secs(3);
    let metrics = loop {
        let metrics = sidecar.metrics().await;
        let ok = [
            ("route", "openai"),
            ("status", "200"),
            ("upstream", "primary"),
        ];
        if metrics.value("sluice_requests_total", &ok) == Some(5.0) || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ok = [
        ("route", "openai"),
        ("status", "200"),
        ("upstream", "primary"),
        ("model", "gpt-4o-mini"),
        ("tier", "free"),
    ];
    assert_eq!(metrics.value("sluice_requests_total", &ok), Some(5.0));
    let denied = [("route", "openai"), ("status", "401")];
    assert_eq!(metrics.value("sluice_requests_total", &denied), Some(1.0));
    let route = [("route", "openai")];
    assert_eq!(
        metrics.value(
            "sluice_request_duration_seconds_count",
            &[("route", "openai"), ("cache", "")]
        ),
        Some(6.0)
    );
    assert_eq!(
        metrics.value("sluice_overhead_seconds_count", &route),
        Some(6.0)
    );
    assert_eq!(
        metrics.value("sluice_time_to_first_token_seconds_count", &route),
        Some(3.0),
        "the three streams"
    );
    assert!(metrics.value("sluice_inter_token_gap_seconds_count", &route) >= Some(3.0));
    let input = [
        ("route", "openai"),
        ("kind", "input"),
        ("model", "gpt-4o-mini"),
    ];
    assert!(metrics.value("sluice_tokens_total", &input) > Some(0.0));
    assert!(
        metrics.value("sluice_cost_usd_total", &[("route", "openai")]) > Some(0.0),
        "a dollar a token"
    );
    let attempts = [("upstream", "primary"), ("outcome", "ok")];
    assert_eq!(
        metrics.value("sluice_upstream_attempts_total", &attempts),
        Some(5.0)
    );
    let connections: f64 = ["true", "false"]
        .iter()
        .filter_map(|reused| {
            metrics.value(
                "sluice_upstream_connections_total",
                &[("upstream", "primary"), ("reused", reused)],
            )
        })
        .sum();
    assert_eq!(connections, 5.0);
    // Every attempt's time to its head; the time to connect of each new connection.
    let primary_labels = [("upstream", "primary")];
    assert_eq!(
        metrics.value("sluice_upstream_first_byte_seconds_count", &primary_labels),
        Some(5.0)
    );
    let new = metrics
        .value(
            "sluice_upstream_connections_total",
            &[("upstream", "primary"), ("reused", "false")],
        )
        .unwrap_or(0.0);
    let reused = metrics
        .value(
            "sluice_upstream_connections_total",
            &[("upstream", "primary"), ("reused", "true")],
        )
        .unwrap_or(0.0);
    assert!(new >= 1.0 && reused >= 1.0, "new {new}, reused {reused}");
    assert_eq!(
        metrics.value("sluice_upstream_connect_seconds_count", &primary_labels),
        Some(new)
    );
    assert_eq!(
        metrics.value("sluice_output_tokens_per_second_count", &route),
        Some(3.0),
        "the three streams"
    );
    assert!(metrics.value("sluice_output_tokens_per_second_sum", &route) > Some(0.0));
    // Tens of microseconds are visible in the overhead histogram.
    let finest = metrics.0.samples.iter().any(|s| match &s.value {
        prometheus_parse::Value::Histogram(buckets) => {
            s.metric == "sluice_overhead_seconds" && buckets.iter().any(|b| b.less_than == 0.00001)
        }
        _ => false,
    });
    assert!(finest, "a 10µs bucket");

    let stats: serde_json::Value = reqwest::get(format!("{}/admin/stats", sidecar.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let minute = &stats["routes"]["openai"]["1m"];
    assert_eq!(minute["requests"], 6, "{stats}");
    assert_eq!(minute["success_rate"], 100.0, "a 401 is not a failure");
    assert!(minute["total_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert_eq!(stats["upstreams"]["primary"]["1m"]["requests"], 5);
    // Under a tier with a queue every admission is timed; none had to wait yet.
    assert_eq!(
        metrics.value("sluice_queue_wait_seconds_count", &route),
        Some(5.0)
    );
    assert!(metrics.value("sluice_queue_wait_seconds_sum", &route) < Some(0.05));

    // A request that waits in the limits queue behind a slow stream: its wait is measured.
    let slow = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(CALLER_KEY)
        .header("x-mock-chunk-ms", "100")
        .header("x-mock-chunks", "4")
        .json(&chat_body("hold", true))
        .send()
        .await
        .unwrap();
    let (_, queued) = tokio::join!(slow.bytes(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        traced_call(&sidecar, &chat_body("queued", false)).await
    });
    assert_eq!(queued.status(), 200);
    let queue_wait = ("sluice_queue_wait_seconds_count", &route[..], 7.0);
    wait_for_metric(&sidecar, queue_wait, Duration::from_secs(3), async || {}).await;
    let waited = sidecar
        .metrics()
        .await
        .value("sluice_queue_wait_seconds_sum", &route)
        .unwrap();
    assert!(waited >= 0.1, "waited {waited} s");
}

#[tokio::test]
async fn an_unreachable_collector_costs_requests_nothing() {
    let (primary, backup) = (mock().await, mock().await);
    // A collector that accepts and never answers; a long export timeout that a request must
    // never wait for, so the small queue overflows behind the stuck export.
    let hung = Sinkhole::start().await;
    let policy = traced_policy(&primary, &backup, &hung.url(), "http/protobuf").replace(
        "export_interval: 100ms",
        "export_interval: 100ms, timeout: 5s, queue_size: 4",
    );
    let sidecar = Sidecar::start(&policy).await;
    let started = Instant::now();
    for i in 0..20 {
        let response = traced_call(&sidecar, &chat_body(&format!("lost {i}"), false)).await;
        assert_eq!(response.status(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "requests waited on the exporter: {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = sidecar.metrics().await;
        let lost = metrics
            .value("sluice_otlp_spans_dropped_total", &[])
            .unwrap_or(0.0)
            + metrics
                .value("sluice_otlp_spans_failed_total", &[])
                .unwrap_or(0.0);
        if lost >= 1.0 {
            assert!(
                metrics.value("sluice_otlp_spans_dropped_total", &[]) >= Some(1.0),
                "a queue of 4 overflows"
            );
            break;
        }
        assert!(Instant::now() < deadline, "lost spans are counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A latency rule and a success-rate rule break (injected latency; injected 500s) and heal:
/// each once, in the metrics, the log and a span event — exported although the policy samples
/// no requests.
/// A collector that refuses connections: the spans it did not take are counted as failed,
/// and the requests are answered as usual.
#[tokio::test]
async fn a_refusing_collector_counts_failed_exports() {
    let (primary, backup) = (mock().await, mock().await);
    let refusing = format!("http://127.0.0.1:{}", free_port());
    let policy = traced_policy(&primary, &backup, &refusing, "http/protobuf").replace(
        "export_interval: 100ms",
        "export_interval: 100ms, timeout: 1s",
    );
    let sidecar = Sidecar::start(&policy).await;
    for i in 0..3 {
        let response = traced_call(&sidecar, &chat_body(&format!("refused {i}"), false)).await;
        assert_eq!(response.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = sidecar.metrics().await;
        let failed = metrics.value("sluice_otlp_spans_failed_total", &[]);
        if failed >= Some(3.0) {
            assert_eq!(
                metrics.value("sluice_otlp_spans_exported_total", &[]),
                Some(0.0)
            );
            assert_eq!(
                metrics.value("sluice_otlp_spans_dropped_total", &[]),
                Some(0.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "failed exports counted: {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_sla_rule_breaks_and_recovers() {
    let mock = mock().await;
    let (collector_url, collector) = http_collector().await;
    let policy = format!(
        r#"
telemetry:
  otlp: {{ endpoint: "{collector_url}", protocol: http/protobuf, export_interval: 100ms, sampling_ratio: 0 }}
  sla:
    - {{ name: fast-chat, route: openai, window: 2s, p95: 150ms, min_requests: 3 }}
    - {{ name: reliable, route: openai, window: 2s, success_rate: 90, min_requests: 3 }}
upstreams:
  openai: {{ provider: openai, base_url: "{url}", circuit_breaker: {{ enabled: false }} }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, auth: passthrough, retry: {{ attempts: 1 }} }}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start_with_env(&policy, &[("SLUICE_LOG", "info")]).await;
    let send = || async {
        reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .json(&chat_body("sla", false))
            .send()
            .await
            .unwrap()
            .status()
    };
    let call = || async { assert_eq!(send().await, 200) };
    mock.set_first_byte_delay(Duration::from_millis(300));
    for _ in 0..4 {
        call().await;
    }
    let rule = [("rule", "fast-chat")];
    let breaches = ("sluice_sla_breaches_total", &rule[..], 1.0);
    wait_for_metric(&sidecar, breaches, Duration::from_secs(5), async || {}).await;
    assert_eq!(
        sidecar.metrics().await.value("sluice_sla_ok", &rule),
        Some(0.0)
    );
    let stats: serde_json::Value = reqwest::get(format!("{}/admin/stats", sidecar.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["sla"][0]["state"], "broken", "{stats}");

    // Healed: fast answers, and the slow ones leave the 2 s window.
    mock.set_first_byte_delay(Duration::ZERO);
    let recoveries = ("sluice_sla_recoveries_total", &rule[..], 1.0);
    wait_for_metric(&sidecar, recoveries, Duration::from_secs(8), call).await;
    let metrics = sidecar.metrics().await;
    assert_eq!(metrics.value("sluice_sla_ok", &rule), Some(1.0));
    assert_eq!(
        metrics.value("sluice_sla_breaches_total", &rule),
        Some(1.0),
        "once"
    );

    // Failures: the success-rate rule breaks, and heals once they leave the window.
    let reliable = [("rule", "reliable")];
    mock.set_fault(Some(Fault::Status {
        status: 500,
        retry_after: None,
    }));
    let breaches = ("sluice_sla_breaches_total", &reliable[..], 1.0);
    wait_for_metric(&sidecar, breaches, Duration::from_secs(5), async || {
        assert_eq!(send().await, 500);
    })
    .await;
    mock.set_fault(None);
    let recoveries = ("sluice_sla_recoveries_total", &reliable[..], 1.0);
    wait_for_metric(&sidecar, recoveries, Duration::from_secs(8), call).await;

    let logs = sidecar.logs();
    assert_eq!(logs.matches("SLA broken").count(), 2, "{logs}");
    assert_eq!(logs.matches("SLA recovered").count(), 2, "{logs}");
    let spans = collector
        .wait_for("a broken and a recovered event per rule", |spans| {
            spans.iter().filter(|s| s.name.starts_with("sla ")).count() >= 4
        })
        .await;
    assert!(
        spans.iter().all(|s| s.name.starts_with("sla ")),
        "requests are not sampled"
    );
    for name in ["fast-chat", "reliable"] {
        let events: Vec<&str> = spans
            .iter()
            .filter(|s| s.name == format!("sla {name}"))
            .flat_map(|s| &s.events)
            .inspect(|event| {
                let rule = event
                    .attributes
                    .iter()
                    .find(|kv| kv.key == "sluice.sla.rule");
                assert!(
                    matches!(rule.and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref()),
                        Some(Value::StringValue(r)) if r == name),
                    "{event:?}"
                );
            })
            .map(|event| event.name.as_str())
            .collect();
        assert_eq!(events, ["sla.broken", "sla.recovered"], "{name}");
    }
}

/// One JSON line per request with who asked (tenant, tier), what it took (attempts, cache,
/// cost, time to first token on a stream), and no prompt or completion unless the policy asks.
#[tokio::test]
async fn the_access_log_is_one_json_line_without_prompts_unless_asked() {
    let mock = mock().await;
    let policy = |bodies: bool| {
        format!(
            r#"
telemetry: {{ access_log: {{ bodies: {bodies} }} }}
prices:
  gpt-4o-mini: {{ input: 1000000, output: 1000000 }}
upstreams:
  openai: {{ provider: openai, base_url: "{url}", keys: ["{PROVIDER_KEY}"] }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    upstream: openai
    filters:
      - request_id: {{}}
      - cache: {{ ttl: 1h }}
tiers:
  free: {{ limits: {{ requests_per_minute: 100 }} }}
tenants:
  - {{ name: team, tier: free, keys: [{{ hash: "{hash}" }}] }}
"#,
            url = mock.url(),
            hash = KeyHash::of(CALLER_KEY).to_text(),
        )
    };
    for bodies in [false, true] {
        let sidecar = Sidecar::start_with_env(&policy(bodies), &ACCESS_LOG_JSON).await;
        let prompt = format!("a private prompt {bodies}");
        let whole = serde_json::json!({
            "model": "gpt-4o-mini",
            "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
        });
        let mut ids = Vec::new();
        let mut sizes = Vec::new();
        for body in [whole.clone(), whole, chat_body("streamed", true)] {
            sizes.push(serde_json::to_vec(&body).unwrap().len());
            let response = reqwest::Client::new()
                .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
                .bearer_auth(CALLER_KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            ids.push(
                response.headers()["x-request-id"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
            response.bytes().await.unwrap();
        }
        let mut lines = wait_for_access(&sidecar, "openai", 3).await;
        // Nothing more comes: one line per request.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(access_lines(&sidecar).len(), 3, "{}", sidecar.logs());
        lines.sort_by_key(|line| {
            let id = line["fields"]["request_id"].as_str().unwrap().to_owned();
            ids.iter().position(|i| *i == id).expect("a request's id")
        });
        for (line, size) in lines.iter().zip(&sizes) {
            let fields = &line["fields"];
            // The body as sent upstream, also for the stream, whose body is released once its
            // answer is chosen (and grew by the usage option Sluice asks for).
            let sent = fields["request_bytes"].as_u64().unwrap() as usize;
            match fields["stream"].as_bool() {
                Some(true) => assert!(sent > *size, "{fields}"),
                _ => assert_eq!(sent, *size, "{fields}"),
            }
            assert_eq!(fields["tenant"], "team", "{fields}");
            assert_eq!(fields["tier"], "free", "{fields}");
            assert_eq!(fields["status"], 200, "{fields}");
            assert!(fields["duration_ms"].as_f64().unwrap() > 0.0);
            assert!(fields["sluice_ms"].as_f64().is_some());
        }
        let (miss, hit, stream) = (
            &lines[0]["fields"],
            &lines[1]["fields"],
            &lines[2]["fields"],
        );
        assert_eq!(miss["cache"], "miss");
        assert_eq!(miss["attempts"], 1);
        assert_eq!(miss["upstream"], "openai");
        assert_eq!(miss["model"], "gpt-4o-mini");
        assert!(miss["input_tokens"].as_u64().unwrap() > 0);
        assert!(miss["cost_usd"].as_f64().unwrap() > 0.0, "a dollar a token");
        assert!(miss["upstream_ms"].as_f64().is_some());
        assert_eq!(hit["cache"], "hit");
        assert_eq!(hit["attempts"], 0, "answered from the cache");
        assert!(hit.get("cost_usd").is_none(), "a hit costs nothing: {hit}");
        assert_eq!(stream["stream"], true);
        assert!(stream["ttft_ms"].as_f64().unwrap() > 0.0, "{stream}");
        assert!(stream["output_tokens"].as_u64().unwrap() > 0, "{stream}");
        assert!(
            miss.get("ttft_ms").is_none(),
            "no stream, no first token: {miss}"
        );

        let miss_line = lines[0].to_string();
        assert_eq!(miss_line.contains(&prompt), bodies, "{miss_line}");
        let completion = format!("echo: {prompt}");
        assert_eq!(miss_line.contains(&completion), bodies, "{miss_line}");
    }
}

/// Canary keys through success, 401, 429, retries and a broken stream, with the most verbose
/// log level and tracing on: they appear nowhere Sluice writes.
#[tokio::test]
async fn canary_keys_never_leak() {
    let (primary, backup) = (mock().await, mock().await);
    let (url, collector) = http_collector().await;
    let policy = traced_policy(&primary, &backup, &url, "http/protobuf")
        .replace("requests_per_minute: 100", "requests_per_minute: 4");
    let sidecar = Sidecar::start_with_env(&policy, &[("SLUICE_LOG", "trace")]).await;
    primary.set_fault(Some(Fault::Status {
        status: 500,
        retry_after: None,
    }));
    assert_eq!(
        traced_call(&sidecar, &chat_body("retried", false))
            .await
            .status(),
        200
    );
    primary.set_fault(Some(Fault::ResetMidStream));
    let broken = traced_call(&sidecar, &chat_body("broken", true)).await;
    let _ = broken.bytes().await;
    primary.set_fault(None);
    let mut error_bodies = Vec::new();
    for _ in 0..4 {
        let response = traced_call(&sidecar, &chat_body("limited", false)).await;
        error_bodies.push(response.text().await.unwrap());
    }
    let wrong = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(format!("{CALLER_KEY}-wrong"))
        .json(&chat_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    error_bodies.push(wrong.text().await.unwrap());
    // A key in the query string (as some SDKs send one) is not logged or traced either.
    let queried = reqwest::Client::new()
        .post(format!(
            "{}/openai/v1/chat/completions?api-key={CALLER_KEY}&key={PROVIDER_KEY}",
            sidecar.proxy
        ))
        .json(&chat_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(queried.status(), 401);
    error_bodies.push(queried.text().await.unwrap());
    assert!(
        error_bodies.iter().any(|b| b.contains("rate limit")),
        "{error_bodies:?}"
    );

    collector
        .wait_for("spans of every request", |s| s.len() >= 8)
        .await;
    let metrics = reqwest::get(format!("{}/metrics", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut admin = Vec::new();
    for path in [
        "/admin/policy",
        "/admin/upstreams",
        "/admin/stats",
        "/readyz",
    ] {
        let text = reqwest::get(format!("{}{path}", sidecar.admin))
            .await
            .unwrap()
            .text()
            .await;
        admin.push(text.unwrap());
    }
    let spans = format!("{:?}", collector.spans());
    let everything = [
        sidecar.logs(),
        spans,
        metrics,
        error_bodies.join("\n"),
        admin.join("\n"),
    ];
    for secret in [CALLER_KEY, PROVIDER_KEY] {
        use base64::Engine;
        let forms = [
            secret.to_owned(),
            base64::engine::general_purpose::STANDARD.encode(secret),
            urlencoding(secret),
        ];
        for (place, text) in ["logs", "spans", "metrics", "error bodies", "admin"]
            .iter()
            .zip(&everything)
        {
            for form in &forms {
                assert!(
                    !text.contains(form.as_str()),
                    "{secret} in {place} as {form}"
                );
            }
        }
    }
    assert!(sidecar.logs().contains("TRACE") || sidecar.logs().contains("DEBUG"));
}

/// Waits until the sample `(name, labels)` has the value `want`, calling `between` after each
/// look that found it otherwise.
async fn wait_for_metric(
    sidecar: &Sidecar,
    (name, labels, want): (&str, &[(&str, &str)], f64),
    within: Duration,
    mut between: impl AsyncFnMut(),
) {
    let deadline = Instant::now() + within;
    while sidecar.metrics().await.value(name, labels) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} never reached {want}"
        );
        between().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn urlencoding(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `server-timing` entries by name: `dur` in milliseconds (or `desc`).
fn server_timing(response: &reqwest::Response) -> std::collections::HashMap<String, String> {
    let header = response.headers()["server-timing"].to_str().unwrap();
    header
        .split(',')
        .filter_map(|entry| {
            let (name, param) = entry.trim().split_once(';')?;
            let (_, value) = param.split_once('=')?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect()
}

fn timing_ms(timings: &std::collections::HashMap<String, String>, name: &str) -> f64 {
    timings[name].parse().unwrap()
}

/// The JSON access lines written so far.
fn access_lines(sidecar: &Sidecar) -> Vec<serde_json::Value> {
    sidecar
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["target"] == "sluice::access")
        .collect()
}

/// Waits for `count` access lines of a route.
async fn wait_for_access(sidecar: &Sidecar, route: &str, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<_> = access_lines(sidecar)
            .into_iter()
            .filter(|entry| entry["fields"]["route"] == route)
            .collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ACCESS_LOG_JSON: [(&str, &str); 2] = [
    ("SLUICE_LOG", "sluice::access=info"),
    ("SLUICE_LOG_FORMAT", "json"),
];

/// Every attempt failed (refused connections; a stalled upstream timed out twice): the time
/// went to the upstream, not to Sluice, and the attempts are counted. The stalled route's
/// 1.6 s upstream time is far above the 200 ms Sluice may take on a loaded machine.
#[tokio::test]
async fn a_failed_upstream_s_time_is_the_upstream_s_and_its_attempts_are_counted() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let stalled = mock().await;
    stalled.set_fault(Some(Fault::Stall));
    let (url, collector) = http_collector().await;
    let policy = format!(
        r#"
telemetry:
  otlp: {{ endpoint: "{url}", protocol: http/protobuf, export_interval: 100ms }}
upstreams:
  dead: {{ provider: openai, base_url: "{dead}" }}
  stalled: {{ provider: openai, base_url: "{stalled}" }}
routes:
  - name: dead
    match: {{ path_prefix: /dead }}
    upstream: dead
    auth: passthrough
    retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 2ms }} }}
  - name: stalled
    match: {{ path_prefix: /stalled }}
    upstream: stalled
    auth: passthrough
    retry: {{ attempts: 2, attempt_timeout: 800ms, on: [first_byte_timeout], backoff: {{ base: 1ms, max: 2ms }} }}
"#,
        stalled = stalled.url()
    );
    let sidecar = Sidecar::start_with_env(&policy, &ACCESS_LOG_JSON).await;
    for (route, status, upstream_at_least) in [("dead", 502, 0.0), ("stalled", 504, 1600.0)] {
        let response = reqwest::Client::new()
            .post(format!("{}/{route}/v1/chat/completions", sidecar.proxy))
            .json(&chat_body("fail", false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{route}");
        let timings = server_timing(&response);
        assert!(
            timing_ms(&timings, "sluice") < 200.0,
            "{route}: the upstream's time is not Sluice's: {timings:?}"
        );
        assert!(
            timing_ms(&timings, "upstream") >= upstream_at_least,
            "{route}: {timings:?}"
        );
        assert!(!timings.contains_key("ttft"), "no token came: {timings:?}");
    }

    for (route, attempts) in [("dead", 3), ("stalled", 2)] {
        let lines = wait_for_access(&sidecar, route, 1).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        let fields = &lines[0]["fields"];
        assert_eq!(fields["attempts"], attempts, "{route}: {fields}");
        assert_eq!(fields["upstream"], route, "{route}: the upstream tried");
        assert!(fields["upstream_ms"].as_f64().is_some(), "{fields}");
    }
    // Metrics are recorded before the access line is written.
    let metrics = sidecar.metrics().await;
    for (route, total_at_least) in [("dead", 0.0), ("stalled", 1.6)] {
        let labels = [("route", route)];
        let overhead = metrics
            .value("sluice_overhead_seconds_sum", &labels)
            .unwrap();
        let total = metrics
            .value("sluice_request_duration_seconds_sum", &labels)
            .unwrap();
        assert!(overhead < 0.2, "{route}: overhead {overhead} s");
        assert!(total >= total_at_least, "{route}: total {total} s");
    }

    let spans = collector
        .wait_for("two server spans", |spans| {
            spans.iter().filter(|s| s.kind == 2).count() >= 2
        })
        .await;
    let server = |route: &str| {
        spans
            .iter()
            .find(|s| s.kind == 2 && string_attribute(s, "sluice.route") == Some(route))
            .unwrap_or_else(|| panic!("a server span for {route}"))
    };
    assert_eq!(int_attribute(server("dead"), "sluice.attempts"), Some(3));
    assert_eq!(
        string_attribute(server("dead"), "sluice.upstream"),
        Some("dead")
    );
    assert_eq!(int_attribute(server("stalled"), "sluice.attempts"), Some(2));
    assert_eq!(
        string_attribute(server("dead"), "gen_ai.response.model"),
        None,
        "no response, no response model"
    );
    assert_eq!(
        spans.iter().filter(|s| s.kind == 3).count(),
        5,
        "a client span per attempt"
    );

    // A caller that gives up while an attempt is under way: its attempt is counted too. It
    // leaves once the stalled upstream has its request, well inside the first 800 ms attempt.
    let asked = stalled.request_count();
    let gone = tokio::time::timeout(
        Duration::from_secs(5),
        reqwest::Client::new()
            .post(format!("{}/stalled/v1/chat/completions", sidecar.proxy))
            .json(&chat_body("gone", false))
            .send(),
    );
    let upstream_has_it = eventually(
        Duration::from_secs(5),
        "the gone caller's attempt never reached the upstream",
        async || stalled.request_count() > asked,
    );
    tokio::select! {
        answer = gone => panic!("the stalled upstream answered: {answer:?}"),
        () = upstream_has_it => {}
    }
    let lines = wait_for_access(&sidecar, "stalled", 2).await;
    let fields = &lines.last().expect("the gone caller's line")["fields"];
    assert_eq!(fields["outcome"], "CallerGone", "{fields}");
    assert_eq!(fields["attempts"], 1, "{fields}");
    assert_eq!(fields["upstream"], "stalled", "{fields}");
}

/// Cache hits answer in microseconds: their latency is kept apart from the upstream's, in the
/// histogram (`cache="hit"`) and in `/admin/stats` (not in the route's percentiles).
#[tokio::test]
async fn cache_hits_are_timed_apart_from_the_upstream() {
    let mock = mock().await;
    mock.set_first_byte_delay(Duration::from_millis(150));
    let policy = format!(
        r#"
telemetry: {{ stats: {{ windows: [1m, 7s] }} }}
cache: {{ max_bytes: 4KiB }}
upstreams:
  openai: {{ provider: openai, base_url: "{url}" }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    upstream: openai
    auth: passthrough
    filters:
      - cache: {{ ttl: 1h, max_entry: 2KiB }}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "temperature": 0,
        "messages": [{"role": "user", "content": "cache me"}],
    });
    const HITS: usize = 5;
    for i in 0..=HITS {
        let response = reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let expected = if i == 0 { "miss" } else { "hit" };
        assert_eq!(
            response.headers()["x-sluice-cache"],
            expected,
            "request {i}"
        );
        response.bytes().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let hits = [("route", "openai"), ("cache", "hit")];
    let others = [("route", "openai"), ("cache", "")];
    let metrics = loop {
        let metrics = sidecar.metrics().await;
        let count = metrics.value("sluice_request_duration_seconds_count", &hits);
        if count == Some(HITS as f64) || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        metrics.value("sluice_request_duration_seconds_count", &hits),
        Some(HITS as f64)
    );
    assert_eq!(
        metrics.value("sluice_request_duration_seconds_count", &others),
        Some(1.0),
        "the miss"
    );
    let hit_seconds = metrics
        .value("sluice_request_duration_seconds_sum", &hits)
        .unwrap();
    assert!(
        hit_seconds < 0.1,
        "hits did not wait on the upstream: {hit_seconds}"
    );
    assert!(metrics.value("sluice_request_duration_seconds_sum", &others) >= Some(0.15));

    let stats: serde_json::Value = reqwest::get(format!("{}/admin/stats", sidecar.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // A custom window shows next to the default one.
    for window in ["1m", "7s"] {
        let summary = &stats["routes"]["openai"][window];
        assert_eq!(summary["requests"], 1, "{window}: {stats}");
        assert_eq!(summary["cache_hits"], HITS, "{window}: {stats}");
        assert!(
            summary["total_ms"]["p50"].as_f64().unwrap() >= 150.0,
            "{window}: only the miss is in the percentiles: {stats}"
        );
        assert!(
            summary["cache_hit_ms"]["p99"].as_f64().unwrap() < 100.0,
            "{stats}"
        );
    }

    // More answers than the 4 KiB bound holds: the evictions show in /metrics.
    mock.set_first_byte_delay(Duration::ZERO);
    for i in 0..30 {
        let mut body = body.clone();
        body["messages"][0]["content"] = format!("evict {i}").into();
        let response = reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .json(&body)
            .send()
            .await
            .unwrap();
        response.bytes().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let metrics = sidecar.metrics().await;
        let evicted = metrics.value("sluice_cache_removals_total", &[("reason", "size")]);
        if evicted > Some(0.0) {
            assert!(metrics.value("sluice_cache_bytes", &[]) <= Some(4096.0));
            break;
        }
        assert!(Instant::now() < deadline, "evictions counted: {evicted:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request that panics while it holds the caller's key and the provider's (the debug-build
/// canary puts both in the panic message): the caller gets a provider-shaped 500 at once, the
/// process goes on serving, and neither key reaches the logs, spans or the answer.
#[tokio::test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the panic canary exists only in debug builds"
)]
async fn a_panic_answers_500_and_leaks_no_key() {
    let (primary, backup) = (mock().await, mock().await);
    let (url, collector) = http_collector().await;
    let policy = traced_policy(&primary, &backup, &url, "http/protobuf");
    let sidecar = Sidecar::start_with_env(
        &policy,
        &[("SLUICE_LOG", "trace"), ("SLUICE_TEST_PANIC", "1")],
    )
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let panicked = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(CALLER_KEY)
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .header("x-sluice-test-panic", "1")
        .json(&chat_body("panic", false))
        .send()
        .await
        .expect("an answer, not a dropped or hung connection");
    assert_eq!(panicked.status(), 500);
    let body = panicked.text().await.unwrap();
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(
        error["error"]["message"].is_string(),
        "OpenAI's shape: {body}"
    );
    assert!(primary.requests().is_empty(), "nothing went upstream");

    // The process goes on serving.
    let next = traced_call(&sidecar, &chat_body("after the panic", false)).await;
    assert_eq!(next.status(), 200);

    collector
        .wait_for("the server span of the request after the panic", |spans| {
            spans.iter().any(|s| s.kind == 2)
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !sidecar.logs().contains("panicked at") {
        assert!(Instant::now() < deadline, "the panic is reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = sidecar.logs();
    assert!(logs.contains("withheld"), "{logs}");
    assert!(logs.contains("the exchange panicked"), "{logs}");
    let spans = format!("{:?}", collector.spans());
    for secret in [CALLER_KEY, PROVIDER_KEY] {
        for (place, text) in [("logs", &logs), ("spans", &spans), ("error body", &body)] {
            assert!(!text.contains(secret), "{secret} in {place}");
        }
    }
}

/// The policy's OTLP header reaches the collector (and nowhere else); a sampling ratio of 0
/// traces only callers whose `traceparent` is sampled; a limit's 429 and a cache hit show on
/// their spans.
#[tokio::test]
async fn otlp_headers_sampling_and_decisions() {
    const OTLP_KEY: &str = "otlp-canary-5d2e81";
    let mock = mock().await;
    let (url, collector) = http_collector().await;
    let policy = format!(
        r#"
telemetry:
  otlp:
    endpoint: "{url}"
    protocol: http/protobuf
    export_interval: 100ms
    sampling_ratio: 0
    headers: {{ x-api-key: "${{OTLP_TEST_KEY}}" }}
upstreams:
  openai: {{ provider: openai, base_url: "{mock}", keys: ["{PROVIDER_KEY}"] }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    upstream: openai
    filters:
      - cache: {{ ttl: 1h }}
tiers:
  free: {{ limits: {{ requests_per_minute: 4 }} }}
tenants:
  - {{ name: team, tier: free, keys: [{{ hash: "{hash}" }}] }}
"#,
        mock = mock.url(),
        hash = KeyHash::of(CALLER_KEY).to_text(),
    );
    let sidecar = Sidecar::start_with_env(
        &policy,
        &[("SLUICE_LOG", "trace"), ("OTLP_TEST_KEY", OTLP_KEY)],
    )
    .await;
    let cacheable = serde_json::json!({
        "model": "gpt-4o-mini",
        "temperature": 0,
        "messages": [{"role": "user", "content": "sampled?"}],
    });
    let call = |trace: Option<(String, &'static str)>, body: serde_json::Value| {
        let mut request = reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .bearer_auth(CALLER_KEY)
            .json(&body);
        if let Some((trace_id, flags)) = trace {
            request = request.header(
                "traceparent",
                format!("00-{trace_id}-{CALLER_SPAN}-{flags}"),
            );
        }
        async move { request.send().await.unwrap() }
    };
    let trace = |n: u32| format!("{n:032x}");
    // Not traced: no traceparent (ratio 0), and a caller's unsampled one.
    let first = call(None, cacheable.clone()).await;
    assert_eq!(first.headers()["x-sluice-cache"], "miss");
    let unsampled = call(Some((trace(1), "00")), cacheable.clone()).await;
    assert_eq!(unsampled.status(), 200);
    // Traced: the caller sampled it.
    let hit = call(Some((trace(2), "01")), cacheable.clone()).await;
    assert_eq!(hit.headers()["x-sluice-cache"], "hit");
    let mut limited = None;
    for n in 3..10 {
        let response = call(
            Some((trace(n), "01")),
            chat_body(&format!("limit {n}"), false),
        )
        .await;
        if response.status() == 429 {
            limited = Some(trace(n));
            break;
        }
    }
    let limited = limited.expect("the limit answers 429");

    let spans = collector
        .wait_for("the hit's and the 429's server spans", |spans| {
            spans.iter().any(|s| hex::encode(&s.trace_id) == limited)
        })
        .await;
    let sampled: Vec<String> = (2..10).map(trace).collect();
    for span in &spans {
        assert!(
            sampled.contains(&hex::encode(&span.trace_id)),
            "an unsampled request was traced: {}",
            span.name
        );
    }
    let server = |trace_id: &str| {
        spans
            .iter()
            .find(|s| s.kind == 2 && hex::encode(&s.trace_id) == trace_id)
            .expect("a server span")
    };
    let hit_span = server(&trace(2));
    assert_eq!(string_attribute(hit_span, "sluice.cache"), Some("hit"));
    assert!(
        spans
            .iter()
            .all(|s| !(s.kind == 3 && s.trace_id == hit_span.trace_id)),
        "a hit makes no upstream attempt"
    );
    let limited_span = server(&limited);
    assert_eq!(
        int_attribute(limited_span, "http.response.status_code"),
        Some(429)
    );
    assert!(
        limited_span
            .events
            .iter()
            .any(|e| e.name == "sluice.limited"),
        "{:?}",
        limited_span.events
    );

    // The export header went to the collector, and nowhere else.
    let exports = collector.1.lock().unwrap().clone();
    assert!(!exports.is_empty());
    assert!(exports
        .iter()
        .all(|headers| headers.get("x-api-key").is_some_and(|v| v == OTLP_KEY)));
    let policy_text = reqwest::get(format!("{}/admin/policy", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (place, text) in [("logs", sidecar.logs()), ("/admin/policy", policy_text)] {
        assert!(!text.contains(OTLP_KEY), "the OTLP header in {place}");
    }
}

/// Label values stay few: a model the policy does not name is `other`, and tenants are labels
/// only when `telemetry.metrics.tenant_labels` asks.
#[tokio::test]
async fn metric_labels_stay_bounded() {
    let mock = mock().await;
    for tenant_labels in [false, true] {
        let policy = format!(
            r#"
telemetry: {{ metrics: {{ tenant_labels: {tenant_labels} }} }}
prices:
  gpt-4o-mini: {{ input: 1000000, output: 1000000 }}
upstreams:
  openai: {{ provider: openai, base_url: "{url}", keys: ["{PROVIDER_KEY}"] }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
tiers:
  free: {{ limits: {{ requests_per_minute: 100 }} }}
tenants:
  - {{ name: team, tier: free, keys: [{{ hash: "{hash}" }}] }}
"#,
            url = mock.url(),
            hash = KeyHash::of(CALLER_KEY).to_text(),
        );
        let sidecar = Sidecar::start(&policy).await;
        for model in ["gpt-4o-mini", "made-up-model-7"] {
            let mut body = chat_body("labels", false);
            body["model"] = model.into();
            let response = traced_call(&sidecar, &body).await;
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }
        let tenant = if tenant_labels { "team" } else { "" };
        let other = [("model", "other"), ("status", "200"), ("tenant", tenant)];
        let requests = ("sluice_requests_total", &other[..], 1.0);
        wait_for_metric(&sidecar, requests, Duration::from_secs(3), async || {}).await;
        let metrics = sidecar.metrics().await;
        let priced = [("model", "gpt-4o-mini"), ("tenant", tenant)];
        assert_eq!(metrics.value("sluice_requests_total", &priced), Some(1.0));
        let tokens = [("model", "other"), ("kind", "input"), ("tenant", tenant)];
        assert!(metrics.value("sluice_tokens_total", &tokens) > Some(0.0));
        assert_eq!(
            metrics.value("sluice_cost_usd_total", &[("model", "other")]),
            None,
            "an unpriced model costs nothing known"
        );
        for sample in &metrics.0.samples {
            assert!(
                sample.labels.values().all(|v| v != "made-up-model-7"),
                "{} names the caller's model",
                sample.metric
            );
            if let Some(value) = sample.labels.get("tenant") {
                assert_eq!(value, tenant, "{}", sample.metric);
            }
        }
    }
}
