//! Bedrock through the real binary: callers sign with their Sluice key as the access key id,
//! Sluice re-signs with its own AWS credentials, and the mock verifies that signature as AWS
//! would. Responses (JSON and event streams) pass through; their usage settles token limits.

mod common;

use std::time::SystemTime;

use common::*;
use serde_json::{json, Value};
use sluice_filters::auth::keys::KeyHash;
use sluice_filters::eventstream::{self, FrameDecoder, Message};
use sluice_mock::bedrock::{
    sigv4_headers, SigV4Request, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_TEMPORARY_ACCESS_KEY_ID, AWS_TEMPORARY_SECRET_ACCESS_KEY,
};

const KEY: &str = "sk-sluice-bedrock-caller";
/// An inference profile id, percent-encoded in the path as SDKs send it.
const MODEL: &str = "us.anthropic.claude-3-5-haiku-20241022-v1:0";
const MODEL_IN_PATH: &str = "us.anthropic.claude-3-5-haiku-20241022-v1%3A0";

/// A bedrock upstream on the mock, signing with the mock's temporary credentials taken from
/// the environment through `${VAR}`; `tier` is the tier's body.
fn policy(mock_url: &str, tier: &str) -> String {
    format!(
        r#"
upstreams:
  bedrock:
    provider: bedrock
    region: us-west-2
    base_url: "{mock_url}"
    aws:
      access_key_id: "${{BEDROCK_KEY_ID}}"
      secret_access_key: "${{BEDROCK_SECRET}}"
      session_token: "${{BEDROCK_TOKEN:-}}"
routes:
  - {{ name: bedrock, match: {{ path_prefix: /bedrock }}, upstream: bedrock }}
tiers:
  team: {tier}
tenants:
  - {{ name: search, tier: team, keys: [{{ hash: "{hash}" }}] }}
"#,
        hash = KeyHash::of(KEY).to_text(),
    )
}

const TEMPORARY_CREDENTIALS: [(&str, &str); 3] = [
    ("BEDROCK_KEY_ID", AWS_TEMPORARY_ACCESS_KEY_ID),
    ("BEDROCK_SECRET", AWS_TEMPORARY_SECRET_ACCESS_KEY),
    ("BEDROCK_TOKEN", AWS_SESSION_TOKEN),
];

/// A request as an AWS SDK sends it: signed with the caller's key id and any secret.
fn caller_request(url: &str, body: &[u8], access_key_id: &str) -> reqwest::RequestBuilder {
    let host = url.split('/').nth(2).unwrap();
    let signature = sigv4_headers(&SigV4Request {
        method: "POST",
        url,
        headers: &[("host", host), ("content-type", "application/json")],
        body,
        access_key_id,
        secret_access_key: "any-secret",
        session_token: None,
        region: "us-east-1",
        service: "bedrock",
        time: SystemTime::now(),
    });
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("x-amz-content-sha256", "caller-hash")
        .body(body.to_vec());
    for (name, value) in signature {
        request = request.header(name, value);
    }
    request
}

fn url(sidecar: &Sidecar, operation: &str) -> String {
    format!(
        "{}/bedrock/model/{MODEL_IN_PATH}/{operation}",
        sidecar.proxy
    )
}

fn converse_body(text: &str, max_tokens: Option<u64>) -> Vec<u8> {
    let mut body = json!({"messages": [{"role": "user", "content": [{"text": text}]}]});
    if let Some(max) = max_tokens {
        body["inferenceConfig"] = json!({ "maxTokens": max });
    }
    serde_json::to_vec(&body).unwrap()
}

fn invoke_body(text: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "anthropic_version": "bedrock-2023-05-31", "max_tokens": 100,
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

fn decode(bytes: &[u8]) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut decoder = FrameDecoder::default();
    decoder.feed(bytes, |m| messages.push(m)).unwrap();
    assert_eq!(
        decoder.pending(),
        0,
        "the stream ends on a message boundary"
    );
    messages
}

fn payload(message: &Message) -> Value {
    serde_json::from_slice(message.payload()).unwrap()
}

