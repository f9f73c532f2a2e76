//! Errors Sluice produces itself come in the route's provider error shape, never as a hang.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

async fn json_error(response: reqwest::Response) -> serde_json::Value {
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

#[tokio::test]
async fn no_route_is_404_in_openai_shape() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let response = reqwest::get(format!("{}/nowhere/v1/models", sidecar.proxy))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let error = json_error(response).await;
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/nowhere/v1/models"));
    // Segment boundary: /openaix is not /openai.
    let response = reqwest::get(format!("{}/openaix/v1/models", sidecar.proxy))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn oversize_bodies_get_413_without_reaching_the_upstream() {
    let mock = mock().await;
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{url}" }}
  anthropic: {{ provider: anthropic, base_url: "{url}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, max_body: 1KiB }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: anthropic, max_body: 1KiB }}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let client = reqwest::Client::new();
    let big = serde_json::to_vec(&chat_body(&"x".repeat(4096), false)).unwrap();

    // Declared length: refused before the body is read.
    let response = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        json_error(response).await["error"]["code"],
        "request_too_large"
    );

    // Chunked: refused once the limit is crossed, in Anthropic's shape on an Anthropic route.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(512).map(|c| Ok(c.to_vec())).collect();
    let response = client
        .post(format!("{}/anthropic/v1/messages", sidecar.proxy))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let error = json_error(response).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "request_too_large");

    // Within the limit still passes.
    let small = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .json(&chat_body("small", false))
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn a_body_naming_the_model_twice_is_refused() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`model`"));
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let request = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{}{}\r\n0\r\n\r\n";
    let answer = raw_exchange(&sidecar.proxy, request, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("Content-Length and Transfer-Encoding"),
        "{answer}"
    );
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let closed_port = free_port();
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "http://127.0.0.1:{closed_port}" }}
  anthropic: {{ provider: anthropic, base_url: "http://127.0.0.1:{closed_port}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: anthropic }}
"#
    );
    let sidecar = Sidecar::start(&policy).await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .json(&chat_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let error = json_error(response).await;
    assert_eq!(error["error"]["type"], "server_error");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("openai"));

    let response = client
        .post(format!("{}/anthropic/v1/messages", sidecar.proxy))
        .json(&chat_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(json_error(response).await["error"]["type"], "api_error");
}

#[tokio::test]
async fn stalled_upstream_is_504_after_the_first_byte_timeout() {
    let mock = mock().await;
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{url}", timeouts: {{ first_byte: 700ms }} }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-fault", "stall")
        .json(&chat_body("hi", false))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), 504);
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let error = json_error(response).await;
    assert_eq!(error["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn provider_errors_pass_through_unchanged() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-status", "429")
        .header("x-mock-retry-after", "7")
        .json(&chat_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn a_stream_that_breaks_upstream_does_not_end_cleanly() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-fault", "reset-mid-stream")
        .header("x-mock-chunks", "6")
        // Spaced out, so the head and the first events are on the wire before the reset.
        .header("x-mock-chunk-ms", "50")
        .json(&chat_body("this will break", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "the caller must see the break, not a clean end: {text}"
    );
    assert!(!text.contains("[DONE]"));
}
