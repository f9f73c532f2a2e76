//! The response cache through the real binary against the mock provider: tenant isolation,
//! byte-identical stream replay, request controls, TTL, coalescing, what is never stored, the
//! byte bound, accounting of hits, admin, reload, and the Redis shared tier.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice_filters::auth::keys::KeyHash;

const KEY_A: &str = "sk-sluice-cache-a";
const KEY_B: &str = "sk-sluice-cache-b";

/// One OpenAI route with the cache filter `cache`, tenants `a` and `b` on a tier with `limits`,
/// and `extra` top-level YAML (store settings, state).
fn policy(mock_url: &str, cache: &str, limits: &str, extra: &str) -> String {
    policy_routes(mock_url, &[("openai", cache)], limits, extra)
}

/// As [`policy`], with one route per `(name, cache rules)`, matched by `/{name}`, all to the
/// same mock.
fn policy_routes(mock_url: &str, routes: &[(&str, &str)], limits: &str, extra: &str) -> String {
    let routes: String = routes
        .iter()
        .map(|(name, cache)| {
            format!(
                r#"
  - name: {name}
    match: {{ path_prefix: /{name} }}
    upstream: openai
    retry: {{ attempts: 1 }}
    filters:
      - request_id: {{}}
      - cache: {cache}"#
            )
        })
        .collect();
    format!(
        r#"
{extra}
# Errors go to the caller as they come (no retry, no resting key): these tests are about
# what the cache keeps of them.
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}", keys: ["sk-upstream"], key_cooldown: 0s }}
routes:{routes}
tiers:
  free: {{ limits: {limits} }}
tenants:
  - {{ name: a, tier: free, keys: [{{ hash: "{a}" }}] }}
  - {{ name: b, tier: free, keys: [{{ hash: "{b}" }}] }}
"#,
        a = KeyHash::of(KEY_A).to_text(),
        b = KeyHash::of(KEY_B).to_text(),
    )
}

fn prompt(content: &str, stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    })
}

struct Answer {
    status: u16,
    cache: String,
    age: Option<u64>,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn id(&self) -> String {
        self.json()["id"].as_str().unwrap().to_owned()
    }
}

