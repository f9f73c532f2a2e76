use std::thread;

use super::*;
use crate::RequestHeader;

fn limits(f: impl FnOnce(&mut RequestLimits)) -> RequestLimits {
    let mut limits = RequestLimits::default();
    f(&mut limits);
    limits
}

fn scope(name: &str) -> Arc<str> {
    name.into()
}

#[test]
fn gcra_allows_the_burst_then_the_rate() {
    let store = LimitStore::default();
    let tenant = scope("t");
    let tier = limits(|l| {
        l.rps = Some(10.0);
        l.burst = Some(3);
    });
    let checks = [(&tenant, &tier)];
    let start = Instant::now();
    let wall = SystemTime::now();
    for _ in 0..3 {
        assert!(store.admit(&checks, 0, start, wall).is_ok());
    }
    let refused = store.admit(&checks, 0, start, wall).unwrap_err();
    assert_eq!(refused.limit, LimitName::Rate);
    assert!(
        refused.retry_after <= Duration::from_millis(100)
            && refused.retry_after > Duration::from_millis(90)
    );
    // One interval later, exactly one more.
    let later = start + Duration::from_millis(100);
    assert!(store.admit(&checks, 0, later, wall).is_ok());
    assert!(store.admit(&checks, 0, later, wall).is_err());
}

#[test]
fn windows_count_exactly_and_reset_on_the_boundary() {
    let store = LimitStore::default();
    let tenant = scope("t");
    let tier = limits(|l| l.requests_per_minute = Some(2));
    let checks = [(&tenant, &tier)];
    let minute = at_epoch_second(1_700_000_080); // 40 s into a minute
    let now = Instant::now();
    let first = store
        .admit(&checks, 0, now, minute)
        .unwrap()
        .0
        .requests
        .unwrap();
    assert_eq!(
        (first.limit, first.remaining, first.reset),
        (2, 1, Duration::from_secs(20))
    );
    assert_eq!(
        store
            .admit(&checks, 0, now, minute)
            .unwrap()
            .0
            .requests
            .unwrap()
            .remaining,
        0
    );
    let refused = store.admit(&checks, 0, now, minute).unwrap_err();
    assert_eq!(
        (refused.limit, refused.retry_after),
        (LimitName::PerMinute, Duration::from_secs(20))
    );
    let next_minute = at_epoch_second(1_700_000_100);
    assert_eq!(
        store
            .admit(&checks, 0, now, next_minute)
            .unwrap()
            .0
            .requests
            .unwrap()
            .remaining,
        1
    );
}

fn at_epoch_second(secs: u64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs)
}

#[test]
fn a_refused_request_is_charged_nothing() {
    let store = LimitStore::default();
    let (tenant, system) = (scope("t"), scope(SYSTEM_SCOPE));
    let tier = limits(|l| l.requests_per_day = Some(10));
    let everyone = limits(|l| l.requests_per_day = Some(1));
    let checks = [(&tenant, &tier), (&system, &everyone)];
    let (now, wall) = (Instant::now(), SystemTime::now());
    store.admit(&checks, 0, now, wall).unwrap();
    for _ in 0..5 {
        assert_eq!(
            store.admit(&checks, 0, now, wall).unwrap_err().scope,
            system
        );
    }
    // The tenant's own count is still 1: 9 left.
    let alone = [(&tenant, &tier)];
    assert_eq!(
        store
            .admit(&alone, 0, now, wall)
            .unwrap()
            .0
            .requests
            .unwrap()
            .remaining,
        8
    );
}

#[test]
fn concurrency_is_released_when_the_admission_ends() {
    let store = Arc::new(LimitStore::default());
    let tenant = scope("t");
    let tier = limits(|l| l.concurrent = Some(1));
    let checks = [(&tenant, &tier)];
    let (now, wall) = (Instant::now(), SystemTime::now());
    let (_, charge) = store.admit(&checks, 0, now, wall).unwrap();
    assert_eq!(
        store.admit(&checks, 0, now, wall).unwrap_err().limit,
        LimitName::Concurrent
    );
    store.settle(&charge, 0, 0);
    assert!(store.admit(&checks, 0, now, wall).is_ok());
}

