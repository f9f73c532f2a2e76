//! Token usage read off a response as it passes, without holding any chunk back: the JSON body's
//! `usage` object, OpenAI's final streaming usage chunk, Anthropic's `message_start` and
//! `message_delta` events, and Bedrock's figures (response headers, Converse's `usage`, the
//! event streams' `metadata` event and `amazon-bedrock-invocationMetrics`).

use bytes::{Bytes, BytesMut};
use http::header;
use serde_json::Value;

use crate::eventstream::{self, FrameDecoder, Message};
use crate::{json_edit, ResponseHeader};

/// The API family of a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    #[default]
    OpenAi,
    Anthropic,
    /// Amazon Bedrock: JSON bodies, and `application/vnd.amazon.eventstream` streams.
    Bedrock,
}

/// How an event-stream event message begins: `:message-type` (13 bytes) of type string (7),
/// length 5, `event`. Exact enough that a payload can hardly contain it by chance.
const EVENT_MESSAGE_HEADER: &[u8] = b"\x0d:message-type\x07\x00\x05event";

impl Dialect {
    /// The events a streamed chunk carries (SSE `data:` lines; Bedrock event messages), counted
    /// per chunk: whole events behind the exchange, which frames event streams first; for
    /// chunks cut anywhere, an event split in two may be missed.
    pub fn stream_events_in(self, chunk: &[u8]) -> u64 {
        let marker: &[u8] = match self {
            Dialect::OpenAi | Dialect::Anthropic => b"data:",
            Dialect::Bedrock => EVENT_MESSAGE_HEADER,
        };
        memchr::memmem::find_iter(chunk, marker).count() as u64
    }
}

/// The JSON string fields that carry generated content in stream events: OpenAI's delta
/// `content` and tool-call `arguments`, Anthropic's `text_delta`, `input_json_delta` and
/// `thinking_delta`, Bedrock's `text`.
const CONTENT_FIELDS: [&[u8]; 5] = [
    b"\"content\":\"",
    b"\"arguments\":\"",
    b"\"text\":\"",
    b"\"partial_json\":\"",
    b"\"thinking\":\"",
];

/// Whether a streamed chunk carries generated content: one of the content fields with a
/// non-empty value (a role-only first event or an empty delta is not a token yet). For time
/// to first token and the gaps between tokens; a field split across chunks may be missed
/// (not behind the exchange, which hands on whole events).
pub fn carries_content(chunk: &[u8]) -> bool {
    CONTENT_FIELDS.iter().any(|field| {
        memchr::memmem::find_iter(chunk, field).any(|at| {
            chunk
                .get(at + field.len())
                .is_some_and(|next| *next != b'"')
        })
    })
}

/// Bedrock's InvokeModel reports its usage in these response headers.
const BEDROCK_INPUT_TOKENS: &str = "x-amzn-bedrock-input-token-count";
const BEDROCK_OUTPUT_TOKENS: &str = "x-amzn-bedrock-output-token-count";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// Of a non-streaming body only the end is kept: providers put `usage` last, so the whole
/// body never needs copying.
const KEPT_BODY_TAIL: usize = 16 * 1024;
/// An SSE line longer than this is skipped for usage purposes; an event-stream message longer
/// than this ends the reading of usage (the stream itself passes untouched).
const MAX_LINE: usize = 1024 * 1024;

/// Reads usage from a response body fed chunk by chunk.
#[derive(Debug, Clone)]
pub struct UsageMeter {
    dialect: Dialect,
    stream: bool,
    /// Non-stream: the body's last bytes; stream: the current unfinished line.
    buffer: BytesMut,
    usage: Option<Usage>,
    /// Drop OpenAI's usage-only chunk from what goes downstream (Sluice asked for it, the
    /// caller did not).
    strip_usage_chunk: bool,
    /// A Bedrock event stream's framing; `None` for other bodies, and once a stream turned out
    /// malformed (its usage is then unknown).
    frames: Option<FrameDecoder>,
    /// The stream's closing event went by (`[DONE]`, `message_stop`, a final error event).
    ended: bool,
    /// Stream: the bytes fed so far end between two events (after a blank line, or at the
    /// start), so the next chunk begins a new event.
    at_event_start: bool,
    /// Look for the provider's `model` field (only when a trace will report it).
    read_model: bool,
    model: Option<Box<str>>,
    /// Scratch for `feed`'s byte ranges to cut, kept so a stream's chunks reuse one allocation.
    cuts: Vec<(usize, usize)>,
}