/// The model's own event inside an InvokeModelWithResponseStream `chunk`.
fn native(message: &Message) -> Value {
    let bytes = aws_smithy_types::base64::decode(payload(message)["bytes"].as_str().unwrap());
    serde_json::from_slice(&bytes.unwrap()).unwrap()
}

#[tokio::test]
async fn the_four_operations_pass_through_signed_by_sluice() {
    let mock = mock().await;
    let sidecar = Sidecar::start_with_env(&policy(&mock.url(), "{}"), &TEMPORARY_CREDENTIALS).await;

    // Converse
    let body = converse_body("hello converse", Some(64));
    let response = caller_request(&url(&sidecar, "converse"), &body, KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["output"]["message"]["content"][0]["text"],
        "echo: hello converse"
    );
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.path, format!("/model/{MODEL_IN_PATH}/converse"));
    assert_eq!(seen.body, body, "the body goes upstream byte for byte");
    let header = |name: &str| {
        seen.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let authorization = header("authorization").unwrap();
    assert!(
        authorization.starts_with(&format!(
            "AWS4-HMAC-SHA256 Credential={AWS_TEMPORARY_ACCESS_KEY_ID}/"
        )) && authorization.contains("/us-west-2/bedrock/aws4_request"),
        "{authorization}"
    );
    assert_eq!(
        header("x-amz-security-token").as_deref(),
        Some(AWS_SESSION_TOKEN)
    );
    assert_eq!(
        header("x-amz-content-sha256"),
        None,
        "the caller's signature material stays behind"
    );
    assert!(
        !format!("{seen:?}").contains(KEY),
        "the Sluice key never goes upstream"
    );

    // ConverseStream: the event stream arrives intact.
    let response = caller_request(
        &url(&sidecar, "converse-stream"),
        &converse_body("stream me", None),
        KEY,
    )
    .header("x-mock-chunks", "4")
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/vnd.amazon.eventstream"
    );
    let messages = decode(&response.bytes().await.unwrap());
    let text: String = messages
        .iter()
        .filter(|m| eventstream::header(m, ":event-type") == Some("contentBlockDelta"))
        .map(|m| payload(m)["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "echo: stream me");
    let last = messages.last().unwrap();
    assert_eq!(eventstream::header(last, ":event-type"), Some("metadata"));

    // InvokeModel: the model's own body, usage in headers.
    let response = caller_request(&url(&sidecar, "invoke"), &invoke_body("native call"), KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-amzn-bedrock-output-token-count"], "5");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["content"][0]["text"], "echo: native call");
    assert_eq!(answer["model"], MODEL);

    // InvokeModelWithResponseStream: chunks of the model's own events.
    let response = caller_request(
        &url(&sidecar, "invoke-with-response-stream"),
        &invoke_body("native stream"),
        KEY,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let messages = decode(&response.bytes().await.unwrap());
    let events: Vec<Value> = messages.iter().map(native).collect();
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| e["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "echo: native stream");
    assert!(events.last().unwrap()["amazon-bedrock-invocationMetrics"].is_object());
    assert_eq!(
        mock.request_count(),
        4,
        "every signature verified: none refused"
    );
}

#[tokio::test]
async fn token_limits_settle_to_the_usage_bedrock_reports() {
    let mock = mock().await;
    let sidecar = Sidecar::start_with_env(
        &policy(&mock.url(), "{ limits: { tokens_per_day: 100000 } }"),
        &TEMPORARY_CREDENTIALS,
    )
    .await;
    // Admission reserves bytes / 4 (rounded up) plus the requested output; the mock reports
    // bytes / 4 (rounded down) plus one token per streamed piece (5 by default).
    let reservation = |body: &[u8], output: u64| (body.len() as u64).div_ceil(4) + output;
    let reported = |body: &[u8]| (body.len() as u64 / 4).max(1) + 5;
    let calls: [(&str, Vec<u8>, u64); 4] = [
        ("converse", converse_body("count me!", Some(200)), 200),
        (
            "converse-stream",
            converse_body("count me too", Some(300)),
            300,
        ),
        ("invoke", invoke_body("and me"), 100),
        (
            "invoke-with-response-stream",
            invoke_body("and me as well"),
            100,
        ),
    ];
    let mut used = 0;
    for (operation, body, output) in calls {
        let response = caller_request(&url(&sidecar, operation), &body, KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{operation}");
        assert_eq!(
            remaining_tokens(&response).await,
            100_000 - used - reservation(&body, output),
            "{operation}: the earlier calls settled to their reported usage"
        );
        response.bytes().await.unwrap();
        used += reported(&body);
    }
    // One more shows the last call settled too.
    let body = converse_body("last", Some(10));
    let response = caller_request(&url(&sidecar, "converse"), &body, KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        remaining_tokens(&response).await,
        100_000 - used - reservation(&body, 10)
    );
}

#[tokio::test]
async fn a_wrong_secret_gets_bedrocks_own_refusal() {
    let mock = mock().await;
    let credentials = [
        ("BEDROCK_KEY_ID", AWS_ACCESS_KEY_ID),
        ("BEDROCK_SECRET", "not-the-account-secret"),
    ];
    let sidecar = Sidecar::start_with_env(&policy(&mock.url(), "{}"), &credentials).await;
    let response = caller_request(&url(&sidecar, "converse"), &converse_body("x", None), KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.headers()["x-amzn-errortype"],
        "InvalidSignatureException"
    );
    let error: Value = response.json().await.unwrap();
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("The request signature we calculated does not match"),
        "{error}"
    );
}

#[tokio::test]
async fn sluice_refusals_come_in_bedrocks_shape() {
    let mock = mock().await;
    let sidecar = Sidecar::start_with_env(
        &policy(
            &mock.url(),
            r#"{ models: ["us.anthropic.claude-3-5-haiku-*"] }"#,
        ),
        &TEMPORARY_CREDENTIALS,
    )
    .await;
    let refusal = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let kind = response.headers()["x-amzn-errortype"]
            .to_str()
            .unwrap()
            .to_owned();
        let error: Value = response.json().await.unwrap();
        (status, kind, error["message"].as_str().unwrap().to_owned())
    };
    let body = converse_body("x", None);

    let unknown = caller_request(&url(&sidecar, "converse"), &body, "sk-sluice-unknown");
    let (status, kind, message) = refusal(unknown.send().await.unwrap()).await;
    assert_eq!(
        (status, kind.as_str()),
        (401, "UnrecognizedClientException")
    );
    assert_eq!(message, "invalid Sluice key");

    let unsigned = reqwest::Client::new()
        .post(url(&sidecar, "converse"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let (status, _, message) = refusal(unsigned).await;
    assert_eq!(status, 401);
    assert!(message.contains("missing credentials"), "{message}");

    // The model comes from the path, percent-decoded: the tier's allowlist applies.
    let other = format!(
        "{}/bedrock/model/amazon.nova-pro-v1%3A0/converse",
        sidecar.proxy
    );
    let (status, kind, message) =
        refusal(caller_request(&other, &body, KEY).send().await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (403, "AccessDeniedException"));
    assert_eq!(
        message,
        "model `amazon.nova-pro-v1:0` is not allowed for tier `team`"
    );
    assert_eq!(
        mock.request_count(),
        0,
        "no refused request reached the provider"
    );

    let allowed = caller_request(&url(&sidecar, "converse"), &body, KEY);
    assert_eq!(allowed.send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_stream_outgrowing_its_tokens_ends_with_an_exception_message() {
    let mock = mock().await;
    let sidecar = Sidecar::start_with_env(
        &policy(
            &mock.url(),
            "{ limits: { tokens_per_day: 30, reserve_output_tokens: 10, cut_streams_over_tokens: true } }",
        ),
        &TEMPORARY_CREDENTIALS,
    )
    .await;
    let response = caller_request(
        &url(&sidecar, "converse-stream"),
        &converse_body("x", None),
        KEY,
    )
    .header("x-mock-chunks", "50")
    .header("x-mock-chunk-ms", "2")
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let messages = decode(&response.bytes().await.expect("the cut stream ends cleanly"));
    assert!(
        messages.len() < 50,
        "cut early: {} messages",
        messages.len()
    );
    let last = messages.last().unwrap();
    assert_eq!(
        eventstream::header(last, ":message-type"),
        Some("exception")
    );
    assert_eq!(
        eventstream::header(last, ":exception-type"),
        Some("throttlingException")
    );
    assert!(payload(last)["message"]
        .as_str()
        .unwrap()
        .contains("token limit reached mid-stream"));
    assert!(messages[..messages.len() - 1]
        .iter()
        .all(|m| eventstream::header(m, ":message-type") == Some("event")));
    wait_for_a_cancelled_stream(&mock).await;
}

#[tokio::test]
async fn passthrough_routes_sign_with_environment_credentials_and_show_no_secret() {
    let mock = mock().await;
    let policy = format!(
        r#"
upstreams:
  bedrock: {{ provider: bedrock, region: eu-west-1, base_url: "{}" }}
routes:
  - name: bedrock
    match: {{ path_prefix: /bedrock }}
    upstream: bedrock
    auth: {{ mode: passthrough, tenant_header: x-tenant }}
"#,
        mock.url()
    );
    let environment = [
        ("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY),
        ("SLUICE_LOG", "debug"),
    ];
    let sidecar = Sidecar::start_with_env(&policy, &environment).await;
    // The caller's own AWS signature, whatever it is, is replaced by Sluice's.
    let response = caller_request(
        &url(&sidecar, "converse"),
        &converse_body("hi", None),
        "AKIDCALLER",
    )
    .header("x-tenant", "research")
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let seen = mock.requests().pop().unwrap();
    let authorization = &seen
        .headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .unwrap()
        .1;
    assert!(
        authorization.contains(&format!("Credential={AWS_ACCESS_KEY_ID}/")),
        "{authorization}"
    );
    assert!(
        authorization.contains("/eu-west-1/bedrock/"),
        "{authorization}"
    );

    let shown = reqwest::get(format!("{}/admin/policy", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let logs = sidecar.logs();
    for secret in [AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID] {
        assert!(!shown.contains(secret), "{shown}");
        assert!(!logs.contains(secret), "{logs}");
    }
}

#[tokio::test]
async fn missing_credentials_stop_the_policy_from_loading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(
        &path,
        "upstreams:\n  b: { provider: bedrock, region: us-east-1 }\nroutes:\n  - { name: b, match: { path_prefix: / }, upstream: b, auth: passthrough }\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(&path)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_ACCESS_KEY_ID", "AKIDONLY")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("no AWS credentials"), "{text}");
    assert!(text.contains("set AWS_SECRET_ACCESS_KEY"), "{text}");
    assert!(!text.contains("AKIDONLY"), "{text}");
}

#[tokio::test]
async fn credentials_reload_with_the_policy() {
    let mock = mock().await;
    let with_secret = |secret: &str| {
        policy(&mock.url(), "{}")
            .replace("${BEDROCK_KEY_ID}", AWS_ACCESS_KEY_ID)
            .replace("${BEDROCK_SECRET}", secret)
    };
    let sidecar = Sidecar::start(&with_secret("a-rotated-out-secret")).await;
    let call = || caller_request(&url(&sidecar, "converse"), &converse_body("x", None), KEY).send();
    assert_eq!(call().await.unwrap().status(), 403);

    let before = sidecar.policy_hash().await;
    sidecar.write_policy(&with_secret(AWS_SECRET_ACCESS_KEY));
    let reloaded = reqwest::Client::new()
        .post(format!("{}/admin/reload", sidecar.admin))
        .send()
        .await
        .unwrap();
    assert!(reloaded.status().is_success());
    assert_ne!(sidecar.policy_hash().await, before);
    assert_eq!(call().await.unwrap().status(), 200);
}
