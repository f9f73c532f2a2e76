//! Per-tier limits through the real binary: exact under concurrency, nothing charged for a
//! refusal, counters kept across reloads.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use sluice_filters::auth::keys::KeyHash;
use sluice_filters::usage::Dialect;

const KEY_A: &str = "sk-sluice-limits-a";
const KEY_B: &str = "sk-sluice-limits-b";

fn policy(mock_url: &str, tier_limits: &str, extra_route: bool) -> String {
    let extra = if extra_route {
        "  - { name: extra, match: { path_prefix: /extra }, upstream: openai }\n"
    } else {
        ""
    };
    format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}", keys: ["sk-upstream"] }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
{extra}tiers:
  free: {{ limits: {tier_limits} }}
tenants:
  - {{ name: a, tier: free, keys: [{{ hash: "{a}" }}] }}
  - {{ name: b, tier: free, keys: [{{ hash: "{b}" }}] }}
"#,
        a = KeyHash::of(KEY_A).to_text(),
        b = KeyHash::of(KEY_B).to_text(),
    )
}

async fn call(sidecar: &Sidecar, key: &str, stream: bool) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(key)
        .json(&chat_body("limits", stream))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_requests_against_a_quota_admit_exactly_the_quota() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(&mock.url(), "{ requests_per_day: 7 }", false)).await;
    let calls = (0..60).map(|_| call(&sidecar, KEY_A, false));
    let responses = futures_util::future::join_all(calls).await;
    let mut admitted = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                let retry: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=86_400).contains(&retry));
                let error: serde_json::Value = response.json().await.unwrap();
                assert_eq!(error["error"]["type"], "rate_limit_error");
                assert!(error["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("`requests_per_day` limit of 7"));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 7);
    assert_eq!(
        mock.request_count(),
        7,
        "refused requests never reached the provider"
    );
    // Tenant b has its own quota.
    assert_eq!(call(&sidecar, KEY_B, false).await.status(), 200);
}

#[tokio::test]
async fn headers_count_down_and_refusals_are_free() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        "{ requests_per_minute: 3, max_output_tokens: 50 }",
        false,
    ))
    .await;
    // Refused for asking too much output: charged nothing.
    let greedy = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY_A)
        .json(&serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 500, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(greedy.status(), 400);
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let response = call(&sidecar, KEY_A, false).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-ratelimit-limit-requests"], "3");
        remaining.push(
            response.headers()["x-ratelimit-remaining-requests"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    assert_eq!(call(&sidecar, KEY_A, false).await.status(), 429);
    assert_eq!(call(&sidecar, KEY_A, false).await.status(), 429);
    let metrics = sidecar.metrics().await;
    let rejections = |limit| {
        metrics.value(
            "sluice_limit_rejections_total",
            &[("limit", limit), ("scope", "free")],
        )
    };
    assert_eq!(rejections("requests_per_minute"), Some(2.0));
    assert_eq!(rejections("max_output_tokens"), Some(1.0));
    assert_eq!(rejections("rps"), None, "no refusal, no series");
}

#[tokio::test]
async fn counters_survive_reloads_and_new_limits_apply_to_them() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(&mock.url(), "{ requests_per_day: 3 }", false)).await;
    for _ in 0..2 {
        assert_eq!(call(&sidecar, KEY_A, false).await.status(), 200);
    }
    // A reload that leaves the tier's limits as they were keeps the count: one left.
    let before = sidecar.policy_hash().await;
    sidecar.write_policy(&policy(&mock.url(), "{ requests_per_day: 3 }", true));
    sidecar.wait_for_reload(&before).await;
    assert_eq!(call(&sidecar, KEY_A, false).await.status(), 200);
    assert_eq!(call(&sidecar, KEY_A, false).await.status(), 429);
    // Raising the limit applies to the usage already counted: 3 used of 5.
    let before = sidecar.policy_hash().await;
    sidecar.write_policy(&policy(&mock.url(), "{ requests_per_day: 5 }", true));
    sidecar.wait_for_reload(&before).await;
    assert_eq!(call(&sidecar, KEY_A, false).await.status(), 200);
    assert_eq!(call(&sidecar, KEY_A, false).await.status(), 200);
    assert_eq!(call(&sidecar, KEY_A, false).await.status(), 429);
}

