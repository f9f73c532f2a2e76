//! Process lifecycle: graceful drain on SIGTERM, caller disconnects, admin endpoints, `check`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

#[tokio::test]
async fn sigterm_drains_open_streams_then_exits() {
    let mock = mock().await;
    let mut sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-chunk-ms", "200")
        .header("x-mock-chunks", "6")
        .json(&chat_body("drain me", true))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    sidecar.signal("TERM");
    // Not ready any more while draining, so a load balancer stops sending. Pingora closes every
    // listener on SIGTERM, the admin one included, so a refused connection is as good an answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = reqwest::get(format!("{}/readyz", sidecar.admin)).await;
    if let Ok(ready) = ready {
        assert_eq!(ready.status(), 503);
    }
    while let Some(chunk) = stream.next().await {
        text.push_str(
            std::str::from_utf8(&chunk.expect("the stream was cut by shutdown")).unwrap(),
        );
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Exits once drained, well before the 10 s drain timeout.
    let (took, status) = sidecar
        .wait_exit(Duration::from_secs(5))
        .expect("sluice did not exit after draining");
    assert!(status.success(), "{status:?}");
    eprintln!("exited {took:?} after the stream ended");
}

#[tokio::test]
async fn a_caller_that_leaves_cancels_the_upstream_stream() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&passthrough_policy(&mock.url())).await;
    let response = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .header("x-mock-chunk-ms", "100")
        .header("x-mock-chunks", "100")
        .json(&chat_body("going away", true))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    // The mock notices its stream was dropped unfinished long before its 10 s would end.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while mock.cancelled_streams() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "upstream stream was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let mock = mock().await;
    let sidecar = Sidecar::start_with_env(
        &format!(
            "upstreams:\n  openai: {{ provider: openai, base_url: \"{}\", keys: [\"${{SECRET_KEY}}\"] }}\nroutes:\n  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}\n",
            mock.url()
        ),
        &[("SECRET_KEY", "sk-very-secret-value")],
    )
    .await;
    let health = reqwest::get(format!("{}/healthz", sidecar.admin))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", sidecar.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    let policy = reqwest::get(format!("{}/admin/policy", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!policy.contains("sk-very-secret-value"));
    assert!(
        !policy.contains("SECRET_KEY"),
        "even the template of a secret field is redacted"
    );
    let policy: serde_json::Value = serde_json::from_str(&policy).unwrap();
    assert_eq!(
        policy["policy"]["upstreams"]["openai"]["keys"][0],
        "<redacted>"
    );
    assert_eq!(policy["hash"].as_str().unwrap().len(), 64);
    let missing = reqwest::get(format!("{}/admin/nothing", sidecar.admin))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let wrong_method = reqwest::get(format!("{}/admin/reload", sidecar.admin))
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
}

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(&path)
        .env_remove("UNSET_FOR_TEST")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_policies() {
    let mut files = vec![std::path::PathBuf::from("conf/sluice.yaml")];
    for entry in std::fs::read_dir("conf/examples").unwrap() {
        let path = entry.unwrap().path();
        // Sub-folders hold files the examples refer to (keys files), not policies.
        if path.is_file() {
            files.push(path);
        }
    }
    for file in files {
        let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("check")
            .arg(&file)
            .env("OPENAI_API_KEY", "sk-test")
            .env("ANTHROPIC_API_KEY", "sk-ant-test")
            .env("AZURE_OPENAI_KEY", "azure-test")
            .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
            .env("AWS_SECRET_ACCESS_KEY", "aws-test-secret")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(": ok: ") && stdout.lines().count() == 1,
            "{stdout}"
        );
    }
}

#[test]
fn check_reports_every_error_with_its_line() {
    let (ok, _, stderr) = check(
        "listen: { proxy: 127.0.0.1:1, admin: not-an-address }\n\
         upstreams:\n\
         \x20 a: { provider: openai, base_url: \"ftp://x\", keys: [\"${UNSET_FOR_TEST}\"] }\n\
         routes:\n\
         \x20 - { name: r, match: { path_prefix: /r }, upstream: missing }\n",
    );
    assert!(!ok);
    assert!(stderr.contains("4 errors"), "{stderr}");
    assert!(
        stderr.contains(":1:") && stderr.contains("listen.admin"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":3:") && stderr.contains("upstreams.a.base_url"),
        "{stderr}"
    );
    assert!(stderr.contains("`UNSET_FOR_TEST` is not set"), "{stderr}");
    assert!(
        stderr.contains(":5:") && stderr.contains("unknown upstream `missing`"),
        "{stderr}"
    );
}

#[test]
fn check_reports_bad_yaml_and_unknown_fields_with_their_line() {
    let (ok, _, stderr) = check(
        "routes:\n  - name: r\n    match: { path_prefix: /r }\n    upstream: a\n    colour: blue\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains(":5:") && stderr.contains("unknown field `colour`"),
        "{stderr}"
    );
    let (ok, _, stderr) = check("routes: [\n  { name: r,\n");
    assert!(!ok);
    assert!(stderr.contains("1 error"), "{stderr}");
    let (ok, _, stderr) = check("routes:\n  - name: r\n    match: { path_prefix: /r }\n    upstream: a\n    filters:\n      - request_id: {}\n      - request_id: {}\n");
    assert!(!ok);
    assert!(stderr.contains("listed twice"), "{stderr}");
}
