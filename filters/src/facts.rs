use crate::usage::Dialect;

/// The facts about a request body that filters need, parsed tolerantly: a body that is not JSON,
/// or a field of an unexpected type, leaves the fact unknown instead of failing the request (the
/// provider is the judge of its own API).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyFacts {
    pub model: Option<String>,
    pub stream: bool,
    /// `max_tokens`, or OpenAI's newer `max_completion_tokens`, or Bedrock Converse's
    /// `inferenceConfig.maxTokens`.
    pub max_tokens: Option<u64>,
    /// Body size in bytes: the input to prompt-size estimates.
    pub body_len: usize,
    /// A field above that the body names twice. Parsers disagree on which copy counts (most
    /// keep the last, some the first), so such a request is refused rather than guessed at.
    pub duplicate_field: Option<&'static str>,
}

impl BodyFacts {
    /// The facts of a request to a provider of this dialect. Bedrock names the model and the
    /// operation (streaming or not) in the path, not in the body.
    pub fn parse_for(dialect: Dialect, path: &str, body: &[u8]) -> Self {
        let mut facts = Self::parse(body);
        if dialect == Dialect::Bedrock {
            let operation = BedrockOperation::parse_path(path);
            facts.stream = operation.as_ref().is_some_and(|(op, _)| op.streams());
            facts.model = operation.map(|(_, model)| model);
        }
        facts
    }

    pub fn parse(body: &[u8]) -> Self {
        let mut facts = BodyFacts {
            body_len: body.len(),
            ..Default::default()
        };
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return facts;
        }
        let Ok(raw) = serde_json::from_slice::<RawFacts>(body) else {
            return facts;
        };
        facts.model = raw.model.and_then(|v| match v {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        });
        facts.stream = matches!(raw.stream, Some(serde_json::Value::Bool(true)));
        let converse_max = raw
            .inference_config
            .and_then(|mut c| c.get_mut("maxTokens").map(serde_json::Value::take));
        facts.max_tokens = raw
            .max_tokens
            .or(raw.max_completion_tokens)
            .or(converse_max)
            .and_then(|v| v.as_u64());
        facts.duplicate_field = raw.duplicate;
        facts
    }
}

/// The top-level fields filters read, each parsed on its own so one odd field does not hide
/// the others; other fields are skipped without being materialised. A repeated field keeps its
/// last value (as serde_json and most providers' parsers do) and is reported.
#[derive(Default)]
struct RawFacts {
    model: Option<serde_json::Value>,
    stream: Option<serde_json::Value>,
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
    inference_config: Option<serde_json::Value>,
    duplicate: Option<&'static str>,
}

impl<'de> serde::Deserialize<'de> for RawFacts {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = RawFacts;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawFacts, A::Error> {
                let mut raw = RawFacts::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let (name, slot) = match &*key {
                        "model" => ("model", &mut raw.model),
                        "stream" => ("stream", &mut raw.stream),
                        "max_tokens" => ("max_tokens", &mut raw.max_tokens),
                        "max_completion_tokens" => {
                            ("max_completion_tokens", &mut raw.max_completion_tokens)
                        }
                        "inferenceConfig" => ("inferenceConfig", &mut raw.inference_config),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    if slot.replace(map.next_value()?).is_some() {
                        raw.duplicate.get_or_insert(name);
                    }
                }
                Ok(raw)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A Bedrock runtime operation, as named by the last segment of its path
/// (`/model/{modelId}/{operation}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BedrockOperation {
    Converse,
    ConverseStream,
    InvokeModel,
    InvokeModelWithResponseStream,
}

impl BedrockOperation {
    pub fn streams(self) -> bool {
        matches!(
            self,
            BedrockOperation::ConverseStream | BedrockOperation::InvokeModelWithResponseStream
        )
    }

