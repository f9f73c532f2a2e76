use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::chain::Filter;
use crate::exchange::{CacheStatus, Exchange, Outcome};
use crate::units::ByteSize;
use crate::{RequestHeader, ResponseHeader, Verdict};

fn request(headers: &[(&str, &str)]) -> RequestHeader {
    let mut request = RequestHeader::build("POST", b"/openai/v1/chat/completions", None).unwrap();
    for (name, value) in headers {
        request.append_header(name.to_string(), *value).unwrap();
    }
    request
}

fn key_of(scope: &Scope, body: &Value, request: &RequestHeader, stream: bool) -> CacheKey {
    CacheKey::new(&KeyInput {
        scope,
        route: "openai",
        upstream: "openai",
        api: "openai",
        request,
        credential_scoped: false,
        stream,
        body,
        rules: &[0; 32],
    })
}

fn tenant(name: &str) -> Scope {
    Scope::Tenant(name.into())
}

#[test]
fn canonical_form_sorts_keys_drops_whitespace_and_ignored_fields() {
    let a: Value = serde_json::from_str(
        r#"{ "model" : "m", "messages": [ {"role":"user", "content":"hi"} ], "temperature": 0, "user": "alice" }"#,
    )
    .unwrap();
    let b: Value = serde_json::from_str(
        r#"{"temperature":0,"messages":[{"content":"hi","role":"user"}],"model":"m","metadata":{"x":1}}"#,
    )
    .unwrap();
    let expected =
        br#"{"messages":[{"content":"hi","role":"user"}],"model":"m","temperature":0}"#.to_vec();
    assert_eq!(canonical_json(&a), expected);
    assert_eq!(canonical_json(&b), expected);
    // Nested `user` fields are content, not the end-user id: kept.
    let nested = json!({"messages": [{"role": "user", "user": "x"}]});
    assert_eq!(
        canonical_json(&nested),
        br#"{"messages":[{"role":"user","user":"x"}]}"#.to_vec()
    );
    // Escapes are normalised, numbers are not (1 and 1.0 may be treated differently).
    let escaped: Value = serde_json::from_str(r#"{"s":"\u00e9"}"#).unwrap();
    assert_eq!(
        canonical_json(&escaped),
        "{\"s\":\"é\"}".as_bytes().to_vec()
    );
    assert_ne!(
        canonical_json(&json!({"n": 1})),
        canonical_json(&json!({"n": 1.0}))
    );
}

#[test]
fn everything_that_changes_the_answer_changes_the_key() {
    let body =
        json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]});
    let plain = request(&[]);
    let base = key_of(&tenant("a"), &body, &plain, false);
    // Same request, reordered and with an ignored field: same key.
    let same = json!({"messages": [{"content": "hi", "role": "user"}], "user": "u", "temperature": 0, "model": "m"});
    assert_eq!(key_of(&tenant("a"), &same, &plain, false), base);

    let mut different = vec![
        key_of(&tenant("b"), &body, &plain, false),
        key_of(&Scope::Shared, &body, &plain, false),
        key_of(&tenant("a"), &body, &plain, true),
        key_of(
            &tenant("a"),
            &json!({"model": "m2", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}),
            &plain,
            false,
        ),
        key_of(
            &tenant("a"),
            &body,
            &request(&[("anthropic-version", "2023-06-01")]),
            false,
        ),
    ];
    let mut other_path = plain.clone();
    other_path.set_uri(http::Uri::from_static("/openai/v1/completions"));
    different.push(key_of(&tenant("a"), &body, &other_path, false));
    for (route, upstream, api) in [
        ("r2", "openai", "openai"),
        ("openai", "u2", "openai"),
        ("openai", "openai", "anthropic"),
    ] {
        different.push(CacheKey::new(&KeyInput {
            scope: &tenant("a"),
            route,
            upstream,
            api,
            request: &plain,
            credential_scoped: false,
            stream: false,
            body: &body,
            rules: &[0; 32],
        }));
    }
    for (i, key) in different.iter().enumerate() {
        assert_ne!(key.digest, base.digest, "variant {i} shares the digest");
    }
}

#[test]
fn forwarded_credentials_scope_the_key_without_appearing_in_it() {
    let body = json!({"model": "m", "temperature": 0});
    let with_key = |credential: &str| {
        let request = request(&[("authorization", credential)]);
        CacheKey::new(&KeyInput {
            scope: &Scope::Shared,
            route: "r",
            upstream: "u",
            api: "openai",
            request: &request,
            credential_scoped: true,
            stream: false,
            body: &body,
            rules: &[0; 32],
        })
    };
    let a = with_key("Bearer sk-aaaa");
    assert_eq!(a, with_key("Bearer sk-aaaa"));
    assert_ne!(a, with_key("Bearer sk-bbbb"));
    assert!(!a.hex().contains("sk-aaaa") && !format!("{a:?}").contains("sk-aaaa"));
}

