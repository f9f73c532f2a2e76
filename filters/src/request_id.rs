//! `request_id`: every exchange gets an id that the caller, the upstream and the logs share.
//! A caller's own id is kept (so a trace that started in the app continues); otherwise one is made.

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::chain::{Filter, Verdict};
use crate::exchange::Exchange;
use crate::{RequestHeader, ResponseHeader};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestIdConfig {
    /// The header that carries the id, in both directions.
    #[serde(default = "default_header")]
    pub header: String,
    /// Keep an id the caller sent (if it is well-formed) instead of making a new one.
    #[serde(default = "default_true")]
    pub trust_incoming: bool,
}

impl Default for RequestIdConfig {
    fn default() -> Self {
        Self {
            header: default_header(),
            trust_incoming: true,
        }
    }
}

fn default_header() -> String {
    "x-request-id".to_owned()
}

fn default_true() -> bool {
    true
}

/// Incoming ids longer than this are replaced: an id is a key, not a payload.
const MAX_INCOMING_LEN: usize = 200;

#[derive(Debug)]
pub struct RequestId {
    header: HeaderName,
    trust_incoming: bool,
}

impl RequestId {
    pub fn new(config: &RequestIdConfig) -> Result<Self, http::header::InvalidHeaderName> {
        Ok(Self {
            header: HeaderName::from_bytes(config.header.as_bytes())?,
            trust_incoming: config.trust_incoming,
        })
    }

    fn incoming(&self, request: &RequestHeader) -> Option<HeaderValue> {
        let value = request.headers.get(&self.header)?;
        let usable = !value.is_empty()
            && value.len() <= MAX_INCOMING_LEN
            && value.as_bytes().iter().all(|b| b.is_ascii_graphic());
        usable.then(|| value.clone())
    }
}

/// A random 128-bit id in UUID v4 text form, built without intermediate strings.
fn new_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut text = [0u8; 36];
    let mut at = 0;
    for (n, byte) in bytes.iter().enumerate() {
        if matches!(n, 4 | 6 | 8 | 10) {
            text[at] = b'-';
            at += 1;
        }
        text[at] = HEX[usize::from(byte >> 4)];
        text[at + 1] = HEX[usize::from(byte & 0x0f)];
        at += 2;
    }
    HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value")
}

#[async_trait]
impl Filter for RequestId {
    fn name(&self) -> &'static str {
        "request_id"
    }

    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        let incoming = if self.trust_incoming {
            self.incoming(&ex.request)
        } else {
            None
        };
        ex.request_id = Some(incoming.unwrap_or_else(new_id));
        Verdict::Continue
    }

    fn on_upstream_request(&self, ex: &Exchange, upstream: &mut RequestHeader) {
        if let Some(id) = &ex.request_id {
            // Infallible: the name and value were validated when made.
            let _ = upstream.insert_header(self.header.clone(), id.clone());
        }
    }

    fn on_response_head(&self, ex: &mut Exchange, response: &mut ResponseHeader) {
        if let Some(id) = &ex.request_id {
            let _ = response.insert_header(self.header.clone(), id.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn exchange(id: Option<&str>) -> Exchange {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        if let Some(id) = id {
            req.insert_header("x-request-id", id).unwrap();
        }
        Exchange::new("r".into(), req, Bytes::new())
    }

    async fn run(filter: &RequestId, ex: &mut Exchange) -> (HeaderValue, HeaderValue) {
        assert!(matches!(filter.on_request(ex).await, Verdict::Continue));
        let mut up = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        filter.on_upstream_request(ex, &mut up);
        let mut resp = ResponseHeader::build(200, None).unwrap();
        filter.on_response_head(ex, &mut resp);
        (
            up.headers["x-request-id"].clone(),
            resp.headers["x-request-id"].clone(),
        )
    }

    #[tokio::test]
    async fn keeps_the_callers_id_both_ways() {
        let filter = RequestId::new(&RequestIdConfig::default()).unwrap();
        let mut ex = exchange(Some("abc-123"));
        let (up, down) = run(&filter, &mut ex).await;
        assert_eq!(up, "abc-123");
        assert_eq!(down, "abc-123");
    }

    #[tokio::test]
    async fn makes_a_uuid_when_missing_or_unusable() {
        let filter = RequestId::new(&RequestIdConfig::default()).unwrap();
        let long = "x".repeat(MAX_INCOMING_LEN + 1);
        for incoming in [None, Some(""), Some(long.as_str()), Some("has space")] {
            let mut ex = exchange(incoming);
            let (up, down) = run(&filter, &mut ex).await;
            assert_eq!(up, down);
            let text = up.to_str().unwrap();
            assert_eq!(text.len(), 36, "{text}");
            assert_eq!(&text[14..15], "4", "version nibble in {text}");
            assert!(
                matches!(&text[19..20], "8" | "9" | "a" | "b"),
                "variant in {text}"
            );
        }
    }

    #[tokio::test]
    async fn distrusting_incoming_ids_always_makes_a_new_one() {
        let config = RequestIdConfig {
            trust_incoming: false,
            ..Default::default()
        };
        let filter = RequestId::new(&config).unwrap();
        let mut ex = exchange(Some("caller-chosen"));
        let (up, _) = run(&filter, &mut ex).await;
        assert_ne!(up, "caller-chosen");
    }
}