async fn send(
    sidecar: &Sidecar,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Result<Answer> {
    send_to(sidecar, "openai", key, body, headers).await
}

/// As [`send`], on the route `route` of a [`policy_routes`] policy.
async fn send_to(
    sidecar: &Sidecar,
    route: &str,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Result<Answer> {
    let mut request = reqwest::Client::new()
        .post(format!("{}/{route}/v1/chat/completions", sidecar.proxy))
        .bearer_auth(key)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let headers = response.headers().clone();
    let status = response.status().as_u16();
    let body = response.bytes().await?.to_vec();
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    Ok(Answer {
        status,
        cache: text("x-sluice-cache").unwrap_or_default(),
        age: text("age").map(|age| age.parse().unwrap()),
        headers,
        body,
    })
}

async fn call(sidecar: &Sidecar, key: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    send(sidecar, key, body, headers).await.unwrap()
}

async fn call_to(sidecar: &Sidecar, route: &str, key: &str, body: &Value) -> Answer {
    send_to(sidecar, route, key, body, &[]).await.unwrap()
}

async fn cache_stats(sidecar: &Sidecar) -> Value {
    let answer: Value = reqwest::get(format!("{}/admin/cache", sidecar.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["stats"].clone()
}

/// Waits until the cache holds `n` entries: an entry is stored as its exchange ends, just after
/// the caller has the answer.
async fn stored(sidecar: &Sidecar, n: u64) {
    eventually(
        Duration::from_secs(3),
        "the answer was not stored",
        async || cache_stats(sidecar).await["entries"] == n,
    )
    .await;
}

/// Waits until `n` exchanges have ended: each is counted in `sluice_requests_total` just after
/// its spend is settled, which is after its caller has the answer.
async fn ended(sidecar: &Sidecar, n: f64) {
    eventually(
        Duration::from_secs(3),
        "the exchanges did not end",
        async || {
            let metrics = sidecar.metrics().await;
            let counted: f64 = (metrics.0.samples.iter())
                .filter(|sample| sample.metric == "sluice_requests_total")
                .map(|sample| match sample.value {
                    prometheus_parse::Value::Counter(v) => v,
                    _ => 0.0,
                })
                .sum();
            counted == n
        },
    )
    .await;
}

async fn purge(sidecar: &Sidecar, body: &str) -> Value {
    reqwest::Client::new()
        .post(format!("{}/admin/cache/purge", sidecar.admin))
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

const NO_LIMITS: &str = "{}";

#[tokio::test]
async fn two_tenants_with_identical_prompts_never_get_each_others_answers() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(&mock.url(), "{ ttl: 1h }", NO_LIMITS, "")).await;
    let body = prompt("same words", false);

    let a1 = call(&sidecar, KEY_A, &body, &[]).await;
    assert_eq!((a1.status, a1.cache.as_str()), (200, "miss"));
    let a2 = call(&sidecar, KEY_A, &body, &[]).await;
    assert_eq!((a2.status, a2.cache.as_str()), (200, "hit"));
    assert_eq!(
        a2.body, a1.body,
        "a hit is the stored answer, byte for byte"
    );
    assert!(a2.age.is_some_and(|age| age < 5));
    assert!(a1.age.is_none());
    assert_eq!(a2.headers["content-type"], a1.headers["content-type"]);
    // The request id is the hit's own, not the stored response's.
    assert_ne!(a2.headers["x-request-id"], a1.headers["x-request-id"]);

    let b1 = call(&sidecar, KEY_B, &body, &[]).await;
    assert_eq!(b1.cache, "miss", "tenant b must not see tenant a's entry");
    assert_ne!(
        b1.id(),
        a1.id(),
        "b's answer comes from its own upstream call"
    );
    let b2 = call(&sidecar, KEY_B, &body, &[]).await;
    assert_eq!((b2.cache.as_str(), b2.id()), ("hit", b1.id()));
    let a3 = call(&sidecar, KEY_A, &body, &[]).await;
    assert_eq!((a3.cache.as_str(), a3.id()), ("hit", a1.id()));
    assert_eq!(mock.request_count(), 2);

    let stats = cache_stats(&sidecar).await;
    assert_eq!(
        (stats["hits"].as_u64(), stats["misses"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(stats["entries"], 2);
    assert!((stats["hit_ratio"].as_f64().unwrap() - 0.6).abs() < 1e-9);

    // The same figures at /metrics, and a second scrape does not count them twice.
    for _ in 0..2 {
        let metrics = sidecar.metrics().await;
        let lookups = |result| metrics.value("sluice_cache_lookups_total", &[("result", result)]);
        assert_eq!((lookups("hit"), lookups("miss")), (Some(3.0), Some(2.0)));
        assert_eq!(metrics.value("sluice_cache_entries", &[]), Some(2.0));
        assert!(metrics.value("sluice_cache_bytes", &[]) > Some(0.0));
        let hits = |cache| metrics.value("sluice_requests_total", &[("cache", cache)]);
        assert_eq!(hits("hit"), Some(3.0));
    }
}

/// The body of a streamed response, as bytes received.
async fn stream_bytes(
    sidecar: &Sidecar,
    body: &Value,
    headers: &[(&str, &str)],
) -> (String, Vec<u8>) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY_A)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let cache = response.headers()["x-sluice-cache"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut out = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    (cache, out)
}

#[tokio::test]
async fn a_stream_is_replayed_byte_identically_and_never_to_a_plain_request() {
    let mock = mock().await;
    // Token limits make Sluice inject `include_usage` and cut the usage chunk out for a
    // caller who did not ask: the cache must keep what the caller saw.
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        "{ ttl: 1h }",
        "{ tokens_per_day: 1000000 }",
        "",
    ))
    .await;
    let body = prompt("stream me", true);
    let (first_status, first) = stream_bytes(&sidecar, &body, &[("x-mock-chunks", "8")]).await;
    assert_eq!(first_status, "miss");
    let text = String::from_utf8(first.clone()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"usage\""),
        "the injected usage chunk stays hidden: {text}"
    );
    let upstream_body: Value = serde_json::from_slice(&mock.requests()[0].body).unwrap();
    assert_eq!(upstream_body["stream_options"]["include_usage"], true);

    let (second_status, second) = stream_bytes(&sidecar, &body, &[]).await;
    assert_eq!(second_status, "hit");
    assert_eq!(second, first, "replayed byte for byte");
    assert_eq!(mock.request_count(), 1);

    // The same prompt without streaming: its own entry, never the stream.
    let plain = call(&sidecar, KEY_A, &prompt("stream me", false), &[]).await;
    assert_eq!(plain.cache, "miss");
    assert_eq!(plain.json()["object"], "chat.completion");
    assert_eq!(mock.request_count(), 2);
    let plain_again = call(&sidecar, KEY_A, &prompt("stream me", false), &[]).await;
    assert_eq!(
        (plain_again.cache.as_str(), plain_again.body),
        ("hit", plain.body)
    );
}

#[tokio::test]
async fn no_store_leaves_nothing_and_no_cache_refreshes() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(&mock.url(), "{}", NO_LIMITS, "")).await;
    let body = prompt("controls", false);
    let stored_nothing = call(&sidecar, KEY_A, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(
        (stored_nothing.status, stored_nothing.cache.as_str()),
        (200, "bypass")
    );
    assert_eq!(cache_stats(&sidecar).await["entries"], 0);
    let first = call(&sidecar, KEY_A, &body, &[]).await;
    assert_eq!(first.cache, "miss", "no-store left no entry behind");
    // no-store does not read either.
    let again = call(&sidecar, KEY_A, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(again.cache, "bypass");
    assert_ne!(again.id(), first.id());
    // no-cache goes upstream and replaces the entry.
    let refreshed = call(&sidecar, KEY_A, &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(refreshed.cache, "refresh");
    let hit = call(&sidecar, KEY_A, &body, &[]).await;
    assert_eq!((hit.cache.as_str(), hit.id()), ("hit", refreshed.id()));
    assert_eq!(
        mock.request_count(),
        4,
        "no-store twice, the miss, the refresh"
    );
    // Sampling without a seed is not cached under `when: deterministic` (the default).
    let sampled = json!({"model": "gpt-4o-mini", "temperature": 1, "messages": []});
    assert_eq!(call(&sidecar, KEY_A, &sampled, &[]).await.cache, "bypass");
    // A malformed control is refused in OpenAI's shape.
    let bad = call(&sidecar, KEY_A, &body, &[("cache-control", "max-age=soon")]).await;
    assert_eq!(bad.status, 400);
    let error = bad.json();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max-age"));
}

#[tokio::test]
async fn entries_expire_after_their_ttl_and_max_age_bounds_what_a_caller_accepts() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        "{ ttl: 1h, models: { gpt-4o-mini: 1s } }",
        NO_LIMITS,
        "",
    ))
    .await;
    let body = prompt("short-lived", false);
    assert_eq!(call(&sidecar, KEY_A, &body, &[]).await.cache, "miss");
    assert_eq!(call(&sidecar, KEY_A, &body, &[]).await.cache, "hit");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        call(&sidecar, KEY_A, &body, &[]).await.cache,
        "miss",
        "expired"
    );

    // Another model, the route's TTL (1h): an entry older than the caller's max-age is not
    // served to that caller.
    let other = json!({"model": "gpt-4o", "temperature": 0, "messages": []});
    assert_eq!(call(&sidecar, KEY_A, &other, &[]).await.cache, "miss");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh_only = call(&sidecar, KEY_A, &other, &[("cache-control", "max-age=0")]).await;
    assert_eq!(fresh_only.cache, "miss");
    let tolerant = call(&sidecar, KEY_A, &other, &[("cache-control", "max-age=600")]).await;
    assert_eq!(tolerant.cache, "hit");
    // The caller's TTL header shortens an entry's life.
    let asked = json!({"model": "gpt-4o", "seed": 1, "messages": []});
    let short = [("x-sluice-cache-ttl", "1s")];
    assert_eq!(call(&sidecar, KEY_A, &asked, &short).await.cache, "miss");
    assert!(mock
        .requests()
        .last()
        .unwrap()
        .headers
        .iter()
        .all(|(name, _)| name != "x-sluice-cache-ttl"));
    assert_eq!(call(&sidecar, KEY_A, &asked, &[]).await.cache, "hit");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(call(&sidecar, KEY_A, &asked, &[]).await.cache, "miss");
}