impl UsageMeter {
    /// `stream`: the body is SSE, or for Bedrock an event stream.
    pub fn new(dialect: Dialect, stream: bool, strip_usage_chunk: bool) -> Self {
        Self {
            dialect,
            stream,
            buffer: BytesMut::new(),
            usage: None,
            strip_usage_chunk,
            frames: (stream && dialect == Dialect::Bedrock).then(|| FrameDecoder::new(MAX_LINE)),
            ended: false,
            at_event_start: true,
            read_model: false,
            model: None,
            cuts: Vec::new(),
        }
    }

    /// Also reads the model the provider says answered: the first `"model":"…"` field of the
    /// body (OpenAI bodies and stream chunks, Anthropic messages and `message_start`).
    /// Bedrock's answers do not name one.
    pub fn reading_model(mut self) -> Self {
        self.read_model = self.dialect != Dialect::Bedrock;
        self
    }

    /// The model the provider named, if it was looked for and found.
    pub fn take_response_model(&mut self) -> Option<Box<str>> {
        self.model.take()
    }

    /// The meter for a response, from its head: how the body is framed, whether an injected
    /// usage chunk can be cut out (not from a body of declared length: that would break its
    /// framing), and the usage Bedrock's InvokeModel reports in headers.
    pub fn for_response(
        dialect: Dialect,
        head: Option<&ResponseHeader>,
        usage_injected: bool,
    ) -> Self {
        let header = |name: &str| head.and_then(|h| h.headers.get(name));
        let content_type = header(header::CONTENT_TYPE.as_str()).map_or(&b""[..], |v| v.as_bytes());
        let stream = content_type.starts_with(b"text/event-stream")
            || content_type.starts_with(b"application/vnd.amazon.eventstream");
        let strip = usage_injected && header(header::CONTENT_LENGTH.as_str()).is_none();
        let mut meter = Self::new(dialect, stream, strip);
        if dialect == Dialect::Bedrock {
            let count = |name| header(name)?.to_str().ok()?.trim().parse::<u64>().ok();
            if let (Some(input), Some(output)) =
                (count(BEDROCK_INPUT_TOKENS), count(BEDROCK_OUTPUT_TOKENS))
            {
                meter.usage = Some(Usage {
                    input_tokens: input,
                    output_tokens: output,
                });
            }
        }
        meter
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Takes a chunk's usage into account; returns the chunk to send downstream (the same one,
    /// unless an injected usage event had to be cut out of it).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.read_model && self.model.is_none() {
            self.model = model_field(&chunk);
        }
        if self.dialect == Dialect::Bedrock && self.stream {
            self.read_event_stream(&chunk);
            return chunk;
        }
        if !self.stream {
            let keep = chunk.len().min(KEPT_BODY_TAIL);
            let excess = (self.buffer.len() + keep).saturating_sub(KEPT_BODY_TAIL);
            if excess > 0 {
                let _ = self.buffer.split_to(excess);
            }
            self.buffer.extend_from_slice(&chunk[chunk.len() - keep..]);
            return chunk;
        }
        // Byte ranges of this chunk to leave out, in order: the injected usage event, and the
        // `,"usage":null` OpenAI writes into every content chunk under `include_usage`.
        let mut cuts = std::mem::take(&mut self.cuts);
        cuts.clear();
        let mut strip: Option<(usize, usize)> = None;
        let mut line_start = 0;
        // Where the current event began in this chunk: a usage event is cut out whole, with
        // any comment or field lines before its data line (an `id:`, a `: keep-alive`), so
        // none of them is left to run into the next event. `None`: it began in an earlier
        // chunk, already sent; then its lines from `resume` on (after the end of a line that
        // began earlier) are cut.
        let mut event_start = self.at_event_start.then_some(0);
        let resume = if self.buffer.is_empty() {
            0
        } else {
            memchr::memchr(b'\n', &chunk).map_or(chunk.len(), |at| at + 1)
        };
        // A line that began in an earlier chunk is completed from this one.
        while let Some(offset) = memchr::memchr(b'\n', &chunk[line_start..]) {
            let end = line_start + offset;
            let completes_earlier = !self.buffer.is_empty();
            let blank = !completes_earlier && matches!(&chunk[line_start..end], b"" | b"\r");
            let mut null_usage = false;
            let is_usage_event = if completes_earlier {
                if self.buffer.len() + (end - line_start) <= MAX_LINE {
                    self.buffer.extend_from_slice(&chunk[line_start..end]);
                    let line = std::mem::take(&mut self.buffer);
                    null_usage = self.strip_usage_chunk && has_null_usage(&line);
                    self.read_line(&line)
                } else {
                    self.buffer.clear();
                    false
                }
            } else {
                let line = &chunk[line_start..end];
                null_usage = self.strip_usage_chunk && has_null_usage(line);
                self.read_line(line)
            };
            if null_usage {
                // The field ends the line; it is cut when it lies in this chunk (a line that
                // began earlier is already partly sent: a field split across the boundary
                // stays).
                let stop = if end > line_start && chunk[end - 1] == b'\r' {
                    end - 1
                } else {
                    end
                };
                if stop - line_start > NULL_USAGE.len() {
                    // The field and its closing brace lie in this chunk; the brace stays.
                    cuts.push((stop - 1 - NULL_USAGE.len(), stop - 1));
                }
            }
            if is_usage_event && self.strip_usage_chunk && !completes_earlier && strip.is_none() {
                // The event is this line plus its blank terminator line.
                let mut stop = end + 1;
                if chunk.get(stop) == Some(&b'\n') {
                    stop += 1;
                } else if chunk.get(stop..stop + 2) == Some(b"\r\n") {
                    stop += 2;
                }
                strip = Some((event_start.unwrap_or(resume), stop));
            }
            if blank {
                event_start = Some(end + 1);
            }
            line_start = end + 1;
        }
        self.at_event_start = event_start == Some(chunk.len());
        if line_start < chunk.len() && self.buffer.len() + (chunk.len() - line_start) <= MAX_LINE {
            self.buffer.extend_from_slice(&chunk[line_start..]);
        }
        if let Some((from, to)) = strip {
            // The usage event goes whole: cuts inside it are part of it; the others stay.
            cuts.retain(|&(start, _)| start < from || start >= to);
            cuts.push((from, to));
            cuts.sort_unstable();
        }
        if cuts.is_empty() {
            self.cuts = cuts;
            return chunk;
        }
        let removed: usize = cuts.iter().map(|(from, to)| to - from).sum();
        let mut out = BytesMut::with_capacity(chunk.len() - removed);
        let mut kept_from = 0;
        for &(from, to) in &cuts {
            // Cuts lie within their own lines, so they never overlap; `max` keeps it so.
            out.extend_from_slice(&chunk[kept_from..from.max(kept_from)]);
            kept_from = to.max(kept_from);
        }
        out.extend_from_slice(&chunk[kept_from..]);
        self.cuts = cuts;
        out.freeze()
    }

    /// The body is complete: a non-streaming body is read for its usage now.
    pub fn finish(&mut self) {
        if self.stream || self.buffer.is_empty() {
            return;
        }
        // The last `"usage"` key of the body, and the value after its colon.
        if let Some(at) = memchr::memmem::rfind(&self.buffer, b"\"usage\"") {
            let rest = self.buffer[at + 7..].trim_ascii_start();
            if let Some(value) = rest.strip_prefix(b":") {
                let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Value>();
                if let Some(Ok(usage)) = values.next() {
                    self.take_usage(&usage);
                }
            }
        }
        self.buffer = BytesMut::new();
    }

    /// Whether an SSE stream carried its closing event, so a clean end of the connection is
    /// the end of the answer; Bedrock's event streams are not judged here.
    pub fn saw_stream_end(&self) -> bool {
        let pending = self.buffer.strip_suffix(b"\r").unwrap_or(&self.buffer);
        !self.stream
            || self.dialect == Dialect::Bedrock
            || self.ended
            || ends_stream(self.dialect, pending)
    }

    /// Reads one SSE line; whether it was OpenAI's usage-only chunk.
    fn read_line(&mut self, line: &[u8]) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !self.ended && ends_stream(self.dialect, line) {
            self.ended = true;
        }
        // OpenAI's content chunks under `include_usage` end with `"usage":null` (a suffix
        // check, not a scan).
        if has_null_usage(line) {
            return false;
        }
        let Some(data) = line.strip_prefix(b"data:") else {
            return false;
        };
        // Only events that carry usage are parsed at all (`"usage":null` elsewhere in an
        // event carries none).
        if memchr::memmem::find(data, b"\"usage\"").is_none()
            || (memchr::memmem::find(data, b"\"usage\":null").is_some()
                && memchr::memmem::find(data, b"\"usage\":{").is_none())
        {
            return false;
        }
        let Ok(event) = serde_json::from_slice::<Value>(data.trim_ascii_start()) else {
            return false;
        };
        match self.dialect {
            Dialect::OpenAi => {
                let usage = &event["usage"];
                if usage.is_object() {
                    self.take_usage(usage);
                    return event["choices"].as_array().is_some_and(Vec::is_empty);
                }
                false
            }
            Dialect::Anthropic | Dialect::Bedrock => {
                self.read_anthropic_event(&event);
                false
            }
        }
    }

    /// Anthropic's streamed events: input in `message_start`, output (cumulative) in
    /// `message_delta`.
    fn read_anthropic_event(&mut self, event: &Value) {
        match event["type"].as_str() {
            Some("message_start") => self.take_usage(&event["message"]["usage"]),
            Some("message_delta") => self.take_usage(&event["usage"]),
            _ => {}
        }
    }

    /// Decodes the event-stream messages this chunk completes. A malformed stream stops the
    /// reading (not the stream): its usage is then whatever was read before.
    fn read_event_stream(&mut self, chunk: &[u8]) {
        let Some(mut frames) = self.frames.take() else {
            return;
        };
        match frames.feed(chunk, |message| self.read_bedrock_event(&message)) {
            Ok(()) => self.frames = Some(frames),
            Err(e) => tracing::debug!("usage not read from a Bedrock stream: {e}"),
        }
    }

    /// ConverseStream reports usage in its `metadata` event; InvokeModelWithResponseStream's
    /// `chunk` events carry the model's own events, base64 in `bytes`, the last of them with
    /// `amazon-bedrock-invocationMetrics` (and Anthropic models' events carry their usage).
    fn read_bedrock_event(&mut self, message: &Message) {
        if eventstream::header(message, ":message-type") != Some("event") {
            return;
        }
        match eventstream::header(message, ":event-type") {
            Some("metadata") => {
                if let Ok(event) = serde_json::from_slice::<Value>(message.payload()) {
                    self.take_usage(&event["usage"]);
                }
            }
            Some("chunk") => {
                #[derive(serde::Deserialize)]
                struct PayloadPart<'a> {
                    bytes: &'a str,
                }
                let Ok(part) = serde_json::from_slice::<PayloadPart>(message.payload()) else {
                    return;
                };
                let Ok(native) = aws_smithy_types::base64::decode(part.bytes) else {
                    return;
                };
                // Only events that carry figures are parsed.
                let finder = |needle: &[u8]| memchr::memmem::find(&native, needle).is_some();
                if !finder(b"\"usage\"") && !finder(b"invocationMetrics") {
                    return;
                }
                let Ok(event) = serde_json::from_slice::<Value>(&native) else {
                    return;
                };
                let metrics = &event["amazon-bedrock-invocationMetrics"];
                if metrics.is_object() {
                    self.take_usage(metrics);
                } else {
                    self.read_anthropic_event(&event);
                }
            }
            _ => {}
        }
    }

    /// Merges a usage object of any dialect (later figures are cumulative).
    fn take_usage(&mut self, usage: &Value) {
        let field = |names: [&str; 4]| names.iter().find_map(|name| usage[*name].as_u64());
        let input = field([
            "prompt_tokens",
            "input_tokens",
            "inputTokens",
            "inputTokenCount",
        ]);
        let output = field([
            "completion_tokens",
            "output_tokens",
            "outputTokens",
            "outputTokenCount",
        ]);
        if input.is_none() && output.is_none() {
            return;
        }
        let current = self.usage.get_or_insert_with(Usage::default);
        if let Some(input) = input {
            current.input_tokens = current.input_tokens.max(input);
        }
        if let Some(output) = output {
            current.output_tokens = output;
        }
    }
}

