//! The fuzz targets' bodies: each takes arbitrary bytes and checks that Sluice's parser or
//! builder neither panics nor breaks a property its callers rely on.
//!
//! libFuzzer drives them through `fuzz_targets/*.rs` (`make harden`); `tests/fuzz_regressions.rs`
//! compiles this file too, to replay the corpus and the kept crash inputs, and to run a short
//! mutation pass, in every `make test`.

use std::path::Path;

use bytes::Bytes;
use serde_json::Value;
use sluice::exchange::headers::{copy_request_headers, sanitize_response};
use sluice::policy::{compile_text, SharedState};
use sluice::upstream::http1::ResponseDecoder;
use sluice_filters::cache::{canonical_json, CacheKey, Controls, KeyInput, Scope};
use sluice_filters::eventstream::FrameDecoder;
use sluice_filters::json_edit;
use sluice_filters::usage::{inject_include_usage, Dialect, UsageMeter};
use sluice_filters::{BodyFacts, RequestHeader, ResponseHeader};

/// A target: arbitrary bytes in, a panic when a property breaks.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("policy", policy),
    ("request_facts", request_facts),
    ("sse", sse),
    ("cache_key", cache_key),
    ("headers", headers),
    ("upstream_response", upstream_response),
];

/// The policy parser and compiler: any text is a policy or a list of errors, never a panic.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "FUZZ_KEY").then(|| "sk-fuzz".to_owned());
    let shared = SharedState::default();
    if let Ok(policy) = compile_text(text, Path::new("fuzz.yaml"), &env, &shared) {
        // The redacted view never carries the interpolated secret.
        assert!(!policy.redacted.to_string().contains("sk-fuzz"));
    }
}

/// Request facts and the byte-preserving JSON edits made to request bodies.
pub fn request_facts(data: &[u8]) {
    let parsed: Option<Value> = serde_json::from_slice(data).ok();
    for dialect in [Dialect::OpenAi, Dialect::Anthropic, Dialect::Bedrock] {
        let facts = BodyFacts::parse_for(dialect, "/model/m.x/converse-stream", data);
        assert_eq!(facts.body_len, data.len());
        if dialect != Dialect::Bedrock {
            let model = parsed.as_ref().and_then(|v| v.get("model")?.as_str());
            // A repeated field: the last one wins, as in serde_json (and the request is
            // refused before any filter).
            if parsed.as_ref().is_some_and(Value::is_object) {
                assert_eq!(facts.model.as_deref(), model);
            }
        }
    }
    // An edit of a body serde reads as an object gives a body serde reads, with the field set.
    if let Some(out) = json_edit::with_field(data, "model", br#""fuzz-model""#) {
        if parsed.as_ref().is_some_and(Value::is_object) {
            let edited: Value = serde_json::from_slice(&out).expect("an edit keeps the JSON valid");
            assert_eq!(edited["model"], "fuzz-model");
        }
    }
    if let Some(out) = inject_include_usage(data) {
        if parsed.as_ref().is_some_and(Value::is_object) {
            let edited: Value = serde_json::from_slice(&out).expect("injection keeps JSON valid");
            assert_eq!(edited["stream_options"]["include_usage"], true);
        }
    }
}

/// Response streams (SSE and Bedrock event streams) cut at arbitrary points: the bytes the
/// caller gets are the bytes sent, unless the injected usage chunk is stripped.
pub fn sse(data: &[u8]) {
    let Some((&cuts, body)) = data.split_first() else {
        return;
    };
    // Chunk sizes from the first byte: 1..=256 bytes, so lines split anywhere.
    let size = usize::from(cuts) + 1;
    for dialect in [Dialect::OpenAi, Dialect::Anthropic, Dialect::Bedrock] {
        for stream in [true, false] {
            let mut meter = UsageMeter::new(dialect, stream, false);
            let mut out = Vec::with_capacity(body.len());
            for chunk in body.chunks(size) {
                out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(chunk)));
            }
            meter.finish();
            assert_eq!(out, body, "a meter that strips nothing changes nothing");
            let _ = meter.usage();
        }
        // Stripping only ever removes whole bytes of the input, never invents any.
        let mut stripping = UsageMeter::new(dialect, true, true);
        let mut kept = 0;
        for chunk in body.chunks(size) {
            kept += stripping.feed(Bytes::copy_from_slice(chunk)).len();
        }
        assert!(kept <= body.len());
    }
    let mut decoder = FrameDecoder::new(64 * 1024);
    for chunk in body.chunks(size) {
        if decoder.feed(chunk, |_| {}).is_err() {
            break;
        }
    }
}

/// Cache keys: the canonical form is stable, equal inputs give equal keys, and the tenant
/// scope always separates them.
pub fn cache_key(data: &[u8]) {
    let request = request_from(data);
    let _ = Controls::parse(&request);
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let canonical = canonical_json(&body);
    let again: Value = serde_json::from_slice(&canonical).expect("the canonical form is JSON");
    assert_eq!(
        canonical_json(&again),
        canonical,
        "canonical form is a fixed point"
    );
    let key = |scope: &Scope| {
        CacheKey::new(&KeyInput {
            scope,
            route: "r",
            upstream: "u",
            api: "/v1/chat/completions",
            request: &request,
            credential_scoped: true,
            stream: false,
            body: &body,
            rules: &[0; 32],
        })
    };
    let (a, b) = (Scope::Tenant("a".into()), Scope::Tenant("b".into()));
    assert_eq!(key(&a), key(&a));
    assert_ne!(key(&a).digest, key(&b).digest);
    assert_ne!(key(&a).digest, key(&Scope::Shared).digest);
}

