//! Soak: steady load at 70 % of the saturation measured at the start of the run, a third of it
//! streamed, 3 % of requests with an injected upstream fault. Memory is judged quiet against
//! quiet: the sidecar's RSS once the callers have hung up and its idle upstream connections have
//! expired, after the load, exceeds the same measure taken after the saturation run (which warms
//! every pool and table up) by no more than `SLUICE_SOAK_RSS_GROWTH` percent (default 5). Under
//! load RSS moves with the number of requests in flight, which no short run can tell from a leak;
//! at rest a leak is all that is left. Requests without a fault all succeed, nothing panics, and
//! at rest the sidecar holds no more descriptors than before the load: none leaked on any path,
//! faults included.
//!
//! `SLUICE_SOAK_SECS` sets the length (default 20; `make harden`: 1800).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const PATH: &str = "/openai/v1/chat/completions";
/// Short, so the pooled upstream connections are gone soon after the load and the descriptor
/// count can be compared with the one before it.
const UPSTREAM_IDLE: Duration = Duration::from_secs(2);
/// How long the sidecar may take to close every connection once the callers hang up: the idle
/// upstream connections expire, then the pool's sweep (every second) closes them.
const AT_REST_WITHIN: Duration = Duration::from_secs(12);
/// How long RSS is watched at rest (the allocator returns freed pages after about a second).
const QUIET_OVER: Duration = Duration::from_secs(3);

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One request of the mix: `n` picks streamed or not (a third), and three in a hundred a fault.
async fn one(client: &reqwest::Client, proxy: &str, n: usize) -> Result<(), String> {
    let stream = n.is_multiple_of(3);
    let fault = match n % 100 {
        17 => Some("reset-mid-stream"),
        51 => Some("reset-before-head"),
        83 => Some("end-without-terminator"),
        _ => None,
    };
    let mut request = client
        .post(format!("{proxy}{PATH}"))
        .header("x-mock-chunks", "10")
        .header("x-mock-chunk-ms", "5")
        .json(&chat_body(&format!("soak {n}"), stream));
    if let Some(fault) = fault {
        request = request.header("x-mock-fault", fault);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.text().await;
    match (fault, body) {
        (Some(_), _) => Ok(()),
        (None, Ok(body)) if status == 200 && (!stream || body.ends_with("data: [DONE]\n\n")) => {
            Ok(())
        }
        (None, Ok(body)) => Err(format!("{status}: {body:.200}")),
        (None, Err(e)) => Err(format!("{status}: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_run_does_not_grow_or_leak() {
    let seconds: u64 = env("SLUICE_SOAK_SECS", 20);
    let allowed_growth: f64 = env("SLUICE_SOAK_RSS_GROWTH", 5.0);
    let mock = mock().await;
    let sidecar = Sidecar::start(&format!(
        "server: {{ drain_timeout: 10s, upstream_pool_size: 64, upstream_idle_timeout: {}s }}\n{}",
        UPSTREAM_IDLE.as_secs(),
        passthrough_policy(&mock.url())
    ))
    .await;
    let pid = sidecar.pid();
    let fds_before_load = open_fds(pid);
    let proxy = Arc::new(sidecar.proxy.clone());

    // Saturation: 64 callers as fast as they go for 3 s (non-streamed, no faults).
    let client = reqwest::Client::new();
    let done = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(3);
    let callers: Vec<_> = (0..64)
        .map(|i| {
            let (client, proxy, done) = (client.clone(), proxy.clone(), done.clone());
            tokio::spawn(async move {
                let mut n: usize = i * 1000 + 1;
                while Instant::now() < until {
                    n += 1;
                    if n.is_multiple_of(3) || n % 100 == 17 || n % 100 == 51 || n % 100 == 83 {
                        continue;
                    }
                    one(&client, &proxy, n).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let saturation = done.load(Ordering::Relaxed) as f64 / 3.0;
    let rate = (saturation * 0.7).max(10.0);
    drop(client);
    descriptors_settle(pid, fds_before_load, AT_REST_WITHIN).await;
    let rss_at_rest_before = quiet_rss_kib(pid, QUIET_OVER).await;

    // The soak: open loop at `rate`, each request on its own task.
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let first_failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let client = reqwest::Client::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples: Vec<(Duration, u64, usize)> = Vec::new();
    let mut last_sample = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        n += 1;
        let (client, proxy, sent, failed, first_failure) = (
            client.clone(),
            proxy.clone(),
            sent.clone(),
            failed.clone(),
            first_failure.clone(),
        );
        tasks.spawn(async move {
            sent.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = one(&client, &proxy, n).await {
                failed.fetch_add(1, Ordering::Relaxed);
                first_failure.lock().unwrap().get_or_insert(e);
            }
        });
        while tasks.try_join_next().is_some() {}
        if last_sample.elapsed() >= Duration::from_secs(1) {
            last_sample = Instant::now();
            samples.push((started.elapsed(), rss_kib(pid), open_fds(pid)));
        }
    }
    while tasks.join_next().await.is_some() {}
    samples.push((started.elapsed(), rss_kib(pid), open_fds(pid)));

    let peak_rss = samples.iter().map(|s| s.1).max().unwrap();
    let fds_at_end = samples.last().unwrap().2;
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));

    drop(client);
    let fds_after = descriptors_settle(pid, fds_before_load, AT_REST_WITHIN).await;
    let rss_at_rest_after = quiet_rss_kib(pid, QUIET_OVER).await;
    let growth =
        (rss_at_rest_after as f64 - rss_at_rest_before as f64) / rss_at_rest_before as f64 * 100.0;
    eprintln!(
        "soak: {seconds} s at {rate:.0} req/s (70 % of {saturation:.0}), {sent} requests, \
         {failed} failed; RSS at rest {rss_at_rest_before} KiB before, {rss_at_rest_after} KiB \
         after ({growth:+.1} %), peak under load {peak_rss} KiB; fds {fds_before_load} before, \
         {fds_at_end} at the end of the load, {fds_after} after"
    );
    assert_eq!(
        failed,
        0,
        "first failure: {:?}",
        first_failure.lock().unwrap()
    );
    assert!(
        growth <= allowed_growth,
        "RSS at rest grew {growth:.1} % over the load"
    );
    assert!(
        fds_after <= fds_before_load,
        "descriptors leaked: {fds_before_load} before the load, {fds_after} after"
    );
    assert!(!sidecar.logs().contains("panicked"), "a panic was logged");
}