/// The value of the first `"model":"…"` field in `bytes`. Inside a JSON string a quote is
/// escaped, so the key's bytes cannot come from content; a value with escapes, not UTF-8 or
/// implausibly long is not a model name.
fn model_field(bytes: &[u8]) -> Option<Box<str>> {
    const KEY: &[u8] = br#""model":""#;
    let start = memchr::memmem::find(bytes, KEY)? + KEY.len();
    let rest = bytes.get(start..)?;
    let len = memchr::memchr(b'"', rest)?;
    let value = &rest[..len];
    if value.is_empty() || value.len() > 256 || value.contains(&b'\\') {
        return None;
    }
    std::str::from_utf8(value).ok().map(Box::from)
}

/// What OpenAI appends to each content chunk of a stream with `include_usage`.
const NULL_USAGE: &[u8] = br#","usage":null"#;

/// Whether an SSE line is an OpenAI data line ending with `,"usage":null}`: the field is the
/// chunk object's last, as OpenAI writes it (inside a JSON string a quote is escaped, so the
/// bytes cannot come from content).
fn has_null_usage(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.starts_with(b"data:")
        && line
            .strip_suffix(b"}")
            .is_some_and(|rest| rest.ends_with(NULL_USAGE))
}

/// Whether an SSE line closes a stream of this dialect: OpenAI's `[DONE]` (chat and
/// completions), the Responses API's final events, Anthropic's `message_stop`, or an error
/// event (a stream may end after one).
fn ends_stream(dialect: Dialect, line: &[u8]) -> bool {
    const OPENAI: &[&[u8]] = &[
        b"data: [DONE]",
        b"data:[DONE]",
        b"event: response.completed",
        b"event: response.failed",
        b"event: response.incomplete",
        b"event: error",
        b"data: {\"error\"",
    ];
    const ANTHROPIC: &[&[u8]] = &[b"event: message_stop", b"event: error"];
    let closers = match dialect {
        Dialect::OpenAi => OPENAI,
        Dialect::Anthropic => ANTHROPIC,
        Dialect::Bedrock => return false,
    };
    closers.iter().any(|closer| line.starts_with(closer))
}

