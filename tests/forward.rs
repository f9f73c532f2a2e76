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

/// One HTTP/1.1 response read from `stream` (length-delimited or chunked), the connection left
/// open: its status and its body.
async fn read_response(stream: &mut tokio::net::TcpStream) -> (u16, serde_json::Value) {
    /// Appends what the next read brings.
    async fn read_more(stream: &mut tokio::net::TcpStream, bytes: &mut Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(n > 0, "the connection closed mid-response");
        bytes.extend_from_slice(&chunk[..n]);
    }
    let mut bytes = Vec::new();
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        read_more(stream, &mut bytes).await;
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")).map(str::to_owned))
    };
    let body = if let Some(length) = header("content-length") {
        let length: usize = length.trim().parse().unwrap();
        while bytes.len() < head_end + length {
            read_more(stream, &mut bytes).await;
        }
        bytes[head_end..head_end + length].to_vec()
    } else {
        assert_eq!(
            header("transfer-encoding").as_deref(),
            Some("chunked"),
            "{head}"
        );
        while !bytes[head_end..].ends_with(b"0\r\n\r\n") {
            read_more(stream, &mut bytes).await;
        }
        let mut body = Vec::new();
        let mut rest = &bytes[head_end..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = std::str::from_utf8(&rest[..line_end]).unwrap();
            let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body
    };
    (status, serde_json::from_slice(&body).unwrap())
}

/// A plain `http://` request for an intercepted host, as a client with `HTTP_PROXY` sends it
/// (absolute form, no CONNECT): it runs the exchange as an intercepted HTTPS call does, and
/// the connection carries the next request too.
#[tokio::test]
async fn absolute_form_requests_to_intercepted_hosts_run_the_exchange() {
    use tokio::io::AsyncWriteExt;
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let sidecar =
        Sidecar::start_forward(&policy(&provider, "{ requests_per_minute: 1000 }", ""), &[]).await;
    let forward = sidecar.forward.as_deref().unwrap();
    let post = |content: &str, key: Option<&str>| {
        let body = chat_body(content, false).to_string();
        let auth = key.map_or(String::new(), |key| {
            format!("Authorization: Bearer {key}\r\n")
        });
        format!(
            "POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut connection = tokio::net::TcpStream::connect(forward.trim_start_matches("http://"))
        .await
        .unwrap();
    for content in ["first on the connection", "second on the connection"] {
        connection
            .write_all(post(content, Some(KEY)).as_bytes())
            .await
            .unwrap();
        let (status, answer) = read_response(&mut connection).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            format!("echo: {content}")
        );
    }
    let seen = provider.mock.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.path, "/v1/chat/completions");
        assert!(
            request
                .headers
                .contains(&("authorization".into(), "Bearer sk-upstream-openai".into())),
            "{:?}",
            request.headers
        );
    }

    // Without the Sluice key: refused in OpenAI's shape, and the provider sees nothing.
    connection
        .write_all(post("no key", None).as_bytes())
        .await
        .unwrap();
    let (status, error) = read_response(&mut connection).await;
    assert_eq!(status, 401);
    assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
    assert!(error["error"]["message"].is_string(), "{error}");
    assert!(error["error"]["type"].is_string(), "{error}");
    assert_eq!(provider.mock.request_count(), 2);
    let metrics = sidecar.metrics().await;
    let intercepted = metrics.value("sluice_forward_total", &[("action", "intercept")]);
    assert_eq!(intercepted, Some(3.0));
}