/// Headers going upstream and coming back: what must stay behind always does.
pub fn headers(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let from = request_from(rest);
    let strip = flags & 1 == 1;
    let mut to = RequestHeader::build("POST", b"/v1/chat/completions", None).expect("valid");
    copy_request_headers(&from, &mut to, strip);
    for name in to.headers.keys() {
        let name = name.as_str();
        assert!(!name.contains('_'), "{name} forwarded");
        assert!(
            !matches!(
                name,
                "host"
                    | "content-length"
                    | "transfer-encoding"
                    | "connection"
                    | "keep-alive"
                    | "te"
                    | "upgrade"
                    | "proxy-authorization"
                    | "expect"
            ),
            "{name} forwarded"
        );
        if strip {
            assert!(!matches!(name, "authorization" | "x-api-key" | "api-key"));
        }
    }
    let status = 100 + u16::from(flags) * 2 % 500;
    let Ok(mut response) = ResponseHeader::build(status, None) else {
        return;
    };
    for (name, value) in header_lines(rest) {
        let _ = response.append_header(name, value);
    }
    let had_length = response.headers.contains_key(http::header::CONTENT_LENGTH);
    sanitize_response(&mut response, flags & 2 == 2);
    for name in ["connection", "keep-alive", "upgrade", "te", "trailer"] {
        assert!(response.headers.get(name).is_none(), "{name} kept");
    }
    let te = response.headers.get_all(http::header::TRANSFER_ENCODING);
    assert!(te.iter().all(|v| v == "chunked") && te.iter().count() <= 1);
    assert!(
        !(had_length
            && response
                .headers
                .contains_key(http::header::TRANSFER_ENCODING))
    );
}

/// `name: value` lines of `data`; lines that are not a valid header are skipped.
fn header_lines(data: &[u8]) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    data.split(|b| *b == b'\n').filter_map(|line| {
        let colon = line.iter().position(|b| *b == b':')?;
        let name = std::str::from_utf8(&line[..colon]).ok()?.trim().to_owned();
        let value = line[colon + 1..].trim_ascii().to_vec();
        http::HeaderName::from_bytes(name.as_bytes()).ok()?;
        http::HeaderValue::from_bytes(&value).ok()?;
        Some((name, value))
    })
}

fn request_from(data: &[u8]) -> RequestHeader {
    let mut request = RequestHeader::build("POST", b"/v1/chat/completions", None).expect("valid");
    for (name, value) in header_lines(data) {
        let _ = request.append_header(name, value);
    }
    request
}

/// Sluice's HTTP/1 response decoder (`upstream::http1`), fed what an upstream might send: any
/// bytes give a head and body pieces or an error, never a panic; the body handed out is never
/// longer than what came in; and the same bytes read in other pieces decode the same. The
/// first byte sets the piece size (1..=64) and whether the request was HEAD.
pub fn upstream_response(data: &[u8]) {
    let Some((&seed, wire)) = data.split_first() else {
        return;
    };
    let head_request = seed & 0x80 != 0;
    let whole = decode_response(wire, wire.len().max(1), head_request);
    let pieces = decode_response(wire, usize::from(seed & 0x3f) + 1, head_request);
    assert_eq!(whole, pieces, "the split of the input changes nothing");
    if let Ok((_, body, _)) = &whole {
        assert!(body.len() <= wire.len());
    }
}

/// Status, body and reusability, or that the response was refused.
type Decoded = Result<(u16, Vec<u8>, bool), ()>;

fn decode_response(wire: &[u8], piece: usize, head_request: bool) -> Decoded {
    let mut decoder = ResponseDecoder::new(head_request);
    let mut pieces = wire.chunks(piece);
    let mut body = Vec::new();
    let mut feed = |decoder: &mut ResponseDecoder| -> bool {
        match pieces.next() {
            Some(piece) => {
                let (input, _) = decoder.input();
                input.extend_from_slice(piece);
                true
            }
            None => false,
        }
    };
    loop {
        if decoder.read_head().map_err(|_| ())? {
            break;
        }
        if !feed(&mut decoder) {
            decoder.closed().map_err(|_| ())?;
        }
    }
    loop {
        while let Some(bytes) = decoder.next_body_piece().map_err(|_| ())? {
            assert!(!bytes.is_empty());
            body.extend_from_slice(&bytes);
        }
        if decoder.done() {
            break;
        }
        if !feed(&mut decoder) {
            decoder.closed().map_err(|_| ())?;
            break;
        }
    }
    // Reuse is judged on what has arrived: bytes after the end of the response (fed here if
    // the pieces had not reached them yet) make the connection unusable.
    while feed(&mut decoder) {}
    let status = decoder.head().map_or(0, |head| head.status.as_u16());
    Ok((status, body, decoder.reusable()))
}
