//! `sluice`: a sidecar reverse proxy for LLM provider APIs.

mod admin;
mod exchange;
mod policy;
mod server;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
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
        Command::Check { file } => match policy::load(&file) {
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
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
    guard
}