#[tokio::test]
async fn concurrent_identical_misses_make_one_upstream_call() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        "{ coalesce_wait: 10s }",
        NO_LIMITS,
        "",
    ))
    .await;
    let body = prompt("everyone at once", false);
    // The first request takes 400 ms upstream; the others arrive meanwhile.
    let calls = (0..12).map(|_| call(&sidecar, KEY_A, &body, &[("x-mock-first-byte-ms", "400")]));
    let answers = futures_util::future::join_all(calls).await;
    assert_eq!(mock.request_count(), 1, "one upstream call for all of them");
    let ids: std::collections::BTreeSet<String> = answers.iter().map(Answer::id).collect();
    assert_eq!(ids.len(), 1, "everyone got the same answer");
    let misses = answers.iter().filter(|a| a.cache == "miss").count();
    let hits = answers.iter().filter(|a| a.cache == "hit").count();
    assert_eq!((misses, hits), (1, 11));
    let stats = cache_stats(&sidecar).await;
    assert_eq!(stats["coalesced_waits"], 11);

    // A leader that fails lets the others go upstream themselves.
    let failing = prompt("the first one fails", false);
    let leader = call(
        &sidecar,
        KEY_A,
        &failing,
        &[("x-mock-first-byte-ms", "300"), ("x-mock-status", "500")],
    );
    let follower = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        call(&sidecar, KEY_A, &failing, &[]).await
    };
    let (leader, follower) = tokio::join!(leader, follower);
    assert_eq!((leader.status, follower.status), (500, 200));
    assert_eq!(follower.cache, "miss");
    assert_eq!(mock.request_count(), 3);
}

