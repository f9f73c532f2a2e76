//! The mock over real HTTP: what Sluice's integration tests, SDK tests and benchmarks rely on.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice_mock::{Fault, MockConfig, MockServer};

async fn mock() -> MockServer {
    MockServer::start(MockConfig::default()).await.unwrap()
}

fn chat(text: &str, stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream,
           "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]})
}

/// Reads a whole SSE body, one entry per event (the text between blank lines).
async fn events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    assert!(text.ends_with("\n\n"), "unterminated SSE body: {text:?}");
    text.split_terminator("\n\n").map(str::to_owned).collect()
}

fn data(event: &str) -> Value {
    let line = event
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line in {event:?}"));
    serde_json::from_str(line).unwrap()
}

#[tokio::test]
async fn non_stream_chat_echoes_the_last_message() {
    let mock = mock().await;
    let body = chat("hello there", false).to_string();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("content-type", "application/json")
        .header("x-request-id", "req-42")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "gpt-4o-mini");
    assert!(answer["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "echo: hello there"
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["prompt_tokens"], body.len() / 4);
    assert_eq!(answer["usage"]["completion_tokens"], 5);
    assert_eq!(answer["usage"]["total_tokens"], body.len() / 4 + 5);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn long_and_multipart_content_is_echoed_truncated() {
    let mock = mock().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x".repeat(150)}, {"type": "text", "text": "y".repeat(150)}]}]});
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text.chars().count(), 200);
    assert_eq!(text, format!("echo: {}{}", "x".repeat(150), "y".repeat(44)));
}

