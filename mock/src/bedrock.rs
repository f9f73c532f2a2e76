//! Bedrock in the mock: requests must carry a valid AWS SigV4 signature, checked the way AWS
//! checks it — recomputed with AWS's own signer (`aws-sigv4`) from the request as received and
//! the credentials the mock knows — and streams are real event-stream messages, written by
//! AWS's own encoder (`aws-smithy-eventstream`).

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};

/// Long-term credentials of the mock's account (no session token).
pub const AWS_ACCESS_KEY_ID: &str = "AKIDSLUICEMOCK000001";
pub const AWS_SECRET_ACCESS_KEY: &str = "mock/Secret+Access/Key/0123456789abcdefgh";
/// Temporary credentials of the mock's account: valid only with their session token.
pub const AWS_TEMPORARY_ACCESS_KEY_ID: &str = "ASIASLUICEMOCK000001";
pub const AWS_TEMPORARY_SECRET_ACCESS_KEY: &str = "mock/Temporary+Secret/Key/0123456789abcd";
pub const AWS_SESSION_TOKEN: &str = "mock-session-token/IQoJb3JpZ2luX2VjEXAMPLE=";

/// How far a request's time may be from the mock's, as AWS allows.
const CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// `(access key id, secret, session token)`
const KNOWN: [(&str, &str, Option<&str>); 2] = [
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, None),
    (
        AWS_TEMPORARY_ACCESS_KEY_ID,
        AWS_TEMPORARY_SECRET_ACCESS_KEY,
        Some(AWS_SESSION_TOKEN),
    ),
];

/// A refusal as AWS words it: status, `x-amzn-ErrorType`, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
}

fn denied(error_type: &'static str, message: impl Into<String>) -> Denied {
    Denied {
        status: StatusCode::FORBIDDEN,
        error_type,
        message: message.into(),
    }
}

const SIGNATURE_MISMATCH: &str = "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";

/// The parts of `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
}

fn parse_authorization(value: &str) -> Option<Authorization<'_>> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let field = |name: &str| {
        rest.split(',')
            .find_map(|part| part.trim().strip_prefix(name)?.strip_prefix('='))
    };
    let mut scope = field("Credential")?.split('/');
    let (access_key_id, date, region, service, terminator) = (
        scope.next()?,
        scope.next()?,
        scope.next()?,
        scope.next()?,
        scope.next()?,
    );
    if terminator != "aws4_request" || scope.next().is_some() {
        return None;
    }
    field("Signature")?;
    Some(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers: field("SignedHeaders")?.split(';').collect(),
    })
}

/// `20260102T030405Z` as a time.
fn parse_amz_date(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &text[0..4],
        &text[4..6],
        &text[6..8],
        &text[9..11],
        &text[11..13],
        &text[13..15]
    );
    let time = aws_smithy_types::DateTime::from_str(
        &rfc3339,
        aws_smithy_types::date_time::Format::DateTime,
    )
    .ok()?;
    SystemTime::try_from(time).ok()
}

