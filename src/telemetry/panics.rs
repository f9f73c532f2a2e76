//! Panics: reported without the request data they may carry, and (in debug builds only) a
//! canary that makes a request panic on purpose, so tests can prove that.

use std::panic::PanicHookInfo;

/// Replaces the default panic hook, which prints the panic's message: a message formatted at
/// run time (`unwrap` on an error, `panic!("{x:?}")`) may hold a request's headers, keys
/// included. Only a literal message (a `&'static str`, which cannot hold request data) and
/// where the panic happened are logged.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info: &PanicHookInfo<'_>| {
        let location = info
            .location()
            .map_or_else(String::new, |l| format!("{}:{}", l.file(), l.line()));
        let message = info
            .payload()
            .downcast_ref::<&'static str>()
            .copied()
            .unwrap_or("(a formatted message, withheld: it may carry request data)");
        // stderr directly as well as the log: the log writer may be what panicked. "panicked",
        // as the default hook says it, so whatever watches the logs for panics still sees them.
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("<unnamed>");
        eprintln!("thread '{thread}' panicked at {location}: {message}");
        tracing::error!(target: "sluice::panic", %location, "panicked: {message}");
    }));
}

/// The request header that triggers the canary.
#[cfg(debug_assertions)]
const CANARY_HEADER: &str = "x-sluice-test-panic";

/// In debug builds started with `SLUICE_TEST_PANIC=1` (read once, at the first request), a
/// request carrying `x-sluice-test-panic` panics here — with the caller's and the upstream
/// request's headers, keys included, in the panic message — so tests can check that neither
/// reaches logs, spans or the answer. Release builds have no such code.
#[cfg(debug_assertions)]
pub fn canary(caller: &sluice_filters::RequestHeader, upstream: &sluice_filters::RequestHeader) {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| std::env::var("SLUICE_TEST_PANIC").is_ok_and(|v| v == "1"));
    if enabled && caller.headers.contains_key(CANARY_HEADER) {
        let text = |request: &sluice_filters::RequestHeader| {
            request
                .headers
                .iter()
                .map(|(name, value)| {
                    format!("{name}: {}", String::from_utf8_lossy(value.as_bytes()))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        panic!(
            "canary panic: caller [{}], upstream [{}]",
            text(caller),
            text(upstream)
        );
    }
}
