//! `sluice-mock`: the mock provider as a process, for the SDK tests, `make demo` and `make bench`.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use sluice_mock::{Fault, MockConfig, MockServer, MockTls};

#[derive(Parser)]
#[command(
    name = "sluice-mock",
    about = "Mock OpenAI/Anthropic provider for Sluice's tests and benchmarks"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9900")]
    listen: String,
    /// Delay before the response head, in ms.
    #[arg(long, default_value_t = 0)]
    first_byte_ms: u64,
    /// Delay between streamed events, in ms.
    #[arg(long, default_value_t = 0)]
    chunk_ms: u64,
    /// Content pieces per answer.
    #[arg(long, default_value_t = 5)]
    chunks: usize,
    /// Do not keep received requests (for benchmarks).
    #[arg(long)]
    no_record: bool,
    /// Answer every request with this status.
    #[arg(long)]
    fault_status: Option<u16>,
    /// `retry-after` value sent with --fault-status.
    #[arg(long)]
    retry_after: Option<String>,
    /// reset-mid-stream | stall | stall-mid-stream
    #[arg(long)]
    fault: Option<String>,
    /// Also serve HTTPS here (same state as --listen), with --tls-cert and --tls-key.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<String>,
    /// Certificate chain (PEM) for --tls-listen.
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) for --tls-listen.
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let fault = match (args.fault_status, args.fault.as_deref()) {
        (Some(status), _) => Some(Fault::Status {
            status,
            retry_after: args.retry_after.clone(),
        }),
        (None, Some(name)) => Some(Fault::parse(name).ok_or_else(|| {
            std::io::Error::other(format!(
                "unknown fault {name:?}: reset-mid-stream | stall | stall-mid-stream"
            ))
        })?),
        (None, None) => None,
    };
    let config = MockConfig {
        first_byte_delay: Duration::from_millis(args.first_byte_ms),
        chunk_delay: Duration::from_millis(args.chunk_ms),
        chunks: args.chunks.max(1),
        record: !args.no_record,
        fault,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let mut server = MockServer::start_on(listener, config).await?;
        println!("sluice-mock listening on {}", server.url());
        if let (Some(address), Some(certificate_file), Some(key_file)) =
            (&args.tls_listen, args.tls_cert, args.tls_key)
        {
            let listener = tokio::net::TcpListener::bind(address).await?;
            let tls = MockTls {
                certificate_file,
                key_file,
            };
            let addr = server.serve_tls(listener, &tls)?;
            println!("sluice-mock listening on https://{addr}");
        }
        std::io::stdout().flush()?;
        std::future::pending::<()>().await;
        Ok(())
    })
}
