//! `sluice`: a sidecar reverse proxy for LLM provider APIs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::{policy, server, upstream};

/// jemalloc instead of glibc's allocator (whose arena locks showed up in profiles under load) or
/// mimalloc (used until the bench's memory runs): a burst of 1,000 connections left mimalloc v3
/// holding 138 MiB for good (pages freed by another thread than the one that allocated them stay
/// with that thread until it allocates again), v2 83 MiB; jemalloc's background thread returns
/// freed memory within about a second whatever the worker threads do: 37 MiB after the same
/// bursts, from 28 MiB idle, at the same CPU per request.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start: purge on a background thread, dirty pages returned to
/// the kernel after a second, no second (`muzzy`) stage. A thin pointer to a NUL-ended string,
/// as the C symbol `malloc_conf` is declared.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

/// Transparent huge pages off for this process. With THP on, an allocator's first touches of a
/// fresh region fault in whole 2 MiB pages (mimalloc's eagerly committed arenas made an idle
/// Sluice hold 14 MiB of `AnonHugePages`), and freed memory inside a huge page cannot go back to
/// the kernel page by page. A proxy's working set is small, so the TLB gains little from huge
/// pages. Set before any thread starts.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of this process.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sidecar reverse proxy for LLM provider APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the sidecar.
    Run {
        /// Policy file.
        #[arg(short, long, default_value = "conf/sluice.yaml")]
        config: PathBuf,
    },
    /// Validate a policy file: print every error with its location, exit 1 if any.
    Check {
        /// Policy file.
        file: PathBuf,
    },
    /// Make a new Sluice key for a tenant: prints the key once, and the line for the policy.
    Keygen {
        /// The tenant the key is for.
        #[arg(long)]
        tenant: String,
        /// A note on who holds the key.
        #[arg(long)]
        label: Option<String>,
        /// Expiry: an RFC 3339 time or a date (e.g. 2027-01-31).
        #[arg(long)]
        expires: Option<String>,
    },
}

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            // Before the log writer, the first thread, starts: this sets environment variables.
            let roots = upstream::system_roots::read_on_demand();
            // Held for the process's life: dropping it would stop the log writer thread.
            let _log_writer = init_logging();
            tracing::info!(?roots, "system roots for HTTPS upstreams");
            sluice::telemetry::panics::install_hook();
            match server::run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Keygen {
            tenant,
            label,
            expires,
        } => {
            let key = sluice_filters::auth::keys::generate();
            let hash = sluice_filters::auth::keys::KeyHash::of(&key).to_text();
            let mut entry = format!("hash: \"{hash}\"");
            if let Some(label) = label {
                entry.push_str(&format!(", label: {}", serde_json::Value::String(label)));
            }
            if let Some(expires) = expires {
                entry.push_str(&format!(", expires: \"{expires}\""));
            }
            println!("New key for tenant `{tenant}` (shown once; Sluice stores only its hash):\n");
            println!("  {key}\n");
            println!("Add it under the tenant's keys in the policy:\n");
            println!("  tenants:\n    - name: {tenant}\n      keys:\n        - {{ {entry} }}\n");
            println!("or to the keys file:\n\n  keys:\n    - {{ tenant: {tenant}, {entry} }}");
            ExitCode::SUCCESS
        }
        Command::Check { file } => match policy::load(&file, &policy::SharedState::default()) {
            Ok(policy) => {
                println!("{}: ok: {}", file.display(), policy.summary());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Logs go to stderr through a writer thread, so a request never waits on a log write (lines are
/// dropped rather than block if the writer falls far behind).
///
/// Other crates' debug and trace events are never written, whatever `SLUICE_LOG` says: some of
/// them (Pingora's request dumps, HTTP clients') print whole header maps, credentials included.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{filter, fmt, EnvFilter, Layer};
    let wanted = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let safe = filter::filter_fn(|meta| {
        meta.target().starts_with("sluice") || *meta.level() <= tracing::Level::INFO
    });
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let layer = if json {
        fmt::layer().json().with_writer(writer).boxed()
    } else {
        fmt::layer().with_ansi(false).with_writer(writer).boxed()
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(wanted).with_filter(safe))
        .init();
    guard
}
