//! Upstream faults from the mock, streamed and not: reset before the head, reset after some
//! events, a clean end without the terminator, a stall before the head and mid-stream, a slow
//! drip, malformed events, and 429 / 5xx storms. Every request ends within its timeouts as a
//! complete answer or an explicit error, content is never duplicated, and the sidecar's file
//! descriptors return to where they were.
//!
//! `SLUICE_HARDEN_SCALE` multiplies the requests per fault (`make harden`: 10).

mod common;

use std::time::{Duration, Instant};

use common::*;

const PATH: &str = "/openai/v1/chat/completions";

/// The pieces of content a stream carried, in order.
fn stream_contents(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter_map(|event| {
            event["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// How one request ended.
#[derive(Debug, PartialEq, Eq, Hash, Clone, Copy)]
enum Ending {
    Complete,
    /// A provider-shaped error: an error status with a JSON error, or an error event.
    ExplicitError,
    /// The body was cut short (the caller's HTTP client reports it).
    Truncated,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_ends_in_a_complete_answer_or_an_explicit_error() {
    let per_fault = 8 * std::env::var("SLUICE_HARDEN_SCALE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    let mock = mock().await;
    // Idle upstream connections expire after 2 s, so that after the test the sidecar is back to
    // the descriptors it started with.
    let policy = format!(
        r#"
server: {{ drain_timeout: 10s, upstream_pool_size: 16, upstream_idle_timeout: 2s }}
upstreams:
  openai:
    provider: openai
    base_url: "{}"
    timeouts: {{ first_byte: 1s, idle: 1s }}
    circuit_breaker: {{ enabled: false }}
    key_cooldown: 0s
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, retry: {{ attempts: 1 }} }}
"#,
        mock.url()
    );
    let sidecar = Sidecar::start(&policy).await;
    let client = reqwest::Client::new();
    let call = |stream: bool, headers: Vec<(&'static str, &'static str)>| {
        let mut request = client
            .post(format!("{}{PATH}", sidecar.proxy))
            .json(&chat_body("the quick brown fox jumps", stream));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move {
            let started = Instant::now();
            let response = request.send().await;
            let ending = match response {
                Err(e) => panic!("no answer at all: {e}"),
                Ok(mut response) => {
                    let status = response.status();
                    // Chunk by chunk, so what arrived before a cut is still seen.
                    let mut bytes = Vec::new();
                    let cut = loop {
                        match response.chunk().await {
                            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                            Ok(None) => break false,
                            Err(_) => break true,
                        }
                    };
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    if status == 200 && stream && text.contains("\"error\"") {
                        (Ending::ExplicitError, text)
                    } else if cut {
                        (Ending::Truncated, text)
                    } else if status == 200 && !stream {
                        let json: serde_json::Value =
                            serde_json::from_str(&text).expect("a 200 is whole JSON");
                        assert!(json["choices"][0]["message"]["content"].is_string());
                        (Ending::Complete, text)
                    } else if status == 200 {
                        assert!(
                            text.trim_end().ends_with("data: [DONE]"),
                            "a stream ended cleanly without [DONE] or an error: {text}"
                        );
                        (Ending::Complete, text)
                    } else {
                        let json: serde_json::Value = serde_json::from_str(&text)
                            .unwrap_or_else(|_| panic!("{status}: not JSON: {text}"));
                        assert!(json["error"].is_object(), "{text}");
                        (Ending::ExplicitError, text)
                    }
                }
            };
            (ending, started.elapsed())
        }
    };

    // The whole answer, for the duplicate check.
    let (ending, _) = call(true, vec![]).await;
    assert_eq!(ending.0, Ending::Complete);
    let full = stream_contents(&ending.1).concat();
    let fds_before = open_fds(sidecar.pid());

    let faults: &[(&str, Vec<(&'static str, &'static str)>)] = &[
        (
            "reset-before-head",
            vec![("x-mock-fault", "reset-before-head")],
        ),
        (
            "reset-mid-stream",
            vec![("x-mock-fault", "reset-mid-stream")],
        ),
        (
            "end-without-terminator",
            vec![("x-mock-fault", "end-without-terminator")],
        ),
        ("stall", vec![("x-mock-fault", "stall")]),
        (
            "stall-mid-stream",
            vec![("x-mock-fault", "stall-mid-stream")],
        ),
        (
            "slow-drip",
            vec![("x-mock-chunk-ms", "300"), ("x-mock-chunks", "6")],
        ),
        (
            "malformed-events",
            vec![("x-mock-fault", "malformed-events")],
        ),
        (
            "429-storm",
            vec![("x-mock-status", "429"), ("x-mock-retry-after", "1")],
        ),
        ("500-storm", vec![("x-mock-status", "500")]),
        ("503-storm", vec![("x-mock-status", "503")]),
    ];
    let mut report = Vec::new();
    for (name, headers) in faults {
        for stream in [false, true] {
            let calls = (0..per_fault).map(|_| call(stream, headers.clone()));
            let results = futures_util::future::join_all(calls).await;
            let mut endings = std::collections::BTreeMap::new();
            for ((ending, text), took) in results {
                // Within the timeouts: 1 s to the head, 1 s between chunks, a slow drip's
                // whole length, and a margin for a loaded machine.
                assert!(
                    took < Duration::from_secs(6),
                    "{name} stream={stream}: {took:?}"
                );
                if !text.is_empty() {
                    let got = stream_contents(&text).concat();
                    assert!(
                        full.starts_with(&got),
                        "{name}: content out of order or repeated: {got:?} vs {full:?}"
                    );
                }
                *endings.entry(format!("{ending:?}")).or_insert(0) += 1;
            }
            report.push(format!("{name} stream={stream}: {endings:?}"));
        }
    }
    // The sidecar is fine afterwards, and once its idle upstream connections expire it holds no
    // more descriptors than before.
    let (ending, _) = call(false, vec![]).await;
    assert_eq!(ending.0, Ending::Complete);
    drop(client);
    let fds_after = descriptors_settle(sidecar.pid(), fds_before, Duration::from_secs(12)).await;
    assert!(
        fds_after <= fds_before,
        "descriptors {fds_before} -> {fds_after}"
    );
    eprintln!(
        "upstream faults, {per_fault} requests each:\n{}",
        report.join("\n")
    );
}
