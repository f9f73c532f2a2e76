//! `sluice-stream-bench`: opens SSE streams to a path (direct to the mock, or through a proxy),
//! `--concurrency` at a time, `--streams` in all, and prints one JSON object of figures.
//!
//! Each request asks the mock (`x-mock-stamp: 1`) to start every event with the wall-clock time
//! it was sent, so the delay of each event is measured directly (arrival − send; one clock, one
//! machine) rather than inferred from gaps. The figures:
//! - `ttfb_us`: request start (before connecting) → first event, percentiles over streams;
//! - `delay_us`: arrival − send of every event, percentiles over all events;
//! - `held_back`: events that arrived only after the next event had been sent — what a proxy
//!   that coalesces or buffers chunks produces; 0 means each event went through on its own;
//! - `multi_event_reads`: socket reads that brought more than one event (the kernel may join
//!   events that arrive close together; this is context for `held_back`, not a failure).
//!
//! A stream counts as complete when it answered 200, ended with `data: [DONE]`, and every event
//! carried a stamp.

mod http;
mod sse;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::{parse_head, BodyDecoder, HttpError};
use crate::sse::EventSplitter;

#[derive(Parser, Debug, Clone)]
#[command(name = "sluice-stream-bench")]
struct Args {
    /// `http://HOST:PORT/PATH` of a chat-completions endpoint.
    #[arg(long)]
    url: String,
    /// Streams open at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Streams in all (each of the `concurrency` workers opens its share one after another).
    #[arg(long)]
    streams: Option<usize>,
    /// Content events per stream (`x-mock-chunks`).
    #[arg(long, default_value_t = 64)]
    chunks: usize,
    /// Milliseconds between events (`x-mock-chunk-ms`).
    #[arg(long, default_value_t = 20)]
    chunk_ms: u64,
    /// Extra request header, `name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Give up on a stream after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("url must be http://host:port/path")]
    Url,
    #[error("connect: {0}")]
    Connect(std::io::ErrorKind),
    #[error("io: {0}")]
    Io(std::io::ErrorKind),
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("connection closed before the stream ended")]
    Truncated,
    #[error("event without a send stamp")]
    Unstamped,
    #[error("timed out")]
    Timeout,
}

/// What one stream saw.
#[derive(Default)]
struct StreamRecord {
    ttfb_ns: Option<u64>,
    /// (sent, arrived) wall-clock ns of each event, in order.
    events: Vec<(u64, u64)>,
    multi_event_reads: u64,
}

#[derive(Serialize, Default)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut values: Vec<u64>) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_unstable();
        // Nearest rank, as the load generator reports.
        let at = |q: f64| {
            let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            values[rank - 1] as f64 / 1000.0
        };
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            max: *values.last().unwrap() as f64 / 1000.0,
        }
    }
}

