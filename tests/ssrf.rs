//! Isolation and SSRF on the base-URL listener: nothing a caller controls — a body's
//! `api_base`, `Host`, `X-Forwarded-Host`, an absolute request URI, a CONNECT target, an
//! upstream's redirect — makes Sluice connect anywhere the policy did not name. A sinkhole
//! listener stands for "anywhere else" and must see no connection at all.
//! (No cross-tenant cache hit: tests/cache.rs. The forward listener's rules: tests/forward.rs.)

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATH: &str = "/openai/v1/chat/completions";

#[tokio::test]
async fn caller_controlled_fields_never_choose_the_destination() {
    let mock = mock().await;
    let sinkhole = Sinkhole::start().await;
    let elsewhere = sinkhole.addr.to_string();
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let client = reqwest::Client::new();

    let mut body = chat_body("where to?", false);
    for field in ["api_base", "base_url", "baseURL", "endpoint", "url"] {
        body[field] = serde_json::json!(format!("http://{elsewhere}/v1"));
    }
    let tries = [
        ("host", elsewhere.clone()),
        ("x-forwarded-host", elsewhere.clone()),
        ("x-forwarded-for", "127.0.0.1".to_owned()),
        ("forwarded", format!("host={elsewhere}")),
        ("x-original-url", format!("http://{elsewhere}{PATH}")),
        ("x-rewrite-url", format!("http://{elsewhere}{PATH}")),
    ];
    for (name, value) in &tries {
        let response = client
            .post(format!("{}{PATH}", sidecar.proxy))
            .header(*name, value)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{name}");
    }
    // An absolute request URI naming another host: routed by path to the policy's upstream.
    let absolute = format!(
        "POST http://{elsewhere}{PATH} HTTP/1.1\r\nHost: {elsewhere}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.to_string().len(),
        body
    );
    let answer = raw_exchange(&sidecar.proxy, absolute.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.120}");
    // CONNECT on the base-URL listener is not a tunnel.
    let connect = format!("CONNECT {elsewhere} HTTP/1.1\r\nHost: {elsewhere}\r\n\r\n");
    let answer = raw_exchange(&sidecar.proxy, connect.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer:.120}");

    assert_eq!(mock.request_count(), tries.len() + 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sinkhole.accepted(),
        0,
        "Sluice connected where the caller pointed"
    );
}

/// An upstream that answers every request with a redirect to `location`.
async fn redirecting_upstream(location: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let location = location.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0; 64 * 1024];
                let _ = stream.read(&mut buffer).await;
                let body = r#"{"error":{"message":"moved","type":"redirect"}}"#;
                let answer = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn credentials_never_follow_a_redirect() {
    let sinkhole = Sinkhole::start().await;
    let upstream = redirecting_upstream(format!("{}/steal", sinkhole.url())).await;
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{upstream}", keys: ["sk-provider-secret"] }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, auth: passthrough, retry: {{ attempts: 1 }} }}
"#
    );
    let sidecar = Sidecar::start(&policy).await;
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}{PATH}", sidecar.proxy))
        .json(&chat_body("follow me", false))
        .send()
        .await
        .unwrap();
    // Relayed as the upstream's answer, not followed.
    assert_eq!(response.status(), 307);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sinkhole.accepted(), 0, "Sluice followed the redirect");
}
