//! The mock's Bedrock runtime over real HTTP: signatures verified as AWS verifies them, answers
//! and event streams in Bedrock's shapes.

use std::time::SystemTime;

use aws_smithy_eventstream::frame::read_message_from;
use aws_smithy_types::event_stream::Message;
use serde_json::{json, Value};
use sluice_mock::bedrock::{
    sigv4_headers, SigV4Request, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_TEMPORARY_ACCESS_KEY_ID, AWS_TEMPORARY_SECRET_ACCESS_KEY,
};
use sluice_mock::{MockConfig, MockServer};

const MODEL: &str = "us.anthropic.claude-3-5-haiku-20241022-v1%3A0";

struct Keys<'a> {
    id: &'a str,
    secret: &'a str,
    token: Option<&'a str>,
}

const LONG_TERM: Keys = Keys {
    id: AWS_ACCESS_KEY_ID,
    secret: AWS_SECRET_ACCESS_KEY,
    token: None,
};

/// A request signed the way an AWS SDK signs it.
fn signed(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    keys: &Keys,
    service: &str,
) -> reqwest::RequestBuilder {
    let host = url.split('/').nth(2).unwrap();
    let length = body.len().to_string();
    let headers = [
        ("host", host),
        ("content-type", "application/json"),
        ("content-length", length.as_str()),
    ];
    let signature = sigv4_headers(&SigV4Request {
        method: "POST",
        url,
        headers: &headers,
        body,
        access_key_id: keys.id,
        secret_access_key: keys.secret,
        session_token: keys.token,
        region: "us-east-1",
        service,
        time: SystemTime::now(),
    });
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (name, value) in signature {
        request = request.header(name, value);
    }
    request
}

fn converse_body(text: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "messages": [{"role": "user", "content": [{"text": text}]}],
        "inferenceConfig": {"maxTokens": 64},
    }))
    .unwrap()
}

fn decode_all(mut bytes: &[u8]) -> Vec<Message> {
    let mut messages = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        messages.push(read_message_from(&bytes[..len]).unwrap());
        bytes = &bytes[len..];
    }
    messages
}

fn header<'m>(message: &'m Message, name: &str) -> &'m str {
    message
        .headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .map(|h| h.value().as_string().unwrap().as_str())
        .unwrap_or_else(|| panic!("no {name} header"))
}

