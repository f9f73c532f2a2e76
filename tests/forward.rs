//! HTTPS_PROXY mode through the real binary: clients that trust Sluice's CA and point
//! `HTTPS_PROXY` at the forward listener reach a provider by its real name (a TLS mock with a
//! test certificate, found through the policy's `resolve`), and every filter applies as in
//! base-URL mode; other hosts are tunnelled untouched or refused, and a refused target is
//! never dialled; bad CA files stop a start and are refused on reload.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use sluice_filters::auth::keys::KeyHash;

const KEY: &str = "sk-sluice-forward-test";
/// Names on the TLS mock's certificate.
const MOCK_NAMES: [&str; 3] = ["api.openai.com", "api.anthropic.com", "tunnel.example"];
/// Where the sidecar keeps its CA (the defaults of `forward.ca`).
const CA_CERT: &str = "sluice-ca.pem";
const CA_KEY: &str = "sluice-ca.key";

/// Upstreams named as in production (`https://api.openai.com`), reached at the TLS mock
/// through `resolve` and trusting its test CA. HTTPS_PROXY requests are routed by host, base-URL
/// requests by path, to the same upstreams under the same tier.
fn policy(provider: &TlsMock, tier_limits: &str, forward: &str) -> String {
    format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "https://api.openai.com", keys: ["sk-upstream-openai"], tls: {{ ca_file: "{ca}" }} }}
  anthropic: {{ provider: anthropic, base_url: "https://api.anthropic.com", keys: ["sk-upstream-anthropic"], tls: {{ ca_file: "{ca}" }} }}
routes:
  - name: openai-by-host
    match: {{ hosts: [api.openai.com] }}
    upstream: openai
    filters: [{{ cache: {{ ttl: 1h }} }}]
  - {{ name: anthropic-by-host, match: {{ hosts: [api.anthropic.com] }}, upstream: anthropic }}
  - name: openai-by-path
    match: {{ path_prefix: /openai }}
    upstream: openai
    filters: [{{ cache: {{ ttl: 1h }} }}]
tiers:
  small: {{ limits: {tier_limits} }}
tenants:
  - {{ name: forward-team, tier: small, keys: [{{ hash: "{hash}" }}] }}
resolve:
  api.openai.com: "127.0.0.1:{port}"
  api.anthropic.com: "127.0.0.1:{port}"
  tunnel.example: "127.0.0.1"
{forward}"#,
        ca = provider.ca_file().display(),
        port = provider.port(),
        hash = KeyHash::of(KEY).to_text(),
    )
}

/// A client as an app with `HTTPS_PROXY` set and `trusted` (PEM) as its only CA.
fn via_proxy(sidecar: &Sidecar, trusted: &[u8], http1_only: bool) -> reqwest::Client {
    let forward = sidecar.forward.as_deref().unwrap();
    let mut builder = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(forward).unwrap())
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(trusted).unwrap())
        .timeout(Duration::from_secs(10));
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

