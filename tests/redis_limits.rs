//! Limits shared through a real `redis-server`: exact across replicas, and the Redis-down
//! behaviour the policy chooses.

mod common;

use std::time::Duration;

use common::*;
use sluice_filters::auth::keys::KeyHash;

const KEY: &str = "sk-sluice-redis-test";

fn policy(mock_url: &str, redis_url: &str, on_error: &str, limits: &str) -> String {
    format!(
        r#"
state: {{ backend: redis, url: "{redis_url}", on_error: {on_error}, timeout: 200ms }}
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}", keys: ["sk-upstream"] }}
routes:
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai }}
tiers:
  free: {{ limits: {limits} }}
tenants:
  - {{ name: a, tier: free, keys: [{{ hash: "{hash}" }}] }}
"#,
        hash = KeyHash::of(KEY).to_text(),
    )
}

async fn call(client: &reqwest::Client, sidecar: &Sidecar) -> u16 {
    client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY)
        .json(&chat_body("shared", false))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn three_replicas_admit_exactly_the_quota_together() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let text = policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ requests_per_day: 7 }",
    );
    let replicas = [
        Sidecar::start(&text).await,
        Sidecar::start(&text).await,
        Sidecar::start(&text).await,
    ];
    let client = reqwest::Client::new();
    let calls = (0..60).map(|i| call(&client, &replicas[i % 3]));
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        53,
        "{statuses:?}"
    );
    assert_eq!(mock.request_count(), 7);
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", replicas[0].admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["limits_store"], "redis");
}

/// Runs one command straight on Redis; its integer answer (an integer reply, or a bulk string
/// holding one), `None` for nil.
fn redis_int(port: u16, args: &[&str]) -> Option<u64> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let mut command = format!("*{}\r\n", args.len());
    for arg in args {
        command += &format!("${}\r\n{arg}\r\n", arg.len());
    }
    stream.write_all(command.as_bytes()).ok()?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header).ok()?;
    if let Some(integer) = header.strip_prefix(':') {
        return integer.trim().parse().ok();
    }
    if header.starts_with("$-1") {
        return None;
    }
    let mut value = String::new();
    reader.read_line(&mut value).ok()?;
    value.trim().parse().ok()
}

/// `CONFIG SET name value` straight to Redis, which must answer `+OK`.
fn redis_config_set(port: u16, name: &str, value: &str) {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let command = format!(
        "*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n${}\r\n{name}\r\n${}\r\n{value}\r\n",
        name.len(),
        value.len()
    );
    stream.write_all(command.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    assert_eq!(reply.trim_end(), "+OK", "CONFIG SET {name} {value}");
}

/// Reads an integer key straight from Redis.
fn redis_get(port: u16, key: &str) -> Option<u64> {
    redis_int(port, &["GET", key])
}

/// Today's tokens-per-day key of tenant `a`.
fn tokens_today_key() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("sluice:{{a}}:t2:{}", now - now % 86_400)
}

/// Every command Redis runs, as `MONITOR` shows it (a script's own commands are marked `lua`).
struct RedisMonitor {
    stream: std::net::TcpStream,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RedisMonitor {
    fn start(port: u16) -> RedisMonitor {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(b"MONITOR\r\n").unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        assert_eq!(ok, "+OK\r\n");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                seen.lock().unwrap().push(line);
            }
        });
        RedisMonitor { stream, lines }
    }

    /// The commands clients sent themselves (not those run inside a script).
    fn client_commands(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| !line.contains(" lua] "))
            .cloned()
            .collect()
    }
}

