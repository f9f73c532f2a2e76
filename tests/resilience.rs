//! Key rotation, fallback, retries, retry budgets, circuit breakers and hedging, through the
//! real binary against mocks with injected faults.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sluice_mock::Fault;

fn status(code: u16, retry_after: Option<&str>) -> Option<Fault> {
    Some(Fault::Status {
        status: code,
        retry_after: retry_after.map(str::to_owned),
    })
}

async fn chat(sidecar: &Sidecar, body: &serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The key each recorded request carried (the part after `Bearer `).
fn keys_seen(mock: &MockServer) -> Vec<String> {
    mock.requests()
        .iter()
        .map(|r| {
            let auth = r
                .headers
                .iter()
                .find(|(name, _)| name == "authorization")
                .map_or("", |(_, value)| value.as_str());
            auth.trim_start_matches("Bearer ").to_owned()
        })
        .collect()
}

async fn admin_upstreams(sidecar: &Sidecar) -> serde_json::Value {
    reqwest::get(format!("{}/admin/upstreams", sidecar.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn key_state<'a>(
    upstreams: &'a serde_json::Value,
    upstream: &str,
    key: &str,
) -> &'a serde_json::Value {
    upstreams["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == upstream)
        .and_then(|u| {
            u["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["name"] == key)
        })
        .unwrap_or_else(|| panic!("no key {key} of {upstream}: {upstreams}"))
}

fn two_keys(mock: &MockServer) -> String {
    format!(
        r#"
upstreams:
  openai:
    provider: openai
    base_url: "{url}"
    keys:
      - {{ key: sk-a, name: a }}
      - {{ key: sk-b, name: b }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, auth: passthrough }}
"#,
        url = mock.url()
    )
}

#[tokio::test]
async fn a_rate_limited_key_rests_and_another_serves() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&two_keys(&mock)).await;
    mock.set_key_fault("sk-a", status(429, Some("30")));

    let response = chat(&sidecar, &chat_body("first", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "openai");
    assert_eq!(
        keys_seen(&mock),
        ["sk-a", "sk-b"],
        "a answered 429, b served"
    );

    // a rests for the 30 s the provider asked: everything goes to b meanwhile.
    mock.clear();
    for _ in 0..4 {
        assert_eq!(
            chat(&sidecar, &chat_body("more", false)).await.status(),
            200
        );
    }
    assert_eq!(keys_seen(&mock), ["sk-b"; 4]);
    let upstreams = admin_upstreams(&sidecar).await;
    let a = key_state(&upstreams, "openai", "a");
    assert_eq!(a["state"], "resting", "{upstreams}");
    let resting = a["resting_ms"].as_u64().unwrap();
    assert!((28_000..=30_000).contains(&resting), "{resting}");
    assert!(
        !upstreams.to_string().contains("sk-a"),
        "key values never shown"
    );
    let metrics = sidecar.metrics().await;
    let labels = [("upstream", "openai"), ("key", "a")];
    assert_eq!(
        metrics.value("sluice_key_cooldowns_total", &labels),
        Some(1.0)
    );
    let retried = [("upstream", "openai"), ("kind", "retry")];
    assert_eq!(
        metrics.value("sluice_upstream_retries_total", &retried),
        Some(1.0)
    );

    // With both keys resting, Sluice answers for the provider, saying when to come back.
    mock.set_key_fault("sk-b", status(429, Some("20")));
    let refused = chat(&sidecar, &chat_body("again", false)).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let refused = chat(&sidecar, &chat_body("and again", false)).await;
    assert_eq!(refused.status(), 429);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rate limited"),
        "{error}"
    );
}

#[tokio::test]
async fn a_refused_key_is_disabled_until_reload() {
    let mock = mock().await;
    let policy = two_keys(&mock);
    let sidecar = Sidecar::start(&policy).await;
    mock.set_key_fault("sk-a", status(401, None));

    for _ in 0..3 {
        assert_eq!(chat(&sidecar, &chat_body("x", false)).await.status(), 200);
    }
    assert_eq!(
        keys_seen(&mock),
        ["sk-a", "sk-b", "sk-b", "sk-b"],
        "a refused once, then never used again"
    );
    let upstreams = admin_upstreams(&sidecar).await;
    assert_eq!(key_state(&upstreams, "openai", "a")["state"], "disabled");
    let metrics = sidecar.metrics().await;
    let labels = [("upstream", "openai"), ("key", "a")];
    assert_eq!(
        metrics.value("sluice_keys_disabled_total", &labels),
        Some(1.0)
    );
    assert!(sidecar.logs().contains("provider refused a key"));
    assert!(
        !sidecar.logs().contains("sk-a"),
        "the key's value is never logged"
    );

    // A reload (the operator fixed the key) brings it back.
    mock.set_key_fault("sk-a", None);
    let before = sidecar.policy_hash().await;
    sidecar.write_policy(&format!("{policy}\n# key a rotated\n"));
    wait_for_new_hash(&sidecar, &before).await;
    let upstreams = admin_upstreams(&sidecar).await;
    assert_eq!(key_state(&upstreams, "openai", "a")["state"], "ok");

    // A 403 (the key lost access) disables it just the same.
    mock.clear();
    mock.set_key_fault("sk-a", status(403, None));
    for _ in 0..2 {
        assert_eq!(chat(&sidecar, &chat_body("x", false)).await.status(), 200);
    }
    assert_eq!(keys_seen(&mock), ["sk-a", "sk-b", "sk-b"]);
    let upstreams = admin_upstreams(&sidecar).await;
    assert_eq!(key_state(&upstreams, "openai", "a")["state"], "disabled");
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metrics.value("sluice_keys_disabled_total", &labels),
        Some(2.0)
    );
}

