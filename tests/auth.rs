//! The auth matrix through the real binary: every route × every way a credential can be wrong,
//! in each provider's error shape, and no Sluice key ever reaching the upstream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sluice_filters::auth::keys::KeyHash;

const GOOD: &str = "sk-sluice-good-key";
const PRO: &str = "sk-sluice-pro-key";
const REVOKED: &str = "sk-sluice-revoked-key";
const EXPIRED: &str = "sk-sluice-expired-key";
const FROM_FILE: &str = "sk-sluice-from-keys-file";

fn hash(key: &str) -> String {
    KeyHash::of(key).to_text()
}

/// The policy (routes for each provider shape, all upstreams with their own keys) and the keys
/// file beside it.
fn auth_policy(mock_url: &str, file_key_revoked: bool) -> (String, String) {
    let policy = format!(
        r#"
keys_file: keys.yaml
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}", keys: ["sk-upstream-openai"] }}
  anthropic: {{ provider: anthropic, base_url: "{mock_url}", keys: ["sk-upstream-anthropic"] }}
  azure: {{ provider: azure_openai, base_url: "{mock_url}", keys: ["sk-upstream-azure"] }}
  open: {{ provider: openai, base_url: "{mock_url}" }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: anthropic }}
  - {{ name: azure, match: {{ path_prefix: /azure }}, upstream: azure }}
  - name: open
    match: {{ path_prefix: /open }}
    upstream: open
    auth: {{ mode: passthrough, tenant_header: x-tenant }}
tiers:
  free: {{ models: ["gpt-4o-mini", "claude-*"] }}
  pro: {{}}
tenants:
  - name: search
    tier: free
    keys:
      - {{ hash: "{good}", label: ci }}
      - {{ hash: "{revoked}", revoked: true }}
      - {{ hash: "{expired}", expires: "2020-01-01" }}
  - name: research
    tier: pro
    keys: [{{ hash: "{pro}" }}]
"#,
        good = hash(GOOD),
        revoked = hash(REVOKED),
        expired = hash(EXPIRED),
        pro = hash(PRO),
    );
    let keys = format!(
        "keys:\n  - {{ tenant: research, hash: \"{}\", revoked: {file_key_revoked} }}\n",
        hash(FROM_FILE)
    );
    (policy, keys)
}

struct Route {
    path: &'static str,
    header: &'static str,
    bearer: bool,
    anthropic_shape: bool,
}

const ROUTES: [Route; 3] = [
    Route {
        path: "/openai/v1/chat/completions",
        header: "authorization",
        bearer: true,
        anthropic_shape: false,
    },
    Route {
        path: "/anthropic/v1/messages",
        header: "x-api-key",
        bearer: false,
        anthropic_shape: true,
    },
    Route {
        path: "/azure/v1/chat/completions",
        header: "api-key",
        bearer: false,
        anthropic_shape: false,
    },
];

impl Route {
    fn credential(&self, key: &str) -> String {
        if self.bearer {
            format!("Bearer {key}")
        } else {
            key.to_owned()
        }
    }

    fn wrong_header(&self) -> &'static str {
        if self.header == "x-api-key" {
            "authorization"
        } else {
            "x-api-key"
        }
    }
}

async fn start(mock: &MockServer, file_key_revoked: bool) -> Sidecar {
    let (policy, keys) = auth_policy(&mock.url(), file_key_revoked);
    Sidecar::start_with_files(&policy, &[("keys.yaml", &keys)]).await
}

type Headers = Vec<(String, String)>;

