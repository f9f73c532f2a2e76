//! Header rules between the caller and the upstream: hop-by-hop headers (RFC 9110 §7.6.1) stay
//! on their hop, framing is Sluice's own, and credentials are swapped when the upstream has keys.

use http::header::{self, HeaderMap, HeaderName};
use sluice_filters::{RequestHeader, ResponseHeader};

use crate::upstream::CALLER_CREDENTIAL_HEADERS;

/// Hop-by-hop by definition, whatever the `Connection` header says.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Whether a header of `headers` must not be forwarded: hop-by-hop, or named by `Connection`.
/// `Connection` is looked up once here, not once for every header the caller asks about.
fn hop_by_hop(headers: &HeaderMap) -> impl Fn(&HeaderName) -> bool + '_ {
    let connection = headers.get_all(header::CONNECTION);
    move |name| {
        HOP_BY_HOP.contains(name)
            || connection.iter().any(|value| {
                value
                    .to_str()
                    .unwrap_or("")
                    .split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
            })
    }
}

/// Copies the caller's headers for the upstream. Left out: hop-by-hop headers, names with an
/// underscore, framing (Sluice
/// sets its own length for the buffered body), `Host` (set for the upstream), `Expect`
/// (the body is already read), `Accept-Encoding` (filters read usage from the body, so the
/// upstream must answer in identity encoding), and the caller's credentials when the upstream
/// has its own.
pub fn copy_request_headers(from: &RequestHeader, to: &mut RequestHeader, strip_credentials: bool) {
    let is_hop_by_hop = hop_by_hop(&from.headers);
    for (name, value) in from.headers.iter() {
        let framing = matches!(
            *name,
            header::HOST
                | header::CONTENT_LENGTH
                | header::TRANSFER_ENCODING
                | header::EXPECT
                | header::ACCEPT_ENCODING
        );
        // An underscore name (`Transfer_Encoding`, `X_Api_Key`) is what CGI and WSGI
        // servers fold into the same variable as its dashed twin: left behind, as nginx does,
        // so it cannot override a header Sluice checked.
        let underscored = name.as_str().contains('_');
        if framing || underscored || is_hop_by_hop(name) {
            continue;
        }
        if strip_credentials && CALLER_CREDENTIAL_HEADERS.contains(&name.as_str()) {
            continue;
        }
        // Infallible: the name and value come from a parsed header map.
        let _ = to.append_header(name.clone(), value.clone());
    }
}

/// Removes what belongs to the upstream hop from a response about to go downstream. The
/// body's framing is re-chosen by the downstream writer: `Content-Length` is kept when the
/// upstream sent one, otherwise an HTTP/1.1 caller gets chunked encoding.
pub fn sanitize_response(response: &mut ResponseHeader, downstream_h1_1: bool) {
    // The status line is Sluice's own: an HTTP/1.0 upstream does not make the caller's hop 1.0.
    response.set_version(http::Version::HTTP_11);
    let names: Vec<HeaderName> = {
        let is_hop_by_hop = hop_by_hop(&response.headers);
        response
            .headers
            .keys()
            .filter(|name| *name == header::TRANSFER_ENCODING || is_hop_by_hop(name))
            .cloned()
            .collect()
    };
    for name in names {
        response.remove_header(&name);
    }
    let has_body = !(response.status.is_informational()
        || response.status == http::StatusCode::NO_CONTENT
        || response.status == http::StatusCode::NOT_MODIFIED);
    if downstream_h1_1 && has_body && !response.headers.contains_key(header::CONTENT_LENGTH) {
        let _ = response.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    #[test]
    fn hop_by_hop_and_framing_stay_behind() {
        let from = request(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("content-length", "10"),
            ("host", "caller"),
            ("accept-encoding", "gzip"),
            ("proxy-authorization", "Basic x"),
            ("x-keep", "yes"),
            ("openai-beta", "assistants=v2"),
            ("transfer_encoding", "chunked"),
            ("x_api_key", "shadow"),
        ]);
        let mut to = request(&[]);
        copy_request_headers(&from, &mut to, false);
        let names: Vec<&str> = to.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-keep", "openai-beta"]);
    }

    #[test]
    fn caller_credentials_are_dropped_only_when_asked() {
        let from = request(&[
            ("authorization", "Bearer caller"),
            ("x-api-key", "k"),
            ("api-key", "a"),
        ]);
        let mut kept = request(&[]);
        copy_request_headers(&from, &mut kept, false);
        assert_eq!(kept.headers.len(), 3);
        let mut stripped = request(&[]);
        copy_request_headers(&from, &mut stripped, true);
        assert!(stripped.headers.is_empty());
    }

    #[test]
    fn responses_keep_length_or_get_chunked() {
        let mut with_length = ResponseHeader::build(200, None).unwrap();
        with_length.insert_header("content-length", "5").unwrap();
        with_length.insert_header("connection", "close").unwrap();
        sanitize_response(&mut with_length, true);
        assert_eq!(with_length.headers["content-length"], "5");
        assert!(with_length.headers.get("connection").is_none());
        assert!(with_length.headers.get("transfer-encoding").is_none());

        let mut streamed = ResponseHeader::build(200, None).unwrap();
        streamed
            .insert_header("transfer-encoding", "chunked")
            .unwrap();
        streamed
            .insert_header("content-type", "text/event-stream")
            .unwrap();
        sanitize_response(&mut streamed, false);
        assert!(
            streamed.headers.get("transfer-encoding").is_none(),
            "h2 callers get no TE"
        );
        sanitize_response(&mut streamed, true);
        assert_eq!(streamed.headers["transfer-encoding"], "chunked");

        let mut old = ResponseHeader::build(200, None).unwrap();
        old.set_version(http::Version::HTTP_10);
        sanitize_response(&mut old, true);
        assert_eq!(old.version, http::Version::HTTP_11);
        assert_eq!(old.headers["transfer-encoding"], "chunked");

        let mut empty = ResponseHeader::build(204, None).unwrap();
        sanitize_response(&mut empty, true);
        assert!(empty.headers.get("transfer-encoding").is_none());
    }
}
