//! Resource abuse: oversized heads and bodies are refused before they cost anything, and idle,
//! slow and long-streaming clients do not starve legitimate traffic or leak descriptors.
//!
//! `SLUICE_HARDEN_SCALE` multiplies the number of abusive clients (`make harden`: 5).

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATH: &str = "/openai/v1/chat/completions";

fn scale() -> usize {
    std::env::var("SLUICE_HARDEN_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

async fn connect(sidecar: &Sidecar) -> TcpStream {
    TcpStream::connect(sidecar.proxy.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads what the sidecar answers within `limit`; whether it closed the connection.
async fn answer(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, stream.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test]
async fn oversized_headers_get_431_and_huge_ones_400() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}{PATH}", sidecar.proxy))
        .header("x-padding", "a".repeat(100 * 1024))
        .json(&chat_body("big head", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "request_too_large", "{error}");

    // Over Pingora's own 1 MiB bound: refused before any routing, and the connection closed.
    let mut stream = connect(&sidecar).await;
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nx-padding: {}\r\n\r\n",
        "a".repeat(2 * 1024 * 1024)
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let (text, closed) = answer(&mut stream, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text:.80}");
    assert!(closed);
    assert_eq!(mock.request_count(), 0);

    let ok = client
        .post(format!("{}{PATH}", sidecar.proxy))
        .json(&chat_body("small head", false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_before_they_are_read() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let rss_before = rss_kib(sidecar.pid());

    // A declared gigabyte: answered at once, nothing of it read.
    let mut stream = connect(&sidecar).await;
    let head = format!("POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let (text, closed) = answer(&mut stream, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        closed,
        "the unread body cannot be followed by another request"
    );

    // Chunked without end: refused as soon as the 8 MiB limit is crossed, while still sending.
    let mut stream = connect(&sidecar).await;
    let head = format!("POST {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let piece = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
    let mut sent = 0usize;
    while stream.write_all(piece.as_bytes()).await.is_ok() {
        sent += piece.len();
        if sent > 64 * 1024 * 1024 {
            break;
        }
    }
    let (text, _) = answer(&mut stream, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        sent < 32 * 1024 * 1024,
        "sending stopped near the limit, not at the end: {sent} bytes"
    );
    assert_eq!(mock.request_count(), 0);
    let grown = rss_kib(sidecar.pid()).saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_and_streaming_clients_do_not_starve_legitimate_traffic() {
    let mock = mock().await;
    // Idle upstream connections expire after 2 s, so what stays open after the test is exactly
    // what was open before it; a long connect timeout, as the in-process mock accepts slowly
    // while the test floods it.
    let sidecar = Sidecar::start(&format!(
        r#"server: {{ drain_timeout: 10s, client_body_timeout: 3s, upstream_pool_size: 16, upstream_idle_timeout: 2s }}
upstreams:
  openai: {{ provider: openai, base_url: "{}", timeouts: {{ connect: 30s }} }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
"#,
        mock.url()
    ))
    .await;
    let pid = sidecar.pid();
    let (fds_idle, rss_idle) = (open_fds(pid), rss_kib(pid));
    let n = scale();

    // Idle connections that never send a byte.
    let mut held = Vec::new();
    for _ in 0..300 * n {
        held.push(connect(&sidecar).await);
    }
    // Slowloris: a head one byte at a time.
    let mut slow = Vec::new();
    for _ in 0..100 * n {
        let mut stream = connect(&sidecar).await;
        stream
            .write_all(format!("POST {PATH} HTTP/1.1\r\nHost: x\r\n").as_bytes())
            .await
            .unwrap();
        slow.push(stream);
    }
    // Slow bodies: a declared length, trickled.
    for _ in 0..50 * n {
        let mut stream = connect(&sidecar).await;
        stream
            .write_all(
                format!("POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{{")
                    .as_bytes(),
            )
            .await
            .unwrap();
        slow.push(stream);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            for stream in slow.iter_mut() {
                let _ = stream.write_all(b"x").await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slow
    });
    // Long streams: 200 open at once, each 50 events 100 ms apart.
    let client = reqwest::Client::new();
    let mut streams = Vec::new();
    for _ in 0..200 * n {
        let request = client
            .post(format!("{}{PATH}", sidecar.proxy))
            .header("x-mock-chunks", "50")
            .header("x-mock-chunk-ms", "100")
            .json(&chat_body("long", true));
        streams.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let body = response.text().await.unwrap();
            assert!(
                body.trim_end().ends_with("data: [DONE]"),
                "a stream ended early"
            );
        }));
    }
    let rss_busy = rss_kib(pid);

    // Meanwhile, legitimate traffic: every request answered.
    let started = Instant::now();
    for round in 0..20 {
        let calls = (0..10).map(|i| {
            client
                .post(format!("{}{PATH}", sidecar.proxy))
                .json(&chat_body(&format!("legit {round} {i}"), false))
                .send()
        });
        for response in futures_util::future::join_all(calls).await {
            assert_eq!(response.unwrap().status(), 200);
        }
    }
    let legit = started.elapsed();
    for stream in streams {
        stream.await.unwrap();
    }
    let slow = trickle.await.unwrap();
    let fds_busy = open_fds(pid);
    drop(held);
    drop(slow);
    drop(client);

    // Descriptors back to where they were once the clients are gone.
    let fds_after = descriptors_settle(pid, fds_idle, Duration::from_secs(12)).await;
    assert!(
        fds_after <= fds_idle,
        "descriptors: idle {fds_idle}, busy {fds_busy}, now {fds_after}"
    );
    eprintln!(
        "abuse: {} idle, {} slow heads, {} slow bodies, {} streams; 200 legitimate requests in \
         {legit:?}; fds {fds_idle} -> {fds_busy} -> {}; RSS {rss_idle} KiB -> {rss_busy} KiB -> {} KiB",
        300 * n,
        100 * n,
        50 * n,
        200 * n,
        fds_after,
        rss_kib(pid)
    );
}
