//! Prompt size before the provider reports it: OpenAI models by their own tokenizer
//! (tiktoken's encodings, `super::tokenizer`), everything else — and bodies too large to tokenize on the request path — as
//! a quarter of the body's bytes.

use super::tokenizer::encoding_for_model;
use crate::usage::Dialect;
use crate::Exchange;

/// Bodies above this are estimated, not tokenized: tokenizing costs about a millisecond per
/// 100 KiB, which a request should not wait for.
const MAX_TOKENIZED_BODY: usize = 256 * 1024;
/// OpenAI's framing around each chat message, and the priming of the reply (their cookbook).
const TOKENS_PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;

/// About four bytes a token for English text and JSON.
pub fn estimate_from_bytes(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

/// The prompt's tokens as the provider will count them, as near as can be known up front.
pub fn estimate_input_tokens(ex: &Exchange) -> u64 {
    let body_len = ex.body().len();
    let bytes_estimate = estimate_from_bytes(body_len);
    if ex.dialect != Dialect::OpenAi || body_len > MAX_TOKENIZED_BODY {
        return bytes_estimate;
    }
    let Some(encoding) = ex.facts.model.as_deref().and_then(encoding_for_model) else {
        return bytes_estimate;
    };
    let Some(request) = ex.body_json() else {
        return bytes_estimate;
    };
    let count = |text: &str| encoding.count(text);
    let text_of = |value: &serde_json::Value| -> u64 {
        match value {
            serde_json::Value::String(text) => count(text),
            serde_json::Value::Array(parts) => parts
                .iter()
                .map(|part| match part {
                    serde_json::Value::String(text) => count(text),
                    other => other.get("text").and_then(|t| t.as_str()).map_or(0, count),
                })
                .sum(),
            _ => 0,
        }
    };
    if let Some(messages) = request.get("messages").and_then(|m| m.as_array()) {
        let content: u64 = messages
            .iter()
            .map(|message| {
                TOKENS_PER_MESSAGE + text_of(&message["content"]) + text_of(&message["name"])
            })
            .sum();
        return content + REPLY_PRIMING;
    }
    match request.get("prompt").or_else(|| request.get("input")) {
        Some(text) => text_of(text),
        None => bytes_estimate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(body: &'static [u8], model: Option<&str>, dialect: Dialect) -> u64 {
        let request = crate::RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        let mut ex = Exchange::with_dialect(
            "r".into(),
            request,
            bytes::Bytes::from_static(body),
            dialect,
        );
        ex.facts.model = model.map(str::to_owned);
        estimate_input_tokens(&ex)
    }

    #[test]
    fn openai_chat_is_tokenized() {
        let body =
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello, world!"}]}"#;
        // "Hello, world!" is 4 tokens in o200k_base; 3 framing + 3 priming.
        assert_eq!(estimate(body, Some("gpt-4o-mini"), Dialect::OpenAi), 10);
        let parts = br#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"Hello, world!"}]}]}"#;
        assert_eq!(estimate(parts, Some("gpt-4o"), Dialect::OpenAi), 10);
    }

    #[test]
    fn others_fall_back_to_bytes() {
        let body =
            br#"{"model":"claude-x","messages":[{"role":"user","content":"Hello, world!"}]}"#;
        let bytes = estimate_from_bytes(body.len());
        assert_eq!(estimate(body, Some("claude-x"), Dialect::Anthropic), bytes);
        assert_eq!(
            estimate(body, Some("not-a-known-model"), Dialect::OpenAi),
            bytes
        );
        assert_eq!(estimate(body, None, Dialect::OpenAi), bytes);
        assert_eq!(estimate(b"not json", Some("gpt-4o"), Dialect::OpenAi), 2);
    }

    #[test]
    fn prompts_and_inputs_count_too() {
        let body = br#"{"model":"gpt-4o","prompt":["Hello, world!","Hello, world!"]}"#;
        assert_eq!(estimate(body, Some("gpt-4o"), Dialect::OpenAi), 8);
    }
}