#[test]
fn concurrent_admissions_never_overshoot() {
    let store = Arc::new(LimitStore::default());
    let tier = Arc::new(limits(|l| l.requests_per_hour = Some(37)));
    let admitted: usize = (0..8)
        .map(|_| {
            let (store, tier) = (store.clone(), tier.clone());
            thread::spawn(move || {
                let tenant = scope("t");
                let checks = [(&tenant, &*tier)];
                (0..50)
                    .filter(|_| {
                        store
                            .admit(&checks, 0, Instant::now(), SystemTime::now())
                            .is_ok()
                    })
                    .count()
            })
        })
        .map(|handle| handle.join().unwrap())
        .sum();
    assert_eq!(admitted, 37);
}

fn exchange(tenant: &str, tier: &str, body: &str) -> Exchange {
    let request = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    let mut ex = Exchange::new("r".into(), request, Bytes::from(body.to_owned()));
    ex.tenant = Some(tenant.into());
    ex.tier = Some(tier.into());
    ex
}

fn limits_filter(tier: RequestLimits, system: Option<RequestLimits>) -> (Limits, Arc<LimitStore>) {
    let table = LimitTable {
        tiers: [(Arc::<str>::from("free"), tier)].into(),
        system,
        prices: Arc::default(),
    };
    let store = Arc::new(LimitStore::default());
    (
        Limits::new(Arc::new(table), Backend::Memory(store.clone())),
        store,
    )
}