/// A host the user adds to `forward.intercept.hosts`, with its own route and `resolve` entry,
/// is intercepted; writing the list replaces the defaults, so `api.openai.com` is then not.
#[tokio::test]
async fn a_written_intercept_list_replaces_the_defaults() {
    let provider = TlsMock::start(&["llm.internal.example"]).await;
    let policy = format!(
        r#"
upstreams:
  internal: {{ provider: openai_compatible, base_url: "https://llm.internal.example", keys: ["sk-upstream-internal"], tls: {{ ca_file: "{ca}" }} }}
routes:
  - {{ name: internal-by-host, match: {{ hosts: [llm.internal.example] }}, upstream: internal }}
tiers:
  small: {{ limits: {{ requests_per_minute: 1000 }} }}
tenants:
  - {{ name: forward-team, tier: small, keys: [{{ hash: "{hash}" }}] }}
resolve:
  llm.internal.example: "127.0.0.1:{port}"
forward:
  intercept: {{ hosts: [llm.internal.example] }}
"#,
        ca = provider.ca_file().display(),
        port = provider.port(),
        hash = KeyHash::of(KEY).to_text(),
    );
    let sidecar = Sidecar::start_forward(&policy, &[]).await;
    let client = via_proxy(&sidecar, &sidecar.read_file(CA_CERT), false);
    let response = chat(
        &client,
        "https://llm.internal.example/v1/chat/completions",
        &chat_body("inside", false),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-upstream"], "internal");
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "echo: inside");
    let seen = provider.mock.requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0]
        .headers
        .contains(&("authorization".into(), "Bearer sk-upstream-internal".into())));

    // A default host, no longer listed: neither intercepted nor tunnelled.
    let answer = raw_exchange(
        sidecar.forward.as_deref().unwrap(),
        b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(
        answer.contains("neither intercepted nor tunnelled"),
        "{answer}"
    );
    assert_eq!(provider.mock.request_count(), 1);
}

/// A folder laid out as the kubelet mounts a Secret: the files in a timestamped folder,
/// `..data` a symlink to it, and each name a symlink through `..data`.
struct SecretMount {
    dir: tempfile::TempDir,
    generation: usize,
}

impl SecretMount {
    fn new(files: &[(&str, &[u8])]) -> SecretMount {
        let mut mount = SecretMount {
            dir: tempfile::tempdir().unwrap(),
            generation: 0,
        };
        mount.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), mount.dir.path().join(name))
                .unwrap();
        }
        mount
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// An update as the kubelet makes it: a new folder, `..data` replaced by a rename (atomic),
    /// the old folder removed.
    fn swap(&mut self, files: &[(&str, &[u8])]) {
        let old = format!("..gen_{}", self.generation);
        self.generation += 1;
        let new = format!("..gen_{}", self.generation);
        std::fs::create_dir(self.path(&new)).unwrap();
        for (name, bytes) in files {
            std::fs::write(self.path(&new).join(name), bytes).unwrap();
        }
        std::os::unix::fs::symlink(&new, self.path("..data_tmp")).unwrap();
        std::fs::rename(self.path("..data_tmp"), self.path("..data")).unwrap();
        if self.generation > 1 {
            std::fs::remove_dir_all(self.path(&old)).unwrap();
        }
    }
}

/// The CA as deploy/ mounts it (the `sluice-ca` Secret's `tls.crt` and `tls.key`, in a folder
/// of its own): a Secret update is picked up by the watcher; one that pairs the certificate
/// with another CA's key is refused naming the key file, and the old CA keeps signing.
#[tokio::test]
async fn a_ca_secret_update_swaps_the_signing_ca() {
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let (first_ca, first_key, _, _) = test_ca();
    let (second_ca, second_key, _, _) = test_ca();
    let mut secret = SecretMount::new(&[("tls.crt", &first_ca), ("tls.key", &first_key)]);
    let forward = format!(
        "forward:\n  ca: {{ cert_file: \"{}\", key_file: \"{}\", generate: false }}\n",
        secret.path("tls.crt").display(),
        secret.path("tls.key").display()
    );
    let sidecar = Sidecar::start_forward(
        &policy(&provider, "{ requests_per_minute: 1000 }", &forward),
        &[],
    )
    .await;
    let call = |trusted: &[u8]| {
        let client = via_proxy(&sidecar, trusted, false);
        async move {
            client
                .post("https://api.openai.com/v1/chat/completions")
                .bearer_auth(KEY)
                .json(&chat_body("secret", false))
                .send()
                .await
        }
    };
    assert_eq!(call(&first_ca).await.unwrap().status(), 200);
    let before = sidecar.policy_hash().await;

    // A half-made update: the new certificate with the old key.
    secret.swap(&[("tls.crt", &second_ca), ("tls.key", &first_key)]);
    let response = sidecar.admin_reload().await;
    assert_eq!(response.status(), 422);
    let report: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        report["errors"][0]["path"], "forward.ca.key_file",
        "{report}"
    );
    let message = report["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("does not belong to the CA certificate") && message.contains("tls.key"),
        "{report}"
    );
    assert_eq!(sidecar.policy_hash().await, before);
    assert_eq!(call(&first_ca).await.unwrap().status(), 200);

    // The whole update: no reload asked for, the watcher sees the `..data` swap.
    secret.swap(&[("tls.crt", &second_ca), ("tls.key", &second_key)]);
    sidecar.wait_for_reload(&before).await;
    assert_eq!(call(&second_ca).await.unwrap().status(), 200);
    assert!(call(&first_ca).await.is_err(), "the old CA still signs");
}