#[tokio::test]
async fn a_stream_reset_mid_way_leaves_no_entry_and_errors_are_never_cached() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(&mock.url(), "{}", NO_LIMITS, "")).await;
    let body = prompt("fragile", true);
    let broken = send(
        &sidecar,
        KEY_A,
        &body,
        &[("x-mock-fault", "reset-mid-stream")],
    )
    .await;
    assert!(broken.is_err(), "the caller sees an unfinished body");
    let (status, _) = stream_bytes(&sidecar, &body, &[]).await;
    assert_eq!(status, "miss", "the broken stream left nothing");
    assert_eq!(mock.request_count(), 2);

    for code in ["400", "404", "429", "500", "503"] {
        let body = prompt(&format!("error {code}"), false);
        let error = call(&sidecar, KEY_A, &body, &[("x-mock-status", code)]).await;
        assert_eq!(error.status.to_string(), code);
        let after = call(&sidecar, KEY_A, &body, &[]).await;
        assert_eq!(
            (after.status, after.cache.as_str()),
            (200, "miss"),
            "{code} was cached"
        );
    }
    stored(&sidecar, 6).await;
}

#[tokio::test]
async fn the_byte_bound_holds_under_a_flood_of_large_entries() {
    let mock = mock().await;
    let max_bytes = 256 * 1024;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        "{ max_entry: 128KiB }",
        NO_LIMITS,
        &format!("cache: {{ max_bytes: {max_bytes}, compress_above: 1MiB }}"),
    ))
    .await;
    let mut sizes = Vec::new();
    for i in 0..30 {
        let body = prompt(&format!("large answer {i}"), true);
        let (status, bytes) = stream_bytes(&sidecar, &body, &[("x-mock-chunks", "300")]).await;
        assert_eq!(status, "miss");
        sizes.push(bytes.len());
    }
    let total: usize = sizes.iter().sum();
    assert!(
        total > 3 * max_bytes,
        "the flood ({total} bytes) is larger than the bound"
    );
    let stats = cache_stats(&sidecar).await;
    assert!(
        stats["bytes"].as_u64().unwrap() <= max_bytes as u64,
        "{stats}"
    );
    assert!(stats["evictions"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["entries"].as_u64().unwrap() < 30, "{stats}");
    // The most recent answer is kept (LRU admits new entries).
    let (status, _) = stream_bytes(&sidecar, &prompt("large answer 29", true), &[]).await;
    assert_eq!(status, "hit");
}

#[tokio::test]
async fn compressed_entries_replay_exactly() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        "{}",
        NO_LIMITS,
        "cache: { compress_above: 1KiB }",
    ))
    .await;
    let body = prompt("compress me", true);
    let (_, first) = stream_bytes(&sidecar, &body, &[("x-mock-chunks", "100")]).await;
    assert!(first.len() > 4096);
    let (status, second) = stream_bytes(&sidecar, &body, &[]).await;
    assert_eq!((status.as_str(), second), ("hit", first.clone()));
    let stats = cache_stats(&sidecar).await;
    assert!(
        stats["bytes"].as_u64().unwrap() < first.len() as u64,
        "kept compressed: {stats}"
    );
}