impl Drop for RedisMonitor {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A TCP link to Redis that a test cuts and restores: Redis stays up with its data, as in a
/// network blip (stopping `redis-server` would lose every counter, so a test could not tell
/// a replayed settlement from an empty Redis).
struct RedisLink {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pipes: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl RedisLink {
    async fn start(redis_port: u16) -> RedisLink {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let pipes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (open_, pipes_) = (open.clone(), pipes.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                // While cut, a connection is accepted and closed at once.
                if !open_.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let pipe = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                pipes_.lock().unwrap().push(pipe);
            }
        });
        RedisLink {
            port,
            open,
            pipes,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Drops every open connection and refuses new ones.
    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for RedisLink {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn tokens_settle_across_replicas() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let text = policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ tokens_per_day: 100000 }",
    );
    let (a, b) = (Sidecar::start(&text).await, Sidecar::start(&text).await);
    let body = serde_json::json!({"model": "m", "max_tokens": 100, "messages": []});
    let send = |sidecar: &Sidecar| {
        reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .bearer_auth(KEY)
            .json(&body)
            .send()
    };
    let first = send(&a).await.unwrap();
    let remaining_after_reservation: u64 = first.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let reserved = 100_000 - remaining_after_reservation;
    first.bytes().await.unwrap();
    let used = (serde_json::to_vec(&body).unwrap().len() as u64 / 4).max(1) + 5;
    assert_ne!(used, reserved);
    // The settlement runs after the response: wait for it in Redis itself.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = format!("sluice:{{a}}:t2:{}", now - now % 86_400);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while redis_get(redis.port, &key) != Some(used) {
        assert!(
            std::time::Instant::now() < deadline,
            "not settled: {:?} != {used}",
            redis_get(redis.port, &key)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The other replica counts from the settled figure.
    let second = send(&b).await.unwrap();
    let remaining: u64 = second.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 100_000 - used - reserved);
}

#[tokio::test]
async fn redis_down_follows_on_error_and_recovers() {
    let mut redis = RedisServer::start();
    let mock = mock().await;
    let closed = Sidecar::start(&policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ requests_per_day: 1000 }",
    ))
    .await;
    let open = Sidecar::start(&policy(
        &mock.url(),
        &redis.url(),
        "fail_open",
        "{ requests_per_day: 1000 }",
    ))
    .await;
    let client = reqwest::Client::new();
    assert_eq!(call(&client, &closed).await, 200);
    assert_eq!(call(&client, &open).await, 200);

    redis.stop();
    assert_eq!(call(&client, &closed).await, 503, "fail_closed refuses");
    assert_eq!(
        call(&client, &open).await,
        200,
        "fail_open admits uncounted"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reqwest::get(format!("{}/readyz", closed.admin))
        .await
        .unwrap()
        .status()
        != 503
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a fail_closed replica without Redis is not ready"
        );
        assert_eq!(call(&client, &closed).await, 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Health is the result of the latest call: a settlement that was already on its way may
    // still land; the next failing call marks it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ready: serde_json::Value = reqwest::get(format!("{}/readyz", open.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ready["limits_store"]
            .as_str()
            .unwrap()
            .contains("fail_open")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ready}");
        assert_eq!(call(&client, &open).await, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let up = [("backend", "redis")];
    for (sidecar, on_error) in [(&closed, "fail_closed"), (&open, "fail_open")] {
        let metrics = sidecar.metrics().await;
        assert_eq!(metrics.value("sluice_limits_store_up", &up), Some(0.0));
        assert!(metrics.value("sluice_limits_store_errors_total", &[]) >= Some(1.0));
        let unavailable = [("on_error", on_error)];
        assert!(metrics.value("sluice_limits_unavailable_total", &unavailable) >= Some(1.0));
    }

    redis.restart();
    // Recovers by itself: failed connections are retried after a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(&client, &closed).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "did not recover after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = reqwest::get(format!("{}/readyz", closed.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = closed.metrics().await;
    assert_eq!(metrics.value("sluice_limits_store_up", &up), Some(1.0));
}