#[tokio::test]
async fn openai_stream_with_and_without_usage() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", mock.url());

    let response = client
        .post(&url)
        .json(&chat("stream me", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let plain = events(response).await;
    assert_eq!(plain.len(), 5 + 1, "{plain:?}");
    assert_eq!(plain.last().unwrap(), "data: [DONE]");
    assert!(plain.iter().all(|e| !e.contains("usage")), "{plain:?}");
    let chunks: Vec<Value> = plain[..5].iter().map(|e| data(e)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[1]["choices"][0]["delta"].get("role").is_none());
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert!(chunks[..4]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "gpt-4o-mini"));
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "echo: stream me");

    let mut body = chat("stream me", true);
    body["stream_options"] = json!({"include_usage": true});
    let with_usage = events(client.post(&url).json(&body).send().await.unwrap()).await;
    assert_eq!(with_usage.len(), 5 + 2, "{with_usage:?}");
    assert_eq!(with_usage.last().unwrap(), "data: [DONE]");
    let usage = data(&with_usage[5]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(usage["usage"]["prompt_tokens"], body.to_string().len() / 4);
    // Like OpenAI: under include_usage every content chunk ends with `"usage":null`.
    assert!(
        with_usage[..5]
            .iter()
            .all(|e| e.ends_with(r#","usage":null}"#) && data(e)["usage"].is_null()),
        "{with_usage:?}"
    );
}

#[tokio::test]
async fn completions_and_embeddings_and_models() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    let completion: Value = client
        .post(format!("{}/v1/completions", mock.url()))
        .json(&json!({"model": "davinci", "prompt": "say hi"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["choices"][0]["text"], "echo: say hi");

    let streamed = events(
        client
            .post(format!("{}/v1/completions", mock.url()))
            .header("x-mock-chunks", "3")
            .json(&json!({"model": "davinci", "prompt": "say hi", "stream": true}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(streamed.len(), 3 + 1);
    let text: String = streamed[..3]
        .iter()
        .map(|e| data(e)["choices"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "echo: say hi");

    let embed = |input: Value| {
        let request = client
            .post(format!("{}/v1/embeddings", mock.url()))
            .json(&json!({"model": "text-embedding-3-small", "input": input}));
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let one = embed(json!("alpha")).await;
    let two = embed(json!(["alpha", "beta"])).await;
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    assert_eq!(two["data"].as_array().unwrap().len(), 2);
    assert_eq!(one["data"][0]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(one["data"][0]["embedding"], two["data"][0]["embedding"]);
    assert_ne!(two["data"][0]["embedding"], two["data"][1]["embedding"]);

    let models: Value = client
        .get(format!("{}/v1/models", mock.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert!(!models["data"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn azure_paths_use_the_deployment_as_model() {
    let mock = mock().await;
    let body = json!({"messages": [{"role": "user", "content": "hi azure"}]});
    let response = reqwest::Client::new()
        .post(format!(
            "{}/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21",
            mock.url()
        ))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["model"], "my-gpt");
    assert_eq!(answer["choices"][0]["message"]["content"], "echo: hi azure");
    assert_eq!(
        mock.requests()[0].path,
        "/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21"
    );
}

#[tokio::test]
async fn anthropic_message_and_stream_event_order() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/messages", mock.url());
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "bonjour"}]});
    let message: Value = client
        .post(&url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(message["type"], "message");
    assert!(message["id"].as_str().unwrap().starts_with("msg_mock_"));
    assert_eq!(message["model"], "claude-sonnet-4-5");
    assert_eq!(message["content"][0]["text"], "echo: bonjour");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"]["input_tokens"], body.to_string().len() / 4);
    assert_eq!(message["usage"]["output_tokens"], 5);

    let mut body = body;
    body["stream"] = json!(true);
    let streamed = events(client.post(&url).json(&body).send().await.unwrap()).await;
    let names: Vec<&str> = streamed
        .iter()
        .map(|e| e.lines().next().unwrap().strip_prefix("event: ").unwrap())
        .collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 5]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for (event, name) in streamed.iter().zip(&names) {
        assert_eq!(data(event)["type"], *name);
    }
    assert_eq!(
        data(&streamed[0])["message"]["usage"]["input_tokens"],
        body.to_string().len() / 4
    );
    let text: String = streamed[3..8]
        .iter()
        .map(|e| data(e)["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "echo: bonjour");
    let delta = data(&streamed[9]);
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn status_fault_with_retry_after_in_each_provider_shape() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("x-mock-status", "429")
        .header("x-mock-retry-after", "7")
        .json(&chat("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");
    assert!(error["error"]["message"].is_string());

    let response = client
        .post(format!("{}/v1/messages", mock.url()))
        .header("x-mock-status", "529")
        .json(&json!({"model": "claude", "max_tokens": 8, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 529);
    assert!(response.headers().get("retry-after").is_none());
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "overloaded_error");

    // The instance-wide fault applies unless a header overrides it.
    let faulty = MockServer::start(MockConfig {
        fault: Some(Fault::Status {
            status: 503,
            retry_after: Some("2".into()),
        }),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let response = client
        .post(format!("{}/v1/chat/completions", faulty.url()))
        .json(&chat("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "2");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    let response = client
        .post(format!("{}/v1/chat/completions", faulty.url()))
        .header("x-mock-status", "200")
        .json(&chat("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn bad_json_and_unknown_paths_get_provider_errors() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/chat/completions", mock.url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(error["error"]["code"].is_null());

    let response = client
        .post(format!("{}/v1/messages", mock.url()))
        .body("[1,")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    let response = client
        .get(format!("{}/v2/nothing", mock.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].is_string());
}

#[tokio::test]
async fn records_headers_and_a_large_body() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    let big: Vec<u8> = (0..1024 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let response = client
        .post(format!("{}/v1/completions?trace=1", mock.url()))
        .header("X-Custom-Thing", "Value 1")
        .header("authorization", "Bearer sk-test")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    // Not JSON, so a 400, but it is still recorded as received.
    assert_eq!(response.status(), 400);

    let recorded = mock.requests();
    assert_eq!(recorded.len(), 1);
    let request = &recorded[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/completions?trace=1");
    assert_eq!(request.body.len(), big.len());
    assert_eq!(&request.body[..], &big[..]);
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("x-custom-thing"), Some("Value 1"));
    assert_eq!(header("authorization"), Some("Bearer sk-test"));

    // Over HTTP too; control endpoints are neither recorded nor counted.
    assert_eq!(
        client
            .get(format!("{}/_mock/health", mock.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
    let listed: Value = client
        .get(format!("{}/_mock/requests", mock.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["body_len"], big.len());
    assert_eq!(listed[0]["headers"]["x-custom-thing"], "Value 1");
    assert_eq!(listed[0]["path"], "/v1/completions?trace=1");
    assert_eq!(mock.request_count(), 1);

    let cleared = client
        .delete(format!("{}/_mock/requests", mock.url()))
        .send()
        .await
        .unwrap();
    assert!(cleared.status().is_success());
    assert!(mock.requests().is_empty());
    client
        .get(format!("{}/v1/models", mock.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(mock.requests().len(), 1);
    mock.clear();
    assert!(mock.requests().is_empty());
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test]
async fn record_keeps_the_last_thousand_and_can_be_off() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    for i in 0..1005 {
        client
            .get(format!("{}/v1/models?n={i}", mock.url()))
            .send()
            .await
            .unwrap();
    }
    let recorded = mock.requests();
    assert_eq!(recorded.len(), 1000);
    assert_eq!(recorded[0].path, "/v1/models?n=5");
    assert_eq!(recorded[999].path, "/v1/models?n=1004");

    let quiet = MockServer::start(MockConfig {
        record: false,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    client
        .get(format!("{}/v1/models", quiet.url()))
        .send()
        .await
        .unwrap();
    assert!(quiet.requests().is_empty());
    assert_eq!(quiet.request_count(), 1);
}

#[tokio::test]
async fn events_are_spaced_by_the_chunk_delay() {
    let mock = mock().await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("x-mock-chunk-ms", "100")
        .header("x-mock-chunks", "3")
        .header("x-mock-first-byte-ms", "50")
        .json(&chat("slowly", true))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(50));
    let mut body = response.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.next().await {
        arrivals.push(Instant::now());
        text.push_str(std::str::from_utf8(&frame.unwrap()).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"));
    // 3 content events and [DONE], 100 ms apart: about 300 ms from the first to the last.
    let gap = *arrivals.last().unwrap() - arrivals[0];
    assert!(gap >= Duration::from_millis(150), "gap {gap:?}");
}

#[tokio::test]
async fn stamped_events_carry_their_send_time_in_a_comment() {
    let mock = mock().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("x-mock-stamp", "1")
        .header("x-mock-chunks", "3")
        .header("x-mock-chunk-ms", "20")
        .json(&chat("stamped", true))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    // 3 content events (the last with the finish reason) and [DONE], each stamped, in order.
    assert_eq!(events.len(), 4, "{text}");
    let mut stamps = Vec::new();
    for event in &events {
        let (comment, rest) = event.split_once('\n').unwrap();
        let sent: u128 = comment.strip_prefix(": sent_ns=").unwrap().parse().unwrap();
        assert!(rest.starts_with("data: "), "{event}");
        stamps.push(sent);
    }
    assert!(stamps[0] >= before);
    assert!(
        stamps
            .windows(2)
            .all(|pair| pair[1] - pair[0] >= 15_000_000),
        "{stamps:?}"
    );
    // Unstamped streams stay as they were.
    let plain = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.url()))
        .json(&chat("plain", true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(plain.starts_with("data: "), "{plain}");
}

#[tokio::test]
async fn reset_mid_stream_breaks_the_body() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("x-mock-fault", "reset-mid-stream")
        .header("x-mock-chunks", "6")
        .json(&chat("this breaks", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut failed = false;
    while let Some(frame) = body.next().await {
        match frame {
            Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "expected a broken body, got {text:?}");
    assert!(text.contains("\"role\":\"assistant\""), "{text:?}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(text.matches("data: ").count(), 3, "{text:?}");

    // Not streamed: the head arrives, then the connection is aborted instead of the body.
    let response = client
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("x-mock-fault", "reset-mid-stream")
        .json(&chat("this breaks", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err());
}

#[tokio::test]
async fn stalls_hang_before_the_head_or_mid_stream() {
    let mock = mock().await;
    let client = reqwest::Client::new();
    let stalled = client
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("x-mock-fault", "stall")
        .json(&chat("never", false))
        .send();
    assert!(tokio::time::timeout(Duration::from_millis(300), stalled)
        .await
        .is_err());

    let response = client
        .post(format!("{}/v1/chat/completions", mock.url()))
        .header("x-mock-fault", "stall-mid-stream")
        .header("x-mock-chunks", "4")
        .json(&chat("half", true))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let read = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(frame) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&frame.unwrap()));
        }
    })
    .await;
    assert!(read.is_err(), "the stream should hang, got {text:?}");
    assert_eq!(text.matches("data: ").count(), 2, "{text:?}");
}

#[tokio::test]
async fn binary_prints_its_address_and_serves() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice-mock"))
        .args(["--listen", "127.0.0.1:0", "--chunks", "2", "--no-record"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = line
        .strip_prefix("sluice-mock listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    assert!(url.starts_with("http://127.0.0.1:"));
    let answer: Value = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat("from the binary", false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 2);
    let listed: Value = reqwest::get(format!("{url}/_mock/requests"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, json!([]));
    child.kill().await.unwrap();
}
