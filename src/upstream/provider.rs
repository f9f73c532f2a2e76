//! What differs between provider APIs: the credential header, the error shape, path rules.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use sluice_filters::auth::CredentialHeader;
use sluice_filters::eventstream;
use sluice_filters::usage::Dialect;
use sluice_filters::ErrorKind;

use super::{AzureSettings, InvalidKey, ProviderKind};

/// Headers a caller may carry its provider credential in; removed when the upstream has its own.
pub const CALLER_CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "api-key", "x-api-key"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request names no model, so no Azure deployment can be chosen")]
    AzureNeedsModel,
}

impl ProviderKind {
    /// The header this provider's SDKs carry a key in: callers send Sluice keys there, and
    /// Sluice sends the upstream's key there.
    pub fn caller_credential(self) -> CredentialHeader {
        match self {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => CredentialHeader::Bearer,
            ProviderKind::AzureOpenai => CredentialHeader::ApiKey,
            ProviderKind::Anthropic => CredentialHeader::XApiKey,
            ProviderKind::Bedrock => CredentialHeader::SigV4,
        }
    }

    /// How this provider's bodies are read (usage, events).
    pub fn dialect(self) -> Dialect {
        match self {
            ProviderKind::Anthropic => Dialect::Anthropic,
            ProviderKind::Bedrock => Dialect::Bedrock,
            ProviderKind::Openai | ProviderKind::AzureOpenai | ProviderKind::OpenaiCompatible => {
                Dialect::OpenAi
            }
        }
    }

    pub fn credential_header(self) -> HeaderName {
        self.caller_credential().name()
    }

    pub fn credential_value(self, key: &str) -> Result<HeaderValue, InvalidKey> {
        let mut value = match self {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
                HeaderValue::from_str(&format!("Bearer {key}"))
            }
            // Bedrock never gets here: it signs requests, and the policy refuses `keys` on it.
            ProviderKind::AzureOpenai | ProviderKind::Anthropic | ProviderKind::Bedrock => {
                HeaderValue::from_str(key)
            }
        }
        .map_err(|_| InvalidKey)?;
        // Sensitive values print as `Sensitive` in Debug and are never indexed by HPACK.
        value.set_sensitive(true);
        Ok(value)
    }

    /// An error Sluice itself produces, in this provider's error body shape, so the caller's SDK
    /// raises its usual exception with our message.
    pub fn error_body(self, kind: ErrorKind, message: &str) -> Bytes {
        let body = match self {
            ProviderKind::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": anthropic_error_type(kind), "message": message },
            }),
            // Bedrock (restJson1): the error's name goes in `x-amzn-ErrorType` (error_header).
            ProviderKind::Bedrock => serde_json::json!({ "message": message }),
            _ => serde_json::json!({
                "error": {
                    "message": message,
                    "type": openai_error_type(kind),
                    "param": null,
                    "code": openai_error_code(kind),
                }
            }),
        };
        Bytes::from(body.to_string())
    }

    /// A header an error response of Sluice's own carries besides its body: Bedrock names the
    /// error in `x-amzn-ErrorType`, where AWS SDKs read it to raise the modelled exception.
    pub fn error_header(self, kind: ErrorKind) -> Option<(HeaderName, HeaderValue)> {
        (self == ProviderKind::Bedrock).then(|| {
            (
                HeaderName::from_static("x-amzn-errortype"),
                HeaderValue::from_static(bedrock_error_type(kind)),
            )
        })
    }

    /// An error as the last event of a stream, in the shape this provider's SDKs raise on:
    /// OpenAI's `data: {"error": …}`, Anthropic's `event: error`, Bedrock's event-stream
    /// exception message.
    pub fn stream_error_event(self, kind: ErrorKind, message: &str) -> Bytes {
        let body = self.error_body(kind, message);
        if self == ProviderKind::Bedrock {
            // Encoding fails only for a payload over 4 GiB or a header over 32 KiB; this one is
            // a short message and constant headers.
            return eventstream::exception(bedrock_stream_exception(kind), body)
                .unwrap_or_default();
        }
        let body = String::from_utf8_lossy(&body);
        Bytes::from(match self {
            ProviderKind::Anthropic => format!("event: error\ndata: {body}\n\n"),
            _ => format!("data: {body}\n\n"),
        })
    }

    /// Rewrites an OpenAI-style path (`/v1/chat/completions`) to an Azure deployment path when
    /// the upstream is Azure OpenAI; other paths and providers pass unchanged.
    pub fn upstream_path(
        self,
        path_and_query: String,
        model: Option<&str>,
        azure: &AzureSettings,
    ) -> Result<String, PathError> {
        if self != ProviderKind::AzureOpenai || path_and_query.starts_with("/openai/") {
            return Ok(path_and_query);
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query.as_str(), None),
        };
        let operation = path.strip_prefix("/v1").unwrap_or(path);
        let model = model.ok_or(PathError::AzureNeedsModel)?;
        let deployment = azure.deployments.get(model).map_or(model, String::as_str);
        let mut rewritten = format!("/openai/deployments/{deployment}{operation}");
        let mut separator = '?';
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            rewritten.push('?');
            rewritten.push_str(query);
            separator = '&';
        }
        let has_version =
            query.is_some_and(|q| q.split('&').any(|p| p.starts_with("api-version=")));
        if let (false, Some(version)) = (has_version, &azure.api_version) {
            rewritten.push(separator);
            rewritten.push_str("api-version=");
            rewritten.push_str(version);
        }
        Ok(rewritten)
    }
}