    /// The operation and model id of a path ending in `/model/{modelId}/{operation}` (a route
    /// prefix may come before it; the query is ignored). SDKs percent-encode the id — inference
    /// profile ids hold `:`, ARNs `:` and `/` — so it is decoded here.
    pub fn parse_path(path: &str) -> Option<(BedrockOperation, String)> {
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        let mut segments = path.rsplit('/');
        let operation = match segments.next()? {
            "converse" => BedrockOperation::Converse,
            "converse-stream" => BedrockOperation::ConverseStream,
            "invoke" => BedrockOperation::InvokeModel,
            "invoke-with-response-stream" => BedrockOperation::InvokeModelWithResponseStream,
            _ => return None,
        };
        let encoded = segments.next()?;
        if segments.next()? != "model" {
            return None;
        }
        let model = percent_encoding::percent_decode_str(encoded)
            .decode_utf8()
            .ok()?;
        (!model.is_empty()).then(|| (operation, model.into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_field_keeps_its_last_value_and_is_reported() {
        let facts =
            BodyFacts::parse(br#"{"model":"gpt-4o-mini","x":{"model":1},"model":"gpt-4o"}"#);
        assert_eq!(facts.model.as_deref(), Some("gpt-4o"));
        assert_eq!(facts.duplicate_field, Some("model"));
        let nested = BodyFacts::parse(br#"{"model":"a","messages":[{"model":"b"}]}"#);
        assert_eq!(
            (nested.model.as_deref(), nested.duplicate_field),
            (Some("a"), None)
        );
        let escaped = BodyFacts::parse(br#"{"model":"a","mod\u0065l":"b"}"#);
        assert_eq!(
            escaped.duplicate_field,
            Some("model"),
            "escapes name the same key"
        );
    }

    #[test]
    fn reads_openai_chat_facts() {
        let facts = BodyFacts::parse(
            br#"{"model":"gpt-4o","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"hi"}],"extra":{"a":[1,2]}}"#,
        );
        assert_eq!(facts.model.as_deref(), Some("gpt-4o"));
        assert!(facts.stream);
        assert_eq!(facts.max_tokens, Some(64));
    }

    #[test]
    fn newer_max_completion_tokens_counts() {
        let facts = BodyFacts::parse(br#"{"model":"o1","max_completion_tokens":9}"#);
        assert_eq!(facts.max_tokens, Some(9));
        assert!(!facts.stream);
    }

    #[test]
    fn odd_types_leave_facts_unknown_but_keep_the_rest() {
        let facts = BodyFacts::parse(br#"{"model":7,"stream":"yes","max_tokens":-1}"#);
        assert_eq!(facts.model, None);
        assert!(!facts.stream);
        assert_eq!(facts.max_tokens, None);
    }

    #[test]
    fn bedrock_facts_come_from_the_path_and_the_body() {
        let converse = BodyFacts::parse_for(
            Dialect::Bedrock,
            "/bedrock/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream",
            br#"{"messages":[],"inferenceConfig":{"temperature":0.5,"maxTokens":300}}"#,
        );
        assert_eq!(
            converse.model.as_deref(),
            Some("us.anthropic.claude-sonnet-4-5-20250929-v1:0")
        );
        assert!(converse.stream);
        assert_eq!(converse.max_tokens, Some(300));

        let invoke = BodyFacts::parse_for(
            Dialect::Bedrock,
            "/model/anthropic.claude-3-haiku-20240307-v1:0/invoke?x=1",
            br#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":64,"stream":true,"messages":[]}"#,
        );
        assert_eq!(
            invoke.model.as_deref(),
            Some("anthropic.claude-3-haiku-20240307-v1:0")
        );
        assert!(
            !invoke.stream,
            "the operation, not the body, says whether it streams"
        );
        assert_eq!(invoke.max_tokens, Some(64));

        // Outside Bedrock the path says nothing.
        let openai =
            BodyFacts::parse_for(Dialect::OpenAi, "/model/x/converse", br#"{"model":"m"}"#);
        assert_eq!(openai.model.as_deref(), Some("m"));
    }

    #[test]
    fn bedrock_model_ids_are_decoded_from_their_segment() {
        let arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3";
        let encoded = "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Fa1b2c3";
        assert_eq!(
            BedrockOperation::parse_path(&format!("/model/{encoded}/invoke-with-response-stream")),
            Some((
                BedrockOperation::InvokeModelWithResponseStream,
                arn.to_owned()
            ))
        );
        assert_eq!(
            BedrockOperation::parse_path("/model/amazon.nova-pro-v1%3A0/converse"),
            Some((
                BedrockOperation::Converse,
                "amazon.nova-pro-v1:0".to_owned()
            ))
        );
        for path in [
            "/model//converse",
            "/models/x/converse",
            "/model/x/chat",
            "/converse",
            "/model/%FF/converse",
            "",
        ] {
            assert_eq!(BedrockOperation::parse_path(path), None, "{path}");
        }
        assert!(BedrockOperation::ConverseStream.streams());
        assert!(!BedrockOperation::InvokeModel.streams());
    }

    #[test]
    fn non_json_bodies_are_tolerated() {
        for body in [&b""[..], b"not json", b"[1,2]", b"{\"model\": \"x\""] {
            let facts = BodyFacts::parse(body);
            assert_eq!(facts.model, None);
            assert_eq!(facts.body_len, body.len());
        }
    }
}
