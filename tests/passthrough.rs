//! Requests reach the provider unchanged and answers come back unchanged, streaming included.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

fn header<'a>(request: &'a sluice_mock::RecordedRequest, name: &str) -> Option<&'a str> {
    request
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn openai_chat_passes_through_with_request_id() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let body = serde_json::to_vec(&chat_body("hello there", false)).unwrap();
    let response = reqwest::Client::new()
        .post(format!(
            "{}/openai/v1/chat/completions?trace=1",
            sidecar.proxy
        ))
        .header("authorization", "Bearer sk-caller")
        .header("content-type", "application/json")
        .header("x-request-id", "req-42")
        .header("openai-beta", "assistants=v2")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "echo: hello there"
    );
    assert!(answer["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.path, "/v1/chat/completions?trace=1");
    assert_eq!(
        &seen.body[..],
        &body[..],
        "the body reaches the provider byte for byte"
    );
    assert_eq!(
        header(seen, "authorization"),
        Some("Bearer sk-caller"),
        "no key upstream: the caller's passes"
    );
    assert_eq!(header(seen, "x-request-id"), Some("req-42"));
    assert_eq!(header(seen, "openai-beta"), Some("assistants=v2"));
    let host = header(seen, "host").unwrap();
    assert_eq!(host, mock.url().trim_start_matches("http://"));
}

#[tokio::test]
async fn a_request_id_is_made_when_the_caller_sends_none() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .json(&chat_body("hi", false))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 36);
    assert_eq!(
        header(&mock.requests()[0], "x-request-id"),
        Some(id.as_str())
    );
}

#[tokio::test]
async fn get_models_and_embeddings_pass_through() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let client = reqwest::Client::new();
    let models = client
        .get(format!("{}/openai/v1/models", sidecar.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let models: serde_json::Value = models.json().await.unwrap();
    assert!(models["data"].is_array());
    let embeddings = client
        .post(format!("{}/openai/v1/embeddings", sidecar.proxy))
        .json(&serde_json::json!({"model": "text-embedding-3-small", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(embeddings.status(), 200);
    let embeddings: serde_json::Value = embeddings.json().await.unwrap();
    assert_eq!(embeddings["data"].as_array().unwrap().len(), 2);
}

/// Reads a streamed response, returning each chunk's arrival time since the request was sent.
async fn timed_chunks(response: reqwest::Response, sent: Instant) -> (Vec<Duration>, String) {
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        arrivals.push(sent.elapsed());
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    (arrivals, text)
}

#[tokio::test]
async fn openai_stream_chunks_arrive_as_they_are_sent() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let mut body = chat_body("stream me please", true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let sent = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-chunk-ms", "300")
        .header("x-mock-chunks", "4")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (arrivals, text) = timed_chunks(response, sent).await;
    // 4 content events + usage + [DONE], 300 ms apart: the first must not wait for the last.
    let first = arrivals.first().copied().unwrap();
    let last = arrivals.last().copied().unwrap();
    assert!(
        last - first >= Duration::from_millis(900),
        "chunks were held back: {arrivals:?}"
    );
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let content: String = events
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "echo: stream me please");
    assert!(
        text.contains("\"usage\""),
        "the usage chunk the caller asked for is there"
    );
}

#[tokio::test]
async fn anthropic_stream_keeps_its_event_sequence() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "stream": true,
        "messages": [{"role": "user", "content": "bonjour"}],
    });
    let response = reqwest::Client::new()
        .post(format!("{}/anthropic/v1/messages", sidecar.proxy))
        .header("x-api-key", "sk-ant-caller")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert_eq!(events.last(), Some(&"message_stop"));
    assert!(events.contains(&"message_delta"));
    let said: String = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str::<serde_json::Value>(data).unwrap())
        .filter_map(|event| event["delta"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(said, "echo: bonjour");
    let seen = &mock.requests()[0];
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(header(seen, "x-api-key"), Some("sk-ant-caller"));
    assert_eq!(header(seen, "anthropic-version"), Some("2023-06-01"));
}

#[tokio::test]
async fn a_one_mib_body_arrives_intact() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    // A prompt of 1 MiB of varied text, sent both with a length and chunked.
    let prompt: String = (0..)
        .map(|i: u32| char::from(b'a' + (i * 7 % 26) as u8))
        .take(1 << 20)
        .collect();
    let body = serde_json::to_vec(&chat_body(&prompt, false)).unwrap();
    let client = reqwest::Client::new();
    let with_length = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(with_length.status(), 200);
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let chunked = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.status(), 200);
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    for request in seen {
        assert_eq!(request.body.len(), body.len());
        assert!(request.body[..] == body[..], "body changed on the way");
        assert_eq!(
            header(&request, "content-length"),
            Some(body.len().to_string().as_str())
        );
    }
}

