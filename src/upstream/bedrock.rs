//! Amazon Bedrock: requests are authenticated by an AWS Signature Version 4 over the request as
//! sent, made with the upstream's own credentials (`aws-sigv4`, AWS's signer).

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::{header, HeaderValue};
use sluice_filters::RequestHeader;

use super::CALLER_CREDENTIAL_HEADERS;

/// The name requests to `bedrock-runtime` are signed for.
const SIGNING_NAME: &str = "bedrock";

/// Signature material a caller's SDK adds for its own signature; none of it may reach the
/// upstream beside Sluice's.
const CALLER_SIGV4_HEADERS: [&str; 3] =
    ["x-amz-date", "x-amz-security-token", "x-amz-content-sha256"];

/// The default endpoint of a region.
pub fn default_base_url(region: &str) -> String {
    format!("https://bedrock-runtime.{region}.amazonaws.com")
}

/// AWS credentials as the policy gives them.
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Signs an upstream's requests for its region.
pub struct SigV4Signer {
    region: String,
    identity: Identity,
}

impl std::fmt::Debug for SigV4Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The access key id too is left out: it names the account's credentials.
        f.debug_struct("SigV4Signer")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the request has no Host header to sign")]
    NoHost,
    #[error("signing parameters: {0}")]
    Params(#[from] v4::signing_params::BuildError),
    #[error("{0}")]
    Signing(#[from] aws_sigv4::http_request::SigningError),
    #[error("the signature is not a valid header value")]
    Header,
}

impl SigV4Signer {
    pub fn new(region: String, credentials: AwsCredentials) -> Self {
        let credentials = Credentials::new(
            credentials.access_key_id,
            credentials.secret_access_key,
            credentials.session_token,
            None,
            "sluice-policy",
        );
        Self {
            region,
            identity: credentials.into(),
        }
    }

    /// Signs the request as it will be sent: called last, once its headers (Host,
    /// Content-Length, every other) and body are final. Whatever credentials the caller sent
    /// are removed first.
    pub fn sign(
        &self,
        request: &mut RequestHeader,
        tls: bool,
        body: &[u8],
    ) -> Result<(), SignError> {
        self.sign_at(request, tls, body, SystemTime::now())
    }

    fn sign_at(
        &self,
        request: &mut RequestHeader,
        tls: bool,
        body: &[u8],
        time: SystemTime,
    ) -> Result<(), SignError> {
        for name in CALLER_CREDENTIAL_HEADERS
            .iter()
            .chain(&CALLER_SIGV4_HEADERS)
        {
            request.remove_header(*name);
        }
        let instructions = {
            let authority = request
                .headers
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .ok_or(SignError::NoHost)?;
            let scheme = if tls { "https" } else { "http" };
            let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
            let uri = format!("{scheme}://{authority}{path}");
            // A header whose value is not text cannot be signed; it goes unsigned, which AWS
            // accepts for any header but `host` and `x-amz-*`.
            let headers = request
                .headers
                .iter()
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
            let signable = SignableRequest::new(
                request.method.as_str(),
                uri,
                headers,
                SignableBody::Bytes(body),
            )?;
            let params = v4::SigningParams::builder()
                .identity(&self.identity)
                .region(&self.region)
                .name(SIGNING_NAME)
                .time(time)
                .settings(SigningSettings::default())
                .build()?
                .into();
            sign(signable, &params)?.into_parts().0
        };
        let (signed_headers, _query) = instructions.into_parts();
        for signed in signed_headers {
            let mut value = HeaderValue::from_str(signed.value()).map_err(|_| SignError::Header)?;
            value.set_sensitive(signed.sensitive() || signed.name() == header::AUTHORIZATION);
            request
                .insert_header(signed.name(), value)
                .map_err(|_| SignError::Header)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const BODY: &[u8] = br#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#;
    /// 2026-01-02T03:04:05Z
    const TIME: u64 = 1_767_323_045;

    fn signer(session_token: Option<&str>) -> SigV4Signer {
        SigV4Signer::new(
            "us-west-2".into(),
            AwsCredentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
                session_token: session_token.map(str::to_owned),
            },
        )
    }

    /// The request as the exchange builds it, still carrying what the caller's SDK sent.
    fn request() -> RequestHeader {
        let path = b"/bedrock/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse";
        let mut request = RequestHeader::build("POST", path, None).unwrap();
        for (name, value) in [
            ("host", "127.0.0.1:9000"),
            ("content-type", "application/json"),
            ("content-length", "56"),
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=sk-sluice-caller/20260101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=00",
            ),
            ("x-amz-date", "20200101T000000Z"),
            ("x-amz-security-token", "caller-token"),
            ("x-amz-content-sha256", "caller-hash"),
            ("x-api-key", "caller-key"),
        ] {
            request.append_header(name, value).unwrap();
        }
        request
    }

    fn header<'r>(request: &'r RequestHeader, name: &str) -> Option<&'r str> {
        request.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Expected values computed by botocore's SigV4Auth for the same request, time and
    /// credentials: an implementation independent of the one Sluice uses.
    #[test]
    fn signatures_match_botocores_for_the_request_as_sent() {
        let time = UNIX_EPOCH + Duration::from_secs(TIME);
        let mut plain = request();
        signer(None).sign_at(&mut plain, false, BODY, time).unwrap();
        assert_eq!(
            header(&plain, "authorization"),
            Some("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260102/us-west-2/bedrock/aws4_request, SignedHeaders=content-length;content-type;host;x-amz-date, Signature=51741a55737863eaaab43571656bde343126475706a5a7787adb298b31103ad1")
        );
        assert_eq!(header(&plain, "x-amz-date"), Some("20260102T030405Z"));
        for gone in ["x-amz-security-token", "x-amz-content-sha256", "x-api-key"] {
            assert_eq!(
                header(&plain, gone),
                None,
                "{gone} must not reach the upstream"
            );
        }
        assert!(plain.headers["authorization"].is_sensitive());

        let mut temporary = request();
        signer(Some("IQoJb3JpZ2luX2VjEXAMPLETOKEN"))
            .sign_at(&mut temporary, false, BODY, time)
            .unwrap();
        assert_eq!(
            header(&temporary, "authorization"),
            Some("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260102/us-west-2/bedrock/aws4_request, SignedHeaders=content-length;content-type;host;x-amz-date;x-amz-security-token, Signature=52016c0148ee0e80f704c15d8682ce3d6142cc3ae637c6fe07ef18d3c00b5d09")
        );
        assert_eq!(
            header(&temporary, "x-amz-security-token"),
            Some("IQoJb3JpZ2luX2VjEXAMPLETOKEN")
        );
    }

    #[test]
    fn the_body_and_headers_are_covered() {
        let time = UNIX_EPOCH + Duration::from_secs(TIME);
        let signature = |body: &[u8], extra: Option<(&str, &str)>| {
            let mut request = request();
            if let Some((name, value)) = extra {
                request.insert_header(name.to_owned(), value).unwrap();
            }
            signer(None)
                .sign_at(&mut request, true, body, time)
                .unwrap();
            header(&request, "authorization").unwrap().to_owned()
        };
        let base = signature(BODY, None);
        assert_ne!(base, signature(b"{}", None));
        assert_ne!(
            base,
            signature(BODY, Some(("x-amzn-bedrock-trace", "ENABLED")))
        );
    }

    #[test]
    fn debug_shows_no_credential() {
        let shown = format!("{:?}", signer(Some("token-value")));
        assert!(shown.contains("us-west-2"), "{shown}");
        for secret in ["AKIDEXAMPLE", "wJalrXUtnFEMI", "token-value"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn a_request_without_host_is_not_signed() {
        let mut request = RequestHeader::build("POST", b"/model/m/converse", None).unwrap();
        assert!(matches!(
            signer(None).sign(&mut request, true, b""),
            Err(SignError::NoHost)
        ));
    }
}
