//! Request smuggling and framing: a generated corpus of adversarial HTTP/1 requests against the
//! real sidecar, with the mock provider as the echo upstream that counts what reaches it.
//!
//! Every case hides a second request (`/openai/smuggled`) where a parser that disagrees about
//! framing would find it. What must hold, case by case and over the whole corpus:
//! - the sidecar never crashes and answers every case, or closes, within the timeouts;
//! - the upstream never receives a smuggled request, and receives exactly one request per
//!   upstream answer the sidecar relayed (nothing extra rides along);
//! - ambiguous framing (CL with TE, differing or invalid CL, TE on HTTP/1.0, a final coding that
//!   is not chunked, obfuscated TE) is answered 400 and the connection is closed.
//!
//! `SLUICE_HARDEN_ROUNDS` repeats the corpus (in a shuffled order, over fresh and reused
//! connections) for `make harden`; `make test` runs it once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATH: &str = "/openai/v1/chat/completions";
const JSON: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const SMUGGLED: &str = "GET /openai/smuggled HTTP/1.1\r\nHost: victim\r\n\r\n";

/// One adversarial request and what the sidecar must do with it.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    bytes: Vec<u8>,
    /// Must be refused with 400 and the connection closed.
    ambiguous: bool,
}

/// How a request's framing is declared.
struct Framing {
    name: &'static str,
    /// Header lines (each ending in CRLF), given the body's real length.
    headers: fn(usize) -> String,
    /// The body as sent, given the JSON payload.
    body: fn(&str) -> String,
    ambiguous: bool,
}

fn chunked(payload: &str) -> String {
    format!("{:x}\r\n{payload}\r\n0\r\n\r\n", payload.len())
}

fn plain(payload: &str) -> String {
    payload.to_owned()
}