fn remaining(answer: &Answer, kind: &str) -> u64 {
    answer.headers[format!("x-ratelimit-remaining-{kind}").as_str()]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn hits_count_as_requests_but_spend_no_tokens_unless_charged() {
    let mock = mock().await;
    let limits = "{ requests_per_day: 100, tokens_per_day: 100000 }";
    let sidecar = Sidecar::start(&policy(&mock.url(), "{}", limits, "")).await;
    let body = prompt("accounting", false);
    let miss = call(&sidecar, KEY_A, &body, &[]).await;
    assert_eq!(miss.cache, "miss");
    stored(&sidecar, 1).await;
    ended(&sidecar, 1.0).await;
    let hit1 = call(&sidecar, KEY_A, &body, &[]).await;
    ended(&sidecar, 2.0).await;
    let hit2 = call(&sidecar, KEY_A, &body, &[]).await;
    assert_eq!((hit1.cache.as_str(), hit2.cache.as_str()), ("hit", "hit"));
    // Each hit is a request…
    assert_eq!(remaining(&miss, "requests"), 99);
    assert_eq!(remaining(&hit1, "requests"), 98);
    assert_eq!(remaining(&hit2, "requests"), 97);
    // …whose token reservation is given back whole: the second hit sees what the first saw.
    assert_eq!(remaining(&hit2, "tokens"), remaining(&hit1, "tokens"));
    // A miss spends its tokens: after one, the count moved by its usage.
    ended(&sidecar, 3.0).await;
    let other = call(&sidecar, KEY_A, &prompt("another", false), &[]).await;
    assert_eq!(other.cache, "miss");
    ended(&sidecar, 4.0).await;
    let after = call(&sidecar, KEY_A, &body, &[]).await;
    assert!(remaining(&after, "tokens") < remaining(&hit2, "tokens"));
    assert_eq!(mock.request_count(), 2);

    // With `charge_hits`, a hit costs what the original response cost.
    let charged = Sidecar::start(&policy(&mock.url(), "{ charge_hits: true }", limits, "")).await;
    call(&charged, KEY_A, &body, &[]).await;
    stored(&charged, 1).await;
    ended(&charged, 1.0).await;
    let hit1 = call(&charged, KEY_A, &body, &[]).await;
    ended(&charged, 2.0).await;
    let hit2 = call(&charged, KEY_A, &body, &[]).await;
    assert_eq!(hit2.cache, "hit");
    let usage = hit1.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(
        remaining(&hit1, "tokens") - remaining(&hit2, "tokens"),
        usage
    );
}

#[tokio::test]
async fn purges_by_tenant_and_route_and_a_rules_change_purges_the_route() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(&mock.url(), "{ ttl: 1h }", NO_LIMITS, "")).await;
    let body = prompt("purge me", false);
    for key in [KEY_A, KEY_B] {
        assert_eq!(call(&sidecar, key, &body, &[]).await.cache, "miss");
    }
    let purged = purge(&sidecar, r#"{"tenant": "a"}"#).await;
    assert_eq!(purged["purged"], 1);
    assert_eq!(call(&sidecar, KEY_A, &body, &[]).await.cache, "miss");
    assert_eq!(call(&sidecar, KEY_B, &body, &[]).await.cache, "hit");
    assert_eq!(
        purge(&sidecar, r#"{"route": "elsewhere"}"#).await["purged"],
        0
    );
    assert_eq!(purge(&sidecar, "").await["purged"], 2);
    assert_eq!(call(&sidecar, KEY_B, &body, &[]).await.cache, "miss");
    let refused = reqwest::Client::new()
        .post(format!("{}/admin/cache/purge", sidecar.admin))
        .body(r#"{"tenants": "a"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);

    // A reload that keeps the rules keeps the entries; one that changes them purges the route.
    let hash = sidecar.policy_hash().await;
    let same_rules = policy(
        &mock.url(),
        "{ ttl: 1h }",
        NO_LIMITS,
        "# a comment changes the hash",
    );
    sidecar.write_policy(&same_rules);
    sidecar.wait_for_reload(&hash).await;
    assert_eq!(call(&sidecar, KEY_B, &body, &[]).await.cache, "hit");
    let hash = sidecar.policy_hash().await;
    sidecar.write_policy(&policy(&mock.url(), "{ ttl: 2h }", NO_LIMITS, ""));
    sidecar.wait_for_reload(&hash).await;
    assert_eq!(call(&sidecar, KEY_B, &body, &[]).await.cache, "miss");
    // Rules that only decide how entries are used (not what they hold) keep them.
    let hash = sidecar.policy_hash().await;
    let how_used = "{ ttl: 2h, charge_hits: true, coalesce_wait: 5s }";
    sidecar.write_policy(&policy(&mock.url(), how_used, NO_LIMITS, ""));
    sidecar.wait_for_reload(&hash).await;
    assert_eq!(call(&sidecar, KEY_B, &body, &[]).await.cache, "hit");
}

#[tokio::test]
async fn a_shared_tier_without_redis_is_a_load_time_error() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        policy(
            &mock.url(),
            "{ max_entry: 1GiB, colour: blue }",
            NO_LIMITS,
            "cache: { shared: { enabled: true } }",
        ),
    )
    .unwrap();
    let check = |file: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("check")
            .arg(file)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, errors) = check(&file);
    assert!(!ok);
    assert!(errors.contains("unknown field `colour`"), "{errors}");
    std::fs::write(
        &file,
        policy(
            &mock.url(),
            "{ max_entry: 1GiB }",
            NO_LIMITS,
            "cache: { shared: { enabled: true } }",
        ),
    )
    .unwrap();
    let (ok, errors) = check(&file);
    assert!(!ok);
    assert!(
        errors.contains("cache.shared.enabled: the shared tier lives in Redis"),
        "{errors}"
    );
    assert!(
        errors.contains("routes[0].filters[1].cache: `max_entry`"),
        "{errors}"
    );
}

