//! Hot reload: valid changes apply quickly, invalid ones keep the running policy, and requests
//! in flight finish on the policy they started with.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// Routes `/openai` to the mock under a name that shows in the mock's record (the path).
fn policy_with_prefix(mock_url: &str, rewrite: &str) -> String {
    format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, rewrite_prefix: "{rewrite}", upstream: openai }}
"#
    )
}

async fn wait_for_hash_change(sidecar: &Sidecar, old: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if sidecar.policy_hash().await != old {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn a_valid_change_applies_within_a_second() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy_with_prefix(&mock.url(), "")).await;
    let before = sidecar.policy_hash().await;
    sidecar.write_policy(&policy_with_prefix(&mock.url(), "/v2"));
    let took = wait_for_hash_change(&sidecar, &before, Duration::from_secs(1))
        .await
        .expect("the new policy was not applied within 1 s");
    eprintln!("reload applied after {took:?}");
    reqwest::Client::new()
        .post(format!("{}/openai/chat/completions", sidecar.proxy))
        .json(&chat_body("after", false))
        .send()
        .await
        .unwrap();
    assert_eq!(mock.requests().last().unwrap().path, "/v2/chat/completions");
}

#[tokio::test]
async fn an_invalid_file_keeps_the_old_policy_and_reports_why() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy_with_prefix(&mock.url(), "")).await;
    let before = sidecar.policy_hash().await;
    sidecar.write_policy(
        "routes:\n  - name: broken\n    match: { path_prefix: /openai }\n    upstream: nowhere\n",
    );
    let response = reqwest::Client::new()
        .post(format!("{}/admin/reload", sidecar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let report: serde_json::Value = response.json().await.unwrap();
    assert_eq!(report["result"], "rejected");
    assert_eq!(report["active_hash"], before);
    let message = report["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("unknown upstream `nowhere`"), "{report}");
    assert_eq!(report["errors"][0]["line"], 6, "{report}");
    assert_eq!(sidecar.policy_hash().await, before);
    // Requests are still served by the old policy.
    let ok = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .json(&chat_body("still here", false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let policy: serde_json::Value = reqwest::get(format!("{}/admin/policy", sidecar.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rejected = policy["reloads"]["rejected"].as_u64().unwrap();
    assert!(rejected >= 1);
    // The watcher also reloads (and rejects) the written file, on its own schedule: the
    // counter, read later, has counted at least as many.
    let metrics = sidecar.metrics().await;
    let counted = metrics
        .value("sluice_policy_reloads_total", &[("result", "rejected")])
        .unwrap();
    assert!(counted >= rejected as f64, "{counted} < {rejected}");
}

#[tokio::test]
async fn sighup_and_admin_reload_apply_changes() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy_with_prefix(&mock.url(), "")).await;
    let first = sidecar.policy_hash().await;
    sidecar.write_policy(&policy_with_prefix(&mock.url(), "/a"));
    let response = reqwest::Client::new()
        .post(format!("{}/admin/reload", sidecar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let second = sidecar.policy_hash().await;
    assert_ne!(first, second);
    sidecar.write_policy(&policy_with_prefix(&mock.url(), "/b"));
    sidecar.signal("HUP");
    assert!(
        wait_for_hash_change(&sidecar, &second, Duration::from_secs(2))
            .await
            .is_some()
    );
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_noticed() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy_with_prefix(&mock.url(), "")).await;
    let before = sidecar.policy_hash().await;
    // Kubernetes: sluice.yaml -> ..data/sluice.yaml, and ..data is swapped atomically.
    let dir = sidecar.policy_path.parent().unwrap();
    let text = std::fs::read_to_string(&sidecar.policy_path).unwrap();
    let listen: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    let version = dir.join("..v2");
    std::fs::create_dir(&version).unwrap();
    std::fs::write(
        version.join("sluice.yaml"),
        format!("{listen}{}", policy_with_prefix(&mock.url(), "/swapped")),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_file(&sidecar.policy_path).unwrap();
    std::os::unix::fs::symlink("..data/sluice.yaml", &sidecar.policy_path).unwrap();
    assert!(
        wait_for_hash_change(&sidecar, &before, Duration::from_secs(2))
            .await
            .is_some()
    );
}

#[tokio::test]
async fn a_stream_open_across_a_reload_completes_on_its_policy() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy_with_prefix(&mock.url(), "")).await;
    let before = sidecar.policy_hash().await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-chunk-ms", "150")
        .header("x-mock-chunks", "8")
        .json(&chat_body("long stream", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    // Replace the policy with one that no longer has the route at all.
    sidecar.write_policy(&format!(
        "upstreams:\n  other: {{ provider: openai, base_url: \"{}\" }}\nroutes:\n  - {{ name: other, match: {{ path_prefix: /other }}, upstream: other }}\n",
        mock.url()
    ));
    assert!(
        wait_for_hash_change(&sidecar, &before, Duration::from_secs(2))
            .await
            .is_some()
    );
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // New requests see the new policy.
    let gone = reqwest::get(format!("{}/openai/v1/models", sidecar.proxy))
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}
