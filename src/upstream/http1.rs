//! HTTP/1.1 to upstreams: Sluice's own client over a pooled or new connection.
//!
//! Why not Pingora's HTTP/1 client session: it writes and flushes the request head on its own
//! before the body (two segments unless the socket is corked, which costs two more system
//! calls), and it reads every response body through a 64 KiB buffer. Here the head and a body
//! of up to [`COALESCE_LIMIT`] leave in one write, and one read buffer per connection serves
//! the head and the body: it starts at [`FIRST_READ`] bytes and grows only while reads fill it.
//!
//! What it reads (RFC 9112 §6.3): no body after a HEAD request or a 1xx, 204 or 304; a chunked
//! body when `Transfer-Encoding` ends in `chunked` (a `Content-Length` beside it is dropped);
//! otherwise `Content-Length` (several values must agree); otherwise until the connection
//! closes. 1xx responses before the final one are skipped. The connection is reusable only
//! when the body ended by its own framing, nothing came after it, and the response allows it
//! (HTTP/1.1 without `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`).

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, Method, Version};
use pingora::protocols::http::v1::client::http_req_header_to_wire;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request body up to this size is sent in the same write as its head.
pub const COALESCE_LIMIT: usize = 64 * 1024;
/// The first read of a response asks for this much; a read that fills the buffer doubles the
/// next one, up to [`LARGEST_READ`].
pub const FIRST_READ: usize = 4 * 1024;
const LARGEST_READ: usize = 64 * 1024;
/// The most a response head may take (Pingora's limit too).
const MAX_HEAD_BYTES: usize = 1024 * 1024;
const MAX_HEADERS: usize = 256;
/// The longest chunk-size line (size and extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;

/// One HTTP/1.1 exchange at a time over an upstream connection.
pub struct Http1Client {
    stream: Stream,
    decoder: ResponseDecoder,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

/// The response side of an exchange without the socket: bytes go in as they are read, the
/// head and the body's pieces come out. Kept apart from the I/O so that any byte sequence,
/// split anywhere, can be fed to it (the `upstream_response` fuzz target).
pub struct ResponseDecoder {
    /// Bytes read from the connection and not handed out yet.
    buf: BytesMut,
    /// How much the next read asks for.
    read_size: usize,
    head: Option<ResponseHeader>,
    body: Body,
    /// The request was HEAD: its response has no body, whatever its headers say.
    head_request: bool,
    /// The response lets the connection be used again once its body is read.
    keepalive: bool,
}

/// Where the response body's framing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// No response head yet.
    AwaitingHead,
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the current chunk are still to come.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; this many trailer bytes so far.
    Trailers(usize),
}

impl Http1Client {
    pub fn new(stream: Stream, write_timeout: Option<Duration>) -> Self {
        Self {
            stream,
            decoder: ResponseDecoder::new(false),
            read_timeout: None,
            write_timeout,
        }
    }

    /// The longest wait for each read of the response (none by default).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }

    /// Sends the request: its head and, when it is small enough, its body in one write.
    pub async fn write_request(&mut self, request: &RequestHeader, body: &[u8]) -> Result<()> {
        let mut wire = http_req_header_to_wire(request).ok_or_else(|| {
            Error::explain(
                ErrorType::InvalidHTTPHeader,
                "the request line cannot be sent over HTTP/1.1",
            )
        })?;
        self.decoder.head_request = request.method == Method::HEAD;
        let write = async {
            if body.len() <= COALESCE_LIMIT {
                wire.extend_from_slice(body);
                self.stream.write_all(&wire).await?;
            } else {
                self.stream.write_all(&wire).await?;
                self.stream.write_all(body).await?;
            }
            self.stream.flush().await
        };
        let written = match self.write_timeout {
            Some(limit) => pingora_timeout::fast_timeout::fast_timeout(limit, write)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
            None => write.await,
        };
        written.map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => {
                Error::explain(ErrorType::WriteTimedout, "while writing the request")
            }
            _ => Error::because(ErrorType::WriteError, "while writing the request", e),
        })
    }

    /// Reads the final response head (skipping any 1xx before it).
    pub async fn read_response_header(&mut self) -> Result<()> {
        while !self.decoder.read_head()? {
            if self.read_more().await? == 0 {
                self.decoder.closed()?;
            }
        }
        Ok(())
    }

    pub fn response_header(&self) -> Option<&ResponseHeader> {
        self.decoder.head()
    }

    /// Whether the whole response body has been read.
    pub fn response_done(&self) -> bool {
        self.decoder.done()
    }

    /// The next piece of the response body, `None` at its end.
    pub async fn read_response_body(&mut self) -> Result<Option<Bytes>> {
        if self.decoder.head().is_none() {
            return Err(Error::explain(
                ErrorType::InternalError,
                "the response body was read before its head",
            ));
        }
        loop {
            if let Some(piece) = self.decoder.next_body_piece()? {
                return Ok(Some(piece));
            }
            if self.decoder.done() {
                return Ok(None);
            }
            if self.read_more().await? == 0 {
                self.decoder.closed()?;
                return Ok(None);
            }
        }
    }

    /// The connection, when it can carry another request: the response was read to the end of
    /// its own framing, nothing was sent after it, and the upstream allows it.
    pub fn into_reusable(self) -> Option<Stream> {
        self.decoder.reusable().then_some(self.stream)
    }

    async fn read_more(&mut self) -> Result<usize> {
        let (input, room) = self.decoder.input();
        let read = self.stream.read_buf(input);
        let read = match self.read_timeout {
            Some(limit) => pingora_timeout::fast_timeout::fast_timeout(limit, read)
                .await
                .map_err(|_| {
                    Error::explain(ErrorType::ReadTimedout, "while reading the response")
                })?,
            None => read.await,
        };
        let n = read
            .map_err(|e| Error::because(ErrorType::ReadError, "while reading the response", e))?;
        self.decoder.read(n, room);
        Ok(n)
    }
}