/// JSON values of a few levels: what request bodies are made of.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[a-z ]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Two tenants never share a key, whatever they send: the scope is in the digest and in
    /// the key's equality.
    #[test]
    fn two_tenants_never_share_a_key(
        first in "[a-zA-Z0-9_-]{1,16}",
        second in "[a-zA-Z0-9_-]{1,16}",
        body in prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..6),
        stream in any::<bool>(),
    ) {
        prop_assume!(first != second);
        let body = Value::Object(body.into_iter().collect());
        let plain = request(&[]);
        let a = key_of(&tenant(&first), &body, &plain, stream);
        let b = key_of(&tenant(&second), &body, &plain, stream);
        prop_assert_ne!(&a, &b);
        prop_assert_ne!(a.digest, b.digest);
        prop_assert_ne!(key_of(&Scope::Shared, &body, &plain, stream), a.clone());
        // And the same tenant's same request, written another way, is the same key.
        let rewritten: Value = serde_json::from_str(&serde_json::to_string_pretty(&body).unwrap()).unwrap();
        prop_assert_eq!(key_of(&tenant(&first), &rewritten, &plain, stream), a);
    }

    /// Names that differ only in where one ends and the next begins never collide.
    #[test]
    fn length_prefixing_keeps_fields_apart(route in "[a-z]{1,6}", upstream in "[a-z]{1,6}") {
        let body = json!({});
        let plain = request(&[]);
        let key = |route: &str, upstream: &str| CacheKey::new(&KeyInput {
            scope: &Scope::Shared, route, upstream, api: "openai", request: &plain,
            credential_scoped: false, stream: false, body: &body, rules: &[0; 32],
        });
        let joined = format!("{route}{upstream}");
        prop_assert_ne!(key(&route, &upstream), key(&joined, ""));
    }
}

#[test]
fn deterministic_means_temperature_zero_or_a_seed() {
    assert!(is_deterministic(&json!({"temperature": 0})));
    assert!(is_deterministic(&json!({"temperature": 0.0})));
    assert!(is_deterministic(&json!({"temperature": 0.7, "seed": 42})));
    assert!(!is_deterministic(&json!({"temperature": 0.7})));
    assert!(!is_deterministic(&json!({})));
    assert!(!is_deterministic(&json!({"seed": "42"})));
    assert!(!is_deterministic(&json!({"temperature": "0"})));
}

#[test]
fn controls_are_parsed_and_bad_ones_refused() {
    let controls = Controls::parse(&request(&[
        ("cache-control", "No-Cache, max-age=60"),
        ("cache-control", "private"),
        ("x-sluice-cache-ttl", "10m"),
    ]))
    .unwrap();
    assert_eq!(
        controls,
        Controls {
            no_cache: true,
            no_store: false,
            max_age: Some(Duration::from_secs(60)),
            ttl: Some(Duration::from_secs(600)),
        }
    );
    assert!(
        Controls::parse(&request(&[("cache-control", "no-store")]))
            .unwrap()
            .no_store
    );
    assert_eq!(
        Controls::parse(&request(&[("cache-control", "max-age=\"5\"")]))
            .unwrap()
            .max_age,
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        Controls::parse(&request(&[(
            "cache-control",
            "max-age=99999999999999999999999"
        )]))
        .unwrap()
        .max_age,
        Some(Duration::from_secs(u64::MAX))
    );
    for bad in ["max-age=soon", "max-age=", "max-age=-1"] {
        assert!(matches!(
            Controls::parse(&request(&[("cache-control", bad)])),
            Err(ControlError::MaxAge(_))
        ));
    }
    assert!(matches!(
        Controls::parse(&request(&[("x-sluice-cache-ttl", "forever")])),
        Err(ControlError::Ttl(_))
    ));
    assert_eq!(Controls::parse(&request(&[])).unwrap(), Controls::default());
}

#[test]
fn model_ttls_override_the_route_ttl() {
    let config: CacheConfig = serde_json::from_value(json!({
        "ttl": "1h",
        "models": {"gpt-4o": "10m", "claude-*": "2h", "o1": "0s"}
    }))
    .unwrap();
    assert_eq!(config.ttl_for(Some("gpt-4o")), Duration::from_secs(600));
    assert_eq!(
        config.ttl_for(Some("claude-haiku")),
        Duration::from_secs(7200)
    );
    assert_eq!(config.ttl_for(Some("o1")), Duration::ZERO);
    assert_eq!(
        config.ttl_for(Some("gpt-4o-mini")),
        Duration::from_secs(3600)
    );
    assert_eq!(config.ttl_for(None), Duration::from_secs(3600));
    let unknown = serde_json::from_value::<CacheConfig>(json!({"tll": "1h"}));
    assert!(unknown.unwrap_err().to_string().contains("unknown field"));
}