/// Framings: every TE and CL trick of the published smuggling research, as header lines.
fn framings() -> Vec<Framing> {
    macro_rules! f {
        ($name:expr, $amb:expr, $body:expr, |$n:ident| $headers:expr) => {
            Framing {
                name: $name,
                headers: |$n| $headers,
                body: $body,
                ambiguous: $amb,
            }
        };
    }
    vec![
        // Well-formed, for contrast: answered, never smuggling.
        f!("cl", false, plain, |n| format!("Content-Length: {n}\r\n")),
        f!("te", false, chunked, |_n| "Transfer-Encoding: chunked\r\n"
            .into()),
        f!("cl-dup-same", false, plain, |n| format!(
            "Content-Length: {n}\r\nContent-Length: {n}\r\n"
        )),
        // CL and TE together, in both orders and with variations.
        f!("cl-te", true, chunked, |n| format!(
            "Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"
        )),
        f!("te-cl", true, chunked, |n| format!(
            "Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n"
        )),
        f!("cl0-te", true, chunked, |_n| {
            "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n".into()
        }),
        f!("cl-te-short", true, chunked, |_n| {
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n".into()
        }),
        // Transfer-Encoding values a lenient parser reads as chunked and a strict one does not.
        f!("te-identity-chunked", false, chunked, |_n| {
            "Transfer-Encoding: identity, chunked\r\n".into()
        }),
        f!("te-chunked-identity", true, chunked, |_n| {
            "Transfer-Encoding: chunked, identity\r\n".into()
        }),
        f!("te-gzip", true, plain, |_n| "Transfer-Encoding: gzip\r\n"
            .into()),
        f!("te-xchunked", true, chunked, |_n| {
            "Transfer-Encoding: xchunked\r\n".into()
        }),
        f!("te-chunk", true, chunked, |_n| {
            "Transfer-Encoding: chunk\r\n".into()
        }),
        f!("te-quoted", true, chunked, |_n| {
            "Transfer-Encoding: \"chunked\"\r\n".into()
        }),
        f!("te-chunked-comma", true, chunked, |_n| {
            "Transfer-Encoding: chunked,\r\n".into()
        }),
        f!("te-vtab", true, chunked, |_n| {
            "Transfer-Encoding: chunked\x0b\r\n".into()
        }),
        f!("te-ff", true, chunked, |_n| {
            "Transfer-Encoding: \x0cchunked\r\n".into()
        }),
        f!("te-dup-identity", true, chunked, |_n| {
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n".into()
        }),
        f!("te-cl-dup-identity", true, chunked, |n| format!(
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: {n}\r\n"
        )),
        f!("te-space-name", true, chunked, |n| format!(
            "Transfer-Encoding : chunked\r\nContent-Length: {n}\r\n"
        )),
        f!("te-tab-name", true, chunked, |n| format!(
            "Transfer-Encoding\t: chunked\r\nContent-Length: {n}\r\n"
        )),
        // Not framing to Sluice (an unknown header, dropped before the upstream), so the
        // chunked bytes are the Content-Length body.
        f!("te-underscore", false, chunked, |n| format!(
            "Transfer_Encoding: chunked\r\nContent-Length: {n}\r\n"
        )),
        f!("te-obs-fold", true, chunked, |n| format!(
            "Transfer-Encoding:\r\n chunked\r\nContent-Length: {n}\r\n"
        )),
        f!("te-leading-space-line", true, chunked, |n| format!(
            "X-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n"
        )),
        f!("te-nul", true, chunked, |n| format!(
            "Transfer-Encoding: chunked\x00\r\nContent-Length: {n}\r\n"
        )),
        f!("te-cr", true, chunked, |n| format!(
            "Transfer-Encoding: chu\rnked\r\nContent-Length: {n}\r\n"
        )),
        // Content-Length forms: differing duplicates, lists, signs, radix, overflow.
        f!("cl-dup-differ", true, plain, |n| format!(
            "Content-Length: {n}\r\nContent-Length: {}\r\n",
            n + 5
        )),
        f!("cl-list-differ", true, plain, |n| format!(
            "Content-Length: {n}, {}\r\n",
            n + 1
        )),
        f!("cl-plus", true, plain, |n| format!(
            "Content-Length: +{n}\r\n"
        )),
        f!("cl-minus", true, plain, |_n| "Content-Length: -1\r\n"
            .into()),
        f!("cl-hex", true, plain, |n| format!(
            "Content-Length: 0x{n:x}\r\n"
        )),
        f!("cl-decimal", true, plain, |n| format!(
            "Content-Length: {n}.0\r\n"
        )),
        f!("cl-exp", true, plain, |_n| "Content-Length: 1e2\r\n".into()),
        f!("cl-overflow", true, plain, |_n| {
            "Content-Length: 99999999999999999999999\r\n".into()
        }),
        f!("cl-empty", true, plain, |_n| "Content-Length: \r\n".into()),
        f!("cl-nul", true, plain, |n| format!(
            "Content-Length: {n}\x00\r\n"
        )),
        f!("cl-underscore", false, plain, |n| format!(
            "Content_Length: {n}\r\nContent-Length: {n}\r\n"
        )),
        f!("cl-space-name", true, plain, |n| format!(
            "Content-Length : {n}\r\n"
        )),
        f!("cl-obs-fold", true, plain, |n| format!(
            "Content-Length:\r\n {n}\r\n"
        )),
        // Header names and values no parser should take.
        f!("empty-name", true, plain, |n| format!(
            ": x\r\nContent-Length: {n}\r\n"
        )),
        f!("nul-value", true, plain, |n| format!(
            "X-A: a\x00b\r\nContent-Length: {n}\r\n"
        )),
        f!("cr-value", true, plain, |n| format!(
            "X-A: a\rb\r\nContent-Length: {n}\r\n"
        )),
        // Upgrade without a 101: the bytes after the head stay HTTP.
        f!("upgrade", false, plain, |n| format!(
            "Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: {n}\r\n"
        )),
        f!("h2c-upgrade", false, plain, |n| {
            format!(
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: {n}\r\n"
        )
        }),
        f!("expect-continue", false, plain, |n| format!(
            "Expect: 100-continue\r\nContent-Length: {n}\r\n"
        )),
        // Chunk-size tricks inside a chunked body.
        f!(
            "chunk-ext",
            false,
            |p| format!("{:x};ext=\"x\"\r\n{p}\r\n0\r\n\r\n", p.len()),
            |_n| { "Transfer-Encoding: chunked\r\n".into() }
        ),
        f!(
            "chunk-0x",
            true,
            |p| format!("0x{:x}\r\n{p}\r\n0\r\n\r\n", p.len()),
            |_n| { "Transfer-Encoding: chunked\r\n".into() }
        ),
        f!(
            "chunk-huge",
            true,
            |p| format!("ffffffffffffffffff\r\n{p}\r\n0\r\n\r\n"),
            |_n| { "Transfer-Encoding: chunked\r\n".into() }
        ),
        f!(
            "chunk-negative",
            true,
            |p| format!("-{:x}\r\n{p}\r\n0\r\n\r\n", p.len()),
            |_n| { "Transfer-Encoding: chunked\r\n".into() }
        ),
        f!(
            "chunk-short-size",
            true,
            |p| format!("{:x}\r\n{p}\r\n0\r\n\r\n", p.len() / 2),
            |_n| { "Transfer-Encoding: chunked\r\n".into() }
        ),
    ]
}

/// Request lines: versions and methods the framings are combined with.
const REQUEST_LINES: &[(&str, bool)] = &[
    ("POST {PATH} HTTP/1.1", false),
    ("PUT {PATH} HTTP/1.1", false),
    // TE on HTTP/1.0 is faulty framing (RFC 9112 §6.1): any TE makes the case ambiguous.
    ("POST {PATH} HTTP/1.0", true),
    ("POST http://sluice{PATH} HTTP/1.1", false),
];

/// Where the hidden request sits.
const SMUGGLE_PLACES: &[&str] = &[
    "after-body",
    "inside-declared-length",
    "after-terminator-pipelined",
];

/// Line endings: CRLF, and bare LF (which a lenient parser accepts and a strict one refuses).
const LINE_ENDINGS: &[&str] = &["crlf", "bare-lf"];

