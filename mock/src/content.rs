//! What the mock answers: bodies and SSE events in each API's real shape, derived from the
//! request so tests can check that it arrived intact.

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
    Embeddings,
    Models,
    AnthropicMessages,
    BedrockConverse,
    BedrockConverseStream,
    /// InvokeModel, answering as an Anthropic model on Bedrock does.
    BedrockInvoke,
    BedrockInvokeStream,
}

impl Api {
    /// OpenAI paths (`/v1/...`), Azure deployment paths, Anthropic's `/v1/messages`, Bedrock's
    /// `/model/{modelId}/{operation}`.
    pub fn from_request(method: &Method, path: &str) -> Option<Api> {
        if let Some(rest) = path.strip_prefix("/model/") {
            let (model, operation) = rest.split_once('/')?;
            if method != Method::POST || model.is_empty() {
                return None;
            }
            return match operation {
                "converse" => Some(Api::BedrockConverse),
                "converse-stream" => Some(Api::BedrockConverseStream),
                "invoke" => Some(Api::BedrockInvoke),
                "invoke-with-response-stream" => Some(Api::BedrockInvokeStream),
                _ => None,
            };
        }
        if let Some(rest) = path.strip_prefix("/openai/deployments/") {
            // Azure serves only the OpenAI inference operations under a deployment.
            return match (method, rest.split_once('/')?.1) {
                (&Method::POST, "chat/completions") => Some(Api::Chat),
                (&Method::POST, "completions") => Some(Api::Completions),
                (&Method::POST, "embeddings") => Some(Api::Embeddings),
                _ => None,
            };
        }
        match (method, path.strip_prefix("/v1/")?) {
            (&Method::POST, "chat/completions") => Some(Api::Chat),
            (&Method::POST, "completions") => Some(Api::Completions),
            (&Method::POST, "embeddings") => Some(Api::Embeddings),
            (&Method::GET, "models") => Some(Api::Models),
            (&Method::POST, "messages") => Some(Api::AnthropicMessages),
            _ => None,
        }
    }

    /// Whether a request may ask for a stream (`"stream": true`).
    pub fn streams(self) -> bool {
        matches!(self, Api::Chat | Api::Completions | Api::AnthropicMessages)
    }

    /// Bedrock's streaming operations stream whatever the body says.
    pub fn always_streams(self) -> bool {
        matches!(self, Api::BedrockConverseStream | Api::BedrockInvokeStream)
    }

    pub fn is_bedrock(self) -> bool {
        matches!(
            self,
            Api::BedrockConverse
                | Api::BedrockConverseStream
                | Api::BedrockInvoke
                | Api::BedrockInvokeStream
        )
    }

    /// An error body in this API's provider shape (Bedrock names the error in a header too:
    /// [`crate::bedrock::error_type`]).
    pub fn error(self, status: StatusCode, message: &str) -> Value {
        if self.is_bedrock() {
            return json!({ "message": message });
        }
        if self == Api::AnthropicMessages {
            let kind = match status.as_u16() {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            return json!({"type": "error", "error": {"type": kind, "message": message}});
        }
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
    }
}

/// One answer, split into `chunks` pieces.
pub struct Answer {
    api: Api,
    id: String,
    model: String,
    text: String,
    pieces: Vec<String>,
    input_tokens: usize,
    embedding_inputs: Vec<String>,
}

const CREATED: u64 = 1_767_225_600;
const MODELS: [&str; 3] = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"];

/// Longest reply text, in chars; keeps answers (and benchmark allocations) small whatever was sent.
const REPLY_LIMIT: usize = 200;

/// Appends the text of `content` (a string, or an array of strings or of parts with `text`) to
/// `out`, up to `limit` chars in all, without copying more of a huge prompt than the reply needs.
fn push_text(out: &mut String, content: &Value, limit: usize) {
    let mut push = |text: &str| {
        let room = limit.saturating_sub(out.chars().count());
        out.extend(text.chars().take(room));
    };
    match content {
        Value::String(text) => push(text),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.as_str().or_else(|| part.get("text")?.as_str()))
            .for_each(push),
        _ => {}
    }
}