#[test]
fn large_bodies_compress_and_round_trip() {
    let text: String = (0..4000)
        .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
        .collect();
    let plain = Bytes::from(text);
    let body = Body::new(plain.clone(), 1024);
    assert!(matches!(body, Body::Zstd { .. }));
    assert!(body.stored_len() < plain.len() / 4);
    assert_eq!(body.plain_len(), plain.len());
    assert_eq!(body.bytes().unwrap(), plain);
    // Below the threshold: kept as is, no copy.
    let small = Body::new(Bytes::from_static(b"{}"), 1024);
    assert!(matches!(&small, Body::Plain(b) if b.as_ptr() == b"{}".as_ptr() || b == "{}"));
    // A corrupt record is an error, not a panic.
    let corrupt = Body::Zstd {
        data: Bytes::from_static(b"not zstd"),
        len: 10,
    };
    assert!(corrupt.bytes().is_err());
}

fn entry(scope: Scope, body: &'static [u8], ttl: Duration) -> Entry {
    Entry {
        scope,
        route: "openai".into(),
        stored_at: SystemTime::now(),
        ttl,
        stream: true,
        headers: vec![(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        )],
        body: Body::Plain(Bytes::from_static(body)),
        usage: Some(crate::usage::Usage {
            input_tokens: 3,
            output_tokens: 4,
        }),
    }
}

#[test]
fn shared_tier_records_round_trip_and_refuse_garbage() {
    let original = entry(tenant("team-a"), b"data: x\n\n", Duration::from_secs(60));
    let decoded = decode(&encode(&original)).unwrap();
    assert_eq!(decoded.scope, original.scope);
    assert_eq!(decoded.route, original.route);
    assert_eq!(decoded.headers, original.headers);
    assert_eq!(decoded.usage, original.usage);
    assert_eq!(
        decoded.body.bytes().unwrap(),
        original.body.bytes().unwrap()
    );
    assert!(decoded.stream);
    let mut compressed = original.clone();
    compressed.body = Body::new(Bytes::from(vec![b'a'; 50_000]), 100);
    let decoded = decode(&encode(&compressed)).unwrap();
    assert_eq!(
        decoded.body.bytes().unwrap(),
        Bytes::from(vec![b'a'; 50_000])
    );
    let record = encode(&original);
    for cut in [0, 3, 10, record.len() - 1] {
        assert!(decode(&record[..cut]).is_err(), "cut at {cut}");
    }
    assert_eq!(decode(b"XXXXrest").unwrap_err(), DecodeError::Magic);
}

fn store(max_bytes: u64) -> Arc<CacheStore> {
    let config = StoreConfig {
        max_bytes: ByteSize(max_bytes),
        compress_above: ByteSize(1024),
        ..StoreConfig::default()
    };
    Arc::new(CacheStore::new(config, Default::default(), None))
}

#[test]
fn entries_are_found_only_by_their_scope_and_expire() {
    let store = store(1 << 20);
    let body = json!({"temperature": 0});
    let key = key_of(&tenant("a"), &body, &request(&[]), true);
    store.insert(
        key.clone(),
        Arc::new(entry(tenant("a"), b"x", Duration::from_secs(60))),
    );
    assert!(store.get(&key).is_some());
    // Same digest, other scope: not found (the scope is part of the key's equality).
    let forged = CacheKey {
        scope: tenant("b"),
        digest: key.digest,
    };
    assert!(store.get(&forged).is_none());
    let short = key_of(&tenant("a"), &json!({"seed": 1}), &request(&[]), true);
    store.insert(
        short.clone(),
        Arc::new(entry(tenant("a"), b"y", Duration::from_millis(50))),
    );
    assert!(store.get(&short).is_some());
    std::thread::sleep(Duration::from_millis(80));
    assert!(store.get(&short).is_none());
}

#[test]
fn the_byte_bound_holds_under_a_flood() {
    let max = 64 * 1024;
    let store = store(max);
    static BIG: [u8; 4096] = [7; 4096];
    for i in 0..200 {
        let key = key_of(&tenant("a"), &json!({"seed": i}), &request(&[]), false);
        let mut e = entry(tenant("a"), &BIG, Duration::from_secs(60));
        e.body = Body::Plain(Bytes::from_static(&BIG));
        store.insert(key, Arc::new(e));
    }
    let stats = store.stats();
    assert!(stats.bytes <= max, "{stats:?}");
    assert!(stats.entries > 0 && stats.entries < 200, "{stats:?}");
    assert!(stats.evictions > 0, "{stats:?}");
    assert_eq!(stats.inserts, 200);
}