async fn send(
    sidecar: &Sidecar,
    path: &str,
    headers: &[(String, String)],
    model: &str,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", sidecar.proxy))
        .json(&serde_json::json!({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}));
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

fn error_message(route: &Route, body: &serde_json::Value) -> String {
    if route.anthropic_shape {
        assert_eq!(body["type"], "error", "{body}");
        body["error"]["message"].as_str().unwrap().to_owned()
    } else {
        assert!(body["error"]["type"].is_string(), "{body}");
        body["error"]["message"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn the_auth_matrix() {
    let mock = mock().await;
    let sidecar = start(&mock, false).await;
    for route in &ROUTES {
        let h = |value: String| vec![(route.header.to_owned(), value)];
        // (case, headers, model, expected status, what the error says)
        let cases: Vec<(&str, Headers, &str, u16, &str)> = vec![
            ("no key", vec![], "gpt-4o-mini", 401, "missing credentials"),
            (
                "malformed",
                h(if route.bearer {
                    format!("Token {GOOD}")
                } else {
                    "two words".into()
                }),
                "gpt-4o-mini",
                401,
                "malformed",
            ),
            (
                "unknown",
                h(route.credential("sk-sluice-nobody")),
                "gpt-4o-mini",
                401,
                "invalid Sluice key",
            ),
            (
                "revoked",
                h(route.credential(REVOKED)),
                "gpt-4o-mini",
                401,
                "revoked",
            ),
            (
                "expired",
                h(route.credential(EXPIRED)),
                "gpt-4o-mini",
                401,
                "expired",
            ),
            (
                "forbidden model",
                h(route.credential(GOOD)),
                "gpt-4o",
                403,
                "model `gpt-4o` is not allowed for tier `free`",
            ),
            (
                "duplicate header",
                vec![
                    (route.header.to_owned(), route.credential(GOOD)),
                    (route.header.to_owned(), route.credential(GOOD)),
                ],
                "gpt-4o-mini",
                401,
                "more than one",
            ),
            (
                "wrong header",
                vec![(route.wrong_header().to_owned(), format!("Bearer {GOOD}"))],
                "gpt-4o-mini",
                401,
                "missing credentials",
            ),
            (
                "good key",
                h(route.credential(GOOD)),
                "gpt-4o-mini",
                200,
                "",
            ),
            (
                "other tenant, any model",
                h(route.credential(PRO)),
                "gpt-4o",
                200,
                "",
            ),
            (
                "key from the keys file",
                h(route.credential(FROM_FILE)),
                "gpt-4o",
                200,
                "",
            ),
        ];
        for (case, headers, model, status, says) in cases {
            let (got, body) = send(&sidecar, route.path, &headers, model).await;
            assert_eq!(got, status, "{} × {case}: {body}", route.path);
            if status != 200 {
                let message = error_message(route, &body);
                assert!(message.contains(says), "{} × {case}: {message}", route.path);
                assert!(
                    !message.contains("sk-sluice"),
                    "{} × {case}: key echoed: {message}",
                    route.path
                );
            }
        }
        if route.bearer {
            for scheme in ["bearer", "BEARER", "BeArEr"] {
                let (got, _) = send(
                    &sidecar,
                    route.path,
                    &h(format!("{scheme} {GOOD}")),
                    "gpt-4o-mini",
                )
                .await;
                assert_eq!(got, 200, "{scheme}");
            }
        }
    }
    let seen = mock.requests();
    assert!(!seen.is_empty());
    for request in &seen {
        for (name, value) in &request.headers {
            assert!(
                !value.contains("sk-sluice"),
                "a Sluice key reached the upstream in {name}: {}",
                request.path
            );
        }
        assert!(!String::from_utf8_lossy(&request.body).contains("sk-sluice"));
    }
    // Refused requests never reached the upstream: 3 routes × (3 + 1 + 3 schemes on one) passes.
    assert_eq!(seen.len(), 3 * 3 + 3);
}

#[tokio::test]
async fn passthrough_routes_forward_the_callers_provider_key() {
    let mock = mock().await;
    let sidecar = start(&mock, false).await;
    let headers = vec![
        (
            "authorization".to_owned(),
            "Bearer sk-provider-own".to_owned(),
        ),
        ("x-tenant".to_owned(), "research".to_owned()),
    ];
    let (status, _) = send(&sidecar, "/open/v1/chat/completions", &headers, "gpt-4o").await;
    assert_eq!(status, 200);
    let restricted = vec![("x-tenant".to_owned(), "search".to_owned())];
    let (status, body) = send(&sidecar, "/open/v1/chat/completions", &restricted, "gpt-4o").await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = send(&sidecar, "/open/v1/chat/completions", &[], "gpt-4o").await;
    assert_eq!(status, 200, "anonymous callers pass");
    let seen = mock.requests();
    let auth = seen[0]
        .headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .map(|(_, v)| v.as_str());
    assert_eq!(auth, Some("Bearer sk-provider-own"));
}

#[tokio::test]
async fn revoking_a_key_by_reload_takes_effect_without_dropping_requests() {
    let mock = mock().await;
    let sidecar = start(&mock, false).await;
    let before = sidecar.policy_hash().await;
    let route = &ROUTES[0];
    let headers = vec![(route.header.to_owned(), route.credential(FROM_FILE))];

    // Requests run steadily while the keys file is rewritten with the key revoked.
    let load = {
        let proxy = sidecar.proxy.clone();
        let headers = headers.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(1500) {
                let mut request = client
                    .post(format!("{proxy}{}", ROUTES[0].path))
                    .json(&chat_body("during reload", false));
                for (name, value) in &headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                statuses.push(
                    request
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0),
                );
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, keys) = auth_policy(&mock.url(), true);
    sidecar.write_file("keys.yaml", &keys);
    let statuses = load.await.unwrap();
    assert_ne!(
        sidecar.policy_hash().await,
        before,
        "the keys file change was not picked up"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 401),
        "a request failed otherwise: {statuses:?}"
    );
    assert_eq!(statuses.first(), Some(&200));
    assert_eq!(statuses.last(), Some(&401), "the revoked key still works");
    let flips = statuses.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(
        flips, 1,
        "once revoked, the key stays refused: {statuses:?}"
    );
    let (status, body) = send(&sidecar, route.path, &headers, "gpt-4o").await;
    assert_eq!(status, 401);
    assert!(error_message(route, &body).contains("revoked"));
}

#[test]
fn auth_misconfigurations_are_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
upstreams:
  nokeys: {{ provider: openai, base_url: "http://127.0.0.1:1" }}
routes:
  - {{ name: a, match: {{ path_prefix: /a }}, upstream: nokeys }}
tiers:
  free: {{}}
tenants:
  - {{ name: t, tier: gold }}
  - name: u
    tier: free
    keys: [{{ hash: "{}" }}, {{ hash: "sk-sluice-oops" }}]
"#,
            hash(GOOD)
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown tier `gold`"), "{stderr}");
    assert!(stderr.contains("looks like a key itself"), "{stderr}");
    assert!(
        stderr.contains("upstream `nokeys` has no `keys`"),
        "{stderr}"
    );
}

fn token(secret: &[u8], claims: serde_json::Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn jwt_routes_verify_tokens_and_follow_secret_rotation() {
    let mock = mock().await;
    let policy = format!(
        r#"
upstreams:
  openai: {{ provider: openai, base_url: "{url}", keys: ["sk-upstream-openai"] }}
routes:
  - name: jwt
    match: {{ path_prefix: /jwt }}
    upstream: openai
    auth:
      mode: jwt
      jwt: {{ algorithms: [HS256], hs256_secret_file: jwt-secret, issuer: idp.example }}
tiers:
  free: {{ models: [gpt-4o-mini] }}
  pro: {{}}
"#,
        url = mock.url()
    );
    let sidecar = Sidecar::start_with_files(&policy, &[("jwt-secret", "first-secret\n")]).await;
    let path = "/jwt/v1/chat/completions";
    let bearer = |token: String| vec![("authorization".to_owned(), format!("Bearer {token}"))];
    let later = unix_now() + 300;
    let claims = |tier: &str, exp: u64| serde_json::json!({"tenant": "team-a", "tier": tier, "iss": "idp.example", "exp": exp});

    let (status, body) = send(
        &sidecar,
        path,
        &bearer(token(b"first-secret", claims("pro", later))),
        "gpt-4o",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let cases = [
        (
            token(b"first-secret", claims("free", later)),
            403,
            "model `gpt-4o` is not allowed for tier `free`",
        ),
        (
            token(b"first-secret", claims("gold", later)),
            403,
            "unknown tier `gold`",
        ),
        (
            token(b"first-secret", claims("pro", unix_now() - 10)),
            401,
            "token expired",
        ),
        (
            token(b"wrong-secret", claims("pro", later)),
            401,
            "invalid token signature",
        ),
        (
            token(
                b"first-secret",
                serde_json::json!({"tenant": "team-a", "tier": "pro", "iss": "evil", "exp": later}),
            ),
            401,
            "rejected",
        ),
        ("not-a-token".to_owned(), 401, "malformed token"),
    ];
    for (token, status, says) in cases {
        let (got, body) = send(&sidecar, path, &bearer(token), "gpt-4o").await;
        assert_eq!(got, status, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }

    // Rotating the secret file is a reload: old tokens stop working, new ones work.
    let before = sidecar.policy_hash().await;
    sidecar.write_file("jwt-secret", "second-secret\n");
    let deadline = Instant::now() + Duration::from_secs(2);
    while sidecar.policy_hash().await == before {
        assert!(Instant::now() < deadline, "secret rotation not picked up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (old, _) = send(
        &sidecar,
        path,
        &bearer(token(b"first-secret", claims("pro", later))),
        "gpt-4o",
    )
    .await;
    let (new, _) = send(
        &sidecar,
        path,
        &bearer(token(b"second-secret", claims("pro", later))),
        "gpt-4o",
    )
    .await;
    assert_eq!((old, new), (401, 200));
    for request in mock.requests() {
        let auth = request
            .headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .map(|(_, v)| v.clone());
        assert_eq!(
            auth.as_deref(),
            Some("Bearer sk-upstream-openai"),
            "the token never goes upstream"
        );
    }
}