impl ResponseDecoder {
    /// A decoder for the response to a request; `head_request`: the request was HEAD.
    pub fn new(head_request: bool) -> Self {
        Self {
            buf: BytesMut::new(),
            read_size: FIRST_READ,
            head: None,
            body: Body::AwaitingHead,
            head_request,
            keepalive: false,
        }
    }

    /// Where the next read goes, with room for it, and how much room that is.
    pub fn input(&mut self) -> (&mut BytesMut, usize) {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        (&mut self.buf, room)
    }

    /// A read of `n` bytes into `room`: one that filled it makes the next one larger.
    pub fn read(&mut self, n: usize, room: usize) {
        if n == room && self.read_size < LARGEST_READ {
            self.read_size *= 2;
        }
    }

    /// The final response head, once it is complete in the input: `false` while more is needed.
    pub fn read_head(&mut self) -> Result<bool> {
        if self.parse_head()? {
            return Ok(true);
        }
        if self.buf.len() > MAX_HEAD_BYTES {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                format!("the response head is larger than {MAX_HEAD_BYTES} bytes"),
            ));
        }
        Ok(false)
    }

    /// The upstream closed the connection: the end of a body that runs until then, an error
    /// anywhere else.
    pub fn closed(&mut self) -> Result<()> {
        match self.body {
            Body::Done => Ok(()),
            Body::UntilClose => {
                self.body = Body::Done;
                Ok(())
            }
            Body::AwaitingHead => Err(Error::explain(
                ErrorType::ConnectionClosed,
                format!(
                    "the upstream closed the connection before a response head ({} bytes read)",
                    self.buf.len()
                ),
            )),
            Body::Length(_) | Body::Chunked(_) => Err(Error::explain(
                ErrorType::ConnectionClosed,
                "the upstream closed the connection before the end of the response body",
            )),
        }
    }

    pub fn head(&self) -> Option<&ResponseHeader> {
        self.head.as_ref()
    }

    /// Whether the whole response body has been handed out.
    pub fn done(&self) -> bool {
        self.body == Body::Done
    }

    /// Whether the connection may carry another request.
    pub fn reusable(&self) -> bool {
        self.body == Body::Done && self.keepalive && self.buf.is_empty()
    }

    /// Parses a complete final response head from the buffer: `false` when more is needed.
    fn parse_head(&mut self) -> Result<bool> {
        loop {
            let Some(parsed) = ParsedHead::parse(&self.buf)? else {
                return Ok(false);
            };
            // Copied out (a head is a few hundred bytes), so the read buffer stays this
            // connection's alone and is reused for the body instead of pinned by the header
            // values that point into it.
            let head_bytes = Bytes::copy_from_slice(&self.buf[..parsed.len]);
            self.buf.advance(parsed.len);
            if (100..200).contains(&parsed.status) {
                if parsed.status == 101 {
                    return Err(Error::explain(
                        ErrorType::InvalidHTTPHeader,
                        "the upstream switched protocols, which Sluice never asks for",
                    ));
                }
                // An interim response (100 Continue, 103 Early Hints): the final one follows.
                continue;
            }
            let mut head = parsed.into_header(&head_bytes)?;
            let framing = framing(&mut head, self.head_request)?;
            self.keepalive = keepalive(&head) && framing != Body::UntilClose;
            self.body = framing;
            self.head = Some(head);
            return Ok(true);
        }
    }

    /// A piece of body already in the buffer, advancing the framing; `None` when more must be
    /// read first (or the body is done).
    pub fn next_body_piece(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.body {
                Body::AwaitingHead | Body::Done => return Ok(None),
                Body::UntilClose => {
                    return Ok((!self.buf.is_empty()).then(|| self.buf.split().freeze()));
                }
                Body::Length(remaining) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let take = remaining.min(self.buf.len() as u64);
                    let piece = self.buf.split_to(take as usize).freeze();
                    self.body = match remaining - take {
                        0 => Body::Done,
                        left => Body::Length(left),
                    };
                    return Ok(Some(piece));
                }
                Body::Chunked(Chunk::Data(remaining)) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let take = remaining.min(self.buf.len() as u64);
                    let piece = self.buf.split_to(take as usize).freeze();
                    self.body = Body::Chunked(match remaining - take {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data(left),
                    });
                    // Whatever framing follows in the buffer is read now, so the end of the
                    // body is known with its last piece.
                    self.advance_chunk_framing()?;
                    return Ok(Some(piece));
                }
                Body::Chunked(_) => {
                    if !self.advance_chunk_framing()? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Consumes chunk framing (size lines, CRLFs, trailers) from the buffer until data or the
    /// end of the body; `false` when the buffer ends first.
    fn advance_chunk_framing(&mut self) -> Result<bool> {
        loop {
            let Body::Chunked(chunk) = self.body else {
                return Ok(true);
            };
            match chunk {
                Chunk::Data(_) => return Ok(true),
                Chunk::Size => match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.buf.advance(used);
                        self.body = Body::Chunked(match size {
                            0 => Chunk::Trailers(0),
                            size => Chunk::Data(size),
                        });
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() <= MAX_CHUNK_LINE => {
                        return Ok(false)
                    }
                    _ => {
                        return Err(Error::explain(
                            ErrorType::InvalidHTTPHeader,
                            "the upstream sent an invalid chunk size",
                        ))
                    }
                },
                Chunk::DataEnd => {
                    if self.buf.len() < 2 {
                        return Ok(false);
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err(Error::explain(
                            ErrorType::InvalidHTTPHeader,
                            "the upstream's chunk data does not end where its size says",
                        ));
                    }
                    self.buf.advance(2);
                    self.body = Body::Chunked(Chunk::Size);
                }
                Chunk::Trailers(seen) => {
                    let Some(end) = memchr::memchr(b'\n', &self.buf) else {
                        if seen + self.buf.len() > MAX_TRAILERS {
                            return Err(Error::explain(
                                ErrorType::InvalidHTTPHeader,
                                "the upstream's chunked trailers are too large",
                            ));
                        }
                        return Ok(false);
                    };
                    let line = &self.buf[..end];
                    let blank = line.is_empty() || line == b"\r";
                    self.buf.advance(end + 1);
                    self.body = if blank {
                        Body::Done
                    } else {
                        Body::Chunked(Chunk::Trailers(seen + end + 1))
                    };
                }
            }
        }
    }
}