#[tokio::test]
async fn h2c_callers_are_served() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .json(&chat_body("over h2c", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn upstream_keys_replace_the_callers_credential() {
    let mock = mock().await;
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{url}", keys: ["${{TEST_OPENAI_KEY}}"] }}
  anthropic: {{ provider: anthropic, base_url: "{url}", keys: ["sk-ant-upstream"] }}
  azure:
    provider: azure_openai
    base_url: "{url}"
    keys: ["azure-upstream"]
    api_version: "2024-10-21"
    deployments: {{ gpt-4o-mini: mini-deployment }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: anthropic }}
  - {{ name: azure, match: {{ path_prefix: /azure }}, upstream: azure }}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start_with_env(&policy, &[("TEST_OPENAI_KEY", "sk-upstream")]).await;
    let client = reqwest::Client::new();
    let caller_headers = [
        ("authorization", "Bearer sk-caller"),
        ("x-api-key", "sk-caller"),
        ("api-key", "sk-caller"),
    ];
    for path in [
        "/openai/v1/chat/completions",
        "/anthropic/v1/messages",
        "/azure/v1/chat/completions",
    ] {
        let mut request = client
            .post(format!("{}{path}", sidecar.proxy))
            .json(&chat_body("k", false));
        for (name, value) in caller_headers {
            request = request.header(name, value);
        }
        assert_eq!(request.send().await.unwrap().status(), 200, "{path}");
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        for (name, value) in &request.headers {
            assert!(
                !value.contains("sk-caller"),
                "caller credential reached upstream in {name}"
            );
        }
    }
    assert_eq!(
        header(&seen[0], "authorization"),
        Some("Bearer sk-upstream")
    );
    assert_eq!(header(&seen[1], "x-api-key"), Some("sk-ant-upstream"));
    assert_eq!(header(&seen[2], "api-key"), Some("azure-upstream"));
    assert_eq!(
        seen[2].path,
        "/openai/deployments/mini-deployment/chat/completions?api-version=2024-10-21"
    );
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let client = reqwest::Client::new();
    for stream in [false, true, false] {
        let response = client
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .json(&chat_body("again", stream))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let peers: Vec<_> = mock.requests().iter().map(|r| r.peer).collect();
    assert_eq!(peers.len(), 3);
    assert!(
        peers.iter().all(|p| *p == peers[0]),
        "one pooled connection: {peers:?}"
    );
}

/// An upstream that records the raw bytes of the one request it reads and answers with header
/// names in mixed case.
async fn recording_upstream() -> (String, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (seen, received) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buffer = vec![0; 64 * 1024];
        let read = stream.read(&mut buffer).await.unwrap();
        let _ = seen.send(String::from_utf8_lossy(&buffer[..read]).into_owned());
        let body = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[]}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Upstream-Trace: t-1\r\nOpenAI-Processing-Ms: 12\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
    });
    (url, received)
}

/// Header names are case-insensitive (RFC 9110 §5.1). On HTTP/1 Sluice writes the standard
/// ones in their usual title case and the rest in lower case, as a cache hit (stored by name)
/// always did, instead of keeping a second, case-preserving map of every head: that map cost
/// about a tenth of a request's header work.
#[tokio::test]
async fn header_names_are_written_titled_if_standard_and_lower_case_otherwise() {
    let (upstream, received) = recording_upstream().await;
    let sidecar = Sidecar::start(&passthrough_policy(&upstream)).await;
    let body = serde_json::to_string(&chat_body("hello", false)).unwrap();
    let request = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\nOpenAI-Beta: assistants=v2\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_exchange(&sidecar.proxy, request.as_bytes(), Duration::from_secs(5)).await;
    let upstream_saw = tokio::time::timeout(Duration::from_secs(5), received)
        .await
        .unwrap()
        .unwrap();
    assert!(
        upstream_saw.contains("\r\nContent-Type: application/json\r\n"),
        "{upstream_saw}"
    );
    assert!(
        upstream_saw.contains("\r\nopenai-beta: assistants=v2\r\n"),
        "{upstream_saw}"
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("\r\nContent-Type: application/json\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nx-upstream-trace: t-1\r\n"), "{answer}");
    assert!(
        answer.contains("\r\nopenai-processing-ms: 12\r\n"),
        "{answer}"
    );
}