#[tokio::test]
async fn an_open_stream_holds_its_concurrency_slot_until_it_ends() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(&mock.url(), "{ concurrent: 1 }", false)).await;
    let slow = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY_A)
        .header("x-mock-chunk-ms", "100")
        .header("x-mock-chunks", "5")
        .json(&chat_body("hold", true))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let mut stream = slow.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let busy = call(&sidecar, KEY_A, false).await;
    assert_eq!(busy.status(), 429);
    let error: serde_json::Value = busy.json().await.unwrap();
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`concurrent`"));
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }
    // The stream's end gave the slot back.
    let mut status = 0;
    for _ in 0..50 {
        status = call(&sidecar, KEY_A, false).await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn rate_and_burst_are_enforced() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(&mock.url(), "{ rps: 0.1, burst: 2 }", false)).await;
    let statuses: Vec<u16> =
        futures_util::future::join_all((0..6).map(|_| call(&sidecar, KEY_A, false)))
            .await
            .iter()
            .map(|r| r.status().as_u16())
            .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
}

fn token_policy(mock_url: &str) -> String {
    format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}", keys: ["sk-upstream"] }}
  anthropic: {{ provider: anthropic, base_url: "{mock_url}", keys: ["sk-upstream"] }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: anthropic }}
tiers:
  free: {{ limits: {{ tokens_per_day: 100000 }} }}
tenants:
  - {{ name: a, tier: free, keys: [{{ hash: "{a}" }}] }}
"#,
        a = KeyHash::of(KEY_A).to_text(),
    )
}

/// The mock's usage for a body: prompt = max(1, bytes / 4), completion = 5 chunks.
fn mock_usage(body: &[u8]) -> u64 {
    (body.len() as u64 / 4).max(1) + 5
}

/// What admission reserves: the prompt as Sluice measures it (tiktoken for OpenAI models,
/// bytes / 4 otherwise) plus the requested output.
fn reservation(body: &[u8], max_tokens: u64, dialect: Dialect) -> u64 {
    let request =
        sluice_filters::RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    let body = bytes::Bytes::copy_from_slice(body);
    let ex = sluice_filters::Exchange::with_dialect("r".into(), request, body, dialect);
    sluice_filters::limits::estimate_input_tokens(&ex) + max_tokens
}

#[tokio::test]
async fn token_reservations_settle_to_reported_usage() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&token_policy(&mock.url())).await;
    let client = reqwest::Client::new();
    let body = |stream: bool| {
        serde_json::to_vec(&serde_json::json!({
            "model": "gpt-4o-mini", "max_tokens": 200, "stream": stream,
            "messages": [{"role": "user", "content": "count my tokens"}],
        }))
        .unwrap()
    };
    let send = |path: &'static str, body: Vec<u8>| {
        client
            .post(format!("{}{path}", sidecar.proxy))
            .bearer_auth(KEY_A)
            .header("x-api-key", KEY_A)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    // 1. Non-streaming: the reservation is shown, then replaced by the reported usage.
    let first = send("/openai/v1/chat/completions", body(false))
        .await
        .unwrap();
    assert_eq!(
        remaining_tokens(&first).await,
        100_000 - reservation(&body(false), 200, Dialect::OpenAi)
    );
    first.bytes().await.unwrap();
    let mut used = mock_usage(&body(false));

    // 2. An OpenAI stream whose caller did not ask for usage: Sluice asks, reads, and hides it.
    let streamed = send("/openai/v1/chat/completions", body(true))
        .await
        .unwrap();
    assert_eq!(
        remaining_tokens(&streamed).await,
        100_000 - used - reservation(&body(true), 200, Dialect::OpenAi)
    );
    let text = streamed.text().await.unwrap();
    assert!(
        !text.contains("\"usage\""),
        "the caller sees exactly what it asked for: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    // Every event is intact JSON with exactly the fields of a stream without usage (the mock,
    // like OpenAI, wrote `"usage":null` into each content chunk under the injected option).
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    for event in &events[..events.len() - 1] {
        let data = event
            .strip_prefix("data: ")
            .expect("one data line per event");
        let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
        let mut fields: Vec<&str> = chunk
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            ["choices", "created", "id", "model", "object"],
            "{event}"
        );
    }
    let sent_upstream: serde_json::Value =
        serde_json::from_slice(&mock.requests().last().unwrap().body).unwrap();
    assert_eq!(sent_upstream["stream_options"]["include_usage"], true);
    used += mock_usage(&mock.requests().last().unwrap().body);

    // 3. An Anthropic stream: usage from message_start and message_delta.
    let anthropic = send("/anthropic/v1/messages", body(true)).await.unwrap();
    assert_eq!(
        remaining_tokens(&anthropic).await,
        100_000 - used - reservation(&body(true), 200, Dialect::Anthropic)
    );
    anthropic.text().await.unwrap();
    used += mock_usage(&body(true));

    // The next admission shows exactly the settled usage of all three.
    let last = send("/openai/v1/chat/completions", body(false))
        .await
        .unwrap();
    assert_eq!(
        remaining_tokens(&last).await,
        100_000 - used - reservation(&body(false), 200, Dialect::OpenAi)
    );
}