/// A response head found complete in a buffer, as offsets into it: parsing borrows the buffer,
/// and the header values are then cut from it without copying.
struct ParsedHead {
    len: usize,
    status: u16,
    version: Version,
    reason: (usize, usize),
    /// Name and value ranges.
    headers: Vec<((usize, usize), (usize, usize))>,
}

impl ParsedHead {
    fn parse(buf: &[u8]) -> Result<Option<Self>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let mut parser = httparse::ParserConfig::default();
        // As lenient as Pingora's own client.
        parser.allow_spaces_after_header_name_in_responses(true);
        parser.allow_obsolete_multiline_headers_in_responses(true);
        let len = match parser.parse_response(&mut response, buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => {
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    format!("the upstream sent an invalid response head: {e}"),
                ))
            }
        };
        let base = buf.as_ptr() as usize;
        // Where a part lies in the buffer. httparse hands out a static empty string for a
        // reason phrase that is not text (found by the `upstream_response` fuzz target), so a
        // part outside the buffer is taken as empty rather than trusted.
        let range = |part: &[u8]| {
            let start = (part.as_ptr() as usize).wrapping_sub(base);
            match start.checked_add(part.len()) {
                Some(end) if end <= len => (start, end),
                _ => (0, 0),
            }
        };
        Ok(Some(Self {
            len,
            status: response.code.unwrap_or_default(),
            version: match response.version {
                Some(1) => Version::HTTP_11,
                _ => Version::HTTP_10,
            },
            reason: response.reason.map_or((0, 0), |r| range(r.as_bytes())),
            headers: response
                .headers
                .iter()
                .map(|h| (range(h.name.as_bytes()), range(h.value)))
                .collect(),
        }))
    }

    fn into_header(self, bytes: &Bytes) -> Result<ResponseHeader> {
        let invalid = |e| Error::because(ErrorType::InvalidHTTPHeader, "in the response head", e);
        let mut head = ResponseHeader::build_no_case(self.status, Some(self.headers.len()))?;
        head.set_version(self.version);
        let reason = &bytes[self.reason.0..self.reason.1];
        if let Ok(reason) = std::str::from_utf8(reason) {
            head.set_reason_phrase(Some(reason))?;
        }
        for ((name_start, name_end), (value_start, value_end)) in self.headers {
            let name = bytes.slice(name_start..name_end);
            let value = pingora_http::header_value_from_raw(bytes.slice(value_start..value_end));
            head.append_header(name, value).map_err(invalid)?;
        }
        Ok(head)
    }
}