#[tokio::test]
async fn signed_converse_is_answered_in_bedrocks_shape() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/model/{MODEL}/converse", mock.url());
    let body = converse_body("hello bedrock");
    let response = signed(&client, &url, &body, &LONG_TERM, "bedrock")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["output"]["message"]["content"][0]["text"],
        "echo: hello bedrock"
    );
    assert_eq!(answer["stopReason"], "end_turn");
    assert_eq!(answer["usage"]["inputTokens"], body.len() / 4);
    assert_eq!(answer["usage"]["outputTokens"], 5);

    // Temporary credentials sign with their session token.
    let temporary = Keys {
        id: AWS_TEMPORARY_ACCESS_KEY_ID,
        secret: AWS_TEMPORARY_SECRET_ACCESS_KEY,
        token: Some(AWS_SESSION_TOKEN),
    };
    let response = signed(&client, &url, &body, &temporary, "bedrock")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn bad_signatures_are_refused_as_aws_refuses_them() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/model/{MODEL}/converse", mock.url());
    let body = converse_body("x");
    let refusal = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 403);
        let kind = response.headers()["x-amzn-errortype"]
            .to_str()
            .unwrap()
            .to_owned();
        let error: Value = response.json().await.unwrap();
        (kind, error["message"].as_str().unwrap().to_owned())
    };

    let unsigned = client.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(
        refusal(unsigned).await.0,
        "MissingAuthenticationTokenException"
    );

    let wrong_secret = Keys {
        secret: "not-the-secret",
        ..LONG_TERM
    };
    let (kind, message) = refusal(
        signed(&client, &url, &body, &wrong_secret, "bedrock")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(kind, "InvalidSignatureException");
    assert!(message.starts_with("The request signature we calculated does not match"));

    // Signed for one body, sent with another.
    let tampered = signed(&client, &url, &body, &LONG_TERM, "bedrock").body(converse_body("y"));
    assert_eq!(
        refusal(tampered.send().await.unwrap()).await.0,
        "InvalidSignatureException"
    );

    // Signed for another path.
    let other = format!("{}/model/other/converse", mock.url());
    let moved = signed(&client, &other, &body, &LONG_TERM, "bedrock")
        .build()
        .unwrap();
    let mut moved = moved;
    *moved.url_mut() = url.parse().unwrap();
    assert_eq!(
        refusal(client.execute(moved).await.unwrap()).await.0,
        "InvalidSignatureException"
    );

    let unknown = Keys {
        id: "AKIDUNKNOWN",
        ..LONG_TERM
    };
    let (kind, _) = refusal(
        signed(&client, &url, &body, &unknown, "bedrock")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(kind, "UnrecognizedClientException");

    let no_token = Keys {
        id: AWS_TEMPORARY_ACCESS_KEY_ID,
        secret: AWS_TEMPORARY_SECRET_ACCESS_KEY,
        token: None,
    };
    let (kind, _) = refusal(
        signed(&client, &url, &body, &no_token, "bedrock")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(kind, "UnrecognizedClientException");

    let (kind, _) = refusal(
        signed(&client, &url, &body, &LONG_TERM, "s3")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(kind, "InvalidSignatureException");
    assert_eq!(mock.request_count(), 7, "refused requests are recorded too");
}

#[tokio::test]
async fn converse_stream_sends_event_stream_messages() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/model/{MODEL}/converse-stream", mock.url());
    let body = converse_body("stream it");
    let response = signed(&client, &url, &body, &LONG_TERM, "bedrock")
        .header("x-mock-chunks", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/vnd.amazon.eventstream"
    );
    let messages = decode_all(&response.bytes().await.unwrap());
    let kinds: Vec<&str> = messages.iter().map(|m| header(m, ":event-type")).collect();
    assert_eq!(
        kinds,
        [
            "messageStart",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockStop",
            "messageStop",
            "metadata"
        ]
    );
    let payload = |m: &Message| serde_json::from_slice::<Value>(m.payload()).unwrap();
    let text: String = messages[1..4]
        .iter()
        .map(|m| payload(m)["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "echo: stream it");
    assert!(messages
        .iter()
        .all(|m| header(m, ":message-type") == "event"));
    assert_eq!(payload(&messages[6])["usage"]["outputTokens"], 3);
}

#[tokio::test]
async fn invoke_reports_usage_in_headers_and_streams_base64_chunks() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let client = reqwest::Client::new();
    let body = serde_json::to_vec(&json!({
        "anthropic_version": "bedrock-2023-05-31", "max_tokens": 32,
        "messages": [{"role": "user", "content": "native"}],
    }))
    .unwrap();
    let url = format!("{}/model/{MODEL}/invoke", mock.url());
    let response = signed(&client, &url, &body, &LONG_TERM, "bedrock")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let count = |name: &str| {
        response.headers()[name]
            .to_str()
            .unwrap()
            .parse::<usize>()
            .unwrap()
    };
    assert_eq!(count("x-amzn-bedrock-input-token-count"), body.len() / 4);
    assert_eq!(count("x-amzn-bedrock-output-token-count"), 5);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["content"][0]["text"], "echo: native");
    assert_eq!(
        answer["model"],
        "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    );

    let url = format!("{}/model/{MODEL}/invoke-with-response-stream", mock.url());
    let response = signed(&client, &url, &body, &LONG_TERM, "bedrock")
        .send()
        .await
        .unwrap();
    let messages = decode_all(&response.bytes().await.unwrap());
    let native: Vec<Value> = messages
        .iter()
        .map(|m| {
            assert_eq!(header(m, ":event-type"), "chunk");
            let part: Value = serde_json::from_slice(m.payload()).unwrap();
            let bytes = aws_smithy_types::base64::decode(part["bytes"].as_str().unwrap()).unwrap();
            serde_json::from_slice(&bytes).unwrap()
        })
        .collect();
    assert_eq!(native[0]["type"], "message_start");
    let last = native.last().unwrap();
    assert_eq!(last["type"], "message_stop");
    assert_eq!(
        last["amazon-bedrock-invocationMetrics"]["outputTokenCount"],
        5
    );
}

#[tokio::test]
async fn injected_errors_name_their_exception() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/model/{MODEL}/converse", mock.url());
    let body = converse_body("x");
    let response = signed(&client, &url, &body, &LONG_TERM, "bedrock")
        .header("x-mock-status", "429")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(
        response.headers()["x-amzn-errortype"],
        "ThrottlingException"
    );
    let error: Value = response.json().await.unwrap();
    assert_eq!(error, json!({"message": "injected by x-mock-status"}));
}