async fn wait_for_new_hash(sidecar: &Sidecar, old: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sidecar.policy_hash().await == old {
        assert!(Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failing_upstream_falls_back_with_the_body_intact_but_the_model_mapped() {
    let (primary, secondary) = (mock().await, mock().await);
    primary.set_fault(status(503, None));
    let policy = format!(
        r#"
upstreams:
  primary: {{ provider: openai, base_url: "{p}" }}
  secondary: {{ provider: openai, base_url: "{s}" }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    auth: passthrough
    targets: [primary, {{ upstream: secondary, model: gpt-4o-mini }}]
"#,
        p = primary.url(),
        s = secondary.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    // Odd spacing, key order and number formats: only the model may change on the way.
    let sent = "{ \"temperature\" : 0.50, \"model\":\"gpt-4o\",\n \"messages\":[{\"role\":\"user\",\"content\":\"model: gpt-4o\"}] }";
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("content-type", "application/json")
        .body(sent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "secondary");
    assert_eq!(response.headers()["x-sluice-model"], "gpt-4o-mini");
    assert_eq!(primary.request_count(), 1);
    assert_eq!(&primary.requests()[0].body[..], sent.as_bytes());
    let received = secondary.requests().remove(0).body;
    assert_eq!(
        String::from_utf8_lossy(&received),
        sent.replace("\"model\":\"gpt-4o\"", "\"model\":\"gpt-4o-mini\"")
    );
}

#[tokio::test]
async fn model_targets_reach_an_azure_deployment_then_a_cheaper_model() {
    let (openai, azure, cheap) = (mock().await, mock().await, mock().await);
    openai.set_fault(status(500, None));
    azure.set_fault(status(502, None));
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{o}", keys: [sk-openai] }}
  azure:
    provider: azure_openai
    base_url: "{a}"
    keys: [azure-key]
    deployments: {{ gpt-4o: prod-4o }}
  cheap: {{ provider: openai, base_url: "{c}", keys: [sk-cheap] }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    auth: passthrough
    upstream: cheap
    model_targets:
      gpt-4o: [openai, azure, {{ upstream: cheap, model: gpt-4o-mini }}]
"#,
        o = openai.url(),
        a = azure.url(),
        c = cheap.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let response = chat(
        &sidecar,
        &serde_json::json!({"model": "gpt-4o", "messages": []}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "cheap");
    let to_azure = &azure.requests()[0];
    assert_eq!(
        to_azure.path,
        "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    );
    assert!(to_azure
        .headers
        .contains(&("api-key".to_owned(), "azure-key".to_owned())));
    let sent: serde_json::Value = serde_json::from_slice(&cheap.requests()[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    // Another model goes straight to the default target.
    cheap.clear();
    let other = chat(
        &sidecar,
        &serde_json::json!({"model": "o1", "messages": []}),
    )
    .await;
    assert_eq!(other.status(), 200);
    assert_eq!(openai.request_count(), 1);
    assert_eq!(cheap.request_count(), 2);
}

#[tokio::test]
async fn a_slow_target_is_abandoned_after_the_attempt_timeout() {
    let (slow, fast) = (mock().await, mock().await);
    slow.set_first_byte_delay(Duration::from_secs(3));
    let policy = format!(
        r#"
upstreams:
  slow: {{ provider: openai, base_url: "{s}" }}
  fast: {{ provider: openai, base_url: "{f}" }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    auth: passthrough
    targets: [slow, fast]
    retry: {{ attempt_timeout: 300ms, on: [first_byte_timeout, 5xx] }}
"#,
        s = slow.url(),
        f = fast.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let started = Instant::now();
    let response = chat(&sidecar, &chat_body("hurry", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "fast");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let metrics = sidecar.metrics().await;
    let timeouts = [("upstream", "slow"), ("outcome", "timeout")];
    assert_eq!(
        metrics.value("sluice_upstream_attempts_total", &timeouts),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_retry_budget_bounds_attempts_during_an_outage() {
    let (a, b) = (mock().await, mock().await);
    a.set_fault(status(503, None));
    b.set_fault(status(503, None));
    let policy = format!(
        r#"
upstreams:
  a:
    provider: openai
    base_url: "{a}"
    retry_budget: {{ ratio: 0.2, min_per_second: 0, window: 10s }}
    circuit_breaker: {{ enabled: false }}
  b: {{ provider: openai, base_url: "{b}", circuit_breaker: {{ enabled: false }} }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    auth: passthrough
    targets: [a, b]
    retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 2ms }} }}
"#,
        a = a.url(),
        b = b.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let requests = 50;
    for _ in 0..requests {
        let response = chat(&sidecar, &chat_body("outage", false)).await;
        assert_eq!(response.status(), 503, "the provider's answer is relayed");
    }
    let attempts = a.request_count() + b.request_count();
    assert!(
        attempts >= requests && attempts as f64 <= 1.2 * requests as f64,
        "{attempts} attempts for {requests} requests"
    );
    let metrics = sidecar.metrics().await;
    let exhausted = metrics.value("sluice_retry_budget_exhausted_total", &[("upstream", "a")]);
    assert!(exhausted >= Some(1.0), "{exhausted:?}");
}

#[tokio::test]
async fn a_circuit_opens_skips_the_upstream_and_recovers() {
    let (flaky, backup) = (mock().await, mock().await);
    flaky.set_fault(status(500, None));
    let policy = format!(
        r#"
upstreams:
  flaky:
    provider: openai
    base_url: "{f}"
    circuit_breaker: {{ consecutive_failures: 3, open_for: 700ms }}
  backup: {{ provider: openai, base_url: "{b}" }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    auth: passthrough
    targets: [flaky, backup]
"#,
        f = flaky.url(),
        b = backup.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    for _ in 0..3 {
        let response = chat(&sidecar, &chat_body("x", false)).await;
        assert_eq!(response.headers()["x-sluice-upstream"], "backup");
    }
    assert_eq!(flaky.request_count(), 3);
    // Open: flaky is not even asked.
    for _ in 0..5 {
        let response = chat(&sidecar, &chat_body("x", false)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-upstream"], "backup");
    }
    assert_eq!(flaky.request_count(), 3);
    let upstreams = admin_upstreams(&sidecar).await;
    let flaky_state = upstreams["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "flaky")
        .unwrap();
    assert_eq!(flaky_state["circuit"]["state"], "open", "{upstreams}");
    let metrics = sidecar.metrics().await;
    let labels = [("upstream", "flaky"), ("key", "")];
    assert_eq!(metrics.value("sluice_circuit_state", &labels), Some(2.0));
    assert_eq!(
        metrics.value("sluice_circuit_opens_total", &labels),
        Some(1.0)
    );

    // Healed: after open_for a probe goes through, succeeds, and the circuit closes.
    flaky.set_fault(None);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let response = chat(&sidecar, &chat_body("x", false)).await;
    assert_eq!(response.headers()["x-sluice-upstream"], "flaky");
    let metrics = sidecar.metrics().await;
    assert_eq!(metrics.value("sluice_circuit_state", &labels), Some(0.0));
}

#[tokio::test]
async fn all_circuits_open_fail_fast_with_retry_after() {
    let only = mock().await;
    only.set_fault(status(503, None));
    let policy = format!(
        r#"
upstreams:
  only: {{ provider: openai, base_url: "{u}", circuit_breaker: {{ consecutive_failures: 2, open_for: 30s }} }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: only, auth: passthrough, retry: {{ attempts: 1 }} }}
"#,
        u = only.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    for _ in 0..2 {
        assert_eq!(chat(&sidecar, &chat_body("x", false)).await.status(), 503);
    }
    let fast = chat(&sidecar, &chat_body("x", false)).await;
    assert_eq!(fast.status(), 503);
    assert!(fast.headers().contains_key("retry-after"));
    let error: serde_json::Value = fast.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("circuit open"),
        "{error}"
    );
    assert_eq!(only.request_count(), 2);
}

#[tokio::test]
async fn a_hedge_serves_the_faster_target_and_cancels_the_slower() {
    let (slow, fast) = (mock().await, mock().await);
    slow.set_first_byte_delay(Duration::from_secs(2));
    let policy = format!(
        r#"
upstreams:
  slow: {{ provider: openai, base_url: "{s}" }}
  fast: {{ provider: openai, base_url: "{f}" }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    auth: passthrough
    targets: [slow, fast]
    hedge: {{ after: 150ms }}
"#,
        s = slow.url(),
        f = fast.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let started = Instant::now();
    let response = chat(&sidecar, &chat_body("race", true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "fast");
    let text = response.text().await.unwrap();
    assert!(text.contains("[DONE]"));
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!((slow.request_count(), fast.request_count()), (1, 1));
    // The slower attempt's connection was closed: the mock saw its client leave.
    let deadline = Instant::now() + Duration::from_secs(3);
    while slow.abandoned_requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow attempt was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = sidecar.metrics().await;
    for result in ["launched", "won"] {
        let labels = [("route", "openai"), ("result", result)];
        assert_eq!(metrics.value("sluice_hedges_total", &labels), Some(1.0));
    }
}

#[tokio::test]
async fn no_retry_once_the_stream_started_and_the_caller_sees_an_error_event() {
    let (first, second) = (mock().await, mock().await);
    first.set_fault(Some(Fault::ResetMidStream));
    let policy = format!(
        r#"
upstreams:
  first: {{ provider: openai, base_url: "{f}" }}
  second: {{ provider: openai, base_url: "{s}" }}
  claude: {{ provider: anthropic, base_url: "{f}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, targets: [first, second], auth: passthrough }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: claude, auth: passthrough }}
"#,
        f = first.url(),
        s = second.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-chunks", "6")
        .header("x-mock-chunk-ms", "30")
        .json(&chat_body("this will break", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (text, failed) = read_to_break(response).await;
    assert!(failed, "the body must not end cleanly: {text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(
        last.starts_with("data: {\"error\"") && last.contains("broke mid-stream"),
        "{last}"
    );
    assert_eq!(second.request_count(), 0, "no retry after the first byte");

    let response = reqwest::Client::new()
        .post(format!("{}/anthropic/v1/messages", sidecar.proxy))
        .header("x-mock-chunks", "6")
        .header("x-mock-chunk-ms", "30")
        .json(&serde_json::json!({"model": "claude-haiku-4-5", "max_tokens": 20, "stream": true, "messages": [{"role": "user", "content": "break"}]}))
        .send()
        .await
        .unwrap();
    let (text, failed) = read_to_break(response).await;
    assert!(failed);
    let data = text
        .split("event: error\ndata: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no error event: {text}"));
    let event: serde_json::Value = serde_json::from_str(data.lines().next().unwrap()).unwrap();
    assert_eq!(event["type"], "error");
    assert_eq!(event["error"]["type"], "api_error");
    assert!(!text.contains("message_stop"));

    // The failures after the head are visible in the metrics, per upstream.
    let metrics = sidecar.metrics().await;
    for upstream in ["first", "claude"] {
        let labels = [("upstream", upstream)];
        assert_eq!(
            metrics.value("sluice_upstream_broke_total", &labels),
            Some(1.0),
            "{upstream}"
        );
    }
    assert_eq!(
        metrics.value("sluice_upstream_broke_total", &[("upstream", "second")]),
        None
    );
}

/// Sends a six-event OpenAI stream through `sidecar` to an upstream that breaks or ends it inside
/// an event, and checks what the caller got: a 200 whose body does not end cleanly, every event
/// whole JSON, the last Sluice's error. The half event the upstream sent is not among them.
async fn openai_stream_ends_in_a_whole_error(sidecar: &Sidecar, prompt: &str) {
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-chunks", "6")
        .json(&chat_body(prompt, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (text, failed) = read_to_break(response).await;
    assert!(failed, "the body must not end cleanly: {text}");
    assert!(text.ends_with("\n\n"), "{text:?}");
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert!(events.len() >= 2, "{text}");
    let parsed: Vec<serde_json::Value> = events
        .iter()
        .map(|event| {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("{event:?} in {text}"));
            serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data:?} in {text}"))
        })
        .collect();
    assert!(parsed.iter().all(serde_json::Value::is_object), "{text}");
    let last = parsed.last().unwrap();
    assert_eq!(last["error"]["code"], "upstream_unavailable", "{last}");
}

#[tokio::test]
async fn a_stream_that_ends_inside_an_event_ends_with_a_whole_error_event() {
    // The upstream closes cleanly after half an event: the half is dropped, not glued to the
    // error event that tells the caller the answer is incomplete.
    let mock = mock().await;
    mock.set_fault(Some(Fault::EndMidEvent));
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{u}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, auth: passthrough }}
"#,
        u = mock.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    openai_stream_ends_in_a_whole_error(&sidecar, "this will end inside an event").await;
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metrics.value("sluice_upstream_broke_total", &[("upstream", "openai")]),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_stream_that_breaks_inside_an_event_ends_with_a_whole_error_event() {
    let mock = mock().await;
    mock.set_fault(Some(Fault::ResetMidEvent));
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{u}" }}
  claude: {{ provider: anthropic, base_url: "{u}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, auth: passthrough }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: claude, auth: passthrough }}
"#,
        u = mock.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    openai_stream_ends_in_a_whole_error(&sidecar, "this will break inside an event").await;

    let response = reqwest::Client::new()
        .post(format!("{}/anthropic/v1/messages", sidecar.proxy))
        .header("x-mock-chunks", "6")
        .json(&serde_json::json!({"model": "claude-haiku-4-5", "max_tokens": 20, "stream": true, "messages": [{"role": "user", "content": "break inside"}]}))
        .send()
        .await
        .unwrap();
    let (text, failed) = read_to_break(response).await;
    assert!(failed);
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let data = last
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("the error event is not whole: {text:?}"));
    let event: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(event["error"]["type"], "api_error");
    // The caller sent no anthropic-version: the upstream got the default one.
    let to_anthropic = mock
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/messages")
        .unwrap();
    assert!(
        to_anthropic
            .headers
            .contains(&("anthropic-version".to_owned(), "2023-06-01".to_owned())),
        "{:?}",
        to_anthropic.headers
    );
    for event in text.split_terminator("\n\n") {
        let data = event
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap();
        assert!(
            serde_json::from_str::<serde_json::Value>(data).is_ok(),
            "{event:?}"
        );
    }

    // Both breaks are counted against their upstream.
    let metrics = sidecar.metrics().await;
    for upstream in ["openai", "claude"] {
        assert_eq!(
            metrics.value("sluice_upstream_broke_total", &[("upstream", upstream)]),
            Some(1.0),
            "{upstream}"
        );
    }
}

async fn read_to_break(response: reqwest::Response) -> (String, bool) {
    use futures_util::StreamExt;
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

#[tokio::test]
async fn weighted_keys_share_requests_and_respect_models_and_caps() {
    let mock = mock().await;
    let policy = format!(
        r#"
upstreams:
  openai:
    provider: openai
    base_url: "{url}"
    keys:
      - {{ key: sk-heavy, name: heavy, weight: 3, max_concurrent: 1 }}
      - {{ key: sk-light, name: light, weight: 1 }}
      - {{ key: sk-mini, name: mini, models: ["gpt-4o-mini"], weight: 100 }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, auth: passthrough }}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    for _ in 0..8 {
        let body = serde_json::json!({"model": "gpt-4o", "messages": []});
        assert_eq!(chat(&sidecar, &body).await.status(), 200);
    }
    let seen = keys_seen(&mock);
    let count = |key: &str| seen.iter().filter(|k| *k == key).count();
    assert_eq!(
        (count("sk-heavy"), count("sk-light"), count("sk-mini")),
        (6, 2, 0)
    );
    mock.clear();
    let body = serde_json::json!({"model": "gpt-4o-mini", "messages": []});
    assert_eq!(chat(&sidecar, &body).await.status(), 200);
    assert_eq!(
        keys_seen(&mock),
        ["sk-mini"],
        "the heaviest key that may serve it"
    );

    // Three at once, each held 300 ms: by weight heavy would take two of any three, but its
    // cap is one request in flight, so light takes the others.
    mock.clear();
    let slow = || {
        reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .header("x-mock-first-byte-ms", "300")
            .json(&serde_json::json!({"model": "gpt-4o", "messages": []}))
            .send()
    };
    let (a, b, c) = tokio::join!(slow(), slow(), slow());
    for response in [a, b, c] {
        assert_eq!(response.unwrap().status(), 200);
    }
    let seen = keys_seen(&mock);
    let count = |key: &str| seen.iter().filter(|k| *k == key).count();
    assert_eq!((count("sk-heavy"), count("sk-light")), (1, 2), "{seen:?}");
}

async fn post(sidecar: &Sidecar, prefix: &str, body: &serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{prefix}/v1/chat/completions", sidecar.proxy))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_connect_error_falls_back_to_the_next_target() {
    let alive = mock().await;
    // Nothing listens there: the connection is refused.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let policy = format!(
        r#"
upstreams:
  dead: {{ provider: openai, base_url: "{dead}" }}
  alive: {{ provider: openai, base_url: "{a}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, auth: passthrough, targets: [dead, alive] }}
"#,
        a = alive.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let response = chat(&sidecar, &chat_body("elsewhere", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "alive");
    assert_eq!(alive.request_count(), 1);
    let metrics = sidecar.metrics().await;
    let labels = [("upstream", "dead"), ("outcome", "connect_error")];
    assert_eq!(
        metrics.value("sluice_upstream_attempts_total", &labels),
        Some(1.0)
    );
}

#[tokio::test]
async fn named_statuses_are_retried_only_when_listed() {
    let (first, second) = (mock().await, mock().await);
    let policy = format!(
        r#"
upstreams:
  first: {{ provider: openai, base_url: "{f}", circuit_breaker: {{ enabled: false }} }}
  second: {{ provider: openai, base_url: "{s}" }}
routes:
  - name: listed
    match: {{ path_prefix: /listed }}
    auth: passthrough
    targets: [first, second]
    retry: {{ on: [408, 529] }}
  - name: unlisted
    match: {{ path_prefix: /unlisted }}
    auth: passthrough
    targets: [first, second]
    retry: {{ on: [connect_error, 409] }}
"#,
        f = first.url(),
        s = second.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    // 408 falls among 4xx and 529 (Anthropic's "overloaded") among 5xx: only the list counts.
    for code in [408, 529] {
        first.set_fault(status(code, None));
        let before = second.request_count();
        let listed = post(&sidecar, "/listed", &chat_body("again", false)).await;
        assert_eq!(listed.status(), 200, "{code} listed: retried");
        assert_eq!(listed.headers()["x-sluice-upstream"], "second");
        assert_eq!(second.request_count(), before + 1);
        let unlisted = post(&sidecar, "/unlisted", &chat_body("once", false)).await;
        assert_eq!(unlisted.status(), code, "{code} not listed: relayed");
        assert_eq!(unlisted.headers()["x-sluice-upstream"], "first");
        assert_eq!(second.request_count(), before + 1, "{code}: no retry");
    }
    assert_eq!(first.request_count(), 4);
}

#[tokio::test]
async fn retry_after_is_waited_out_up_to_the_cap() {
    let only = mock().await;
    let policy = format!(
        r#"
upstreams:
  only: {{ provider: openai, base_url: "{u}", circuit_breaker: {{ enabled: false }} }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    auth: passthrough
    upstream: only
    retry: {{ attempts: 2, retry_after_max: 5s, backoff: {{ base: 1ms, max: 1ms }} }}
"#,
        u = only.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    // Under the cap: the second attempt waits the second the provider asked for.
    only.set_fault(status(503, Some("1")));
    let started = Instant::now();
    let response = chat(&sidecar, &chat_body("wait", false)).await;
    let took = started.elapsed();
    assert_eq!(
        response.status(),
        503,
        "both attempts failed: the answer relayed"
    );
    assert_eq!(only.request_count(), 2);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Beyond the cap: not worth waiting for, so not retried; the caller hears it at once.
    only.set_fault(status(503, Some("60")));
    let started = Instant::now();
    let response = chat(&sidecar, &chat_body("later", false)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "60");
    assert_eq!(only.request_count(), 3, "exactly one attempt");
    assert!(started.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn a_failing_keys_circuit_opens_and_the_other_key_serves() {
    let mock = mock().await;
    let policy = format!(
        r#"
upstreams:
  openai:
    provider: openai
    base_url: "{url}"
    keys:
      - {{ key: sk-a, name: a }}
      - {{ key: sk-b, name: b }}
    circuit_breaker: {{ consecutive_failures: 2, open_for: 30s }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    upstream: openai
    auth: passthrough
    retry: {{ backoff: {{ base: 1ms, max: 1ms }} }}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    mock.set_key_fault("sk-a", status(500, None));
    for _ in 0..4 {
        assert_eq!(chat(&sidecar, &chat_body("x", false)).await.status(), 200);
    }
    assert_eq!(
        keys_seen(&mock),
        ["sk-a", "sk-b", "sk-a", "sk-b", "sk-b", "sk-b"],
        "a failed twice, its circuit opened, and b served alone"
    );
    let upstreams = admin_upstreams(&sidecar).await;
    let a = key_state(&upstreams, "openai", "a");
    assert_eq!(a["circuit"], "open", "{upstreams}");
    assert_eq!(a["state"], "circuit_open", "{upstreams}");
    assert_eq!(key_state(&upstreams, "openai", "b")["circuit"], "closed");
    let metrics = sidecar.metrics().await;
    let key = |name| [("upstream", "openai"), ("key", name)];
    assert_eq!(metrics.value("sluice_circuit_state", &key("a")), Some(2.0));
    assert_eq!(metrics.value("sluice_circuit_state", &key("b")), Some(0.0));
    assert_eq!(
        metrics.value("sluice_circuit_state", &key("")),
        Some(0.0),
        "b's successes keep the upstream's own circuit closed"
    );
    assert_eq!(
        metrics.value("sluice_circuit_opens_total", &key("a")),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_key_read_from_a_file_follows_the_file() {
    let mock = mock().await;
    let policy = format!(
        r#"
upstreams:
  openai:
    provider: openai
    base_url: "{url}"
    keys: [{{ file: openai.key, name: mounted }}]
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, auth: passthrough }}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start_with_files(&policy, &[("openai.key", "sk-from-file-1\n")]).await;
    assert_eq!(chat(&sidecar, &chat_body("x", false)).await.status(), 200);
    assert_eq!(keys_seen(&mock), ["sk-from-file-1"]);
    assert!(!sidecar.logs().contains("sk-from-file"), "never logged");

    // The Secret is rotated: the file is rewritten, and the next requests carry the new key.
    sidecar.write_file("openai.key", "sk-from-file-2\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        mock.clear();
        assert_eq!(chat(&sidecar, &chat_body("x", false)).await.status(), 200);
        if keys_seen(&mock) == ["sk-from-file-2"] {
            break;
        }
        assert_eq!(keys_seen(&mock), ["sk-from-file-1"]);
        assert!(Instant::now() < deadline, "the new key was never used");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!sidecar.logs().contains("sk-from-file"), "never logged");
}

#[tokio::test]
async fn a_percentile_hedge_waits_for_enough_samples_then_fires() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_first_byte_delay(Duration::from_millis(40));
    let policy = format!(
        r#"
upstreams:
  primary: {{ provider: openai, base_url: "{p}" }}
  backup: {{ provider: openai, base_url: "{b}" }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    auth: passthrough
    targets: [primary, backup]
    hedge: {{ after: p95 }}
"#,
        p = primary.url(),
        b = backup.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    // Fewer than 20 first-byte samples: no percentile to trust, no hedge.
    for _ in 0..20 {
        let response = chat(&sidecar, &chat_body("warm", false)).await;
        assert_eq!(response.headers()["x-sluice-upstream"], "primary");
    }
    assert_eq!(backup.request_count(), 0);
    // Now primary stalls: the hedge goes out after primary's p95 (~40 ms), not its 5 s; the
    // bound leaves room for a loaded machine and still shows the early end.
    primary.set_first_byte_delay(Duration::from_secs(5));
    let started = Instant::now();
    let response = chat(&sidecar, &chat_body("hedged", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "backup");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    let metrics = sidecar.metrics().await;
    for result in ["launched", "won"] {
        let labels = [("route", "openai"), ("result", result)];
        assert_eq!(metrics.value("sluice_hedges_total", &labels), Some(1.0));
    }
}

#[tokio::test]
async fn a_hedged_request_counts_once_against_the_callers_limit() {
    use sluice_filters::auth::keys::KeyHash;
    let (slow, fast) = (mock().await, mock().await);
    slow.set_first_byte_delay(Duration::from_secs(2));
    let caller = "sk-sluice-hedged-caller";
    let policy = format!(
        r#"
upstreams:
  slow: {{ provider: openai, base_url: "{s}", keys: [sk-slow] }}
  fast: {{ provider: openai, base_url: "{f}", keys: [sk-fast] }}
routes:
  - name: openai
    match: {{ path_prefix: /openai }}
    targets: [slow, fast]
    hedge: {{ after: 100ms }}
tiers:
  small: {{ limits: {{ requests_per_minute: 2 }} }}
tenants:
  - {{ name: t, tier: small, keys: [{{ hash: "{hash}" }}] }}
"#,
        s = slow.url(),
        f = fast.url(),
        hash = KeyHash::of(caller).to_text(),
    );
    let sidecar = Sidecar::start(&policy).await;
    let call = || {
        reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .bearer_auth(caller)
            .json(&chat_body("hedged", false))
            .send()
    };
    for _ in 0..2 {
        let response = call().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-upstream"], "fast");
    }
    let third = call().await.unwrap();
    assert_eq!(
        third.status(),
        429,
        "two requests, four attempts: two counted"
    );
    assert_eq!((slow.request_count(), fast.request_count()), (2, 2));
    let metrics = sidecar.metrics().await;
    let launched = [("route", "openai"), ("result", "launched")];
    assert_eq!(metrics.value("sluice_hedges_total", &launched), Some(2.0));
}

#[tokio::test]
async fn a_429_with_only_a_reset_header_rests_the_key_that_long() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&two_keys(&mock)).await;
    // No retry-after and no x-ratelimit-remaining-requests: the reset is all there is.
    mock.set_key_fault("sk-a", status(429, None));
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-ratelimit-reset-requests", "45s")
        .json(&chat_body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(keys_seen(&mock), ["sk-a", "sk-b"]);
    let upstreams = admin_upstreams(&sidecar).await;
    let a = key_state(&upstreams, "openai", "a");
    assert_eq!(a["state"], "resting", "{upstreams}");
    let resting = a["resting_ms"].as_u64().unwrap();
    // 45 s as asked, not the 10 s default cooldown.
    assert!((43_000..=45_000).contains(&resting), "{resting}");
}