#[tokio::test]
async fn concurrency_is_shared_across_replicas() {
    use futures_util::StreamExt;
    let redis = RedisServer::start();
    let mock = mock().await;
    let text = policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ concurrent: 1 }",
    );
    let (a, b) = (Sidecar::start(&text).await, Sidecar::start(&text).await);
    let client = reqwest::Client::new();
    let open = client
        .post(format!("{}/openai/v1/chat/completions", a.proxy))
        .bearer_auth(KEY)
        .header("x-mock-chunk-ms", "100")
        .header("x-mock-chunks", "4")
        .json(&chat_body("holding", true))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let mut stream = open.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert_eq!(
        call(&client, &b).await,
        429,
        "the other replica sees the open stream"
    );
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }
    // The settlement gives the place back shortly after the stream ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while call(&client, &b).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn readyz_recovers_without_traffic() {
    let mut redis = RedisServer::start();
    let mock = mock().await;
    let closed = Sidecar::start(&policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ requests_per_day: 1000 }",
    ))
    .await;
    let client = reqwest::Client::new();
    assert_eq!(call(&client, &closed).await, 200);
    redis.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reqwest::get(format!("{}/readyz", closed.admin))
        .await
        .unwrap()
        .status()
        != 503
    {
        assert!(std::time::Instant::now() < deadline, "never unready");
        assert_eq!(call(&client, &closed).await, 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proxied = mock.request_count();

    // Out of /readyz, the replica gets no traffic: it must find Redis back by itself.
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reqwest::get(format!("{}/readyz", closed.admin))
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed 503 after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = closed.metrics().await;
    assert_eq!(
        metrics.value("sluice_limits_store_up", &[("backend", "redis")]),
        Some(1.0)
    );
    assert_eq!(mock.request_count(), proxied, "no proxied call was needed");
    assert_eq!(call(&client, &closed).await, 200);
}

#[tokio::test]
async fn a_lost_settlement_is_replayed() {
    let redis = RedisServer::start();
    let link = RedisLink::start(redis.port).await;
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        &link.url(),
        "fail_open",
        "{ concurrent: 1, tokens_per_day: 100000 }",
    ))
    .await;
    let client = reqwest::Client::new();
    let mut body = chat_body("held through a blip", true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let stream = || {
        client
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .bearer_auth(KEY)
            .header("x-mock-chunk-ms", "100")
            .header("x-mock-chunks", "4")
            .json(&body)
            .send()
    };
    let (inflight, tokens_key) = ("sluice:{a}:inflight", tokens_today_key());
    let open = stream().await.unwrap();
    assert_eq!(open.status(), 200);
    let reserved = 100_000 - remaining_tokens(&open).await;
    assert_eq!(redis_int(redis.port, &["ZCARD", inflight]), Some(1));

    // Redis goes out of reach while the stream runs; the stream ends, its settlement fails.
    link.cut();
    let text = open.text().await.unwrap();
    let used = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .find_map(|event| event["usage"]["total_tokens"].as_u64())
        .expect("a usage chunk");
    assert_ne!(used, reserved);
    let admin = sidecar.admin.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ready: serde_json::Value = reqwest::get(format!("{admin}/readyz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ready["limits_store"]
            .as_str()
            .unwrap()
            .contains("fail_open")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the settlement did not fail: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        redis_int(redis.port, &["ZCARD", inflight]),
        Some(1),
        "place held"
    );
    assert_eq!(
        redis_get(redis.port, &tokens_key),
        Some(reserved),
        "reservation stands"
    );
    // /readyz turns on the failed write, just before the settlement is put in the backlog.
    eventually(
        Duration::from_secs(5),
        "the kept settlement is not visible as pending",
        async || {
            let metrics = sidecar.metrics().await;
            metrics.value("sluice_limits_settlements_pending", &[]) == Some(1.0)
        },
    )
    .await;
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metrics.value("sluice_limits_settlements_dropped_total", &[]),
        Some(0.0)
    );

    // Redis is reachable again: with no request, the kept settlement lands.
    link.restore();
    eventually(
        Duration::from_secs(5),
        "the settlement was not replayed",
        async || {
            redis_int(redis.port, &["ZCARD", inflight]) == Some(0)
                && redis_get(redis.port, &tokens_key) == Some(used)
        },
    )
    .await;
    assert_eq!(
        sidecar
            .metrics()
            .await
            .value("sluice_limits_settlements_pending", &[]),
        Some(0.0)
    );
    // The place is free and the tokens counted from the settled figure.
    let next = stream().await.unwrap();
    assert_eq!(next.status(), 200);
    assert_eq!(remaining_tokens(&next).await, 100_000 - used - reserved);
    next.bytes().await.unwrap();
}

/// Seconds since the epoch.
fn epoch_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits until the next minute starts if fewer than `needed` seconds of this one are left, so
/// a test's per-minute counts land in one window.
async fn within_one_minute(needed: u64) {
    let left = 60 - epoch_secs() % 60;
    if left < needed {
        tokio::time::sleep(Duration::from_secs(left) + Duration::from_millis(50)).await;
    }
}