#[tokio::test]
async fn the_shared_tier_serves_other_replicas_and_redis_down_leaves_the_local_cache() {
    let mut redis = RedisServer::start();
    let mock = mock().await;
    let state = format!(
        "state: {{ backend: redis, url: \"{}\", timeout: 200ms }}\ncache: {{ shared: {{ enabled: true, read_timeout: 100ms }} }}",
        redis.url()
    );
    let text = policy(&mock.url(), "{ ttl: 1h }", NO_LIMITS, &state);
    let a = Sidecar::start(&text).await;
    let b = Sidecar::start(&text).await;
    let body = prompt("across replicas", false);
    let first = call(&a, KEY_A, &body, &[]).await;
    assert_eq!(first.cache, "miss");
    // Written in the background: wait until it is in Redis.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cache_stats(&a).await["shared_writes"] != 1 {
        assert!(std::time::Instant::now() < deadline, "no shared write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let on_b = call(&b, KEY_A, &body, &[]).await;
    assert_eq!(
        (on_b.cache.as_str(), on_b.body.clone()),
        ("hit", first.body.clone())
    );
    assert_eq!(cache_stats(&b).await["shared_hits"], 1);
    // Tenant b on replica b: still its own entry.
    assert_eq!(call(&b, KEY_B, &body, &[]).await.cache, "miss");
    assert_eq!(mock.request_count(), 2);

    redis.stop();
    // Both replicas go on: local hits are served, misses go upstream and are kept locally.
    let started = std::time::Instant::now();
    assert_eq!(call(&a, KEY_A, &body, &[]).await.cache, "hit");
    assert_eq!(call(&b, KEY_A, &body, &[]).await.cache, "hit");
    let fresh = prompt("while redis is down", false);
    let miss = call(&b, KEY_A, &fresh, &[]).await;
    assert_eq!((miss.status, miss.cache.as_str()), (200, "miss"));
    assert_eq!(call(&b, KEY_A, &fresh, &[]).await.cache, "hit");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no long waits on a dead Redis"
    );
    assert!(cache_stats(&b).await["shared_errors"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn a_shared_scope_serves_every_tenant_of_the_route() {
    let mock = mock().await;
    let routes = [("openai", "{ scope: shared }"), ("private", "{}")];
    let sidecar = Sidecar::start(&policy_routes(&mock.url(), &routes, NO_LIMITS, "")).await;
    let body = prompt("one answer for everyone", false);

    let a = call(&sidecar, KEY_A, &body, &[]).await;
    assert_eq!((a.status, a.cache.as_str()), (200, "miss"));
    let b = call(&sidecar, KEY_B, &body, &[]).await;
    assert_eq!(
        (b.status, b.cache.as_str()),
        (200, "hit"),
        "scope: shared serves b what a stored"
    );
    assert_eq!(b.body, a.body);
    assert_eq!(mock.request_count(), 1);

    // The route without `scope: shared`, same process, same store: each tenant its own.
    let a_private = call_to(&sidecar, "private", KEY_A, &body).await;
    assert_eq!(a_private.cache, "miss", "routes never share entries");
    let b_private = call_to(&sidecar, "private", KEY_B, &body).await;
    assert_eq!(
        b_private.cache, "miss",
        "tenant b must not see tenant a's entry"
    );
    assert_ne!(b_private.id(), a_private.id());
    let a_again = call_to(&sidecar, "private", KEY_A, &body).await;
    assert_eq!(
        (a_again.cache.as_str(), a_again.id()),
        ("hit", a_private.id())
    );
    assert_eq!(mock.request_count(), 3);
}

#[tokio::test]
async fn a_route_with_when_always_caches_requests_without_temperature() {
    let mock = mock().await;
    let routes = [("openai", "{ when: always }"), ("private", "{}")];
    let sidecar = Sidecar::start(&policy_routes(&mock.url(), &routes, NO_LIMITS, "")).await;
    let unset = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "no temperature"}]});
    let sampled = json!({"model": "gpt-4o-mini", "temperature": 0.9, "messages": []});
    for body in [&unset, &sampled] {
        let first = call(&sidecar, KEY_A, body, &[]).await;
        assert_eq!((first.status, first.cache.as_str()), (200, "miss"));
        let again = call(&sidecar, KEY_A, body, &[]).await;
        assert_eq!(
            (again.cache.as_str(), again.id()),
            ("hit", first.id()),
            "when: always caches {body}"
        );
    }
    // The same requests on a route with the default `when: deterministic`: not cached.
    for body in [&unset, &sampled] {
        for _ in 0..2 {
            assert_eq!(
                call_to(&sidecar, "private", KEY_A, body).await.cache,
                "bypass"
            );
        }
    }
    assert_eq!(mock.request_count(), 6);
}

