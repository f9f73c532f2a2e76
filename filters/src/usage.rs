//! Token usage read off a response as it passes, without holding any chunk back: the JSON body's
//! `usage` object, OpenAI's final streaming usage chunk, Anthropic's `message_start` and
//! `message_delta` events.

use bytes::{Bytes, BytesMut};

use crate::json_edit;

/// The API family of a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    #[default]
    OpenAi,
    Anthropic,
}

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
/// An SSE line longer than this is skipped for usage purposes.
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
}

impl UsageMeter {
    pub fn new(dialect: Dialect, stream: bool, strip_usage_chunk: bool) -> Self {
        Self {
            dialect,
            stream,
            buffer: BytesMut::new(),
            usage: None,
            strip_usage_chunk,
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Takes a chunk's usage into account; returns the chunk to send downstream (the same one,
    /// unless an injected usage event had to be cut out of it).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if !self.stream {
            let keep = chunk.len().min(KEPT_BODY_TAIL);
            let excess = (self.buffer.len() + keep).saturating_sub(KEPT_BODY_TAIL);
            if excess > 0 {
                let _ = self.buffer.split_to(excess);
            }
            self.buffer.extend_from_slice(&chunk[chunk.len() - keep..]);
            return chunk;
        }
        let mut strip: Option<(usize, usize)> = None;
        let mut line_start = 0;
        // A line that began in an earlier chunk is completed from this one.
        while let Some(offset) = memchr::memchr(b'\n', &chunk[line_start..]) {
            let end = line_start + offset;
            let completes_earlier = !self.buffer.is_empty();
            let is_usage_event = if completes_earlier {
                if self.buffer.len() + (end - line_start) <= MAX_LINE {
                    self.buffer.extend_from_slice(&chunk[line_start..end]);
                    let line = std::mem::take(&mut self.buffer);
                    self.read_line(&line)
                } else {
                    self.buffer.clear();
                    false
                }
            } else {
                self.read_line(&chunk[line_start..end])
            };
            if is_usage_event && self.strip_usage_chunk && !completes_earlier && strip.is_none() {
                // The event is this line plus its blank terminator line.
                let mut stop = end + 1;
                if chunk.get(stop) == Some(&b'\n') {
                    stop += 1;
                } else if chunk.get(stop..stop + 2) == Some(b"\r\n") {
                    stop += 2;
                }
                strip = Some((line_start, stop));
            }
            line_start = end + 1;
        }
        if line_start < chunk.len() && self.buffer.len() + (chunk.len() - line_start) <= MAX_LINE {
            self.buffer.extend_from_slice(&chunk[line_start..]);
        }
        match strip {
            Some((from, to)) => {
                let mut out = BytesMut::with_capacity(chunk.len() - (to - from));
                out.extend_from_slice(&chunk[..from]);
                out.extend_from_slice(&chunk[to..]);
                out.freeze()
            }
            None => chunk,
        }
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
                let mut values =
                    serde_json::Deserializer::from_slice(value).into_iter::<serde_json::Value>();
                if let Some(Ok(usage)) = values.next() {
                    self.take_usage(&usage);
                }
            }
        }
        self.buffer = BytesMut::new();
    }

    /// Reads one SSE line; whether it was OpenAI's usage-only chunk.
    fn read_line(&mut self, line: &[u8]) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return false;
        };
        // Only events that carry usage are parsed at all.
        if memchr::memmem::find(data, b"\"usage\"").is_none() {
            return false;
        }
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii_start()) else {
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
            Dialect::Anthropic => {
                match event["type"].as_str() {
                    Some("message_start") => self.take_usage(&event["message"]["usage"]),
                    Some("message_delta") => self.take_usage(&event["usage"]),
                    _ => {}
                }
                false
            }
        }
    }

    /// Merges a usage object of either dialect (later figures are cumulative).
    fn take_usage(&mut self, usage: &serde_json::Value) {
        let field = |names: [&str; 2]| names.iter().find_map(|name| usage[*name].as_u64());
        let input = field(["prompt_tokens", "input_tokens"]);
        let output = field(["completion_tokens", "output_tokens"]);
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