/// How the response body is delimited (RFC 9112 §6.3); a `Content-Length` beside a
/// `Transfer-Encoding` is removed, as the latter wins.
fn framing(head: &mut ResponseHeader, head_request: bool) -> Result<Body> {
    let status = head.status.as_u16();
    if head_request || status == 204 || status == 304 {
        return Ok(Body::Done);
    }
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        head.remove_header(&header::CONTENT_LENGTH);
        let chunked = last_coding_is_chunked(&head.headers);
        if head.version == Version::HTTP_10 || !chunked {
            return Ok(Body::UntilClose);
        }
        return Ok(Body::Chunked(Chunk::Size));
    }
    match content_length(&head.headers)? {
        Some(0) => Ok(Body::Done),
        Some(length) => Ok(Body::Length(length)),
        None => Ok(Body::UntilClose),
    }
}

fn last_coding_is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|value| value.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The `Content-Length`, when there is one: every value (and every item of a comma-separated
/// value) must be the same number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>> {
    let mut found: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            let parsed = (!item.is_empty() && item.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(item).ok()?.parse::<u64>().ok())
                .flatten();
            match (parsed, found) {
                (Some(n), None) => found = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => {
                    return Err(Error::explain(
                        ErrorType::InvalidHTTPHeader,
                        "the upstream sent an invalid or conflicting Content-Length",
                    ))
                }
            }
        }
    }
    Ok(found)
}