#[tokio::test]
async fn a_follower_waits_no_longer_than_coalesce_wait() {
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        "{ coalesce_wait: 200ms }",
        NO_LIMITS,
        "",
    ))
    .await;
    let body = prompt("a slow leader", false);
    // The leader's answer takes 3 s upstream. The follower asks once the leader is upstream
    // (so it is surely the follower), waits its 200 ms, then goes upstream itself (the mock
    // answers it at once). Each is timed from its own start.
    let leader = async {
        let started = std::time::Instant::now();
        let answer = call(&sidecar, KEY_A, &body, &[("x-mock-first-byte-ms", "3000")]).await;
        (answer, started.elapsed())
    };
    let follower = async {
        eventually(
            Duration::from_secs(5),
            "the leader never reached the upstream",
            async || mock.request_count() == 1,
        )
        .await;
        let started = std::time::Instant::now();
        let answer = call(&sidecar, KEY_A, &body, &[]).await;
        (answer, started.elapsed())
    };
    let ((leader, leader_took), (follower, follower_took)) = tokio::join!(leader, follower);
    assert_eq!((leader.status, leader.cache.as_str()), (200, "miss"));
    assert_eq!((follower.status, follower.cache.as_str()), (200, "miss"));
    assert_ne!(
        follower.id(),
        leader.id(),
        "the follower's own upstream answer"
    );
    assert!(
        leader_took >= Duration::from_millis(3000),
        "{leader_took:?}"
    );
    assert!(
        follower_took >= Duration::from_millis(200),
        "the follower waited for the leader first: {follower_took:?}"
    );
    // Waiting for the leader's answer instead would take most of its 3 s.
    assert!(
        follower_took < Duration::from_millis(1500),
        "the follower's wait is bounded: {follower_took:?}"
    );
    assert_eq!(mock.request_count(), 2);
    let stats = cache_stats(&sidecar).await;
    assert_eq!(stats["coalesced_timeouts"], 1, "{stats}");
    assert_eq!(stats["coalesced_waits"], 0, "{stats}");
}