/// Adds `stream_options.include_usage: true` to an OpenAI streaming request that did not ask for
/// it, so the usage can be read; returns the new body, or `None` when nothing needs changing.
pub fn inject_include_usage(body: &[u8]) -> Option<Bytes> {
    let options = match json_edit::field_span(body, "stream_options") {
        Some(span) if body[span.clone()].starts_with(b"{") => {
            let options = &body[span];
            let asked = json_edit::field_span(options, "include_usage")
                .is_some_and(|value| &options[value] == b"true");
            if asked {
                return None;
            }
            json_edit::with_field(options, "include_usage", b"true")?
        }
        // Absent or null (a non-object value is the provider's to refuse).
        Some(span) if &body[span.clone()] != b"null" => return None,
        _ => Bytes::from_static(br#"{"include_usage":true}"#),
    };
    json_edit::with_field(body, "stream_options", &options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_knows_whether_it_was_closed() {
        let fed = |dialect, body: &'static [u8]| {
            let mut meter = UsageMeter::new(dialect, true, false);
            for piece in body.chunks(3) {
                meter.feed(Bytes::from_static(piece));
            }
            meter.saw_stream_end()
        };
        let chat = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert!(fed(Dialect::OpenAi, chat));
        assert!(
            fed(Dialect::OpenAi, b"data: {}\n\ndata: [DONE]"),
            "no final newline"
        );
        assert!(!fed(Dialect::OpenAi, b"data: {\"choices\":[]}\n\n"));
        assert!(fed(
            Dialect::OpenAi,
            b"event: response.completed\ndata: {}\n\n"
        ));
        assert!(fed(
            Dialect::Anthropic,
            b"event: message_stop\r\ndata: {}\r\n\r\n"
        ));
        assert!(!fed(
            Dialect::Anthropic,
            b"event: message_delta\ndata: {}\n\n"
        ));
        assert!(fed(Dialect::Anthropic, b"event: error\ndata: {}\n\n"));
        assert!(UsageMeter::new(Dialect::OpenAi, false, false).saw_stream_end());
    }

    #[test]
    fn content_is_told_from_empty_deltas() {
        assert!(!carries_content(
            br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(carries_content(
            br#"data: {"choices":[{"delta":{"content":"Hel"}}]}"#
        ));
        assert!(carries_content(
            br#"data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}"#
        ));
        assert!(carries_content(
            br#"data: {"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\"a"}}]}}]}"#
        ));
        assert!(!carries_content(br#"data: {"type":"message_stop"}"#));
        assert!(!carries_content(b"data: [DONE]"));
    }

    fn feed_all(meter: &mut UsageMeter, chunks: &[&str]) -> String {
        let mut out = String::new();
        for chunk in chunks {
            out.push_str(std::str::from_utf8(&meter.feed(Bytes::from(chunk.to_string()))).unwrap());
        }
        meter.finish();
        out
    }

    #[test]
    fn only_the_end_of_a_large_body_is_kept() {
        let mut meter = UsageMeter::new(Dialect::OpenAi, false, false);
        let content = "x".repeat(100_000);
        let body = format!(
            r#"{{"choices":[{{"message":{{"content":"{content} \"usage\": 1"}}}}],"usage":{{"prompt_tokens":9,"completion_tokens":4}}}}"#
        );
        for piece in body.as_bytes().chunks(4096) {
            meter.feed(Bytes::copy_from_slice(piece));
            assert!(meter.buffer.len() <= KEPT_BODY_TAIL);
        }
        meter.finish();
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 9,
                output_tokens: 4
            })
        );
    }

    #[test]
    fn the_provider_s_model_is_read_only_when_asked() {
        let body = [
            r#"{"id":"x","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","#,
            r#""choices":[{"message":{"content":"say \"model\":\"no\""}}]}"#,
        ];
        let mut asked = UsageMeter::new(Dialect::OpenAi, false, false).reading_model();
        feed_all(&mut asked, &body);
        assert_eq!(
            asked.take_response_model().as_deref(),
            Some("gpt-4o-mini-2024-07-18")
        );
        let mut not_asked = UsageMeter::new(Dialect::OpenAi, false, false);
        feed_all(&mut not_asked, &body);
        assert_eq!(not_asked.take_response_model(), None);

        // A stream names it in its first event (Anthropic: inside `message_start`); content
        // that quotes the key is escaped, so it is never taken for it.
        let mut stream = UsageMeter::new(Dialect::Anthropic, true, false).reading_model();
        feed_all(
            &mut stream,
            &[
                "event: ping\ndata: {\"type\":\"ping\",\"text\":\"\\\"model\\\":\\\"x\\\"\"}\n\n",
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-3-5-haiku-20241022\"}}\n\n",
            ],
        );
        assert_eq!(
            stream.take_response_model().as_deref(),
            Some("claude-3-5-haiku-20241022")
        );
        // Bedrock's answers name none: nothing is looked for.
        let bedrock = UsageMeter::new(Dialect::Bedrock, false, false).reading_model();
        assert!(!bedrock.read_model);
    }

    #[test]
    fn non_streaming_bodies_of_both_dialects() {
        let mut openai = UsageMeter::new(Dialect::OpenAi, false, false);
        feed_all(
            &mut openai,
            &[
                r#"{"id":"x","usage":{"prompt_tokens":12,"#,
                r#""completion_tokens":5,"total_tokens":17}}"#,
            ],
        );
        assert_eq!(
            openai.usage(),
            Some(Usage {
                input_tokens: 12,
                output_tokens: 5
            })
        );
        let mut anthropic = UsageMeter::new(Dialect::Anthropic, false, false);
        feed_all(
            &mut anthropic,
            &[r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":9}}"#],
        );
        assert_eq!(
            anthropic.usage(),
            Some(Usage {
                input_tokens: 3,
                output_tokens: 9
            })
        );
        let mut none = UsageMeter::new(Dialect::OpenAi, false, false);
        feed_all(&mut none, &["not json"]);
        assert_eq!(none.usage(), None);
    }

    const OPENAI_STREAM: [&str; 4] = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"choices\":[],\"usa",
        "ge\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    ];

    #[test]
    fn a_stripped_usage_event_takes_its_comment_and_field_lines_with_it() {
        let events = [
            ": sent=1\ndata: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            ": sent=2\nid: 7\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
            ": sent=3\ndata: [DONE]\n\n",
        ];
        // One event per chunk, and all of them in one chunk.
        let mut meter = UsageMeter::new(Dialect::OpenAi, true, true);
        let out = feed_all(&mut meter, &events);
        let expected = format!("{}{}", events[0], events[2]);
        assert_eq!(out, expected);
        assert_eq!(meter.usage().map(|u| u.input_tokens), Some(7));
        let mut meter = UsageMeter::new(Dialect::OpenAi, true, true);
        assert_eq!(feed_all(&mut meter, &[&events.concat()]), expected);
        // The usage event's first line arrived in an earlier chunk: that line is gone
        // already; the rest of the event is still cut out.
        let mut meter = UsageMeter::new(Dialect::OpenAi, true, true);
        let (early, late) = events[1].split_at(9);
        let out = feed_all(&mut meter, &[events[0], early, late, events[2]]);
        assert_eq!(out, format!("{}{early}{}", events[0], events[2]));
    }

    #[test]
    fn openai_stream_usage_across_chunk_boundaries() {
        let mut meter = UsageMeter::new(Dialect::OpenAi, true, false);
        let out = feed_all(&mut meter, &OPENAI_STREAM);
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 7,
                output_tokens: 2
            })
        );
        assert_eq!(
            out,
            OPENAI_STREAM.concat(),
            "nothing changed when not stripping"
        );
    }

    #[test]
    fn the_injected_usage_chunk_is_cut_out() {
        let whole = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"id\":\"1\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        let mut meter = UsageMeter::new(Dialect::OpenAi, true, true);
        let out = feed_all(&mut meter, &[whole]);
        assert_eq!(
            out,
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 4,
                output_tokens: 1
            })
        );
        // One event per chunk, as providers send them.
        let mut meter = UsageMeter::new(Dialect::OpenAi, true, true);
        let events: Vec<&str> = whole.split_inclusive("\n\n").collect();
        let out = feed_all(&mut meter, &events);
        assert_eq!(
            out,
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn injected_null_usage_fields_are_cut_and_every_other_byte_kept() {
        // OpenAI under `include_usage`: `"usage":null` ends every content chunk.
        let content = |text: &str, eol: &str| {
            format!("data: {{\"id\":\"1\",\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}{eol}{eol}")
        };
        let usage = "data: {\"id\":\"1\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n";
        // Content that merely mentions the field (escaped inside a string) is left alone.
        let quoted = r#"say \",\"usage\":null"#;
        let upstream = [
            content("a", "\n"),
            content(quoted, "\n"),
            content("b", "\r\n"),
            usage.to_owned(),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat();
        let expected = upstream.replace(",\"usage\":null}", "}").replace(usage, "");
        assert!(expected.contains(r#"\",\"usage\":null"#));
        // Whole, one event per chunk, and in small pieces (a field split across chunks).
        for step in [upstream.len(), 7, 3, 1] {
            let mut meter = UsageMeter::new(Dialect::OpenAi, true, true);
            let pieces: Vec<&str> = if step == upstream.len() {
                vec![&upstream]
            } else {
                upstream
                    .as_bytes()
                    .chunks(step)
                    .map(|piece| std::str::from_utf8(piece).unwrap())
                    .collect()
            };
            let out = feed_all(&mut meter, &pieces);
            if step == upstream.len() {
                assert_eq!(out, expected);
            } else {
                // Whatever the split, nothing but the injected bytes is ever removed.
                assert!(is_subsequence(&expected, &out) && is_subsequence(&out, &upstream));
            }
            assert_eq!(
                meter.usage(),
                Some(Usage {
                    input_tokens: 4,
                    output_tokens: 2
                })
            );
        }
        let events: Vec<&str> = upstream.split_inclusive("\n\n").collect();
        let mut meter = UsageMeter::new(Dialect::OpenAi, true, true);
        assert_eq!(feed_all(&mut meter, &events), expected);
        // A caller that asked for usage gets OpenAI's stream unchanged.
        let mut meter = UsageMeter::new(Dialect::OpenAi, true, false);
        assert_eq!(feed_all(&mut meter, &events), upstream);
    }

    #[test]
    fn stripping_only_removes_bytes_whatever_the_mix_and_split() {
        let events = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            ": keep-alive\nid: 7\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n",
            "data: {\"choices\":[],\"usage\":null}\r\n\r\n",
            "data: {\"usage\":null}\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n",
            "data: [DONE]\n\n",
        ];
        // A small deterministic generator: every order of a few events, split every way.
        let mut seed = 0x2545_f491_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..300 {
            let stream: String = (0..6)
                .map(|_| events[next() as usize % events.len()])
                .collect();
            let mut meter = UsageMeter::new(Dialect::OpenAi, true, true);
            let mut out = String::new();
            let mut rest = stream.as_str();
            while !rest.is_empty() {
                let mut size = (next() as usize % 40 + 1).min(rest.len());
                while !rest.is_char_boundary(size) {
                    size += 1;
                }
                let (piece, after) = rest.split_at(size);
                out.push_str(
                    std::str::from_utf8(&meter.feed(Bytes::from(piece.to_owned()))).unwrap(),
                );
                rest = after;
            }
            assert!(is_subsequence(&out, &stream), "{stream:?} -> {out:?}");
        }
    }

    /// Whether `inner`'s bytes appear in `outer` in order.
    fn is_subsequence(inner: &str, outer: &str) -> bool {
        let mut outer = outer.bytes();
        inner.bytes().all(|b| outer.any(|o| o == b))
    }

    #[test]
    fn anthropic_stream_usage() {
        let mut meter = UsageMeter::new(Dialect::Anthropic, true, false);
        feed_all(
            &mut meter,
            &[
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n",
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
            ],
        );
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 25,
                output_tokens: 15
            })
        );
    }

    fn bedrock_event(kind: &str, payload: &str) -> Bytes {
        crate::eventstream::encode(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            Bytes::from(payload.to_owned()),
        )
        .unwrap()
    }

    /// Feeds `stream` cut at every `step` bytes; returns what went downstream.
    fn feed_in_pieces(meter: &mut UsageMeter, stream: &[u8], step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(piece)));
        }
        meter.finish();
        out
    }

    #[test]
    fn bedrock_converse_json_usage() {
        let mut meter = UsageMeter::new(Dialect::Bedrock, false, false);
        feed_all(
            &mut meter,
            &[
                r#"{"output":{"message":{"role":"assistant","content":[{"text":"\"usage\""}]}},"stopReason":"end_turn","usage":{"inputTokens":21,"outputTokens":7,"totalTokens":28},"metrics":{"latencyMs":80}}"#,
            ],
        );
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 21,
                output_tokens: 7
            })
        );
    }

    #[test]
    fn bedrock_invoke_usage_comes_from_response_headers() {
        let mut head = ResponseHeader::build(200, None).unwrap();
        head.insert_header("content-type", "application/json")
            .unwrap();
        head.insert_header("X-Amzn-Bedrock-Input-Token-Count", "31")
            .unwrap();
        head.insert_header("X-Amzn-Bedrock-Output-Token-Count", "9")
            .unwrap();
        let mut meter = UsageMeter::for_response(Dialect::Bedrock, Some(&head), false);
        // A native body without figures leaves the headers' usage standing.
        feed_all(&mut meter, &[r#"{"generation":"hi"}"#]);
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 31,
                output_tokens: 9
            })
        );
        // The same headers mean nothing from another provider.
        let openai = UsageMeter::for_response(Dialect::OpenAi, Some(&head), false);
        assert_eq!(openai.usage(), None);
        // Without the headers, a native Anthropic body's usage is read.
        let mut json = ResponseHeader::build(200, None).unwrap();
        json.insert_header("content-type", "application/json")
            .unwrap();
        let mut meter = UsageMeter::for_response(Dialect::Bedrock, Some(&json), false);
        feed_all(
            &mut meter,
            &[r#"{"type":"message","content":[],"usage":{"input_tokens":4,"output_tokens":2}}"#],
        );
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 4,
                output_tokens: 2
            })
        );
    }

    #[test]
    fn bedrock_converse_stream_usage_from_the_metadata_event() {
        let stream: Vec<u8> = [
            bedrock_event("messageStart", r#"{"role":"assistant"}"#),
            bedrock_event(
                "contentBlockDelta",
                r#"{"contentBlockIndex":0,"delta":{"text":"\"usage\": 1"}}"#,
            ),
            bedrock_event("messageStop", r#"{"stopReason":"end_turn"}"#),
            bedrock_event(
                "metadata",
                r#"{"usage":{"inputTokens":12,"outputTokens":34,"totalTokens":46},"metrics":{"latencyMs":5}}"#,
            ),
        ]
        .concat();
        let mut head = ResponseHeader::build(200, None).unwrap();
        head.insert_header("content-type", "application/vnd.amazon.eventstream")
            .unwrap();
        for step in [1, 7, 64, stream.len()] {
            let mut meter = UsageMeter::for_response(Dialect::Bedrock, Some(&head), false);
            let out = feed_in_pieces(&mut meter, &stream, step);
            assert_eq!(out, stream, "passed through byte for byte");
            assert_eq!(
                meter.usage(),
                Some(Usage {
                    input_tokens: 12,
                    output_tokens: 34
                }),
                "step {step}"
            );
        }
        assert_eq!(Dialect::Bedrock.stream_events_in(&stream), 4);
        assert_eq!(Dialect::OpenAi.stream_events_in(&stream), 0);
    }

    #[test]
    fn bedrock_invoke_stream_usage_from_chunks() {
        let chunk = |native: serde_json::Value| {
            let bytes = aws_smithy_types::base64::encode(native.to_string());
            bedrock_event("chunk", &serde_json::json!({ "bytes": bytes }).to_string())
        };
        // Anthropic's own events carry usage.
        let anthropic: Vec<u8> = [
            chunk(serde_json::json!({"type":"message_start","message":{"usage":{"input_tokens":15,"output_tokens":1}}})),
            chunk(serde_json::json!({"type":"content_block_delta","delta":{"text":"hi"}})),
            chunk(serde_json::json!({"type":"message_delta","usage":{"output_tokens":6}})),
        ]
        .concat();
        let mut meter = UsageMeter::new(Dialect::Bedrock, true, false);
        feed_in_pieces(&mut meter, &anthropic, 5);
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 15,
                output_tokens: 6
            })
        );
        // Any model's last chunk carries Bedrock's invocation metrics.
        let other: Vec<u8> = [
            chunk(serde_json::json!({"generation":"hello"})),
            chunk(serde_json::json!({"generation":"","amazon-bedrock-invocationMetrics":{"inputTokenCount":40,"outputTokenCount":11,"invocationLatency":9,"firstByteLatency":3}})),
        ]
        .concat();
        let mut meter = UsageMeter::new(Dialect::Bedrock, true, false);
        feed_in_pieces(&mut meter, &other, 3);
        assert_eq!(
            meter.usage(),
            Some(Usage {
                input_tokens: 40,
                output_tokens: 11
            })
        );
    }

    #[test]
    fn a_corrupt_bedrock_stream_stops_the_reading_not_the_stream() {
        let mut bad = bedrock_event(
            "metadata",
            r#"{"usage":{"inputTokens":1,"outputTokens":1}}"#,
        )
        .to_vec();
        bad[20] ^= 0xff;
        let good = bedrock_event(
            "metadata",
            r#"{"usage":{"inputTokens":2,"outputTokens":2}}"#,
        );
        let stream = [bad.as_slice(), &good].concat();
        let mut meter = UsageMeter::new(Dialect::Bedrock, true, false);
        assert_eq!(feed_in_pieces(&mut meter, &stream, 10), stream);
        assert_eq!(meter.usage(), None);
    }

    #[test]
    fn include_usage_is_injected_once() {
        let body = br#"{"model":"m","stream":true,"messages":[]}"#;
        let injected = inject_include_usage(body).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&injected).unwrap();
        assert_eq!(value["stream_options"]["include_usage"], true);
        assert_eq!(value["model"], "m");
        assert!(inject_include_usage(&injected).is_none());
        assert!(inject_include_usage(b"not json").is_none());
    }
}
