use serde::Deserialize;

/// The facts about a request body that filters need, parsed tolerantly: a body that is not JSON,
/// or a field of an unexpected type, leaves the fact unknown instead of failing the request (the
/// provider is the judge of its own API).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyFacts {
    pub model: Option<String>,
    pub stream: bool,
    /// `max_tokens`, or OpenAI's newer `max_completion_tokens`.
    pub max_tokens: Option<u64>,
    /// Body size in bytes: the input to prompt-size estimates.
    pub body_len: usize,
}

impl BodyFacts {
    pub fn parse(body: &[u8]) -> Self {
        // Each field is parsed on its own so one odd field does not hide the others; unknown
        // fields are skipped by serde without being materialised.
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            model: Option<serde_json::Value>,
            #[serde(default)]
            stream: Option<serde_json::Value>,
            #[serde(default)]
            max_tokens: Option<serde_json::Value>,
            #[serde(default)]
            max_completion_tokens: Option<serde_json::Value>,
        }
        let mut facts = BodyFacts {
            body_len: body.len(),
            ..Default::default()
        };
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return facts;
        }
        let Ok(raw) = serde_json::from_slice::<Raw>(body) else {
            return facts;
        };
        facts.model = raw.model.and_then(|v| match v {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        });
        facts.stream = matches!(raw.stream, Some(serde_json::Value::Bool(true)));
        facts.max_tokens = raw
            .max_tokens
            .or(raw.max_completion_tokens)
            .and_then(|v| v.as_u64());
        facts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn non_json_bodies_are_tolerated() {
        for body in [&b""[..], b"not json", b"[1,2]", b"{\"model\": \"x\""] {
            let facts = BodyFacts::parse(body);
            assert_eq!(facts.model, None);
            assert_eq!(facts.body_len, body.len());
        }
    }
}