#[tokio::test]
async fn the_filter_refuses_with_429_retry_after_and_counts_down_in_headers() {
    let (filter, store) = limits_filter(limits(|l| l.requests_per_day = Some(2)), None);
    let mut first = exchange("t", "free", "{}");
    assert!(matches!(
        filter.on_request(&mut first).await,
        Verdict::Continue
    ));
    let mut response = ResponseHeader::build(200, None).unwrap();
    filter.on_response_head(&mut first, &mut response);
    assert_eq!(response.headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(response.headers["x-ratelimit-remaining-requests"], "1");
    assert!(response.headers["x-ratelimit-reset-requests"]
        .to_str()
        .unwrap()
        .ends_with('s'));
    assert_eq!(store.in_flight("t"), 1);
    drop(first);
    assert_eq!(
        store.in_flight("t"),
        0,
        "the exchange's end releases its place"
    );

    let mut second = exchange("t", "free", "{}");
    assert!(matches!(
        filter.on_request(&mut second).await,
        Verdict::Continue
    ));
    let mut third = exchange("t", "free", "{}");
    let Verdict::Reject(rejection) = filter.on_request(&mut third).await else {
        panic!("the third request of the day must be refused");
    };
    assert_eq!(rejection.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        rejection.message.contains("`requests_per_day` limit of 2"),
        "{}",
        rejection.message
    );
    assert!(
        rejection.message.contains("tenant `t`"),
        "{}",
        rejection.message
    );
    let retry: u64 = rejection.headers[0].1.to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    // Another tenant of the same tier has its own count.
    let mut other = exchange("u", "free", "{}");
    assert!(matches!(
        filter.on_request(&mut other).await,
        Verdict::Continue
    ));
}

#[tokio::test]
async fn output_caps_reject_or_clamp() {
    let reject = limits(|l| l.max_output_tokens = Some(100));
    let (filter, _) = limits_filter(reject, None);
    let mut ex = exchange("t", "free", r#"{"model":"m","max_tokens":500}"#);
    let Verdict::Reject(rejection) = filter.on_request(&mut ex).await else {
        panic!()
    };
    assert_eq!(rejection.status, StatusCode::BAD_REQUEST);
    assert!(rejection.message.contains("max_tokens 500 exceeds"));

    let clamp = limits(|l| {
        l.max_output_tokens = Some(100);
        l.over_max_output_tokens = OverMax::Clamp;
    });
    let (filter, _) = limits_filter(clamp, None);
    let mut ex = exchange(
        "t",
        "free",
        r#"{"model":"m","max_completion_tokens":500,"messages":[]}"#,
    );
    assert!(matches!(
        filter.on_request(&mut ex).await,
        Verdict::Continue
    ));
    let body: serde_json::Value = serde_json::from_slice(ex.body()).unwrap();
    assert_eq!(body["max_completion_tokens"], 100);
    assert_eq!(body["model"], "m");
    assert_eq!(ex.facts.max_tokens, Some(100));
    let mut small = exchange("t", "free", r#"{"max_tokens":50}"#);
    assert!(matches!(
        filter.on_request(&mut small).await,
        Verdict::Continue
    ));
    assert_eq!(
        &small.body()[..],
        br#"{"max_tokens":50}"#,
        "within the cap the body is untouched"
    );
}

#[tokio::test]
async fn bedrock_converse_output_is_clamped_inside_inference_config() {
    let clamp = limits(|l| {
        l.max_output_tokens = Some(100);
        l.over_max_output_tokens = OverMax::Clamp;
    });
    let (filter, _) = limits_filter(clamp, None);
    let request = RequestHeader::build(
        "POST",
        b"/bedrock/model/amazon.nova-pro-v1%3A0/converse",
        None,
    )
    .unwrap();
    let body = r#"{"messages":[],"inferenceConfig": {"temperature":0.5,"maxTokens":900}}"#;
    let mut ex = Exchange::with_dialect(
        "r".into(),
        request,
        Bytes::from(body),
        crate::usage::Dialect::Bedrock,
    );
    ex.tenant = Some("t".into());
    ex.tier = Some("free".into());
    assert_eq!(ex.facts.max_tokens, Some(900));
    assert!(matches!(
        filter.on_request(&mut ex).await,
        Verdict::Continue
    ));
    assert_eq!(
        &ex.body()[..],
        br#"{"messages":[],"inferenceConfig": {"temperature":0.5,"maxTokens":100}}"#
    );
    assert_eq!(ex.facts.max_tokens, Some(100));
    assert_eq!(ex.facts.model.as_deref(), Some("amazon.nova-pro-v1:0"));
}

#[tokio::test]
async fn prompt_size_is_capped() {
    let (filter, _) = limits_filter(limits(|l| l.max_input_tokens = Some(10)), None);
    let mut ex = exchange(
        "t",
        "free",
        &format!(r#"{{"prompt":"{}"}}"#, "x".repeat(100)),
    );
    let Verdict::Reject(rejection) = filter.on_request(&mut ex).await else {
        panic!()
    };
    assert!(
        rejection.message.contains("max_input_tokens of 10"),
        "{}",
        rejection.message
    );
}

#[tokio::test]
async fn system_limits_apply_to_everyone_and_name_themselves() {
    let (filter, _) = limits_filter(
        RequestLimits::default(),
        Some(limits(|l| l.concurrent = Some(1))),
    );
    let mut a = exchange("t", "free", "{}");
    assert!(matches!(filter.on_request(&mut a).await, Verdict::Continue));
    let mut b = exchange("u", "free", "{}");
    let Verdict::Reject(rejection) = filter.on_request(&mut b).await else {
        panic!()
    };
    assert!(
        rejection.message.contains("system-wide `concurrent`"),
        "{}",
        rejection.message
    );
}

#[test]
fn reset_texts_look_like_openais() {
    assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
    assert_eq!(reset_text(Duration::from_secs(1)), "1s");
    assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    assert_eq!(reset_text(Duration::from_secs(3661)), "1h1m1s");
}

#[test]
fn load_time_problems_are_named() {
    let bad = limits(|l| {
        l.rps = Some(-1.0);
        l.burst = Some(0);
        l.requests_per_day = Some(0);
    });
    let problems = bad.problems().join("\n");
    assert!(problems.contains("`rps` must be a positive number"));
    assert!(problems.contains("`burst` must be at least 1"));
    assert!(problems.contains("requests_per_day: 0"));
}

#[test]
fn tokens_are_reserved_then_settled_to_the_real_usage() {
    let store = LimitStore::default();
    let tenant = scope("t");
    let tier = limits(|l| l.tokens_per_day = Some(1000));
    let checks = [(&tenant, &tier)];
    let (now, wall) = (Instant::now(), SystemTime::now());
    let (standings, charge) = store.admit(&checks, 600, now, wall).unwrap();
    assert_eq!(standings.tokens.unwrap().remaining, 400);
    // While 600 are reserved, a second 600 does not fit.
    let refused = store.admit(&checks, 600, now, wall).unwrap_err();
    assert_eq!(refused.limit, LimitName::TokensPerDay);
    // The response used 150: the rest of the reservation comes back.
    store.settle(&charge, 150, 0);
    assert_eq!(store.tokens_today("t", wall), 150);
    assert!(store.admit(&checks, 600, now, wall).is_ok());
    assert_eq!(store.tokens_today("t", wall), 750);
}

#[test]
fn tokens_per_minute_reserve_settle_and_reset_on_the_minute() {
    let store = LimitStore::default();
    let tenant = scope("t");
    let tier = limits(|l| l.tokens_per_minute = Some(1000));
    let checks = [(&tenant, &tier)];
    let now = Instant::now();
    let minute = at_epoch_second(1_700_000_080); // 40 s into a minute
    let (standings, charge) = store.admit(&checks, 600, now, minute).unwrap();
    let tokens = standings.tokens.unwrap();
    assert_eq!(
        (tokens.limit, tokens.remaining, tokens.reset),
        (1000, 400, Duration::from_secs(20))
    );
    let refused = store.admit(&checks, 600, now, minute).unwrap_err();
    assert_eq!(
        (refused.limit, refused.retry_after, refused.value),
        (LimitName::TokensPerMinute, Duration::from_secs(20), 1000.0)
    );
    // Settled to 150 used: 850 left this minute, so 600 fits and 300 more do not.
    store.settle(&charge, 150, 0);
    let (standings, _) = store.admit(&checks, 600, now, minute).unwrap();
    assert_eq!(standings.tokens.unwrap().remaining, 250);
    assert!(store.admit(&checks, 300, now, minute).is_err());
    // The next minute starts from nothing.
    let next = at_epoch_second(1_700_000_100);
    let (standings, _) = store.admit(&checks, 900, now, next).unwrap();
    let tokens = standings.tokens.unwrap();
    assert_eq!(
        (tokens.remaining, tokens.reset),
        (100, Duration::from_secs(60))
    );
}

#[test]
fn tokens_per_month_follow_the_utc_calendar_month() {
    let store = LimitStore::default();
    let tenant = scope("t");
    let tier = limits(|l| l.tokens_per_month = Some(1000));
    let checks = [(&tenant, &tier)];
    let now = Instant::now();
    // 2024-01-31 23:59:00 UTC, one minute before February.
    let january = at_epoch_second(1_706_745_540);
    let (standings, charge) = store.admit(&checks, 800, now, january).unwrap();
    let tokens = standings.tokens.unwrap();
    assert_eq!(
        (tokens.limit, tokens.remaining, tokens.reset),
        (1000, 200, Duration::from_secs(60))
    );
    let refused = store.admit(&checks, 300, now, january).unwrap_err();
    assert_eq!(
        (refused.limit, refused.retry_after),
        (LimitName::TokensPerMonth, Duration::from_secs(60))
    );
    // A day earlier is the same month: the count holds.
    let earlier = at_epoch_second(1_706_745_540 - 86_400);
    assert!(store.admit(&checks, 300, now, earlier).is_err());
    // February starts from nothing; January's late settlement stays in January.
    let february = at_epoch_second(1_706_745_600);
    let (standings, _) = store.admit(&checks, 900, now, february).unwrap();
    assert_eq!(standings.tokens.unwrap().remaining, 100);
    store.settle(&charge, 100, 0);
    assert!(
        store.admit(&checks, 200, now, february).is_err(),
        "February's 900 reserved stand"
    );
    // February 29th 2024 is still February (a leap year): the count holds.
    let leap_day = at_epoch_second(1_706_745_600 + 28 * 86_400);
    assert!(store.admit(&checks, 200, now, leap_day).is_err());
    let march = at_epoch_second(1_706_745_600 + 29 * 86_400);
    assert!(store.admit(&checks, 1000, now, march).is_ok());
}

#[tokio::test]
async fn the_filter_settles_with_the_exchange_usage() {
    let (filter, store) = limits_filter(limits(|l| l.tokens_per_day = Some(10_000)), None);
    assert!(filter.needs_usage());
    let mut ex = exchange("t", "free", r#"{"model":"m","max_tokens":100}"#);
    assert!(matches!(
        filter.on_request(&mut ex).await,
        Verdict::Continue
    ));
    let reserved = estimate_input_tokens(&ex) + 100;
    assert_eq!(store.tokens_today("t", SystemTime::now()), reserved);
    let mut response = ResponseHeader::build(200, None).unwrap();
    filter.on_response_head(&mut ex, &mut response);
    assert_eq!(response.headers["x-ratelimit-limit-tokens"], "10000");
    assert_eq!(
        response.headers["x-ratelimit-remaining-tokens"],
        (10_000 - reserved).to_string().as_str()
    );
    ex.status = Some(StatusCode::OK);
    ex.usage = Some(crate::usage::Usage {
        input_tokens: 30,
        output_tokens: 12,
    });
    filter.on_done(&ex);
    drop(ex);
    assert_eq!(store.tokens_today("t", SystemTime::now()), 42);

    // A request the upstream refused costs nothing.
    let mut failed = exchange("t", "free", r#"{"max_tokens":100}"#);
    assert!(matches!(
        filter.on_request(&mut failed).await,
        Verdict::Continue
    ));
    failed.status = Some(StatusCode::BAD_GATEWAY);
    filter.on_done(&failed);
    drop(failed);
    assert_eq!(store.tokens_today("t", SystemTime::now()), 42);
}

#[tokio::test]
async fn budgets_count_spend_alert_once_and_downgrade() {
    let tier = limits(|l| {
        l.budget_usd_per_month = Some(100.0);
        l.downgrade = Some(Downgrade {
            above_percent: 50.0,
            models: [("big".to_owned(), "small".to_owned())].into(),
        });
    });
    let mut prices = Prices::default();
    // A dollar a token.
    prices.add(
        "big",
        Price {
            input: 1e6,
            output: 1e6,
        },
    );
    prices.add(
        "sm*",
        Price {
            input: 0.0,
            output: 0.0,
        },
    );
    let table = LimitTable {
        tiers: [(Arc::<str>::from("free"), tier)].into(),
        system: None,
        prices: Arc::new(prices),
    };
    let store = Arc::new(LimitStore::default());
    let metrics = crate::metrics::FilterMetrics::default();
    let filter = Limits::new(Arc::new(table), Backend::Memory(store.clone()))
        .with_metrics(metrics.clone(), true);
    assert!(filter.needs_usage(), "budgets are settled from usage");
    let spend = |usage: u64| {
        let filter = &filter;
        async move {
            let mut ex = exchange("t", "free", r#"{"model":"big"}"#);
            let verdict = filter.on_request(&mut ex).await;
            if let Verdict::Reject(rejection) = verdict {
                return Err(rejection.message);
            }
            ex.status = Some(StatusCode::OK);
            ex.usage = Some(crate::usage::Usage {
                input_tokens: usage,
                output_tokens: 0,
            });
            let model = ex.facts.model.clone();
            filter.on_done(&ex);
            Ok(model)
        }
    };
    assert_eq!(spend(30).await, Ok(Some("big".to_owned())));
    assert_eq!(store.spent_micros("t", SystemTime::now()), 30_000_000);
    assert_eq!(spend(30).await, Ok(Some("big".to_owned())));
    // Above 50 %: downgraded, and the cheaper model costs nothing here.
    assert_eq!(spend(30).await, Ok(Some("small".to_owned())));
    assert_eq!(store.spent_micros("t", SystemTime::now()), 60_000_000);
    // Another model keeps spending up to the hard stop.
    let mut ex = exchange("t", "free", r#"{"model":"big-other"}"#);
    assert!(matches!(
        filter.on_request(&mut ex).await,
        Verdict::Continue
    ));
    drop(ex);
    let charge_everything = |ex: &mut Exchange| {
        ex.status = Some(StatusCode::OK);
        ex.usage = Some(crate::usage::Usage {
            input_tokens: 50,
            output_tokens: 0,
        });
        ex.facts.model = Some("big".to_owned());
    };
    let mut ex = exchange("t", "free", r#"{"model":"other"}"#);
    assert!(matches!(
        filter.on_request(&mut ex).await,
        Verdict::Continue
    ));
    charge_everything(&mut ex);
    filter.on_done(&ex);
    drop(ex);
    assert_eq!(store.spent_micros("t", SystemTime::now()), 110_000_000);
    let mut refused = exchange("t", "free", r#"{"model":"other"}"#);
    let Verdict::Reject(rejection) = filter.on_request(&mut refused).await else {
        panic!("over budget")
    };
    assert_eq!(rejection.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        rejection
            .message
            .contains("`budget_usd_per_month` limit of 100"),
        "{}",
        rejection.message
    );
    // Each threshold counted once, labelled with the tenant (the policy allowed it).
    for threshold in ["50", "75", "90", "95"] {
        let alerts = metrics
            .budget_alerts
            .with_label_values(&["free", threshold, "t"]);
        assert_eq!(alerts.get(), 1, "{threshold}%");
    }
    let downgrades = metrics
        .model_downgrades
        .with_label_values(&["free", "big", "small"]);
    assert_eq!(downgrades.get(), 1);
    let stops = metrics
        .limit_rejections
        .with_label_values(&["budget_usd_per_month", "free"]);
    assert_eq!(stops.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_wait_for_capacity_higher_priority_first() {
    let queue = |priority| {
        Some(QueueSettings {
            max_wait: Duration::from_secs(5),
            priority,
        })
    };
    let table = LimitTable {
        tiers: [
            (Arc::<str>::from("low"), limits(|l| l.queue = queue(1))),
            (Arc::<str>::from("high"), limits(|l| l.queue = queue(5))),
        ]
        .into(),
        system: Some(limits(|l| l.concurrent = Some(1))),
        prices: Arc::default(),
    };
    let filter = Arc::new(Limits::new(
        Arc::new(table),
        Backend::Memory(Arc::new(LimitStore::default())),
    ));
    let mut holder = exchange("h", "high", "{}");
    assert!(matches!(
        filter.on_request(&mut holder).await,
        Verdict::Continue
    ));

    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let waiter = |tenant: &'static str, tier: &'static str| {
        let (filter, order) = (filter.clone(), order.clone());
        tokio::spawn(async move {
            let mut ex = exchange(tenant, tier, "{}");
            let admitted = matches!(filter.on_request(&mut ex).await, Verdict::Continue);
            order.lock().unwrap().push(tenant);
            // Hold the place briefly, then give it to the next waiter.
            tokio::time::sleep(Duration::from_millis(20)).await;
            admitted
        })
    };
    let low = waiter("low-tenant", "low");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let high = waiter("high-tenant", "high");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        order.lock().unwrap().is_empty(),
        "both wait while the place is held"
    );
    drop(holder);
    assert!(
        high.await.unwrap() && low.await.unwrap(),
        "both are admitted in the end"
    );
    assert_eq!(*order.lock().unwrap(), ["high-tenant", "low-tenant"]);
}

#[tokio::test]
async fn a_queue_gives_up_after_max_wait() {
    let tier = limits(|l| {
        l.concurrent = Some(1);
        l.queue = Some(QueueSettings {
            max_wait: Duration::from_millis(100),
            priority: 0,
        });
    });
    let (filter, _) = limits_filter(tier, None);
    let mut first = exchange("t", "free", "{}");
    assert!(matches!(
        filter.on_request(&mut first).await,
        Verdict::Continue
    ));
    let started = Instant::now();
    let mut second = exchange("t", "free", "{}");
    assert!(matches!(
        filter.on_request(&mut second).await,
        Verdict::Reject(_)
    ));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(90) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}
