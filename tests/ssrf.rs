//! Isolation and SSRF on the base-URL listener: nothing a caller controls — a body's
//! `api_base`, `Host`, `X-Forwarded-Host`, an absolute request URI, a CONNECT target, an
//! upstream's redirect — makes Sluice connect anywhere the policy did not name. A sinkhole
//! listener stands for "anywhere else" and must see no connection at all.
//! The forward listener with a wildcard tunnel list reaches no private address either.
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

/// The forward listener with `tunnel.hosts: ["*"]`: any host may be asked for, yet no spelling
/// of a loopback, link-local or unspecified address — dotted, decimal, short, IPv4-mapped,
/// IPv6, a name resolving there — is dialled, by `CONNECT` or by an absolute-form request.
#[tokio::test]
async fn forward_wildcard_tunnel_never_reaches_private_addresses() {
    let mock = mock().await;
    let sinkhole = Sinkhole::start().await;
    let sink = sinkhole.addr.port();
    let body = format!(
        "{}forward:\n  tunnel: {{ hosts: [\"*\"], ports: [80, {sink}] }}\n",
        passthrough_policy(&mock.url())
    );
    let sidecar = Sidecar::start_forward(&body, &[]).await;
    let listener = sidecar.forward.as_deref().unwrap();
    let targets = [
        format!("127.0.0.1:{sink}"),
        format!("2130706433:{sink}"),
        format!("127.1:{sink}"),
        format!("[::ffff:127.0.0.1]:{sink}"),
        format!("[::1]:{sink}"),
        "169.254.169.254:80".to_owned(),
        format!("localhost:{sink}"),
        format!("0.0.0.0:{sink}"),
    ];
    for target in &targets {
        for request in [
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
            format!("GET http://{target}/latest/meta-data HTTP/1.1\r\nHost: {target}\r\n\r\n"),
        ] {
            let answer = raw_exchange(listener, request.as_bytes(), Duration::from_secs(5)).await;
            let line = request.lines().next().unwrap();
            assert!(
                answer.starts_with("HTTP/1.1 403 Forbidden\r\n"),
                "{line}: {answer}"
            );
            assert!(
                answer.contains("which the policy does not let tunnels reach"),
                "{line}: {answer}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sinkhole.accepted(), 0, "a private address was dialled");
    let metrics = sidecar.metrics().await;
    let counted = |action: &str| metrics.value("sluice_forward_total", &[("action", action)]);
    assert_eq!(counted("refuse"), Some(2.0 * targets.len() as f64));
    assert_eq!(counted("tunnel"), Some(0.0));
    assert_eq!(mock.request_count(), 0);
}