/// A generated CA goes where `forward.ca` says, folders made as needed: the certificate
/// readable by the app, the key by Sluice's user alone; and it is the CA that signs.
#[tokio::test]
async fn a_ca_is_generated_into_configured_nested_paths() {
    use std::os::unix::fs::PermissionsExt;
    let provider = TlsMock::start(&MOCK_NAMES).await;
    let forward =
        "forward:\n  ca: { cert_file: trust/for/app/ca.pem, key_file: private/sluice/ca.key }\n";
    let sidecar = Sidecar::start_forward(
        &policy(&provider, "{ requests_per_minute: 1000 }", forward),
        &[],
    )
    .await;
    let folder = sidecar.policy_path.parent().unwrap();
    let mode = |path: &str| {
        std::fs::metadata(folder.join(path))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("trust/for/app/ca.pem"), 0o644);
    assert_eq!(mode("private/sluice/ca.key"), 0o600);
    assert!(!folder.join(CA_CERT).exists() && !folder.join(CA_KEY).exists());
    let generated = sidecar.read_file("trust/for/app/ca.pem");
    let response = chat(
        &via_proxy(&sidecar, &generated, false),
        "https://api.openai.com/v1/chat/completions",
        &chat_body("nested", false),
    )
    .await;
    assert_eq!(response.status(), 200);
}

/// A CA certificate and key (PEM) made with rcgen, valid from `not_before` to `not_after`.
fn ca_valid_between(
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Out-of-date Test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let certificate = params.self_signed(&key).unwrap();
    (certificate.pem(), key.serialize_pem())
}

#[test]
fn a_lone_key_or_an_expired_ca_stops_the_start() {
    let routes = "upstreams:\n  openai: { provider: openai, base_url: \"https://api.openai.com\" }\nroutes:\n  - { name: openai, match: { hosts: [api.openai.com] }, upstream: openai }\n";
    let (_, ca_key, _, _) = test_ca();
    let cert_missing = run_expecting_failure(routes, &[(CA_KEY, &ca_key)]);
    assert!(
        cert_missing.contains("forward.ca.cert_file"),
        "{cert_missing}"
    );
    assert!(
        cert_missing.contains(CA_CERT) && cert_missing.contains("does not exist, but the key does"),
        "{cert_missing}"
    );

    let now = time::OffsetDateTime::now_utc();
    let (expired, expired_key) = ca_valid_between(
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    );
    let expired_error = run_expecting_failure(
        routes,
        &[
            (CA_CERT, expired.as_bytes()),
            (CA_KEY, expired_key.as_bytes()),
        ],
    );
    assert!(
        expired_error.contains("forward.ca.cert_file"),
        "{expired_error}"
    );
    assert!(
        expired_error.contains(CA_CERT) && expired_error.contains("expired on"),
        "{expired_error}"
    );
    let (future, future_key) = ca_valid_between(
        now + time::Duration::days(1),
        now + time::Duration::days(30),
    );
    let future_error = run_expecting_failure(
        routes,
        &[
            (CA_CERT, future.as_bytes()),
            (CA_KEY, future_key.as_bytes()),
        ],
    );
    assert!(
        future_error.contains("is not valid before"),
        "{future_error}"
    );
    // The key is never quoted.
    let keys = [
        String::from_utf8_lossy(&ca_key).into_owned(),
        expired_key,
        future_key,
    ];
    for stderr in [&cert_missing, &expired_error, &future_error] {
        for key in &keys {
            for line in key.lines().filter(|line| !line.starts_with("-----")) {
                assert!(!stderr.contains(line), "key material in: {stderr}");
            }
        }
    }
}