fn split(text: &str, pieces: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(pieces).max(1);
    (0..pieces)
        .map(|i| chars.iter().skip(i * size).take(size).collect())
        .collect()
}

impl Answer {
    /// The model the answer says served it.
    pub fn name_model(&mut self, model: &str) {
        model.clone_into(&mut self.model);
    }

    pub fn new(
        api: Api,
        request: &Value,
        path: &str,
        body_len: usize,
        chunks: usize,
        id: u64,
    ) -> Answer {
        let in_path = crate::bedrock::model_in_path(path).or_else(|| {
            let deployment = path
                .strip_prefix("/openai/deployments/")?
                .split('/')
                .next()?;
            Some(deployment.to_owned())
        });
        let model = match (request.get("model").and_then(Value::as_str), in_path) {
            (Some(model), _) => model.to_owned(),
            (None, Some(model)) => model,
            (None, None) => "mock-model".to_owned(),
        };
        let said = match api {
            Api::Chat
            | Api::AnthropicMessages
            | Api::BedrockConverse
            | Api::BedrockConverseStream
            | Api::BedrockInvoke
            | Api::BedrockInvokeStream => request
                .get("messages")
                .and_then(Value::as_array)
                .and_then(|messages| messages.last())
                .map_or(&Value::Null, |message| &message["content"]),
            Api::Completions => &request["prompt"],
            Api::Embeddings | Api::Models => &Value::Null,
        };
        let mut text = String::from("echo: ");
        push_text(&mut text, said, REPLY_LIMIT);
        let embedding_inputs = match &request["input"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().unwrap_or("").to_owned())
                .collect(),
            _ => Vec::new(),
        };
        Answer {
            api,
            id: match api {
                Api::AnthropicMessages | Api::BedrockInvoke | Api::BedrockInvokeStream => {
                    format!("msg_mock_{id}")
                }
                _ => format!("chatcmpl-mock-{id}"),
            },
            model,
            pieces: split(&text, chunks),
            text,
            input_tokens: (body_len / 4).max(1),
            embedding_inputs,
        }
    }

    pub fn input_tokens(&self) -> usize {
        self.input_tokens
    }

    pub fn output_tokens(&self) -> usize {
        self.pieces.len()
    }

    fn openai_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens(),
            "total_tokens": self.input_tokens + self.output_tokens(),
        })
    }

    /// The non-streaming answer.
    pub fn whole(&self) -> Value {
        match self.api {
            Api::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": CREATED, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text, "refusal": null},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": self.openai_usage(),
            }),
            Api::Completions => json!({
                "id": self.id, "object": "text_completion", "created": CREATED, "model": self.model,
                "choices": [{"index": 0, "text": self.text, "logprobs": null, "finish_reason": "stop"}],
                "usage": self.openai_usage(),
            }),
            Api::Embeddings => json!({
                "object": "list", "model": self.model,
                "data": self.embedding_inputs.iter().enumerate().map(|(i, input)| json!({
                    "object": "embedding", "index": i, "embedding": embedding(input),
                })).collect::<Vec<_>>(),
                "usage": {"prompt_tokens": self.input_tokens, "total_tokens": self.input_tokens},
            }),
            Api::Models => json!({
                "object": "list",
                "data": MODELS.iter().map(|id| json!({
                    "id": id, "object": "model", "created": CREATED, "owned_by": "sluice-mock",
                })).collect::<Vec<_>>(),
            }),
            Api::AnthropicMessages | Api::BedrockInvoke | Api::BedrockInvokeStream => json!({
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [{"type": "text", "text": self.text}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens()},
            }),
            Api::BedrockConverse | Api::BedrockConverseStream => json!({
                "output": {"message": {"role": "assistant", "content": [{"text": self.text}]}},
                "stopReason": "end_turn",
                "usage": self.bedrock_usage(),
                "metrics": {"latencyMs": 1},
            }),
        }
    }

    fn bedrock_usage(&self) -> Value {
        json!({
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens(),
            "totalTokens": self.input_tokens + self.output_tokens(),
        })
    }

    /// Anthropic's streamed events, as `(event name, data)`.
    fn anthropic_events(&self) -> Vec<(&'static str, Value)> {
        let mut events = vec![
            (
                "message_start",
                json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 1}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            ("ping", json!({"type": "ping"})),
        ];
        events.extend(self.pieces.iter().map(|piece| {
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": piece}}),
            )
        }));
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push((
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": self.output_tokens()}}),
        ));
        events.push(("message_stop", json!({"type": "message_stop"})));
        events
    }

    /// The streamed answer of a Bedrock streaming operation, as event-stream messages:
    /// ConverseStream's events, or InvokeModelWithResponseStream's `chunk` events carrying the
    /// model's own (Anthropic) events, the last with Bedrock's invocation metrics.
    pub fn bedrock_events(&self) -> Vec<(&'static str, Value)> {
        if self.api == Api::BedrockInvokeStream {
            let mut native = self.anthropic_events();
            if let Some((_, last)) = native.last_mut() {
                last["amazon-bedrock-invocationMetrics"] = json!({
                    "inputTokenCount": self.input_tokens,
                    "outputTokenCount": self.output_tokens(),
                    "invocationLatency": 1, "firstByteLatency": 1,
                });
            }
            return native
                .into_iter()
                .map(|(_, event)| {
                    let bytes = aws_smithy_types::base64::encode(event.to_string());
                    ("chunk", json!({ "bytes": bytes }))
                })
                .collect();
        }
        let mut events = vec![("messageStart", json!({"role": "assistant"}))];
        events.extend(self.pieces.iter().map(|piece| {
            (
                "contentBlockDelta",
                json!({"contentBlockIndex": 0, "delta": {"text": piece}}),
            )
        }));
        events.push(("contentBlockStop", json!({"contentBlockIndex": 0})));
        events.push(("messageStop", json!({"stopReason": "end_turn"})));
        events.push((
            "metadata",
            json!({"usage": self.bedrock_usage(), "metrics": {"latencyMs": 1}}),
        ));
        events
    }

    /// The streamed answer as SSE events, each one body frame.
    pub fn events(&self, include_usage: bool) -> Vec<Bytes> {
        let data = |value: Value| Bytes::from(format!("data: {value}\n\n"));
        let last = self.pieces.len() - 1;
        match self.api {
            Api::AnthropicMessages => self
                .anthropic_events()
                .into_iter()
                .map(|(name, value)| Bytes::from(format!("event: {name}\ndata: {value}\n\n")))
                .collect(),
            Api::Completions => {
                let mut events: Vec<Bytes> = self.pieces.iter().enumerate().map(|(i, piece)| data(with_null_usage(json!({
                    "id": self.id, "object": "text_completion", "created": CREATED, "model": self.model,
                    "choices": [{"index": 0, "text": piece, "logprobs": null,
                                 "finish_reason": if i == last { json!("stop") } else { Value::Null }}],
                }), include_usage))).collect();
                if include_usage {
                    events.push(data(
                        json!({"id": self.id, "object": "text_completion", "created": CREATED,
                        "model": self.model, "choices": [], "usage": self.openai_usage()}),
                    ));
                }
                events.push(Bytes::from_static(b"data: [DONE]\n\n"));
                events
            }
            _ => {
                let mut events: Vec<Bytes> = self.pieces.iter().enumerate().map(|(i, piece)| {
                    let mut delta = json!({"content": piece});
                    if i == 0 {
                        delta["role"] = json!("assistant");
                    }
                    data(with_null_usage(json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": CREATED, "model": self.model,
                        "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                     "finish_reason": if i == last { json!("stop") } else { Value::Null }}],
                    }), include_usage))
                }).collect();
                if include_usage {
                    events.push(data(
                        json!({"id": self.id, "object": "chat.completion.chunk", "created": CREATED,
                        "model": self.model, "choices": [], "usage": self.openai_usage()}),
                    ));
                }
                events.push(Bytes::from_static(b"data: [DONE]\n\n"));
                events
            }
        }
    }
}