#[derive(Serialize)]
struct Report {
    concurrency: usize,
    streams: usize,
    complete: usize,
    failed: usize,
    errors: BTreeMap<String, usize>,
    events: usize,
    events_per_stream: usize,
    ttfb_us: Percentiles,
    delay_us: Percentiles,
    held_back: usize,
    multi_event_reads: u64,
    wall_s: f64,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

struct Target {
    address: String,
    host: String,
    path: String,
}

fn target(url: &str) -> Result<Target, StreamError> {
    let rest = url.strip_prefix("http://").ok_or(StreamError::Url)?;
    let (address, path) = rest.split_once('/').ok_or(StreamError::Url)?;
    Ok(Target {
        address: address.to_owned(),
        host: address.to_owned(),
        path: format!("/{path}"),
    })
}

fn request_bytes(args: &Args, target: &Target) -> Vec<u8> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": "stream this answer to me, one event at a time"}],
    })
    .to_string();
    let mut head = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: text/event-stream\r\n\
         content-length: {}\r\nx-mock-stamp: 1\r\nx-mock-chunks: {}\r\nx-mock-chunk-ms: {}\r\n",
        target.path,
        target.host,
        body.len(),
        args.chunks,
        args.chunk_ms
    );
    for header in &args.headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("connection: close\r\n\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

async fn one_stream(address: &str, request: &[u8]) -> Result<StreamRecord, StreamError> {
    let started = now_ns();
    let mut socket = TcpStream::connect(address)
        .await
        .map_err(|e| StreamError::Connect(e.kind()))?;
    socket
        .set_nodelay(true)
        .map_err(|e| StreamError::Io(e.kind()))?;
    socket
        .write_all(request)
        .await
        .map_err(|e| StreamError::Io(e.kind()))?;
    let mut record = StreamRecord::default();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut head_bytes = Vec::new();
    let mut decoder: Option<BodyDecoder> = None;
    let mut body = Vec::new();
    let mut events = EventSplitter::default();
    loop {
        let read = socket
            .read(&mut buffer)
            .await
            .map_err(|e| StreamError::Io(e.kind()))?;
        let arrived = now_ns();
        if read == 0 {
            return Err(StreamError::Truncated);
        }
        let mut input = &buffer[..read];
        if decoder.is_none() {
            head_bytes.extend_from_slice(input);
            let Some((head, used)) = parse_head(&head_bytes)? else {
                continue;
            };
            if head.status != 200 {
                return Err(StreamError::Status(head.status));
            }
            decoder = Some(BodyDecoder::new(head.framing));
            head_bytes.drain(..used);
            input = &head_bytes;
        }
        let decoder = decoder.as_mut().expect("set above");
        decoder.feed(input, &mut body)?;
        head_bytes.clear();
        let mut in_this_read = 0;
        for event in events.push(&body) {
            let sent = event.sent_ns.ok_or(StreamError::Unstamped)?;
            record
                .ttfb_ns
                .get_or_insert(arrived.saturating_sub(started));
            record.events.push((sent, arrived));
            in_this_read += 1;
        }
        body.clear();
        if in_this_read > 1 {
            record.multi_event_reads += 1;
        }
        if events.saw_done() {
            return Ok(record);
        }
        if decoder.done() {
            return Err(StreamError::Truncated);
        }
    }
}

async fn worker(
    address: String,
    request: std::sync::Arc<Vec<u8>>,
    count: usize,
    timeout: Duration,
) -> Vec<Result<StreamRecord, StreamError>> {
    let mut results = Vec::with_capacity(count);
    for _ in 0..count {
        let outcome = tokio::time::timeout(timeout, one_stream(&address, &request))
            .await
            .unwrap_or(Err(StreamError::Timeout));
        results.push(outcome);
    }
    results
}

fn report(args: &Args, results: Vec<Result<StreamRecord, StreamError>>, wall: Duration) -> Report {
    let mut errors = BTreeMap::new();
    let (mut ttfb, mut delays) = (Vec::new(), Vec::new());
    let (mut complete, mut held_back, mut events, mut multi) = (0, 0, 0, 0);
    let streams = results.len();
    for result in results {
        match result {
            Ok(record) => {
                complete += 1;
                ttfb.extend(record.ttfb_ns);
                events += record.events.len();
                multi += record.multi_event_reads;
                for (sent, arrived) in &record.events {
                    delays.push(arrived.saturating_sub(*sent));
                }
                held_back += record
                    .events
                    .windows(2)
                    .filter(|pair| pair[0].1 >= pair[1].0)
                    .count();
            }
            Err(error) => *errors.entry(error.to_string()).or_insert(0) += 1,
        }
    }
    Report {
        concurrency: args.concurrency,
        streams,
        complete,
        failed: streams - complete,
        errors,
        events,
        events_per_stream: events.checked_div(complete).unwrap_or(0),
        ttfb_us: Percentiles::of(ttfb),
        delay_us: Percentiles::of(delays),
        held_back,
        multi_event_reads: multi,
        wall_s: wall.as_secs_f64(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let target = target(&args.url)?;
    let request = std::sync::Arc::new(request_bytes(&args, &target));
    let concurrency = args.concurrency.max(1);
    let total = args.streams.unwrap_or(concurrency).max(1);
    let timeout = Duration::from_secs(args.timeout_s);
    // One thread: the client's own work is small next to the proxy's, and it leaves the second
    // core to the servers under test.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let results = runtime.block_on(async {
        let mut tasks = Vec::with_capacity(concurrency);
        for worker_index in 0..concurrency {
            let share = total / concurrency + usize::from(worker_index < total % concurrency);
            tasks.push(tokio::spawn(worker(
                target.address.clone(),
                request.clone(),
                share,
                timeout,
            )));
        }
        let mut results = Vec::with_capacity(total);
        for task in tasks {
            results.extend(task.await.expect("stream workers do not panic"));
        }
        results
    });
    let report = report(&args, results, started.elapsed());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<u64> = (1..=100).map(|v| v * 1000).collect();
        let p = Percentiles::of(values);
        assert_eq!((p.p50, p.p99, p.max), (50.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(Vec::new()).max, 0.0);
    }

    #[test]
    fn held_back_counts_events_that_waited_for_the_next_one() {
        let args = Args::parse_from(["x", "--url", "http://127.0.0.1:1/v1"]);
        let on_time = StreamRecord {
            ttfb_ns: Some(1),
            events: vec![(0, 10), (20, 30), (40, 50)],
            multi_event_reads: 0,
        };
        // The second event only arrived with the third, after the third was sent.
        let coalesced = StreamRecord {
            ttfb_ns: Some(1),
            events: vec![(0, 10), (20, 45), (40, 45)],
            multi_event_reads: 1,
        };
        let figures = report(
            &args,
            vec![Ok(on_time), Ok(coalesced), Err(StreamError::Truncated)],
            Duration::from_secs(1),
        );
        assert_eq!(figures.held_back, 1);
        assert_eq!(figures.complete, 2);
        assert_eq!(figures.failed, 1);
        assert_eq!(figures.events_per_stream, 3);
        assert_eq!(figures.delay_us.max, 0.025);
    }

    #[test]
    fn urls_split_into_address_and_path() {
        let parsed = target("http://127.0.0.1:8787/mock/v1/chat/completions").unwrap();
        assert_eq!(parsed.address, "127.0.0.1:8787");
        assert_eq!(parsed.path, "/mock/v1/chat/completions");
        assert!(target("https://x/y").is_err());
    }
}
