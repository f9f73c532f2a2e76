use std::time::Duration;

use bytes::Bytes;

use super::*;

const GOOD: &str = "sk-sluice-good";

fn directory() -> Arc<Directory> {
    let mut directory = Directory::default();
    directory
        .add_tier("free", &["openai".into()], &["gpt-4o-mini".into()])
        .unwrap();
    directory
        .add_tier("pro", &["*".into()], &["*".into()])
        .unwrap();
    directory.add_tenant("search", "free").unwrap();
    directory.add_tenant("research", "pro").unwrap();
    let past = SystemTime::now() - Duration::from_secs(60);
    directory
        .add_key("search", KeyHash::of(GOOD), Some("ci"), None, false)
        .unwrap();
    directory
        .add_key("search", KeyHash::of("sk-revoked"), None, None, true)
        .unwrap();
    directory
        .add_key("search", KeyHash::of("sk-expired"), None, Some(past), false)
        .unwrap();
    directory
        .add_key("research", KeyHash::of("sk-pro"), None, None, false)
        .unwrap();
    Arc::new(directory)
}

type Headers<'a> = &'a [(&'a str, &'a str)];

fn exchange(route: &str, headers: &[(&str, &str)], model: &str) -> Exchange {
    let mut request = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    for (name, value) in headers {
        request.append_header(name.to_string(), *value).unwrap();
    }
    let body = format!(r#"{{"model":"{model}"}}"#);
    Exchange::new(route.into(), request, Bytes::from(body))
}

async fn verdict(auth: &Auth, ex: &mut Exchange) -> Result<(), (u16, String)> {
    match auth.on_request(ex).await {
        Verdict::Continue => Ok(()),
        Verdict::Reject(r) => Err((r.status.as_u16(), r.message)),
        Verdict::Respond(_) => panic!("auth never answers by itself"),
    }
}

fn keys_auth(credential: CredentialHeader) -> Auth {
    Auth::new(
        &AuthSpec::Mode(AuthMode::Required),
        credential,
        directory(),
        None,
    )
    .unwrap()
}

#[tokio::test]
async fn a_good_key_names_tenant_and_tier() {
    let auth = keys_auth(CredentialHeader::Bearer);
    for header in [
        "Bearer sk-sluice-good",
        "bearer sk-sluice-good",
        "BEARER  sk-sluice-good ",
    ] {
        let mut ex = exchange("openai", &[("authorization", header)], "gpt-4o-mini");
        assert_eq!(verdict(&auth, &mut ex).await, Ok(()), "{header}");
        assert_eq!(ex.tenant.as_deref(), Some("search"));
        assert_eq!(ex.tier.as_deref(), Some("free"));
    }
}

#[tokio::test]
async fn refusals_say_why_without_echoing_the_key() {
    let auth = keys_auth(CredentialHeader::Bearer);
    // (headers, expected status, what the message says)
    let cases: &[(Headers, u16, &str)] = &[
        (&[], 401, "missing credentials"),
        (
            &[("authorization", "Token sk-sluice-good")],
            401,
            "malformed",
        ),
        (&[("authorization", "Bearer")], 401, "malformed"),
        (&[("authorization", "Bearer a b")], 401, "malformed"),
        (
            &[("authorization", "Bearer sk-unknown")],
            401,
            "invalid Sluice key",
        ),
        (&[("authorization", "Bearer sk-revoked")], 401, "revoked"),
        (&[("authorization", "Bearer sk-expired")], 401, "expired"),
        (
            &[
                ("authorization", "Bearer sk-sluice-good"),
                ("authorization", "Bearer sk-sluice-good"),
            ],
            401,
            "more than one",
        ),
        (
            &[("x-api-key", "sk-sluice-good")],
            401,
            "missing credentials",
        ),
    ];
    for (headers, status, says) in cases {
        let mut ex = exchange("openai", headers, "gpt-4o-mini");
        let (got, message) = verdict(&auth, &mut ex).await.unwrap_err();
        assert_eq!(got, *status, "{headers:?}");
        assert!(message.contains(says), "{headers:?}: {message}");
        assert!(!message.contains("sk-"), "the key is echoed: {message}");
        assert_eq!(ex.tenant, None);
    }
}

#[tokio::test]
async fn tiers_limit_routes_and_models() {
    let auth = keys_auth(CredentialHeader::Bearer);
    let mut ex = exchange(
        "openai",
        &[("authorization", "Bearer sk-sluice-good")],
        "gpt-4o",
    );
    let (status, message) = verdict(&auth, &mut ex).await.unwrap_err();
    assert_eq!(status, 403);
    assert_eq!(message, "model `gpt-4o` is not allowed for tier `free`");
    let mut ex = exchange(
        "anthropic",
        &[("authorization", "Bearer sk-sluice-good")],
        "gpt-4o-mini",
    );
    assert_eq!(verdict(&auth, &mut ex).await.unwrap_err().0, 403);
    let mut ex = exchange(
        "anthropic",
        &[("authorization", "Bearer sk-pro")],
        "claude-x",
    );
    assert_eq!(verdict(&auth, &mut ex).await, Ok(()));
}

#[tokio::test]
async fn each_provider_uses_its_own_header() {
    let anthropic = keys_auth(CredentialHeader::XApiKey);
    let mut ex = exchange("openai", &[("x-api-key", "sk-sluice-good")], "gpt-4o-mini");
    assert_eq!(verdict(&anthropic, &mut ex).await, Ok(()));
    let mut wrong = exchange(
        "openai",
        &[("authorization", "Bearer sk-sluice-good")],
        "gpt-4o-mini",
    );
    assert_eq!(verdict(&anthropic, &mut wrong).await.unwrap_err().0, 401);
    let azure = keys_auth(CredentialHeader::ApiKey);
    let mut ex = exchange("openai", &[("api-key", "sk-sluice-good")], "gpt-4o-mini");
    assert_eq!(verdict(&azure, &mut ex).await, Ok(()));
}

#[tokio::test]
async fn aws_sdks_present_the_key_as_their_access_key_id() {
    let bedrock = keys_auth(CredentialHeader::SigV4);
    let signed = |key: &str| {
        format!(
            "AWS4-HMAC-SHA256 Credential={key}/20260101/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=0123abcd"
        )
    };
    let mut ex = exchange(
        "openai",
        &[("authorization", &signed("sk-sluice-good"))],
        "gpt-4o-mini",
    );
    assert_eq!(verdict(&bedrock, &mut ex).await, Ok(()));
    assert_eq!(ex.tenant.as_deref(), Some("search"));

    let cases: &[(String, &str)] = &[
        (signed("sk-unknown"), "invalid Sluice key"),
        (signed("sk-revoked"), "revoked"),
        ("Bearer sk-sluice-good".into(), "malformed"),
        (
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00".into(),
            "malformed",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=sk-sluice-good, Signature=00".into(),
            "malformed",
        ),
        (
            "AWS4-ECDSA-P256-SHA256 Credential=sk-sluice-good/20260101/bedrock/aws4_request".into(),
            "malformed",
        ),
        (signed(""), "malformed"),
    ];
    for (header, says) in cases {
        let mut ex = exchange("openai", &[("authorization", header)], "gpt-4o-mini");
        let (status, message) = verdict(&bedrock, &mut ex).await.unwrap_err();
        assert_eq!(status, 401, "{header}");
        assert!(message.contains(says), "{header}: {message}");
        assert!(!message.contains("sk-"), "the key is echoed: {message}");
    }
    // The caller's signature, Sluice key inside, never goes upstream.
    let mut upstream = RequestHeader::build("POST", b"/", None).unwrap();
    upstream
        .insert_header("authorization", signed("sk-sluice-good"))
        .unwrap();
    bedrock.on_upstream_request(&ex, &mut upstream);
    assert!(upstream.headers.get("authorization").is_none());
}

#[tokio::test]
async fn the_sluice_key_is_removed_from_the_upstream_request() {
    let auth = keys_auth(CredentialHeader::Bearer);
    let ex = exchange("openai", &[], "m");
    let mut upstream = RequestHeader::build("POST", b"/", None).unwrap();
    upstream
        .insert_header("authorization", "Bearer sk-sluice-good")
        .unwrap();
    auth.on_upstream_request(&ex, &mut upstream);
    assert!(upstream.headers.get("authorization").is_none());
}

#[tokio::test]
async fn passthrough_takes_the_tenant_from_a_header() {
    let spec = AuthSpec::Settings(Box::new(AuthSettings {
        mode: AuthMode::Passthrough,
        tenant_header: Some("x-tenant".into()),
        jwt: None,
    }));
    let auth = Auth::new(&spec, CredentialHeader::Bearer, directory(), None).unwrap();
    let mut named = exchange(
        "openai",
        &[
            ("x-tenant", "research"),
            ("authorization", "Bearer sk-provider"),
        ],
        "gpt-4o",
    );
    assert_eq!(verdict(&auth, &mut named).await, Ok(()));
    assert_eq!(
        (named.tenant.as_deref(), named.tier.as_deref()),
        (Some("research"), Some("pro"))
    );
    let mut restricted = exchange("openai", &[("x-tenant", "search")], "gpt-4o");
    assert_eq!(verdict(&auth, &mut restricted).await.unwrap_err().0, 403);
    let mut nobody = exchange("openai", &[], "gpt-4o");
    assert_eq!(verdict(&auth, &mut nobody).await, Ok(()));
    assert_eq!(nobody.tenant.as_deref(), Some(ANONYMOUS));
    // The provider key is the caller's to send: passthrough leaves it.
    let mut upstream = RequestHeader::build("POST", b"/", None).unwrap();
    upstream
        .insert_header("authorization", "Bearer sk-provider")
        .unwrap();
    auth.on_upstream_request(&named, &mut upstream);
    assert!(upstream.headers.get("authorization").is_some());
}

#[test]
fn directory_refuses_inconsistencies() {
    let mut directory = Directory::default();
    directory.add_tier("free", &[], &[]).unwrap();
    assert!(matches!(
        directory.add_tier("free", &[], &[]),
        Err(DirectoryError::DuplicateTier(_))
    ));
    assert!(matches!(
        directory.add_tenant("a", "gold"),
        Err(DirectoryError::UnknownTier { .. })
    ));
    directory.add_tenant("a", "free").unwrap();
    directory.add_tenant("b", "free").unwrap();
    assert!(matches!(
        directory.add_key("zz", KeyHash::of("k"), None, None, false),
        Err(DirectoryError::UnknownTenant(_))
    ));
    directory
        .add_key("a", KeyHash::of("k"), None, None, false)
        .unwrap();
    assert_eq!(
        directory.add_key("b", KeyHash::of("k"), None, None, false),
        Err(DirectoryError::DuplicateKey("a".into()))
    );
}

#[test]
fn tenant_header_needs_passthrough() {
    let spec = AuthSpec::Settings(Box::new(AuthSettings {
        mode: AuthMode::Required,
        tenant_header: Some("x-tenant".into()),
        jwt: None,
    }));
    assert!(Auth::new(&spec, CredentialHeader::Bearer, directory(), None).is_err());
}
