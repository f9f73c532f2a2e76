//! Reload storm: many reloads alternating valid and invalid policies (syntax errors, schema
//! errors, a truncated file, a deleted file, a partial write) under steady load. No request
//! fails, and the last valid policy is always the one in force.
//!
//! `SLUICE_HARDEN_RELOADS` sets the number of reloads (`make harden`: 1000; default 60).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A valid policy sending `/openai` to `mock_url`. Idle upstream connections expire quickly,
/// so that after the storm the descriptors can be compared with those before the load.
fn valid(mock_url: &str) -> String {
    format!(
        r#"
server: {{ upstream_idle_timeout: 300ms }}
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, rewrite_prefix: /v1, upstream: openai }}
"#
    )
}

/// What a step of the storm writes.
#[derive(Debug, Clone, Copy)]
enum Step {
    Valid,
    Syntax,
    Schema,
    Truncated,
    Deleted,
    PartialWrite,
}

const STEPS: [Step; 6] = [
    Step::Valid,
    Step::Syntax,
    Step::Schema,
    Step::Truncated,
    Step::Deleted,
    Step::PartialWrite,
];

async fn reload(sidecar: &Sidecar) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/admin/reload", sidecar.admin))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_reloads_under_load_lose_nothing() {
    let reloads: usize = std::env::var("SLUICE_HARDEN_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    // The valid policies alternate between two mocks: where a request lands says which policy
    // it ran on.
    let mocks = [mock().await, mock().await];
    let urls = [mocks[0].url(), mocks[1].url()];
    let sidecar = Arc::new(Sidecar::start(&valid(&urls[0])).await);
    let head: String = std::fs::read_to_string(&sidecar.policy_path)
        .unwrap()
        .lines()
        .take(2)
        .map(|line| format!("{line}\n"))
        .collect();
    let path = sidecar.policy_path.clone();
    let write = |text: &str| std::fs::write(&path, text).unwrap();

    let fds_before = open_fds(sidecar.pid());
    // Steady load: sequential requests from four tasks until the storm ends.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (sidecar, stop, sent, failed) =
            (sidecar.clone(), stop.clone(), sent.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let response = client
                    .post(format!("{}/openai/chat/completions", sidecar.proxy))
                    .json(&chat_body("storm", false))
                    .send()
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
                match response {
                    Ok(r) if r.status() == 200 => {}
                    other => {
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            let shown = match other {
                                Ok(r) => {
                                    format!("{} {}", r.status(), r.text().await.unwrap_or_default())
                                }
                                Err(e) => e.to_string(),
                            };
                            eprintln!("first failure: {shown}");
                        }
                    }
                }
            }
        }));
    }

    let mut in_force = sidecar.policy_hash().await;
    let mut current = 0;
    let (mut applied, mut rejected) = (0, 0);
    let started = Instant::now();
    for i in 0..reloads {
        let step = STEPS[i % STEPS.len()];
        let next = 1 - current;
        let good = format!("{head}{}", valid(&urls[next]));
        match step {
            Step::Valid => write(&good),
            Step::Syntax => write(&format!(
                "{head}routes: [ {{ name: x, match: {{ path_prefix"
            )),
            Step::Schema => write(&format!(
                "{head}{}",
                valid(&urls[next]).replace("upstream: openai", "upstream: nowhere")
            )),
            Step::Truncated => write(&good[..good.len() * 2 / 3]),
            Step::Deleted => std::fs::remove_file(&path).unwrap(),
            Step::PartialWrite => {
                // Half a file, seen by the watcher and by a reload, then the rest.
                write(&good[..good.len() / 2]);
                let (status, _) = reload(&sidecar).await;
                assert_eq!(status, 422, "step {i}: half a file is rejected");
                assert_eq!(sidecar.policy_hash().await, in_force, "step {i}");
                write(&good);
            }
        }
        let (status, answer) = reload(&sidecar).await;
        match step {
            Step::Valid | Step::PartialWrite => {
                assert_eq!(status, 200, "step {i} ({step:?}): {answer}");
                applied += 1;
                current = next;
                // The watcher may have applied it first: either way it is in force now.
                sidecar.wait_for_reload(&in_force).await;
                in_force = sidecar.policy_hash().await;
            }
            _ => {
                assert_eq!(status, 422, "step {i} ({step:?}): {answer}");
                rejected += 1;
                assert_eq!(
                    sidecar.policy_hash().await,
                    in_force,
                    "step {i} ({step:?}): the last valid policy stays"
                );
                if matches!(
                    step,
                    Step::Deleted | Step::Truncated | Step::Syntax | Step::Schema
                ) {
                    // Put the policy in force back on disk, so the next step starts from it.
                    write(&format!("{head}{}", valid(&urls[current])));
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "reload storm: {reloads} reloads ({applied} applied, {rejected} rejected) in {:?}, \
         {sent} requests under load, {failed} failed",
        started.elapsed()
    );
    assert_eq!(failed, 0, "no request fails during the storm");
    assert!(sent > reloads, "the load ran throughout");
    // Both valid policies carried traffic, and nothing else did.
    let landed = mocks[0].request_count() + mocks[1].request_count();
    assert_eq!(landed, sent);
    assert!(mocks.iter().all(|m| m.request_count() > 0));
    // Nothing leaked per reload: once the callers are gone and the idle upstream connections
    // have expired (each worker thread pools its own), the descriptors are those from before.
    eventually(
        Duration::from_secs(5),
        "descriptors back to where they were before the load",
        async || open_fds(sidecar.pid()) <= fds_before + 1,
    )
    .await;
}
