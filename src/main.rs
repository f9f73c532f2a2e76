//! `sluice`: a sidecar reverse proxy for LLM provider APIs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::{policy, server};

/// mimalloc instead of glibc's allocator: a proxy allocates small buffers on every request from
/// several threads, where glibc's arena locks showed up in profiles under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process. mimalloc asks for huge pages on the arenas it
/// commits eagerly, so each thread's first small allocations touched a whole 2 MiB page: an
/// idle Sluice held 14 MiB of `AnonHugePages` (36 MiB RSS; 27 MiB without them). A proxy's
/// working set is small, so the TLB gains little from huge pages. Set before any thread starts.
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
            // Held for the process's life: dropping it would stop the log writer thread.
            let _log_writer = init_logging();
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