#[tokio::test]
async fn anthropic_answers_settle_and_the_default_reservation_is_1024() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&token_policy(&mock.url())).await;
    let client = reqwest::Client::new();
    let send = |path: &'static str, body: serde_json::Value| {
        client
            .post(format!("{}{path}", sidecar.proxy))
            .bearer_auth(KEY_A)
            .header("x-api-key", KEY_A)
            .json(&body)
            .send()
    };
    let sent_last = || mock.requests().last().unwrap().body.clone();

    // A non-streaming Anthropic answer: its JSON `usage` replaces the reservation.
    let anthropic = serde_json::json!({"model": "claude-3-5-haiku-latest", "max_tokens": 300,
        "messages": [{"role": "user", "content": "settle me"}]});
    let bytes = serde_json::to_vec(&anthropic).unwrap();
    let first = send("/anthropic/v1/messages", anthropic).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(
        remaining_tokens(&first).await,
        100_000 - reservation(&bytes, 300, Dialect::Anthropic)
    );
    let answer: serde_json::Value = first.json().await.unwrap();
    let used = answer["usage"]["input_tokens"].as_u64().unwrap()
        + answer["usage"]["output_tokens"].as_u64().unwrap();
    assert_eq!(used, mock_usage(&sent_last()));

    // No `max_tokens`: the tier's default reserves 1024 for the output.
    let plain = serde_json::json!({"model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "no max_tokens here"}]});
    let bytes = serde_json::to_vec(&plain).unwrap();
    let second = send("/openai/v1/chat/completions", plain.clone())
        .await
        .unwrap();
    assert_eq!(
        remaining_tokens(&second).await,
        100_000 - used - reservation(&bytes, 1024, Dialect::OpenAi),
        "the Anthropic answer was settled, and 1024 reserved by default"
    );
    second.bytes().await.unwrap();
    let used = used + mock_usage(&sent_last());
    let third = send("/openai/v1/chat/completions", plain).await.unwrap();
    assert_eq!(
        remaining_tokens(&third).await,
        100_000 - used - reservation(&bytes, 1024, Dialect::OpenAi)
    );
}

#[tokio::test]
async fn a_caller_that_asked_for_usage_still_gets_it() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&token_policy(&mock.url())).await;
    let mut body = chat_body("with usage", true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let text = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY_A)
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("\"usage\""), "{text}");
}