/// OpenAI's content chunks under `stream_options.include_usage`: each carries `"usage":null`
/// (last, as OpenAI writes it) before the usage-only chunk that ends the stream.
fn with_null_usage(mut chunk: Value, include_usage: bool) -> Value {
    if include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk
}

/// A deterministic 8-dimension vector from the input's bytes.
fn embedding(input: &str) -> Vec<f64> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    (0..8)
        .map(|i| {
            for byte in input.bytes().chain([i as u8]) {
                state = (state ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
            (state % 2000) as f64 / 1000.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_apis() {
        assert_eq!(
            Api::from_request(&Method::POST, "/v1/chat/completions"),
            Some(Api::Chat)
        );
        assert_eq!(
            Api::from_request(&Method::POST, "/openai/deployments/d/embeddings"),
            Some(Api::Embeddings)
        );
        assert_eq!(
            Api::from_request(&Method::POST, "/v1/messages"),
            Some(Api::AnthropicMessages)
        );
        assert_eq!(
            Api::from_request(&Method::GET, "/v1/models"),
            Some(Api::Models)
        );
        assert_eq!(
            Api::from_request(&Method::GET, "/v1/chat/completions"),
            None
        );
        assert_eq!(Api::from_request(&Method::POST, "/other"), None);
        assert_eq!(
            Api::from_request(
                &Method::POST,
                "/model/amazon.nova-pro-v1%3A0/converse-stream"
            ),
            Some(Api::BedrockConverseStream)
        );
        assert_eq!(
            Api::from_request(&Method::POST, "/model/m/invoke-with-response-stream"),
            Some(Api::BedrockInvokeStream)
        );
        assert_eq!(Api::from_request(&Method::GET, "/model/m/converse"), None);
        assert_eq!(Api::from_request(&Method::POST, "/model//invoke"), None);
        assert_eq!(Api::from_request(&Method::POST, "/model/m/chat"), None);
        assert_eq!(
            Api::from_request(&Method::POST, "/openai/deployments/d/messages"),
            None
        );
    }

    #[test]
    fn answers_echo_the_last_message_in_n_pieces() {
        let request = json!({"model": "m", "messages": [
            {"role": "user", "content": "first"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]}]});
        let answer = Answer::new(Api::Chat, &request, "/v1/chat/completions", 100, 3, 7);
        assert_eq!(
            answer.whole()["choices"][0]["message"]["content"],
            "echo: second"
        );
        assert_eq!(answer.pieces.concat(), "echo: second");
        assert_eq!(answer.pieces.len(), 3);
        assert_eq!(answer.whole()["usage"]["completion_tokens"], 3);
        let events = answer.events(true);
        assert_eq!(events.len(), 3 + 2);
        assert!(std::str::from_utf8(&events[3])
            .unwrap()
            .contains("\"usage\""));
        assert_eq!(&events[4][..], b"data: [DONE]\n\n");
        assert_eq!(answer.events(false).len(), 4);
        // Like OpenAI: every content chunk says `"usage":null` when usage was asked for.
        for event in &events[..3] {
            assert!(event.ends_with(b",\"usage\":null}\n\n"), "{event:?}");
        }
        for event in answer.events(false) {
            assert!(!event.windows(7).any(|w| w == b"\"usage\""), "{event:?}");
        }
    }

    #[test]
    fn prompts_may_be_arrays_of_strings() {
        let request = json!({"prompt": ["ab", "cd"]});
        let answer = Answer::new(Api::Completions, &request, "/v1/completions", 10, 1, 0);
        assert_eq!(answer.text, "echo: abcd");
    }

    #[test]
    fn short_texts_still_give_n_events() {
        assert_eq!(split("ab", 5).len(), 5);
        assert_eq!(split("ab", 5).concat(), "ab");
    }
}