async fn chat(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> reqwest::Response {
    client
        .post(url)
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn deterministic(content: &str) -> serde_json::Value {
    let mut body = chat_body(content, false);
    body["temperature"] = 0.into();
    body
}

#[tokio::test]
async fn intercepted_calls_run_the_exchange_over_h2_and_http1() {
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let sidecar = Sidecar::start_forward_with_env(
        &policy(&provider, "{ requests_per_minute: 1000 }", ""),
        &[],
        &[("SLUICE_LOG", "info,sluice=debug")],
    )
    .await;
    // No CA files were given: the sidecar made its CA and wrote it where the app can read it,
    // the key for itself alone.
    let ca = sidecar.read_file(CA_CERT);
    let key_path = sidecar.policy_path.with_file_name(CA_KEY);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    for (http1_only, version) in [
        (false, reqwest::Version::HTTP_2),
        (true, reqwest::Version::HTTP_11),
    ] {
        provider.mock.clear();
        let client = via_proxy(&sidecar, &ca, http1_only);
        let content = format!("hello over {version:?}");
        let response = chat(
            &client,
            "https://api.openai.com/v1/chat/completions",
            &chat_body(&content, false),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
        assert_eq!(response.headers()["x-sluice-upstream"], "openai");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            format!("echo: {content}")
        );
        // The provider saw Sluice's key, not the caller's, on the path the SDK asked for.
        let seen = provider.mock.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].path, "/v1/chat/completions");
        let header = |name: &str| {
            seen[0]
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header("authorization").as_deref(),
            Some("Bearer sk-upstream-openai")
        );

        // Streaming: the events arrive as the provider sends them.
        let response = chat(
            &client,
            "https://api.openai.com/v1/chat/completions",
            &chat_body("stream me", true),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut events = String::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            events.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        assert!(
            events.contains("\"content\":\"ech") && events.ends_with("data: [DONE]\n\n"),
            "{events}"
        );

        // Anthropic's host goes to the anthropic route, with its own credential header.
        let response = client
            .post("https://api.anthropic.com/v1/messages")
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&serde_json::json!({
                "model": "claude-haiku-4-5", "max_tokens": 50,
                "messages": [{"role": "user", "content": "hi claude"}],
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["content"][0]["text"], "echo: hi claude");
    }

    // Auth applies: no Sluice key, no call.
    let client = via_proxy(&sidecar, &ca, false);
    let before = provider.mock.request_count();
    let refused = client
        .post("https://api.openai.com/v1/chat/completions")
        .json(&chat_body("who am i", false))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
    assert_eq!(provider.mock.request_count(), before);

    // The cache applies: the second identical call is answered by Sluice.
    let url = "https://api.openai.com/v1/chat/completions";
    let first = chat(&client, url, &deterministic("cache me")).await;
    assert_eq!(first.headers()["x-sluice-cache"], "miss");
    let first = first.text().await.unwrap();
    let second = chat(&client, url, &deterministic("cache me")).await;
    assert_eq!(second.headers()["x-sluice-cache"], "hit");
    assert_eq!(second.text().await.unwrap(), first);
    assert_eq!(provider.mock.request_count(), before + 1);

    // A request for another host on a connection opened to api.openai.com is not routed by it
    // (HTTP/1.1: over h2 a `host` header that contradicts `:authority` is malformed already).
    let misdirected = via_proxy(&sidecar, &ca, true)
        .get("https://api.openai.com/v1/models")
        .bearer_auth(KEY)
        .header("host", "api.anthropic.com")
        .send()
        .await
        .unwrap();
    assert_eq!(misdirected.status(), 421);

    // The CA's private key is nowhere in what the sidecar said, even at debug level.
    let key = String::from_utf8(std::fs::read(&key_path).unwrap()).unwrap();
    let logs = sidecar.logs();
    assert!(
        logs.contains("sluice::forward"),
        "debug logs expected:\n{logs}"
    );
    for line in key.lines().filter(|line| !line.starts_with("-----")) {
        assert!(!logs.contains(line), "key material in the log");
    }
    assert!(!logs.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn limits_count_both_modes_together() {
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let sidecar =
        Sidecar::start_forward(&policy(&provider, "{ requests_per_minute: 4 }", ""), &[]).await;
    let forwarded = via_proxy(&sidecar, &sidecar.read_file(CA_CERT), false);
    let direct = reqwest::Client::new();
    let by_host = "https://api.openai.com/v1/chat/completions";
    let by_path = format!("{}/openai/v1/chat/completions", sidecar.proxy);
    for i in 0..2 {
        let body = chat_body(&format!("call {i}"), false);
        assert_eq!(chat(&forwarded, by_host, &body).await.status(), 200);
        assert_eq!(chat(&direct, &by_path, &body).await.status(), 200);
    }
    let body = chat_body("one too many", false);
    for refused in [
        chat(&forwarded, by_host, &body).await,
        chat(&direct, &by_path, &body).await,
    ] {
        assert_eq!(refused.status(), 429);
        assert!(refused.headers().contains_key("retry-after"));
        let error: serde_json::Value = refused.json().await.unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("requests_per_minute"),
            "{error}"
        );
    }
    assert_eq!(provider.mock.request_count(), 4);
}

/// `curl` with `HTTPS_PROXY` in its environment and Sluice's CA as its bundle, posting a chat
/// completion (with the Sluice key when `key` is given); its output ends with the status and
/// HTTP version.
async fn curl_chat(sidecar: &Sidecar, key: Option<&str>, stream: bool, more: &[&str]) -> String {
    let ca = sidecar.policy_path.with_file_name(CA_CERT);
    let mut command = tokio::process::Command::new("curl");
    command
        .env("HTTPS_PROXY", sidecar.forward.as_deref().unwrap())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .arg("--cacert")
        .arg(&ca)
        .args(["-sS", "--max-time", "10"])
        .args(["-w", "\n%{http_code} HTTP/%{http_version}"])
        .args(["-H", "content-type: application/json"])
        .arg("-d")
        .arg(chat_body("from curl", stream).to_string())
        .args(more);
    if let Some(key) = key {
        command
            .arg("-H")
            .arg(format!("Authorization: Bearer {key}"));
    }
    let output = command
        .arg("https://api.openai.com/v1/chat/completions")
        .output()
        .await
        .expect("curl is installed (make deps)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "curl: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn curl_reaches_the_provider_through_https_proxy() {
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let sidecar =
        Sidecar::start_forward(&policy(&provider, "{ requests_per_minute: 1000 }", ""), &[]).await;

    let whole = curl_chat(&sidecar, Some(KEY), false, &[]).await;
    assert!(whole.ends_with("\n200 HTTP/2"), "{whole}");
    assert!(whole.contains("\"content\":\"echo: from curl\""), "{whole}");

    let streamed = curl_chat(&sidecar, Some(KEY), true, &["-N", "--http1.1"]).await;
    let end = "data: [DONE]\n\n\n200 HTTP/1.1";
    assert!(streamed.ends_with(end), "{streamed}");

    let unauthenticated = curl_chat(&sidecar, None, false, &[]).await;
    assert!(
        unauthenticated.ends_with("\n401 HTTP/2"),
        "{unauthenticated}"
    );
    assert_eq!(provider.mock.request_count(), 2);
}

#[tokio::test]
async fn other_hosts_are_tunnelled_untouched_when_the_policy_says_so() {
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let (tls_port, plain_port) = (provider.port(), provider.mock.addr.port());
    let forward = format!(
        "forward:\n  tunnel: {{ hosts: [tunnel.example], ports: [{tls_port}, {plain_port}] }}\n"
    );
    let sidecar = Sidecar::start_forward(
        &policy(&provider, "{ requests_per_minute: 1000 }", &forward),
        &[],
    )
    .await;

    // The client trusts only the mock's test CA, not Sluice's: the TLS it gets is the mock's
    // own, end to end.
    let provider_ca = std::fs::read(provider.ca_file()).unwrap();
    let client = via_proxy(&sidecar, &provider_ca, false);
    let health = client
        .get(format!("https://tunnel.example:{tls_port}/_mock/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
    // A client trusting Sluice's CA instead fails there: nothing was intercepted.
    let sluice_trusting = via_proxy(&sidecar, &sidecar.read_file(CA_CERT), false);
    assert!(sluice_trusting
        .get(format!("https://tunnel.example:{tls_port}/_mock/health"))
        .send()
        .await
        .is_err());

    // Plain absolute-form requests are passed on as they are (no filter, no Sluice key).
    let plain = client
        .post(format!(
            "http://tunnel.example:{plain_port}/v1/chat/completions"
        ))
        .bearer_auth("sk-caller-own")
        .json(&chat_body("plain", false))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    let seen = provider.mock.requests();
    let last = seen.last().unwrap();
    assert!(last
        .headers
        .contains(&("authorization".into(), "Bearer sk-caller-own".into())));
    assert!(!last
        .headers
        .iter()
        .any(|(name, _)| name.starts_with("proxy-")));
}

#[tokio::test]
async fn forbidden_targets_are_refused_and_never_dialled() {
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let sinkhole = Sinkhole::start().await;
    let sink = sinkhole.addr.port();
    // `localhost` is allowed by name, but resolves to loopback, which the policy did not name.
    let forward = format!(
        "forward:\n  tunnel: {{ hosts: [tunnel.example, localhost, \"*.public.example\"], ports: [80, 443, {sink}] }}\n"
    );
    let sidecar = Sidecar::start_forward(
        &policy(&provider, "{ requests_per_minute: 1000 }", &forward),
        &[],
    )
    .await;
    let listener = sidecar.forward.as_deref().unwrap();
    let cases = [
        (
            format!("CONNECT evil.example:{sink}"),
            "neither intercepted nor tunnelled",
        ),
        (
            format!("CONNECT 127.0.0.1:{sink}"),
            "neither intercepted nor tunnelled",
        ),
        (
            format!("CONNECT [::ffff:127.0.0.1]:{sink}"),
            "neither intercepted nor tunnelled",
        ),
        (
            "CONNECT 169.254.169.254:80".to_owned(),
            "neither intercepted nor tunnelled",
        ),
        (
            format!("CONNECT localhost:{sink}"),
            "which the policy does not let tunnels reach",
        ),
        (
            "CONNECT tunnel.example:1".to_owned(),
            "port 1 is not one a tunnel may reach",
        ),
        (
            format!("CONNECT api.openai.com:{sink}"),
            "is intercepted on port 443 only",
        ),
        (
            format!("GET http://localhost:{sink}/latest/meta-data"),
            "which the policy does not let tunnels reach",
        ),
        (
            format!("GET http://127.0.0.1:{sink}/"),
            "neither intercepted nor tunnelled",
        ),
    ];
    for (request_line, why) in &cases {
        let request = format!("{request_line} HTTP/1.1\r\nHost: x\r\n\r\n");
        let answer = raw_exchange(listener, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            answer.starts_with("HTTP/1.1 403 Forbidden\r\n"),
            "{request_line}: {answer}"
        );
        assert!(answer.contains(why), "{request_line}: {answer}");
    }
    // Not a proxy request at all.
    let answer = raw_exchange(
        listener,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sinkhole.accepted(), 0, "a refused target was dialled");

    let metrics = sidecar.metrics().await;
    let counted = |action: &str| metrics.value("sluice_forward_total", &[("action", action)]);
    assert_eq!(counted("refuse"), Some(cases.len() as f64));
    assert_eq!(counted("bad_request"), Some(1.0));
    assert_eq!(counted("tunnel"), Some(0.0));

    // The sinkhole does see a tunnel the policy allows (`tunnel.example` is named in `resolve`).
    let request = format!("CONNECT tunnel.example:{sink} HTTP/1.1\r\nHost: x\r\n\r\n");
    let answer = raw_exchange(listener, request.as_bytes(), Duration::from_millis(500)).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(sinkhole.accepted(), 1);
}

#[tokio::test]
async fn without_tunnel_rules_other_hosts_are_refused() {
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let sinkhole = Sinkhole::start().await;
    let sink = sinkhole.addr.port();
    // `tunnel.example` resolves to the sinkhole, but no tunnel rule lets it through.
    let policy = policy(&provider, "{ requests_per_minute: 1000 }", "").replace(
        "tunnel.example: \"127.0.0.1\"",
        &format!("tunnel.example: \"127.0.0.1:{sink}\""),
    );
    let sidecar = Sidecar::start_forward(&policy, &[]).await;
    let answer = raw_exchange(
        sidecar.forward.as_deref().unwrap(),
        b"CONNECT tunnel.example:443 HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sinkhole.accepted(), 0);
}

/// A test CA's certificate and key (PEM), made by openssl as a platform team's would be.
fn test_ca() -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path(), &["leaf.example"]);
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    (
        read("ca.pem"),
        read("ca.key"),
        read("leaf.pem"),
        read("leaf.key"),
    )
}

#[test]
fn bad_or_missing_ca_files_stop_the_start_with_a_clear_error() {
    let routes = "upstreams:\n  openai: { provider: openai, base_url: \"https://api.openai.com\" }\nroutes:\n  - { name: openai, match: { hosts: [api.openai.com] }, upstream: openai }\n";
    let (ca, ca_key, leaf, leaf_key) = test_ca();
    let (_, other_key, _, _) = test_ca();

    let garbage = run_expecting_failure(
        routes,
        &[(CA_CERT, b"not a certificate"), (CA_KEY, &ca_key)],
    );
    assert!(garbage.contains("forward.ca.cert_file"), "{garbage}");
    assert!(
        garbage.contains(CA_CERT) && garbage.contains("holds no PEM certificate"),
        "{garbage}"
    );

    let key_missing = run_expecting_failure(routes, &[(CA_CERT, &ca)]);
    assert!(key_missing.contains("forward.ca.key_file"), "{key_missing}");
    assert!(
        key_missing.contains("does not exist, but the certificate does"),
        "{key_missing}"
    );

    let not_generated = run_expecting_failure(
        &format!("{routes}forward: {{ ca: {{ generate: false }} }}\n"),
        &[],
    );
    assert!(not_generated.contains("generate: false"), "{not_generated}");

    let mismatch = run_expecting_failure(routes, &[(CA_CERT, &ca), (CA_KEY, &other_key)]);
    assert!(
        mismatch.contains("does not belong to the CA certificate"),
        "{mismatch}"
    );
    let bad_key = run_expecting_failure(
        routes,
        &[
            (CA_CERT, &ca),
            (
                CA_KEY,
                b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
            ),
        ],
    );
    assert!(
        bad_key.contains("is not an unencrypted PEM private key"),
        "{bad_key}"
    );
    assert!(
        !bad_key.contains("c2VjcmV0"),
        "the key file's content was quoted: {bad_key}"
    );

    let not_a_ca = run_expecting_failure(routes, &[(CA_CERT, &leaf), (CA_KEY, &leaf_key)]);
    assert!(not_a_ca.contains("is not a CA certificate"), "{not_a_ca}");

    // The key is never quoted, whatever the error.
    for stderr in [&garbage, &key_missing, &mismatch, &not_a_ca] {
        for key in [&ca_key, &other_key, &leaf_key] {
            let key = String::from_utf8_lossy(key);
            for line in key.lines().filter(|line| !line.starts_with("-----")) {
                assert!(!stderr.contains(line), "key material in: {stderr}");
            }
        }
    }
}

#[tokio::test]
async fn a_rotated_ca_applies_on_reload_and_a_bad_one_is_refused() {
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let (first_ca, first_key, _, _) = test_ca();
    let (second_ca, second_key, _, _) = test_ca();
    let sidecar = Sidecar::start_forward(
        &policy(&provider, "{ requests_per_minute: 1000 }", ""),
        &[(CA_CERT, &first_ca), (CA_KEY, &first_key)],
    )
    .await;
    let url = "https://api.openai.com/v1/chat/completions";
    let call = |trusted: &[u8]| {
        // A new client each time: a new connection, a new handshake.
        let client = via_proxy(&sidecar, trusted, false);
        async move {
            client
                .post(url)
                .bearer_auth(KEY)
                .json(&chat_body("ca", false))
                .send()
                .await
        }
    };
    assert_eq!(call(&first_ca).await.unwrap().status(), 200);

    // A broken certificate file: the reload is refused, the old CA keeps serving.
    let before = sidecar.policy_hash().await;
    sidecar.write_file(
        CA_CERT,
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
    );
    let response = sidecar.admin_reload().await;
    assert_eq!(response.status(), 422);
    let report: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        report["errors"][0]["path"], "forward.ca.cert_file",
        "{report}"
    );
    assert_eq!(sidecar.policy_hash().await, before);
    assert_eq!(call(&first_ca).await.unwrap().status(), 200);

    // Rotation: the new files are picked up by the watcher, and the new CA signs from then on.
    sidecar.write_file(CA_KEY, std::str::from_utf8(&second_key).unwrap());
    sidecar.write_file(CA_CERT, std::str::from_utf8(&second_ca).unwrap());
    sidecar.wait_for_reload(&before).await;
    assert_eq!(call(&second_ca).await.unwrap().status(), 200);
    assert!(call(&first_ca).await.is_err(), "the old CA still signs");
    // Counted once Sluice has seen the client's alert, which may come just after the error.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let metrics = sidecar.metrics().await;
        let failed = metrics.value("sluice_forward_total", &[("action", "handshake_failed")]);
        if failed >= Some(1.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{failed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Files gone on reload: refused (a CA is generated at startup only).
    let rotated = sidecar.policy_hash().await;
    std::fs::remove_file(sidecar.policy_path.with_file_name(CA_CERT)).unwrap();
    std::fs::remove_file(sidecar.policy_path.with_file_name(CA_KEY)).unwrap();
    let response = sidecar.admin_reload().await;
    assert_eq!(response.status(), 422);
    let report = response.text().await.unwrap();
    assert!(report.contains("generated at startup only"), "{report}");
    assert_eq!(sidecar.policy_hash().await, rotated);
    assert_eq!(call(&second_ca).await.unwrap().status(), 200);
}