fn openai_error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest | ErrorKind::RequestTooLarge | ErrorKind::NotFound => {
            "invalid_request_error"
        }
        ErrorKind::Authentication => "authentication_error",
        ErrorKind::PermissionDenied => "permission_error",
        ErrorKind::RateLimited => "rate_limit_error",
        ErrorKind::UpstreamUnavailable | ErrorKind::UpstreamTimeout | ErrorKind::Internal => {
            "server_error"
        }
    }
}

fn openai_error_code(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest => "invalid_request",
        ErrorKind::Authentication => "invalid_api_key",
        ErrorKind::PermissionDenied => "permission_denied",
        ErrorKind::NotFound => "not_found",
        ErrorKind::RequestTooLarge => "request_too_large",
        ErrorKind::RateLimited => "rate_limit_exceeded",
        ErrorKind::UpstreamUnavailable => "upstream_unavailable",
        ErrorKind::UpstreamTimeout => "upstream_timeout",
        ErrorKind::Internal => "internal_error",
    }
}

fn anthropic_error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest => "invalid_request_error",
        ErrorKind::Authentication => "authentication_error",
        ErrorKind::PermissionDenied => "permission_error",
        ErrorKind::NotFound => "not_found_error",
        ErrorKind::RequestTooLarge => "request_too_large",
        ErrorKind::RateLimited => "rate_limit_error",
        ErrorKind::UpstreamTimeout => "timeout_error",
        ErrorKind::UpstreamUnavailable | ErrorKind::Internal => "api_error",
    }
}

/// The Bedrock exception an error of this kind is named as (AWS's own names).
fn bedrock_error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest | ErrorKind::RequestTooLarge => "ValidationException",
        ErrorKind::Authentication => "UnrecognizedClientException",
        ErrorKind::PermissionDenied => "AccessDeniedException",
        ErrorKind::NotFound => "ResourceNotFoundException",
        ErrorKind::RateLimited => "ThrottlingException",
        ErrorKind::UpstreamUnavailable => "ServiceUnavailableException",
        ErrorKind::UpstreamTimeout => "ModelTimeoutException",
        ErrorKind::Internal => "InternalServerException",
    }
}