#[tokio::test]
async fn a_token_quota_refuses_what_does_not_fit() {
    let mock = mock().await;
    let policy = token_policy(&mock.url()).replace("tokens_per_day: 100000", "tokens_per_day: 300");
    let sidecar = Sidecar::start(&policy).await;
    let big = serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 400, "messages": []});
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY_A)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let error: serde_json::Value = response.json().await.unwrap();
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`tokens_per_day` limit of 300"));
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn budgets_alert_once_downgrade_then_stop() {
    let mock = mock().await;
    // One dollar a token makes every request cost tens of dollars against a $100 budget.
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{url}", keys: ["sk-upstream"] }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
prices:
  gpt-4o: {{ input: 1000000, output: 1000000 }}
  "gpt-4.*": {{ input: 1000000, output: 1000000 }}
  gpt-4o-mini: {{ input: 0.15, output: 0.6 }}
tiers:
  pro:
    limits:
      budget_usd_per_month: 100
      downgrade: {{ above_percent: 50, models: {{ gpt-4o: gpt-4o-mini }} }}
tenants:
  - {{ name: a, tier: pro, keys: [{{ hash: "{a}" }}] }}
"#,
        url = mock.url(),
        a = KeyHash::of(KEY_A).to_text(),
    );
    let sidecar = Sidecar::start(&policy).await;
    let ask = |model: &'static str| {
        reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .bearer_auth(KEY_A)
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "spend some money please, it is only a test"}]}))
            .send()
    };
    // Until half the budget is spent, gpt-4o is sent as asked.
    let mut statuses = Vec::new();
    loop {
        let response = ask("gpt-4o").await.unwrap();
        assert_eq!(response.status(), 200);
        let downgraded = response.headers().get("x-sluice-model-downgraded").cloned();
        response.bytes().await.unwrap();
        if let Some(header) = downgraded {
            assert_eq!(header, "gpt-4o -> gpt-4o-mini");
            break;
        }
        statuses.push(200);
        assert!(statuses.len() < 10, "never downgraded");
    }
    let sent: serde_json::Value =
        serde_json::from_slice(&mock.requests().last().unwrap().body).unwrap();
    assert_eq!(
        sent["model"], "gpt-4o-mini",
        "the provider receives the cheaper model"
    );
    // Models without a downgrade keep spending until the hard stop.
    let mut refused = None;
    for _ in 0..10 {
        let response = ask("gpt-4.1").await.unwrap();
        if response.status() == 429 {
            refused = Some(response.json::<serde_json::Value>().await.unwrap());
            break;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let refused = refused.expect("the budget never stopped requests");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`budget_usd_per_month` limit of 100"),
        "{refused}"
    );
    each_budget_alert_logged_once(|| sidecar.logs()).await;
    let metrics = sidecar.metrics().await;
    for percent in ["50", "75", "90", "95"] {
        let labels = [("tier", "pro"), ("threshold", percent), ("tenant", "")];
        assert_eq!(
            metrics.value("sluice_budget_alerts_total", &labels),
            Some(1.0),
            "alert {percent}% counted once"
        );
    }
    let downgrade = [("tier", "pro"), ("from", "gpt-4o"), ("to", "gpt-4o-mini")];
    assert_eq!(
        metrics.value("sluice_model_downgrades_total", &downgrade),
        Some(1.0)
    );
    let budget = [("limit", "budget_usd_per_month"), ("scope", "pro")];
    assert_eq!(
        metrics.value("sluice_limit_rejections_total", &budget),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_stream_outgrowing_its_tokens_is_cut_with_an_error_event() {
    let mock = mock().await;
    let policy = token_policy(&mock.url()).replace(
        "tokens_per_day: 100000",
        "tokens_per_day: 30, reserve_output_tokens: 10, cut_streams_over_tokens: true",
    );
    let sidecar = Sidecar::start(&policy).await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY_A)
        .header("x-mock-chunks", "50")
        .header("x-mock-chunk-ms", "2")
        .json(&serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response
        .text()
        .await
        .expect("the cut stream ends cleanly, with its error event");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let last = events.last().unwrap();
    assert!(last.starts_with("data: {\"error\""), "{last}");
    assert!(last.contains("token limit reached mid-stream"), "{last}");
    assert!(!text.contains("[DONE]"));
    assert!(events.len() < 50, "cut early: {} events", events.len());
    // The upstream stream was dropped, which stops the generation.
    wait_for_a_cancelled_stream(&mock).await;
}

#[tokio::test]
async fn a_queued_request_waits_for_the_place_instead_of_failing() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        "{ concurrent: 1, queue: { max_wait: 5s, priority: 1 } }",
        false,
    ))
    .await;
    let slow = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY_A)
        .header("x-mock-chunk-ms", "100")
        .header("x-mock-chunks", "5")
        .json(&chat_body("hold", true))
        .send()
        .await
        .unwrap();
    let mut stream = slow.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let started = std::time::Instant::now();
    let queued = tokio::spawn({
        let proxy = sidecar.proxy.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{proxy}/openai/v1/chat/completions"))
                .bearer_auth(KEY_A)
                .json(&chat_body("waiting", false))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }
    assert_eq!(
        queued.await.unwrap(),
        200,
        "admitted once the stream gave its place back"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it did wait: {:?}",
        started.elapsed()
    );
}