/// Waits until tenant `a` has no request in flight in Redis: every settlement has landed
/// (each admitted request is a member of the set until its settlement removes it).
async fn settled(port: u16) {
    eventually(
        Duration::from_secs(5),
        "a settlement did not land",
        async || redis_int(port, &["ZCARD", "sluice:{a}:inflight"]) == Some(0),
    )
    .await;
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers()[name].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn rate_and_burst_hold_across_replicas() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let text = policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ rps: 0.1, burst: 2 }",
    );
    let replicas = [Sidecar::start(&text).await, Sidecar::start(&text).await];
    let client = reqwest::Client::new();
    let send = |i: usize| {
        client
            .post(format!(
                "{}/openai/v1/chat/completions",
                replicas[i % 2].proxy
            ))
            .bearer_auth(KEY)
            .json(&chat_body("rate", false))
            .send()
    };
    let responses = futures_util::future::join_all((0..8).map(send)).await;
    let mut admitted = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            200 => {
                admitted += 1;
                assert_eq!(header(&response, "x-ratelimit-limit-requests"), "2");
            }
            429 => {
                // One request every 10 s: the next place comes within 10 s.
                let retry: u64 = header(&response, "retry-after").parse().unwrap();
                assert!((1..=10).contains(&retry), "{retry}");
                let error: serde_json::Value = response.json().await.unwrap();
                let message = error["error"]["message"].as_str().unwrap();
                assert!(message.contains("`rps` limit of 0.1"), "{message}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 2, "the burst, across both replicas");
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test]
async fn tokens_per_minute_are_reserved_settled_and_refused_on_redis() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let text = policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ tokens_per_minute: 1000 }",
    );
    let (a, b) = (Sidecar::start(&text).await, Sidecar::start(&text).await);
    // A slow stream holds its reservation while it is open.
    let send = |sidecar: &Sidecar, max_tokens: u64, stream: bool| {
        reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .bearer_auth(KEY)
            .header("x-mock-chunk-ms", "100")
            .json(&serde_json::json!({"model": "m", "max_tokens": max_tokens, "stream": stream, "messages": []}))
            .send()
    };
    within_one_minute(20).await;
    // More than the minute allows: refused, nothing reserved, the provider never asked.
    let refused = send(&a, 1200, false).await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let error: serde_json::Value = refused.json().await.unwrap();
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`tokens_per_minute` limit of 1000"));
    assert_eq!(mock.request_count(), 0);

    let first = send(&a, 400, false).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "1000");
    let reserved = 1000 - remaining_tokens(&first).await;
    assert!(reserved >= 400, "{reserved}");
    first.bytes().await.unwrap();
    settled(redis.port).await;
    let now = epoch_secs();
    let used = redis_get(redis.port, &format!("sluice:{{a}}:t1:{}", now - now % 60)).unwrap();
    assert!(
        used < reserved,
        "the reservation was replaced by the usage: {used}"
    );
    // The other replica counts from the settled figure.
    let second = send(&b, 400, false).await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(remaining_tokens(&second).await, 1000 - used - reserved);
    second.bytes().await.unwrap();
    settled(redis.port).await;
    // While a stream holds its reservation, 600 more do not fit on either replica.
    let open = send(&a, 400, true).await.unwrap();
    assert_eq!(open.status(), 200);
    let left = remaining_tokens(&open).await;
    assert!(left < 600, "{left}");
    for sidecar in [&a, &b] {
        assert_eq!(send(sidecar, 600, false).await.unwrap().status(), 429);
    }
    open.bytes().await.unwrap();
    settled(redis.port).await;
    // Settled: it fits again.
    assert_eq!(send(&b, 600, false).await.unwrap().status(), 200);
    assert_eq!(mock.request_count(), 4);
}