/// Checks a request's SigV4 signature as Bedrock would: known credentials, session token,
/// service, time, and the signature itself over method, path, query, signed headers and body.
pub fn verify(
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Denied> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(received) = text("authorization") else {
        return Err(denied(
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    let auth = parse_authorization(received).ok_or_else(|| {
        denied(
            "IncompleteSignatureException",
            "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters.",
        )
    })?;
    let invalid_token = || {
        denied(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    };
    let (_, secret, token) = KNOWN
        .iter()
        .find(|(id, _, _)| *id == auth.access_key_id)
        .ok_or_else(invalid_token)?;
    if text("x-amz-security-token") != *token {
        return Err(invalid_token());
    }
    if auth.service != "bedrock" {
        return Err(denied(
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to correct service: 'bedrock'. (got '{}')",
                auth.service
            ),
        ));
    }
    let amz_date = text("x-amz-date").unwrap_or_default();
    let Some(time) = parse_amz_date(amz_date).filter(|_| amz_date.starts_with(auth.date)) else {
        return Err(denied(
            "IncompleteSignatureException",
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
        ));
    };
    let now = SystemTime::now();
    let skew = now
        .duration_since(time)
        .or_else(|_| time.duration_since(now))
        .unwrap_or_default();
    if skew > CLOCK_SKEW {
        return Err(denied(
            "InvalidSignatureException",
            format!("Signature expired: {amz_date} is now earlier or later than 15 minutes"),
        ));
    }
    if !auth.signed_headers.contains(&"host") {
        return Err(denied("InvalidSignatureException", SIGNATURE_MISMATCH));
    }
    let host = text("host").unwrap_or_default();
    let mut signed = Vec::new();
    for name in &auth.signed_headers {
        for value in headers.get_all(*name) {
            let value = value
                .to_str()
                .map_err(|_| denied("InvalidSignatureException", SIGNATURE_MISMATCH))?;
            signed.push((*name, value));
        }
    }
    let recomputed = sigv4_headers(&SigV4Request {
        method: method.as_str(),
        url: &format!("http://{host}{path_and_query}"),
        headers: &signed,
        body,
        access_key_id: auth.access_key_id,
        secret_access_key: secret,
        session_token: *token,
        region: auth.region,
        service: auth.service,
        time,
    });
    let expected = recomputed
        .iter()
        .find(|(name, _)| *name == "authorization")
        .map(|(_, value)| value.as_str());
    if expected != Some(received) {
        return Err(denied("InvalidSignatureException", SIGNATURE_MISMATCH));
    }
    Ok(())
}

/// A request to sign, and who signs it for which region and service.
pub struct SigV4Request<'a> {
    pub method: &'a str,
    /// The whole URL, path percent-encoded as sent.
    pub url: &'a str,
    /// The headers to sign, `host` among them.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
    pub region: &'a str,
    pub service: &'a str,
    pub time: SystemTime,
}

/// The headers a SigV4 signature adds to a request (`authorization`, `x-amz-date`, and
/// `x-amz-security-token` with temporary credentials), made by AWS's own signer as an AWS SDK
/// makes them. Empty when the request cannot be signed (a URL that does not parse).
pub fn sigv4_headers(request: &SigV4Request) -> Vec<(&'static str, String)> {
    let Ok(signable) = SignableRequest::new(
        request.method,
        request.url,
        request.headers.iter().copied(),
        SignableBody::Bytes(request.body),
    ) else {
        return Vec::new();
    };
    let identity = Credentials::new(
        request.access_key_id,
        request.secret_access_key,
        request.session_token.map(str::to_owned),
        None,
        "sluice-mock",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(request.region)
        .name(request.service)
        .time(request.time)
        .settings(SigningSettings::default())
        .build();
    let Ok(params) = params else {
        return Vec::new();
    };
    match sign(signable, &params.into()) {
        Ok(output) => output
            .into_parts()
            .0
            .into_parts()
            .0
            .into_iter()
            .map(|header| (header.name(), header.value().to_owned()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The model id of a Bedrock path (`/model/{modelId}/…`), percent-decoded.
pub fn model_in_path(path: &str) -> Option<String> {
    let encoded = path.strip_prefix("/model/")?.split('/').next()?;
    let model = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()?;
    Some(model.into_owned())
}

/// Bedrock's name for an error of this status, for `x-amzn-ErrorType`.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "ValidationException",
        403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        408 => "ModelTimeoutException",
        424 => "ModelErrorException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        _ => "InternalServerException",
    }
}

/// One event message of a Bedrock stream.
pub fn event_frame(event_type: &'static str, payload: &serde_json::Value) -> Bytes {
    let message = Message::new(Bytes::from(payload.to_string()))
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String(event_type.into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ))
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ));
    let mut out = BytesMut::new();
    write_message_to(&message, &mut out).expect("short headers and a small payload encode");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_decoded() {
        assert_eq!(
            model_in_path("/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse")
                .as_deref(),
            Some("us.anthropic.claude-3-5-haiku-20241022-v1:0")
        );
        assert_eq!(model_in_path("/v1/chat/completions"), None);
    }

    #[test]
    fn authorization_headers_are_read_strictly() {
        let auth = parse_authorization(
            "AWS4-HMAC-SHA256 Credential=AKID/20260102/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc",
        )
        .unwrap();
        assert_eq!(
            (auth.access_key_id, auth.date, auth.region, auth.service),
            ("AKID", "20260102", "us-east-1", "bedrock")
        );
        assert_eq!(auth.signed_headers, ["host", "x-amz-date"]);
        for bad in [
            "Bearer x",
            "AWS4-HMAC-SHA256 Credential=AKID/20260102/us-east-1/bedrock, SignedHeaders=host, Signature=a",
            "AWS4-HMAC-SHA256 Credential=AKID/20260102/us-east-1/bedrock/aws4_request, SignedHeaders=host",
        ] {
            assert!(parse_authorization(bad).is_none(), "{bad}");
        }
        assert_eq!(
            parse_amz_date("20260102T030405Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045))
        );
        assert_eq!(parse_amz_date("2026-01-02"), None);
    }
}