#[test]
fn purges_by_tenant_and_route() {
    let store = store(1 << 20);
    for (scope, route, seed) in [("a", "r1", 1), ("a", "r2", 2), ("b", "r1", 3)] {
        let key = key_of(&tenant(scope), &json!({"seed": seed}), &request(&[]), false);
        let mut e = entry(tenant(scope), b"x", Duration::from_secs(60));
        e.route = route.into();
        store.insert(key, Arc::new(e));
    }
    let by_tenant = Purge {
        tenant: Some("a".into()),
        route: Some("r1".into()),
    };
    assert_eq!(store.purge(&by_tenant), 1);
    assert_eq!(store.purge(&Purge::route("r1")), 1);
    assert_eq!(store.purge(&Purge::default()), 1);
    assert_eq!(store.stats().entries, 0);
}

#[tokio::test]
async fn identical_misses_follow_one_leader() {
    let store = store(1 << 20);
    let key = key_of(&tenant("a"), &json!({"seed": 1}), &request(&[]), false);
    let Flight::Lead(lead) = store.join(&key) else {
        panic!("the first request leads")
    };
    let Flight::Follow(mut follower) = store.join(&key) else {
        panic!("the second follows")
    };
    let waiting = tokio::spawn(async move {
        let state = follower
            .wait_for(|s| matches!(s, FlightState::Done(_)))
            .await
            .unwrap()
            .clone();
        match state {
            FlightState::Done(Some(entry)) => entry.body.bytes().unwrap(),
            _ => Bytes::new(),
        }
    });
    lead.publish(Arc::new(entry(
        tenant("a"),
        b"answer",
        Duration::from_secs(60),
    )));
    drop(lead);
    assert_eq!(waiting.await.unwrap(), "answer");
    // The flight is over: the next request leads again.
    let Flight::Lead(failed) = store.join(&key) else {
        panic!("no flight left behind")
    };
    let Flight::Follow(mut follower) = store.join(&key) else {
        panic!("follows")
    };
    drop(failed); // an error upstream: followers are let go without an answer
    let state = follower
        .wait_for(|s| matches!(s, FlightState::Done(_)))
        .await
        .unwrap()
        .clone();
    assert!(matches!(state, FlightState::Done(None)));
}

fn cache_filter(store: &Arc<CacheStore>, config: CacheConfig) -> Cache {
    Cache::new(
        config,
        store.clone(),
        RouteFacts {
            route: "openai".into(),
            upstream: "openai".into(),
            api: "openai".into(),
            credential_scoped: false,
        },
    )
}

fn exchange(body: &Value, tenant: &str, headers: &[(&str, &str)]) -> Exchange {
    let mut ex = Exchange::new(
        "openai".into(),
        request(headers),
        Bytes::from(serde_json::to_vec(body).unwrap()),
    );
    ex.tenant = Some(tenant.into());
    ex
}