#[tokio::test]
async fn budgets_on_redis_alert_once_downgrade_then_stop() {
    let redis = RedisServer::start();
    let mock = mock().await;
    // One dollar a token makes every request cost tens of dollars against a $100 budget.
    let text = policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ budget_usd_per_month: 100, downgrade: { above_percent: 50, models: { gpt-4o: gpt-4o-mini } } }",
    )
    .replace(
        "tiers:",
        r#"prices:
  gpt-4o: { input: 1000000, output: 1000000 }
  "gpt-4.*": { input: 1000000, output: 1000000 }
  gpt-4o-mini: { input: 0.15, output: 0.6 }
tiers:"#,
    );
    let replicas = [Sidecar::start(&text).await, Sidecar::start(&text).await];
    let monitor = RedisMonitor::start(redis.port);
    let mut turn = 0;
    let mut ask = |model: &'static str| {
        turn += 1;
        reqwest::Client::new()
            .post(format!("{}/openai/v1/chat/completions", replicas[turn % 2].proxy))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "spend some money please, it is only a test"}]}))
            .send()
    };
    // Until half the budget is spent (by either replica), gpt-4o is sent as asked.
    let mut sent_as_asked = 0;
    loop {
        let response = ask("gpt-4o").await.unwrap();
        assert_eq!(response.status(), 200);
        let downgraded = response.headers().get("x-sluice-model-downgraded").cloned();
        response.bytes().await.unwrap();
        settled(redis.port).await;
        if let Some(header) = downgraded {
            assert_eq!(header, "gpt-4o -> gpt-4o-mini");
            break;
        }
        sent_as_asked += 1;
        assert!(sent_as_asked < 10, "never downgraded");
    }
    assert!(sent_as_asked >= 1);
    let sent: serde_json::Value =
        serde_json::from_slice(&mock.requests().last().unwrap().body).unwrap();
    assert_eq!(
        sent["model"], "gpt-4o-mini",
        "the provider receives the cheaper model"
    );
    // The downgrade rule used the spend the admission script read: no command of its own.
    let commands = monitor.client_commands();
    let scripts = commands
        .iter()
        .filter(|c| c.contains("] \"EVALSHA\""))
        .count();
    assert!(scripts >= 2 * sent_as_asked, "{commands:#?}");
    assert!(
        !commands.iter().any(|c| c.contains("] \"GET\"")),
        "{commands:#?}"
    );
    // Models without a downgrade keep spending until the hard stop.
    let mut refused = None;
    for _ in 0..10 {
        let response = ask("gpt-4.1").await.unwrap();
        if response.status() == 429 {
            refused = Some(response.json::<serde_json::Value>().await.unwrap());
            break;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        settled(redis.port).await;
    }
    let refused = refused.expect("the budget never stopped requests");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`budget_usd_per_month` limit of 100"),
        "{refused}"
    );
    let requests = mock.request_count();
    // Stopped on both replicas, and the stop charged nothing.
    assert_eq!(ask("gpt-4.1").await.unwrap().status(), 429);
    assert_eq!(ask("gpt-4.1").await.unwrap().status(), 429);
    assert_eq!(mock.request_count(), requests);
    // Each threshold fired once in all, whichever replica's settlement crossed it.
    each_budget_alert_logged_once(|| replicas.iter().map(Sidecar::logs).collect()).await;
    let mut counted = [0.0; 4];
    for replica in &replicas {
        let metrics = replica.metrics().await;
        for (i, percent) in ["50", "75", "90", "95"].into_iter().enumerate() {
            let labels = [("tier", "free"), ("threshold", percent), ("tenant", "")];
            counted[i] += metrics
                .value("sluice_budget_alerts_total", &labels)
                .unwrap_or(0.0);
        }
    }
    assert_eq!(
        counted, [1.0; 4],
        "each alert counted once over both replicas"
    );
}