/// Whether the response lets the connection carry another request.
fn keepalive(head: &ResponseHeader) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for value in head.headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    match head.version {
        Version::HTTP_11 => !close,
        _ => keep_alive && !close && !head.headers.contains_key(header::TRANSFER_ENCODING),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tcp_pair;
    use pingora::protocols::l4;
    use rand::{Rng, SeedableRng};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    /// A client over a real loopback connection and the upstream's end of it.
    async fn connected() -> (Http1Client, TcpStream) {
        let (client, upstream) = tcp_pair().await;
        let stream: Stream = Box::new(l4::stream::Stream::from(client));
        (Http1Client::new(stream, None), upstream)
    }

    fn post(body_len: usize) -> RequestHeader {
        let mut request =
            RequestHeader::build(Method::POST, b"/v1/chat/completions", None).unwrap();
        request.insert_header("Host", "upstream.test").unwrap();
        request.insert_header("content-length", body_len).unwrap();
        request
    }

    /// Sends `wire` as the upstream, in pieces of the given sizes (the rest in one piece).
    async fn answer(mut upstream: TcpStream, wire: Vec<u8>, pieces: Vec<usize>, close: bool) {
        // The request is read first: a socket closed with unread bytes resets the connection.
        let mut request = Vec::new();
        while !request.ends_with(b"\r\n\r\n{}") && !request.ends_with(b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            match tokio::io::AsyncReadExt::read(&mut upstream, &mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        let mut at = 0;
        for size in pieces {
            let end = (at + size).min(wire.len());
            upstream.write_all(&wire[at..end]).await.unwrap();
            upstream.flush().await.unwrap();
            at = end;
            tokio::task::yield_now().await;
        }
        upstream.write_all(&wire[at..]).await.unwrap();
        if close {
            drop(upstream);
        } else {
            // Held open, as a keep-alive upstream does, until the client is done.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    async fn read_all(client: &mut Http1Client) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(piece) = client.read_response_body().await? {
            assert!(!piece.is_empty(), "no empty pieces");
            body.extend_from_slice(&piece);
        }
        Ok(body)
    }

    async fn exchange(
        wire: &[u8],
        pieces: Vec<usize>,
        close: bool,
    ) -> (Http1Client, Result<Vec<u8>>) {
        let (mut client, upstream) = connected().await;
        let server = tokio::spawn(answer(upstream, wire.to_vec(), pieces, close));
        client.write_request(&post(2), b"{}").await.unwrap();
        let body = match client.read_response_header().await {
            Ok(()) => read_all(&mut client).await,
            Err(e) => Err(e),
        };
        if !close {
            server.abort();
        }
        (client, body)
    }

    #[tokio::test]
    async fn the_request_head_and_body_arrive_together_and_intact() {
        let (mut client, mut upstream) = connected().await;
        let mut request = post(7);
        request.insert_header("X-Case-Kept", "yes").unwrap();
        client.write_request(&request, b"payload").await.unwrap();
        let mut got = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut upstream, &mut got)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&got[..n]);
        assert!(
            text.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(text.contains("X-Case-Kept: yes\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\npayload"),
            "one read holds head and body: {text}"
        );
    }

    #[tokio::test]
    async fn a_content_length_body_is_read_to_its_length_and_the_connection_reused() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\nhello world";
        let (client, body) = exchange(wire, vec![20, 40, 3], false).await;
        assert_eq!(body.unwrap(), b"hello world");
        let head = client.response_header().unwrap();
        assert_eq!(head.status.as_u16(), 200);
        assert_eq!(head.headers["content-type"], "application/json");
        assert!(client.response_done());
        assert!(client.into_reusable().is_some());
    }

    #[tokio::test]
    async fn a_chunked_body_with_extensions_and_trailers_is_decoded() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let (client, body) = exchange(wire, vec![], false).await;
        assert_eq!(body.unwrap(), b"hello world");
        assert!(client.into_reusable().is_some());
    }

    #[tokio::test]
    async fn the_end_of_a_chunked_body_is_known_with_its_last_piece() {
        let (mut client, upstream) = connected().await;
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .to_vec();
        let server = tokio::spawn(answer(upstream, wire, vec![], false));
        client.write_request(&post(2), b"{}").await.unwrap();
        client.read_response_header().await.unwrap();
        let piece = client.read_response_body().await.unwrap().unwrap();
        assert_eq!(&piece[..], b"hello");
        assert!(
            client.response_done(),
            "the terminating chunk was in the same read"
        );
        server.abort();
    }

    /// Every split of the wire (here: random piece sizes, down to single bytes) decodes to the
    /// same head and body, for random chunkings of random bodies.
    #[tokio::test]
    async fn any_split_of_the_wire_decodes_the_same() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..60 {
            let body: Vec<u8> = (0..rng.random_range(0..3000))
                .map(|_| rng.random())
                .collect();
            let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            let mut at = 0;
            while at < body.len() {
                let size = rng.random_range(1..=700).min(body.len() - at);
                wire.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                wire.extend_from_slice(&body[at..at + size]);
                wire.extend_from_slice(b"\r\n");
                at += size;
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let pieces: Vec<usize> = (0..rng.random_range(0..40))
                .map(|_| {
                    if round % 3 == 0 {
                        1
                    } else {
                        rng.random_range(1..200)
                    }
                })
                .collect();
            let (client, decoded) = exchange(&wire, pieces, false).await;
            assert_eq!(decoded.unwrap(), body, "round {round}");
            assert!(client.into_reusable().is_some(), "round {round}");
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        let (client, body) = exchange(wire, vec![10], false).await;
        assert_eq!(body.unwrap(), b"ok");
        assert_eq!(client.response_header().unwrap().status.as_u16(), 201);
    }

    #[tokio::test]
    async fn responses_without_a_body_are_done_at_their_head() {
        for wire in [
            &b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"[..],
            b"HTTP/1.1 304 Not Modified\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (client, body) = exchange(wire, vec![], false).await;
            assert!(body.unwrap().is_empty());
            assert!(client.into_reusable().is_some());
        }
        // A HEAD request's answer names a length it does not send.
        let (mut client, upstream) = connected().await;
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n".to_vec();
        let server = tokio::spawn(answer(upstream, wire, vec![], false));
        let head = RequestHeader::build(Method::HEAD, b"/", None).unwrap();
        client.write_request(&head, b"").await.unwrap();
        client.read_response_header().await.unwrap();
        assert!(client.response_done());
        assert!(client.read_response_body().await.unwrap().is_none());
        assert!(client.into_reusable().is_some());
        server.abort();
    }

    #[tokio::test]
    async fn a_body_without_length_runs_to_the_close_and_ends_the_connection() {
        let wire = b"HTTP/1.1 200 OK\r\n\r\nuntil the end";
        let (client, body) = exchange(wire, vec![5], true).await;
        assert_eq!(body.unwrap(), b"until the end");
        assert!(client.response_done());
        assert!(client.into_reusable().is_none());
        // A transfer coding other than chunked, too.
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz";
        let (client, body) = exchange(wire, vec![], true).await;
        assert_eq!(body.unwrap(), b"zz");
        assert!(client.into_reusable().is_none());
    }

    #[tokio::test]
    async fn what_the_upstream_says_about_the_connection_is_respected() {
        let closing = [
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            // Bytes after the body: the connection's state is unknown.
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
        ];
        for wire in closing {
            let (client, body) = exchange(wire, vec![], false).await;
            assert_eq!(&body.unwrap()[..], b"ok");
            assert!(
                client.into_reusable().is_none(),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
        let wire = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok";
        let (client, _) = exchange(wire, vec![], false).await;
        assert!(client.into_reusable().is_some());
    }

    /// Found by the `upstream_response` fuzz target: httparse gives a reason phrase that is not
    /// text as a static empty string, outside the buffer; it was taken as an offset into it.
    #[tokio::test]
    async fn a_reason_phrase_that_is_not_text_is_dropped() {
        let wire = b"HTTP/1.1 200 OK\xff\xfe\r\nContent-Length: 2\r\n\r\nok";
        let (client, body) = exchange(wire, vec![], false).await;
        assert_eq!(body.unwrap(), b"ok");
        assert_eq!(client.response_header().unwrap().status.as_u16(), 200);
    }

    #[tokio::test]
    async fn transfer_encoding_wins_over_content_length() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let (client, body) = exchange(wire, vec![], false).await;
        assert_eq!(body.unwrap(), b"ok");
        assert!(client
            .response_header()
            .unwrap()
            .headers
            .get("content-length")
            .is_none());
    }

    #[tokio::test]
    async fn content_lengths_must_agree() {
        let same = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nok";
        assert_eq!(exchange(same, vec![], false).await.1.unwrap(), b"ok");
        for wire in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
        ] {
            let error = exchange(wire, vec![], false).await.1.unwrap_err();
            assert_eq!(error.etype(), &ErrorType::InvalidHTTPHeader);
        }
    }

    #[tokio::test]
    async fn broken_framing_is_an_error() {
        // Closed with body still to come.
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        let error = exchange(short, vec![], true).await.1.unwrap_err();
        assert_eq!(error.etype(), &ErrorType::ConnectionClosed);
        let cut_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        let error = exchange(cut_chunk, vec![], true).await.1.unwrap_err();
        assert_eq!(error.etype(), &ErrorType::ConnectionClosed);
        for wire in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ] {
            let error = exchange(wire, vec![], true).await.1.unwrap_err();
            assert_eq!(
                error.etype(),
                &ErrorType::InvalidHTTPHeader,
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
        // Nothing at all: the upstream closed a connection before answering.
        let error = exchange(b"", vec![], true).await.1.unwrap_err();
        assert_eq!(error.etype(), &ErrorType::ConnectionClosed);
    }

    #[tokio::test]
    async fn a_large_body_is_read_in_growing_reads() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        wire.extend_from_slice(&body);
        let (client, decoded) = exchange(&wire, vec![], false).await;
        assert_eq!(decoded.unwrap(), body);
        assert!(client.decoder.read_size > FIRST_READ && client.decoder.read_size <= LARGEST_READ);
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out() {
        let (mut client, _upstream) = connected().await;
        client.set_read_timeout(Some(Duration::from_millis(50)));
        client.write_request(&post(2), b"{}").await.unwrap();
        let error = client.read_response_header().await.unwrap_err();
        assert_eq!(error.etype(), &ErrorType::ReadTimedout);
    }
}