#[tokio::test]
async fn hits_spend_no_budget_unless_charged() {
    let mock = mock().await;
    // Output tokens only, $40 each; every answer here is one output token (x-mock-chunks: 1),
    // so every charged response is $40 against a $100 budget: 50% and 75% alert at the second,
    // 90% and 95% at the third, and the fourth is refused.
    let prices = "prices:\n  gpt-4o-mini: { input: 0, output: 40000000 }";
    let limits = "{ budget_usd_per_month: 100 }";
    let one_token = [("x-mock-chunks", "1")];
    let alerts = |metrics: &Metrics, percent: &str| {
        let labels = [("tier", "free"), ("threshold", percent)];
        metrics
            .value("sluice_budget_alerts_total", &labels)
            .unwrap_or(0.0)
    };
    // Spend is settled as each exchange ends, just after its caller has the answer.
    async fn wait_for_alert(sidecar: &Sidecar, percent: &str) {
        let labels = [("tier", "free"), ("threshold", percent)];
        let what = format!("the {percent}% budget alert never fired");
        eventually(Duration::from_secs(3), &what, async || {
            let metrics = sidecar.metrics().await;
            metrics.value("sluice_budget_alerts_total", &labels) == Some(1.0)
        })
        .await;
    }

    let free = Sidecar::start(&policy(&mock.url(), "{}", limits, prices)).await;
    let body = prompt("what does a hit cost", false);
    let miss = call(&free, KEY_A, &body, &one_token).await;
    assert_eq!((miss.status, miss.cache.as_str()), (200, "miss"));
    assert_eq!(miss.json()["usage"]["completion_tokens"], 1);
    stored(&free, 1).await;
    for _ in 0..4 {
        let hit = call(&free, KEY_A, &body, &one_token).await;
        assert_eq!((hit.status, hit.cache.as_str()), (200, "hit"));
    }
    // Once the miss and the four hits have ended, any spend of the hits' would show.
    ended(&free, 5.0).await;
    // Four hits after a $40 miss: still $40 spent, under every alert.
    let metrics = free.metrics().await;
    assert_eq!(alerts(&metrics, "50"), 0.0, "a hit spent budget");
    // A second miss does spend: $80, past 50% and 75%.
    let other = call(&free, KEY_A, &prompt("another question", false), &one_token).await;
    assert_eq!(other.cache, "miss");
    wait_for_alert(&free, "75").await;
    let metrics = free.metrics().await;
    assert_eq!(alerts(&metrics, "50"), 1.0);
    assert_eq!(alerts(&metrics, "90"), 0.0);
    assert_eq!(mock.request_count(), 2);

    // With `charge_hits`, each hit costs what the answer it replays cost.
    let charged = Sidecar::start(&policy(
        &mock.url(),
        "{ charge_hits: true }",
        limits,
        prices,
    ))
    .await;
    assert_eq!(call(&charged, KEY_A, &body, &one_token).await.cache, "miss");
    stored(&charged, 1).await;
    assert_eq!(call(&charged, KEY_A, &body, &one_token).await.cache, "hit");
    wait_for_alert(&charged, "75").await;
    assert_eq!(call(&charged, KEY_A, &body, &one_token).await.cache, "hit");
    wait_for_alert(&charged, "95").await;
    let refused = call(&charged, KEY_A, &body, &one_token).await;
    assert_eq!(refused.status, 429, "$120 of $100 spent, by hits");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("`budget_usd_per_month` limit of 100"),
        "{message}"
    );
    assert_eq!(mock.request_count(), 3);
}

#[tokio::test]
async fn a_purge_clears_the_shared_tier_but_not_other_replicas_local_copies() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let state = format!(
        "state: {{ backend: redis, url: \"{}\", timeout: 200ms }}\ncache: {{ shared: {{ enabled: true, read_timeout: 100ms }} }}",
        redis.url()
    );
    let text = policy(&mock.url(), "{ ttl: 1h }", NO_LIMITS, &state);
    let a = Sidecar::start(&text).await;
    let b = Sidecar::start(&text).await;
    let shared_writes = |n: u64| {
        let a = &a;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while cache_stats(a).await["shared_writes"] != n {
                assert!(std::time::Instant::now() < deadline, "no shared write {n}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let body = prompt("purged everywhere?", false);
    assert_eq!(call(&a, KEY_A, &body, &[]).await.cache, "miss");
    shared_writes(1).await;
    assert_eq!(call(&a, KEY_B, &body, &[]).await.cache, "miss");
    shared_writes(2).await;
    // Replica b takes tenant a's answer from the shared tier and keeps a local copy.
    assert_eq!(call(&b, KEY_A, &body, &[]).await.cache, "hit");
    assert_eq!(cache_stats(&b).await["shared_hits"], 1);

    let purged = purge(&a, r#"{"tenant": "a"}"#).await;
    assert_eq!(purged["purged"], 1, "replica a's local entry: {purged}");
    assert_eq!(
        purged["shared"]["purged"], 1,
        "tenant a's record in Redis, not b's: {purged}"
    );
    // A replica that never saw the entry misses: it is gone from the shared tier…
    let fresh = Sidecar::start(&text).await;
    assert_eq!(call(&fresh, KEY_A, &body, &[]).await.cache, "miss");
    // …tenant b's record is untouched…
    assert_eq!(call(&fresh, KEY_B, &body, &[]).await.cache, "hit");
    // …and a purge does not reach other replicas' local copies (documented): they last until
    // their TTL, or a purge sent to that replica.
    assert_eq!(call(&b, KEY_A, &body, &[]).await.cache, "hit");
    assert_eq!(purge(&b, r#"{"tenant": "a"}"#).await["purged"], 1);
}