/// Runs a miss through the response phases with these chunks and this ending.
fn respond(
    filter: &Cache,
    ex: &mut Exchange,
    status: u16,
    chunks: &[&'static [u8]],
    outcome: Outcome,
) {
    ex.status = Some(StatusCode::from_u16(status).unwrap());
    let mut head = ResponseHeader::build(status, None).unwrap();
    head.insert_header("content-type", "text/event-stream")
        .unwrap();
    head.insert_header("x-request-id", "upstream-id").unwrap();
    filter.on_response_head(ex, &mut head);
    assert!(head.headers.get("x-sluice-cache").is_some());
    for chunk in chunks {
        filter.on_response_chunk(ex, &Bytes::from_static(chunk));
    }
    ex.outcome = outcome;
    filter.on_done(ex);
}

/// A stored entry holds a copy of the body of its own size, not the upstream's read buffer:
/// a slice of it would keep the whole buffer (4 KiB or more) alive for the entry's TTL.
#[tokio::test]
async fn a_stored_body_does_not_keep_the_read_buffer_it_came_in() {
    let store = store(1 << 20);
    let filter = cache_filter(&store, CacheConfig::default());
    let body = json!({"model": "m", "temperature": 0, "messages": []});
    let mut first = exchange(&body, "a", &[]);
    assert!(matches!(
        filter.on_request(&mut first).await,
        Verdict::Continue
    ));
    first.status = Some(StatusCode::OK);
    let answer = b"{\"choices\":[]}";
    let mut head = ResponseHeader::build(200, None).unwrap();
    head.insert_header("content-length", answer.len()).unwrap();
    filter.on_response_head(&mut first, &mut head);
    // As the upstream client hands a body out: a slice of a larger read buffer.
    let mut read_buffer = bytes::BytesMut::with_capacity(4096);
    read_buffer.extend_from_slice(answer);
    read_buffer.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    let buffer = read_buffer.freeze();
    let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + 4096;
    filter.on_response_chunk(&mut first, &buffer.slice(..answer.len()));
    first.outcome = Outcome::Completed;
    filter.on_done(&first);
    drop(first);

    let mut again = exchange(&body, "a", &[]);
    let Verdict::Respond(hit) = filter.on_request(&mut again).await else {
        panic!("expected a hit")
    };
    assert_eq!(&hit.body[..], answer);
    assert!(!range.contains(&(hit.body.as_ptr() as usize)));
}

#[tokio::test]
async fn a_complete_stream_is_replayed_byte_for_byte_to_its_tenant_only() {
    let store = store(1 << 20);
    let filter = cache_filter(&store, CacheConfig::default());
    let body = json!({"model": "m", "stream": true, "temperature": 0, "messages": []});
    let mut first = exchange(&body, "a", &[]);
    assert!(matches!(
        filter.on_request(&mut first).await,
        Verdict::Continue
    ));
    assert_eq!(first.cache, Some(CacheStatus::Miss));
    let chunks: [&[u8]; 3] = [
        b"data: {\"a\":1}\n\n",
        b"data: {\"b\"",
        b":2}\n\ndata: [DONE]\n\n",
    ];
    respond(&filter, &mut first, 200, &chunks, Outcome::Completed);
    drop(first);

    let mut again = exchange(&body, "a", &[]);
    let Verdict::Respond(hit) = filter.on_request(&mut again).await else {
        panic!("expected a hit")
    };
    assert_eq!(again.cache, Some(CacheStatus::Hit));
    assert_eq!(hit.body, Bytes::from(chunks.concat()));
    let header = |name: &str| {
        hit.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("x-sluice-cache").unwrap(), "hit");
    assert_eq!(header("content-type").unwrap(), "text/event-stream");
    assert!(header("age").is_some());
    assert!(
        header("x-request-id").is_none(),
        "per-response headers are not replayed"
    );

    // Another tenant, the same request: a miss.
    let mut other = exchange(&body, "b", &[]);
    assert!(matches!(
        filter.on_request(&mut other).await,
        Verdict::Continue
    ));
    assert_eq!(other.cache, Some(CacheStatus::Miss));
    // The same tenant without streaming: a miss too.
    let mut unstreamed = exchange(
        &json!({"model": "m", "stream": false, "temperature": 0, "messages": []}),
        "a",
        &[],
    );
    unstreamed.facts.stream = false;
    assert!(matches!(
        filter.on_request(&mut unstreamed).await,
        Verdict::Continue
    ));
}

#[tokio::test]
async fn errors_broken_streams_and_oversized_bodies_are_not_stored() {
    let store = store(1 << 20);
    let config = CacheConfig {
        max_entry: ByteSize(10),
        coalesce_wait: Duration::ZERO,
        ..CacheConfig::default()
    };
    let filter = cache_filter(&store, config);
    let cases: [(u16, &[&'static [u8]], Outcome); 4] = [
        (500, &[b"{}"], Outcome::Completed),
        (429, &[b"{}"], Outcome::Completed),
        (200, &[b"data: 1\n\n"], Outcome::UpstreamBroke),
        (200, &[b"0123456789", b"x"], Outcome::Completed),
    ];
    for (i, (status, chunks, outcome)) in cases.into_iter().enumerate() {
        let body = json!({"seed": i});
        let mut ex = exchange(&body, "a", &[]);
        assert!(matches!(
            filter.on_request(&mut ex).await,
            Verdict::Continue
        ));
        respond(&filter, &mut ex, status, chunks, outcome);
        let mut again = exchange(&body, "a", &[]);
        assert!(
            matches!(filter.on_request(&mut again).await, Verdict::Continue),
            "case {i} was stored"
        );
    }
    assert_eq!(store.stats().entries, 0);
    assert_eq!(store.stats().too_large, 1);
}

#[tokio::test]
async fn request_controls_and_when_rules_decide() {
    let store = store(1 << 20);
    let filter = cache_filter(&store, CacheConfig::default());
    let body = json!({"seed": 7});
    let hit_count = || store.stats().hits;
    // Sampling without a seed: bypassed under `when: deterministic`.
    let mut sampled = exchange(&json!({"temperature": 1}), "a", &[]);
    assert!(matches!(
        filter.on_request(&mut sampled).await,
        Verdict::Continue
    ));
    assert_eq!(sampled.cache, Some(CacheStatus::Bypass));
    // no-store: nothing read, nothing written.
    let mut ex = exchange(&body, "a", &[("cache-control", "no-store")]);
    filter.on_request(&mut ex).await;
    assert_eq!(ex.cache, Some(CacheStatus::Bypass));
    respond(&filter, &mut ex, 200, &[b"{}"], Outcome::Completed);
    assert_eq!(store.stats().entries, 0);
    // A normal miss stores; no-cache skips the lookup and replaces it.
    let mut ex = exchange(&body, "a", &[]);
    filter.on_request(&mut ex).await;
    respond(&filter, &mut ex, 200, &[b"{\"v\":1}"], Outcome::Completed);
    drop(ex);
    let mut ex = exchange(&body, "a", &[("cache-control", "no-cache")]);
    assert!(matches!(
        filter.on_request(&mut ex).await,
        Verdict::Continue
    ));
    assert_eq!(ex.cache, Some(CacheStatus::Refresh));
    respond(&filter, &mut ex, 200, &[b"{\"v\":2}"], Outcome::Completed);
    drop(ex);
    let mut ex = exchange(&body, "a", &[]);
    let Verdict::Respond(hit) = filter.on_request(&mut ex).await else {
        panic!("hit expected")
    };
    assert_eq!(hit.body, "{\"v\":2}");
    assert_eq!(hit_count(), 1);
    // max-age=0 refuses an entry of any age above 0 s; one stored just now is 0 s old.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ex = exchange(&body, "a", &[("cache-control", "max-age=0")]);
    assert!(matches!(
        filter.on_request(&mut ex).await,
        Verdict::Continue
    ));
    assert_eq!(ex.cache, Some(CacheStatus::Miss));
    // A bad control is a 400 naming it.
    let mut ex = exchange(&body, "a", &[("cache-control", "max-age=x")]);
    let Verdict::Reject(rejection) = filter.on_request(&mut ex).await else {
        panic!("rejection expected")
    };
    assert_eq!(rejection.status, StatusCode::BAD_REQUEST);
    assert!(rejection.message.contains("max-age"));
}

#[tokio::test]
async fn the_ttl_header_is_capped_and_not_sent_upstream() {
    let store = store(1 << 20);
    let config = CacheConfig {
        ttl: Duration::from_secs(60),
        ..CacheConfig::default()
    };
    let filter = cache_filter(&store, config);
    let mut ex = exchange(&json!({"seed": 1}), "a", &[("x-sluice-cache-ttl", "30d")]);
    filter.on_request(&mut ex).await;
    let mut upstream = request(&[("x-sluice-cache-ttl", "30d")]);
    filter.on_upstream_request(&ex, &mut upstream);
    assert!(upstream.headers.get("x-sluice-cache-ttl").is_none());
    respond(&filter, &mut ex, 200, &[b"{}"], Outcome::Completed);
    let key = ex.extensions.get::<super::Recording>().unwrap().key.clone();
    let stored = store.get(&key).unwrap();
    assert_eq!(
        stored.ttl,
        Duration::from_secs(60),
        "capped at max_ttl (default: ttl)"
    );
}

#[tokio::test]
async fn hits_are_free_unless_the_route_charges_them() {
    let store = store(1 << 20);
    let body = json!({"seed": 3});
    let free = cache_filter(&store, CacheConfig::default());
    let mut ex = exchange(&body, "a", &[]);
    free.on_request(&mut ex).await;
    ex.usage = Some(crate::usage::Usage {
        input_tokens: 10,
        output_tokens: 5,
    });
    respond(&free, &mut ex, 200, &[b"{}"], Outcome::Completed);
    let mut hit = exchange(&body, "a", &[]);
    assert!(matches!(
        free.on_request(&mut hit).await,
        Verdict::Respond(_)
    ));
    assert_eq!(hit.usage, None);
    let charged = cache_filter(
        &store,
        CacheConfig {
            charge_hits: true,
            ..CacheConfig::default()
        },
    );
    let mut hit = exchange(&body, "a", &[]);
    assert!(matches!(
        charged.on_request(&mut hit).await,
        Verdict::Respond(_)
    ));
    assert_eq!(hit.usage.map(|u| u.total()), Some(15));
}

#[test]
fn bedrock_converse_temperature_counts_as_deterministic() {
    // Converse puts sampling parameters in `inferenceConfig`, not at the top level.
    assert!(is_deterministic(
        &json!({"messages": [], "inferenceConfig": {"temperature": 0, "maxTokens": 10}})
    ));
    assert!(is_deterministic(
        &json!({"inferenceConfig": {"temperature": 0.0}})
    ));
    assert!(!is_deterministic(
        &json!({"inferenceConfig": {"temperature": 0.5}})
    ));
    assert!(!is_deterministic(
        &json!({"inferenceConfig": {"maxTokens": 10}})
    ));
    assert!(!is_deterministic(&json!({"inferenceConfig": 0})));
}

fn is_hit(verdict: &Verdict) -> Option<Bytes> {
    match verdict {
        Verdict::Respond(hit) => Some(hit.body.clone()),
        _ => None,
    }
}

/// Unit twin of the integration test of the same name: `scope: shared` puts every tenant of
/// the route in one scope; the default keeps each tenant apart, on the same store.
#[tokio::test]
async fn a_shared_scope_serves_every_tenant_of_the_route() {
    let store = store(1 << 20);
    let shared = cache_filter(
        &store,
        CacheConfig {
            scope: ScopeRule::Shared,
            ..CacheConfig::default()
        },
    );
    let body = json!({"model": "m", "temperature": 0, "messages": []});
    let mut first = exchange(&body, "a", &[]);
    assert!(is_hit(&shared.on_request(&mut first).await).is_none());
    assert_eq!(first.cache, Some(CacheStatus::Miss));
    respond(
        &shared,
        &mut first,
        200,
        &[b"{\"for\":\"all\"}"],
        Outcome::Completed,
    );
    let mut other = exchange(&body, "b", &[]);
    let served = is_hit(&shared.on_request(&mut other).await);
    assert_eq!(served.as_deref(), Some(&b"{\"for\":\"all\"}"[..]));
    assert_eq!(other.cache, Some(CacheStatus::Hit));

    let isolated = cache_filter(&store, CacheConfig::default());
    let mut own = exchange(&body, "a", &[]);
    assert!(is_hit(&isolated.on_request(&mut own).await).is_none());
    respond(
        &isolated,
        &mut own,
        200,
        &[b"{\"for\":\"a\"}"],
        Outcome::Completed,
    );
    let mut other = exchange(&body, "b", &[]);
    assert!(
        is_hit(&isolated.on_request(&mut other).await).is_none(),
        "a tenant-scoped route never serves b what a stored"
    );
}

#[tokio::test]
async fn when_always_caches_sampled_requests_and_deterministic_does_not() {
    let store = store(1 << 20);
    let always = cache_filter(
        &store,
        CacheConfig {
            when: When::Always,
            ..CacheConfig::default()
        },
    );
    let sampled = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mut ex = exchange(&sampled, "a", &[]);
    always.on_request(&mut ex).await;
    assert_eq!(ex.cache, Some(CacheStatus::Miss));
    respond(&always, &mut ex, 200, &[b"{\"n\":1}"], Outcome::Completed);
    let mut again = exchange(&sampled, "a", &[]);
    let served = is_hit(&always.on_request(&mut again).await);
    assert_eq!(served.as_deref(), Some(&b"{\"n\":1}"[..]));

    let deterministic = cache_filter(&store, CacheConfig::default());
    let mut ex = exchange(&sampled, "a", &[]);
    deterministic.on_request(&mut ex).await;
    assert_eq!(ex.cache, Some(CacheStatus::Bypass));
}

/// A miss that started under the old rules and finishes after the reload's purge stores its
/// entry under the old rules' key, which a request under the new rules never finds.
#[tokio::test]
async fn a_miss_in_flight_across_a_rules_change_is_not_served_under_the_new_rules() {
    let store = store(1 << 20);
    let old = cache_filter(&store, CacheConfig::default());
    let new = cache_filter(
        &store,
        CacheConfig {
            ttl: Duration::from_secs(7200),
            ..CacheConfig::default()
        },
    );
    let body = json!({"seed": 9});
    let mut in_flight = exchange(&body, "a", &[]);
    old.on_request(&mut in_flight).await;
    assert_eq!(in_flight.cache, Some(CacheStatus::Miss));
    // The reload: the route is purged while the old miss is still upstream.
    store.purge(&Purge::route("openai"));
    respond(
        &old,
        &mut in_flight,
        200,
        &[b"{\"rules\":\"old\"}"],
        Outcome::Completed,
    );
    assert_eq!(store.stats().entries, 1, "the late entry is stored…");
    let mut under_new = exchange(&body, "a", &[]);
    assert!(
        is_hit(&new.on_request(&mut under_new).await).is_none(),
        "…but never served under the new rules"
    );
    // Rules that only decide how entries are used keep them.
    let charging = cache_filter(
        &store,
        CacheConfig {
            charge_hits: true,
            coalesce_wait: Duration::from_secs(1),
            ..CacheConfig::default()
        },
    );
    let mut ex = exchange(&body, "a", &[]);
    assert!(is_hit(&charging.on_request(&mut ex).await).is_some());
    assert_ne!(
        CacheConfig::default().fingerprint(),
        new.config().fingerprint()
    );
}

/// One request as a caller may send it: a JSON body, headers (keyed, unkeyed, cache
/// controls), streaming or not.
#[derive(Debug, Clone)]
struct Sent {
    body: Value,
    headers: Vec<(&'static str, String)>,
    stream: bool,
}

fn sent() -> impl Strategy<Value = Sent> {
    let header_names = prop::sample::select(vec![
        KEYED_HEADERS[0],
        KEYED_HEADERS[1],
        KEYED_HEADERS[2],
        KEYED_HEADERS[3],
        KEYED_HEADERS[4],
        "x-unkeyed",
        "user-agent",
    ]);
    let control = prop::sample::select(vec!["no-cache", "no-store", "max-age=600", "private"]);
    (
        prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..5),
        prop::option::of(prop::sample::select(vec![json!(0), json!(0.0), json!(0.7)])),
        prop::option::of(0i64..3),
        prop::collection::vec((header_names, "[a-z0-9.-]{0,8}"), 0..3),
        prop::option::of(control),
        any::<bool>(),
    )
        .prop_map(|(fields, temperature, seed, headers, control, stream)| {
            let mut body: serde_json::Map<String, Value> = fields.into_iter().collect();
            body.insert("stream".into(), Value::Bool(stream));
            if let Some(temperature) = temperature {
                body.insert("temperature".into(), temperature);
            }
            if let Some(seed) = seed {
                body.insert("seed".into(), seed.into());
            }
            let mut headers: Vec<(&'static str, String)> = headers;
            if let Some(control) = control {
                headers.push(("cache-control", control.to_owned()));
            }
            Sent {
                body: Value::Object(body),
                headers,
                stream,
            }
        })
}

const ANSWER_A: &[u8] = b"data: {\"for\":\"tenant a\"}\n\n";
const ANSWER_B: &[u8] = b"data: {\"for\":\"tenant b\"}\n\n";

/// Sends `sent` as `tenant` through the filter; a miss is answered upstream with `answer`.
/// Returns what a hit served, if the cache answered.
async fn drive(filter: &Cache, tenant: &str, sent: &Sent, answer: &'static [u8]) -> Option<Bytes> {
    let headers: Vec<(&str, &str)> = sent
        .headers
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let mut ex = exchange(&sent.body, tenant, &headers);
    ex.facts.stream = sent.stream;
    let verdict = filter.on_request(&mut ex).await;
    if let Some(served) = is_hit(&verdict) {
        return Some(served);
    }
    respond(filter, &mut ex, 200, &[answer], Outcome::Completed);
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The whole filter, not only the key: whatever two tenants send (bodies, headers, cache
    /// controls, streaming or not, the same request or not), tenant b is never served what
    /// tenant a stored, nor a what b stored — unless the route's scope is `shared`, where an
    /// identical cacheable request from b is served a's answer.
    #[test]
    fn another_tenant_is_never_served_what_a_tenant_stored(
        first in sent(),
        other in sent(),
        same in any::<bool>(),
        shared in any::<bool>(),
        always in any::<bool>(),
    ) {
        let second = if same { first.clone() } else { other };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let store = store(1 << 20);
            let config = CacheConfig {
                scope: if shared { ScopeRule::Shared } else { ScopeRule::Tenant },
                when: if always { When::Always } else { When::Deterministic },
                coalesce_wait: Duration::from_secs(1),
                ..CacheConfig::default()
            };
            let filter = cache_filter(&store, config);
            prop_assert_eq!(drive(&filter, "a", &first, ANSWER_A).await, None, "empty store");
            let a_stored = store.stats().entries == 1;
            let b_served = drive(&filter, "b", &second, ANSWER_B).await;
            if !shared {
                prop_assert_eq!(b_served, None, "tenant b was served from the cache");
            } else {
                if let Some(served) = &b_served {
                    prop_assert_eq!(&served[..], ANSWER_A);
                }
                let reads = !second.headers.iter().any(|(name, value)| {
                    *name == "cache-control" && (value == "no-cache" || value == "no-store")
                });
                if same && a_stored && reads {
                    prop_assert_eq!(b_served.as_deref(), Some(ANSWER_A), "shared scope, same request");
                }
            }
            // And back: a asking again is never served b's answer under its own scope.
            let a_again = drive(&filter, "a", &first, ANSWER_A).await;
            if !shared {
                if let Some(served) = a_again {
                    prop_assert_eq!(&served[..], ANSWER_A);
                }
            }
            Ok(())
        })?;
    }
}