fn corpus() -> Vec<Case> {
    let mut cases = Vec::new();
    for framing in framings() {
        for (line, te_on_http10_is_ambiguous) in REQUEST_LINES {
            for place in SMUGGLE_PLACES {
                for ending in LINE_ENDINGS {
                    let payload = match *place {
                        // The declared body covers the hidden request too: a parser that stops
                        // early leaves it on the connection.
                        "inside-declared-length" => format!("{JSON}{SMUGGLED}"),
                        _ => JSON.to_owned(),
                    };
                    let body = (framing.body)(&payload);
                    let headers = (framing.headers)(payload.len());
                    let line = line.replace("{PATH}", PATH);
                    let mut head = format!(
                        "{line}\r\nHost: sluice\r\nContent-Type: application/json\r\n{headers}\r\n"
                    );
                    if *ending == "bare-lf" {
                        head = head.replace("\r\n", "\n");
                    }
                    let mut bytes = head.into_bytes();
                    bytes.extend_from_slice(body.as_bytes());
                    if *place != "inside-declared-length" {
                        bytes.extend_from_slice(SMUGGLED.as_bytes());
                    }
                    let has_te = headers.to_ascii_lowercase().contains("transfer-encoding:");
                    let ambiguous = framing.ambiguous || (*te_on_http10_is_ambiguous && has_te);
                    cases.push(Case {
                        name: format!("{} / {line} / {place} / {ending}", framing.name),
                        bytes,
                        ambiguous,
                    });
                }
            }
        }
    }
    cases
}

/// What came back on one connection.
struct Answer {
    text: String,
    /// The sidecar closed the connection (EOF) within the limit.
    closed: bool,
}

async fn send(addr: &str, bytes: &[u8], limit: Duration) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr.trim_start_matches("http://"))
        .await
        .expect("the sidecar is listening");
    // The peer may close while we write: that is an answer too.
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let closed = matches!(
        tokio::time::timeout(limit, stream.read_to_end(&mut out)).await,
        Ok(Ok(_)) | Ok(Err(_))
    );
    Answer {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
    }
}

fn rounds() -> usize {
    std::env::var("SLUICE_HARDEN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversarial_framing_never_smuggles() {
    let mock = mock().await;
    // A body that never completes is given up on after a second.
    let policy = format!(
        "server: {{ drain_timeout: 10s, client_body_timeout: 1s }}\n{}",
        passthrough_policy(&mock.url())
    );
    let sidecar = Sidecar::start(&policy).await;
    let corpus = corpus();
    assert!(corpus.len() >= 500, "corpus of {}", corpus.len());
    let ambiguous = corpus.iter().filter(|c| c.ambiguous).count();

    let mut relayed = 0;
    let mut sent = 0;
    let mut failures = Vec::new();
    let started = Instant::now();
    for round in 0..rounds() {
        let mut cases = corpus.clone();
        // A different order each round, so a case meets the state another left behind.
        let shift = round * 7 % cases.len();
        cases.rotate_left(shift);
        for batch in cases.chunks(100) {
            let answers = futures_util::future::join_all(
                batch
                    .iter()
                    .map(|case| send(&sidecar.proxy, &case.bytes, Duration::from_millis(2500))),
            )
            .await;
            for (case, answer) in batch.iter().zip(answers) {
                sent += 1;
                relayed += answer.text.matches("x-sluice-upstream:").count();
                let responded = answer.text.starts_with("HTTP/1.");
                if !(responded || answer.closed) {
                    failures.push(format!("{}: no answer and not closed", case.name));
                }
                if case.ambiguous {
                    let refused = answer.text.starts_with("HTTP/1.1 400")
                        || answer.text.starts_with("HTTP/1.0 400");
                    if !(refused && answer.closed) || answer.text.contains("x-sluice-upstream:") {
                        failures.push(format!(
                            "{}: ambiguous, got {:?} (closed: {})",
                            case.name,
                            answer.text.lines().next().unwrap_or(""),
                            answer.closed
                        ));
                    }
                }
            }
        }
        // Checked each round: the mock keeps the last thousand requests.
        let received = mock.requests();
        let smuggled: Vec<_> = received
            .iter()
            .filter(|r| r.path.contains("smuggled"))
            .collect();
        assert!(smuggled.is_empty(), "smuggled upstream: {smuggled:?}");
        let underscored: Vec<_> = received
            .iter()
            .flat_map(|r| &r.headers)
            .filter(|(name, _)| name.contains('_'))
            .collect();
        assert!(underscored.is_empty(), "forwarded: {underscored:?}");
        mock.clear();
    }
    assert!(relayed > 0, "well-formed cases reach the upstream");
    assert_eq!(
        mock.request_count(),
        relayed,
        "the upstream saw exactly one request per upstream answer relayed"
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Still alive and serving.
    let after = reqwest::Client::new()
        .post(format!("{}{PATH}", sidecar.proxy))
        .header("content-type", "application/json")
        .body(JSON)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 200);
    eprintln!(
        "smuggling corpus: {} cases ({ambiguous} ambiguous) x {} rounds = {sent} sent in {:?}; \
         {relayed} upstream answers relayed, {} requests reached the upstream, 0 smuggled",
        corpus.len(),
        rounds(),
        started.elapsed(),
        mock.request_count(),
    );
}