#[tokio::test]
async fn a_refusal_charges_nothing_on_redis() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let text = policy(
        &mock.url(),
        &redis.url(),
        "fail_closed",
        "{ requests_per_minute: 3, tokens_per_day: 1000, max_output_tokens: 600 }",
    );
    let sidecar = Sidecar::start(&text).await;
    let client = reqwest::Client::new();
    let send_as = |max_tokens: u64, stream: bool| {
        client
            .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
            .bearer_auth(KEY)
            .header("x-mock-chunk-ms", "100")
            .json(&serde_json::json!({"model": "m", "max_tokens": max_tokens, "stream": stream, "messages": []}))
            .send()
    };
    let send = |max_tokens: u64| send_as(max_tokens, false);
    within_one_minute(20).await;
    let now = epoch_secs();
    let requests_key = format!("sluice:{{a}}:r1:{}", now - now % 60);
    let tokens_key = tokens_today_key();
    let inflight = "sluice:{a}:inflight";
    // Over the per-request cap: refused before any counter is asked.
    assert_eq!(send(700).await.unwrap().status(), 400);
    // Over the day's tokens while a stream holds 500: refused by Redis, with the request
    // count untouched.
    let greedy = send_as(500, true).await.unwrap();
    assert_eq!(greedy.status(), 200);
    let greedy_reserved = 1000 - remaining_tokens(&greedy).await;
    let too_much = send(600).await.unwrap();
    assert_eq!(too_much.status(), 429, "{greedy_reserved} + 600 > 1000");
    assert_eq!(redis_get(redis.port, &requests_key), Some(1));
    greedy.bytes().await.unwrap();
    settled(redis.port).await;
    let mut remaining = Vec::new();
    for _ in 0..2 {
        let response = send(10).await.unwrap();
        assert_eq!(response.status(), 200);
        remaining.push(header(&response, "x-ratelimit-remaining-requests"));
        response.bytes().await.unwrap();
    }
    assert_eq!(remaining, ["1", "0"]);
    settled(redis.port).await;
    let tokens = redis_get(redis.port, &tokens_key);
    // Over the minute's requests: refused, and nothing moved.
    for _ in 0..3 {
        let refused = send(10).await.unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(header(&refused, "content-type"), "application/json");
    }
    assert_eq!(redis_get(redis.port, &requests_key), Some(3));
    assert_eq!(redis_get(redis.port, &tokens_key), tokens);
    assert_eq!(redis_int(redis.port, &["ZCARD", inflight]), Some(0));
    assert_eq!(mock.request_count(), 3);
    let metrics = sidecar.metrics().await;
    let rejections = |limit| {
        metrics.value(
            "sluice_limit_rejections_total",
            &[("limit", limit), ("scope", "free")],
        )
    };
    assert_eq!(rejections("max_output_tokens"), Some(1.0));
    assert_eq!(rejections("tokens_per_day"), Some(1.0));
    assert_eq!(rejections("requests_per_minute"), Some(3.0));
}

#[tokio::test]
async fn a_settlement_a_reachable_redis_keeps_refusing_is_dropped_not_blocking() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let sidecar = Sidecar::start(&policy(
        &mock.url(),
        &redis.url(),
        "fail_open",
        "{ tokens_per_day: 100000 }",
    ))
    .await;
    let client = reqwest::Client::new();
    let open = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.proxy))
        .bearer_auth(KEY)
        .header("x-mock-chunk-ms", "100")
        .header("x-mock-chunks", "4")
        .json(&chat_body("settled into a full Redis", true))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    // Redis answers pings but refuses every write while the stream runs: its settlement
    // fails, is kept, and every replay is refused too.
    redis_config_set(redis.port, "maxmemory", "1");
    open.text().await.unwrap();
    let pending = || async {
        sidecar
            .metrics()
            .await
            .value("sluice_limits_settlements_pending", &[])
    };
    eventually(
        Duration::from_secs(5),
        "the settlement was not kept",
        async || pending().await == Some(1.0),
    )
    .await;
    // After three refused replays (one per probe, a second apart) it is dropped and counted,
    // and nothing is left to hold the backlog.
    eventually(
        Duration::from_secs(10),
        "the refused settlement still blocks the backlog",
        async || {
            let metrics = sidecar.metrics().await;
            metrics.value("sluice_limits_settlements_dropped_total", &[]) == Some(1.0)
                && metrics.value("sluice_limits_settlements_pending", &[]) == Some(0.0)
        },
    )
    .await;
    // Refused whole, never half applied: the request is still named in flight (its place
    // lapses, as the README says of a dropped settlement).
    assert_eq!(
        redis_int(redis.port, &["ZCARD", "sluice:{a}:inflight"]),
        Some(1)
    );
    redis_config_set(redis.port, "maxmemory", "0");
    let logs = sidecar.logs();
    assert!(
        logs.contains("refused 3 times by a reachable Redis"),
        "{logs}"
    );
}