/// The member of a Bedrock stream's event union that an error of this kind ends the stream
/// as: one that both ConverseStream's and InvokeModelWithResponseStream's unions have, since an
/// SDK raises the modelled exception only for a member of the operation's union.
fn bedrock_stream_exception(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::RateLimited => "throttlingException",
        ErrorKind::UpstreamUnavailable => "serviceUnavailableException",
        ErrorKind::UpstreamTimeout => "modelStreamErrorException",
        ErrorKind::Internal => "internalServerException",
        ErrorKind::InvalidRequest
        | ErrorKind::RequestTooLarge
        | ErrorKind::Authentication
        | ErrorKind::PermissionDenied
        | ErrorKind::NotFound => "validationException",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shapes_follow_the_provider() {
        let openai: serde_json::Value = serde_json::from_slice(
            &ProviderKind::Openai.error_body(ErrorKind::NotFound, "no route for /x"),
        )
        .unwrap();
        assert_eq!(openai["error"]["message"], "no route for /x");
        assert_eq!(openai["error"]["type"], "invalid_request_error");
        assert_eq!(openai["error"]["code"], "not_found");

        let anthropic: serde_json::Value = serde_json::from_slice(
            &ProviderKind::Anthropic.error_body(ErrorKind::UpstreamTimeout, "slow"),
        )
        .unwrap();
        assert_eq!(anthropic["type"], "error");
        assert_eq!(anthropic["error"]["type"], "timeout_error");
        assert_eq!(anthropic["error"]["message"], "slow");
    }

    #[test]
    fn bedrock_errors_are_named_in_a_header_and_end_streams_as_exceptions() {
        let body: serde_json::Value = serde_json::from_slice(
            &ProviderKind::Bedrock.error_body(ErrorKind::RateLimited, "slow down"),
        )
        .unwrap();
        assert_eq!(body, serde_json::json!({ "message": "slow down" }));
        let (name, value) = ProviderKind::Bedrock
            .error_header(ErrorKind::RateLimited)
            .unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("x-amzn-errortype", "ThrottlingException")
        );
        assert_eq!(
            ProviderKind::Bedrock
                .error_header(ErrorKind::Authentication)
                .unwrap()
                .1,
            "UnrecognizedClientException"
        );
        assert!(ProviderKind::Openai
            .error_header(ErrorKind::RateLimited)
            .is_none());

        let frame = ProviderKind::Bedrock.stream_error_event(ErrorKind::RateLimited, "cut");
        let mut messages = Vec::new();
        eventstream::FrameDecoder::default()
            .feed(&frame, |m| messages.push(m))
            .unwrap();
        let [message] = messages.as_slice() else {
            panic!("one message: {messages:?}");
        };
        assert_eq!(
            eventstream::header(message, ":message-type"),
            Some("exception")
        );
        assert_eq!(
            eventstream::header(message, ":exception-type"),
            Some("throttlingException")
        );
        let payload: serde_json::Value = serde_json::from_slice(message.payload()).unwrap();
        assert_eq!(payload["message"], "cut");
    }

    #[test]
    fn credentials_go_in_the_providers_header_and_are_sensitive() {
        let value = ProviderKind::Openai.credential_value("sk-1").unwrap();
        assert_eq!(value, "Bearer sk-1");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("sk-1"));
        assert_eq!(ProviderKind::Anthropic.credential_value("a").unwrap(), "a");
        assert_eq!(ProviderKind::AzureOpenai.credential_header(), "api-key");
        assert!(ProviderKind::Openai.credential_value("bad\nkey").is_err());
    }

    #[test]
    fn azure_paths_map_models_to_deployments() {
        let azure = AzureSettings {
            api_version: Some("2024-10-21".into()),
            deployments: [("gpt-4o".to_owned(), "prod-4o".to_owned())].into(),
        };
        let kind = ProviderKind::AzureOpenai;
        assert_eq!(
            kind.upstream_path("/v1/chat/completions".into(), Some("gpt-4o"), &azure)
                .unwrap(),
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            kind.upstream_path("/chat/completions?x=1".into(), Some("other"), &azure)
                .unwrap(),
            "/openai/deployments/other/chat/completions?x=1&api-version=2024-10-21"
        );
        let native = "/openai/deployments/d/embeddings?api-version=1".to_owned();
        assert_eq!(
            kind.upstream_path(native.clone(), None, &azure).unwrap(),
            native
        );
        assert_eq!(
            kind.upstream_path("/v1/chat/completions".into(), None, &azure),
            Err(PathError::AzureNeedsModel)
        );
        assert_eq!(
            ProviderKind::Openai
                .upstream_path("/v1/models".into(), None, &azure)
                .unwrap(),
            "/v1/models"
        );
    }
}
