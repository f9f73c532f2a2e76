//! A mock LLM provider speaking OpenAI (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `/v1/models`, Azure deployment paths), Anthropic (`/v1/messages`) and
//! Amazon Bedrock (`/model/{modelId}/converse`, `converse-stream`, `invoke`,
//! `invoke-with-response-stream`: SigV4 signatures verified against the credentials in
//! [`bedrock`], event streams), with SSE streaming, fault injection and a record of what it
//! received.
//!
//! Answers are derived from the request (`"echo: " + the last message`) so tests can check them.
//! Per-request control headers override the instance settings:
//! `x-mock-status` (+ `x-mock-retry-after`; `x-mock-ratelimit-reset-requests`, sent back as
//! `x-ratelimit-reset-requests` with any status fault), `x-mock-first-byte-ms`, `x-mock-chunk-ms`,
//! `x-mock-chunks`, `x-mock-fault: reset-mid-stream | reset-mid-event | stall |
//! stall-mid-stream | reset-before-head | end-without-terminator | end-mid-event |
//! malformed-events`,
//! `x-mock-model: NAME` (the model the answer names, as providers name a dated snapshot of the
//! one asked for), and `x-mock-stamp: 1`, which starts each SSE event with a comment line
//! `: sent_ns=<ns>` holding the wall-clock time (ns since the Unix epoch) the event was handed
//! to the server, so a client on the same machine measures each event's delay (`make bench`'s
//! streaming runs).

pub mod bedrock;
mod content;
mod tls;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

pub use content::Api;
pub use tls::MockTls;

/// Instance-wide behaviour; each field can be overridden per request by a control header.
#[derive(Debug, Clone)]
pub struct MockConfig {
    pub first_byte_delay: Duration,
    pub chunk_delay: Duration,
    /// Content pieces per answer (streamed as that many events).
    pub chunks: usize,
    /// Keep the last requests for inspection; off for benchmarks.
    pub record: bool,
    pub fault: Option<Fault>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            first_byte_delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            chunks: 5,
            record: true,
            fault: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a provider-shaped error.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// Send about half the events, then abort the connection.
    ResetMidStream,
    /// Send about half the events and the first half of the next one (cut inside its JSON),
    /// then abort the connection.
    ResetMidEvent,
    /// Never send the response head.
    Stall,
    /// Send about half the events, then hang.
    StallMidStream,
    /// Drop the connection before any byte of the response.
    ResetBeforeHead,
    /// End the stream cleanly (chunked terminator sent) without its last event (`[DONE]`,
    /// `message_stop`).
    EndWithoutTerminator,
    /// Send about half the events and the first half of the next one, then end the stream
    /// cleanly.
    EndMidEvent,
    /// Send malformed events in the middle of the stream: bad JSON, a line without a field name.
    MalformedEvents,
}

impl Fault {
    pub fn parse(name: &str) -> Option<Fault> {
        match name {
            "reset-mid-stream" => Some(Fault::ResetMidStream),
            "reset-mid-event" => Some(Fault::ResetMidEvent),
            "stall" => Some(Fault::Stall),
            "stall-mid-stream" => Some(Fault::StallMidStream),
            "reset-before-head" => Some(Fault::ResetBeforeHead),
            "end-without-terminator" => Some(Fault::EndWithoutTerminator),
            "end-mid-event" => Some(Fault::EndMidEvent),
            "malformed-events" => Some(Fault::MalformedEvents),
            _ => None,
        }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// The client's address: the same for requests that reused a connection.
    pub peer: SocketAddr,
    /// Path and query as received.
    pub path: String,
    /// Lower-case names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

const RECORD_LIMIT: usize = 1000;
const BODY_LIMIT: usize = 64 * 1024 * 1024;

struct Shared {
    /// Changeable while serving (`set_fault`, `set_first_byte_delay`).
    config: RwLock<MockConfig>,
    /// Faults for requests carrying a given provider key (`set_key_fault`).
    key_faults: Mutex<HashMap<String, Fault>>,
    record: Mutex<VecDeque<RecordedRequest>>,
    count: AtomicU64,
    ids: AtomicU64,
    cancelled: AtomicU64,
    /// Requests whose client went away before their response head was ready.
    abandoned: AtomicU64,
}

pub struct MockServer {
    pub addr: SocketAddr,
    /// The HTTPS listener's address, when one was added ([`MockServer::serve_tls`]).
    pub tls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl MockServer {
    /// Binds 127.0.0.1 on a free port and serves on the current runtime.
    pub async fn start(config: MockConfig) -> std::io::Result<MockServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, config).await
    }

    pub async fn start_on(
        listener: tokio::net::TcpListener,
        config: MockConfig,
    ) -> std::io::Result<MockServer> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config: RwLock::new(config),
            key_faults: Mutex::new(HashMap::new()),
            record: Mutex::new(VecDeque::new()),
            count: AtomicU64::new(0),
            ids: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
        });
        let app = router(&shared);
        let task = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            // As providers' front ends do: without it, Nagle holds a streamed event on a
            // kept-alive connection until the previous one is acknowledged (a 20 ms stall).
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        Ok(MockServer {
            addr,
            tls_addr: None,
            shared,
            tasks: vec![task],
        })
    }

    /// Also serves HTTPS on `listener`, with the same state (record, faults) as the plain
    /// listener.
    pub fn serve_tls(
        &mut self,
        listener: tokio::net::TcpListener,
        tls: &MockTls,
    ) -> std::io::Result<SocketAddr> {
        use axum::serve::ListenerExt;
        let (listener, accept_loop) = tls::TlsListener::new(listener, tls.acceptor()?)?;
        let addr = axum::serve::Listener::local_addr(&listener)?;
        let app = router(&self.shared).into_make_service_with_connect_info::<SocketAddr>();
        // `tap_io` gives the listener axum's connect-info support for any `Addr` type.
        let serve = axum::serve(listener.tap_io(|_| {}), app);
        self.tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = accept_loop => {}
                _ = std::future::IntoFuture::into_future(serve) => {}
            }
        }));
        self.tls_addr = Some(addr);
        Ok(addr)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The recorded requests, oldest first (at most the last 1000).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock_record().iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.shared.lock_record().clear();
    }

    /// Provider requests received (control endpoints not counted), recorded or not.
    pub fn request_count(&self) -> usize {
        self.shared.count.load(Ordering::Relaxed) as usize
    }

    /// Streams whose reader went away before the last event was sent.
    pub fn cancelled_streams(&self) -> u64 {
        self.shared.cancelled.load(Ordering::Relaxed)
    }

    /// Requests whose client went away while the mock was still preparing the response head
    /// (e.g. during `first_byte_delay`).
    pub fn abandoned_requests(&self) -> u64 {
        self.shared.abandoned.load(Ordering::Relaxed)
    }

    /// Every later request gets this fault (control headers still override it).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.write_config().fault = fault;
    }

    pub fn set_first_byte_delay(&self, delay: Duration) {
        self.shared.write_config().first_byte_delay = delay;
    }

    /// Requests carrying this provider key (as `Authorization: Bearer`, `api-key` or
    /// `x-api-key`) get this fault; `None` clears it.
    pub fn set_key_fault(&self, key: &str, fault: Option<Fault>) {
        let mut faults = self
            .shared
            .key_faults
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match fault {
            Some(fault) => faults.insert(key.to_owned(), fault),
            None => faults.remove(key),
        };
    }
}

fn router(shared: &Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        .with_state(shared.clone())
}

impl Shared {
    fn lock_record(&self) -> std::sync::MutexGuard<'_, VecDeque<RecordedRequest>> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_config(&self) -> std::sync::RwLockWriteGuard<'_, MockConfig> {
        self.config.write().unwrap_or_else(|e| e.into_inner())
    }

    fn config(&self) -> MockConfig {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The fault set for the provider key this request carries, if any.
    fn key_fault(&self, headers: &HeaderMap) -> Option<Fault> {
        let faults = self.key_faults.lock().unwrap_or_else(|e| e.into_inner());
        if faults.is_empty() {
            return None;
        }
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let key = text("authorization")
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v))
            .or_else(|| text("api-key"))
            .or_else(|| text("x-api-key"))?;
        faults.get(key).cloned()
    }
}

/// The settings for one request: instance config overridden by control headers.
struct Plan {
    first_byte_delay: Duration,
    chunk_delay: Duration,
    chunks: usize,
    fault: Option<Fault>,
    /// Stamp each SSE event with the time it was sent (`x-mock-stamp`).
    stamp: bool,
    /// OpenAI's `x-ratelimit-reset-requests`, sent with a status fault (without the
    /// `x-ratelimit-remaining-requests` a provider would usually send with it).
    ratelimit_reset: Option<http::HeaderValue>,
    /// The model the answer names (`x-mock-model`), instead of the one asked for.
    model: Option<String>,
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    let value = headers.get(name)?.to_str().ok()?.parse().ok()?;
    Some(Duration::from_millis(value))
}

impl Plan {
    fn new(config: &MockConfig, headers: &HeaderMap) -> Plan {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let status_fault = text("x-mock-status")
            .and_then(|s| s.parse().ok())
            .map(|status| Fault::Status {
                status,
                retry_after: text("x-mock-retry-after").map(str::to_owned),
            });
        let named_fault = text("x-mock-fault").and_then(Fault::parse);
        Plan {
            first_byte_delay: header_ms(headers, "x-mock-first-byte-ms")
                .unwrap_or(config.first_byte_delay),
            chunk_delay: header_ms(headers, "x-mock-chunk-ms").unwrap_or(config.chunk_delay),
            chunks: text("x-mock-chunks")
                .and_then(|s| s.parse().ok())
                .unwrap_or(config.chunks)
                .max(1),
            fault: status_fault
                .or(named_fault)
                .or_else(|| config.fault.clone()),
            stamp: text("x-mock-stamp") == Some("1"),
            ratelimit_reset: headers.get("x-mock-ratelimit-reset-requests").cloned(),
            model: text("x-mock-model").map(str::to_owned),
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let Ok(body) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &serde_json::json!({"error": "body too large"}),
        );
    };

    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/_mock/health") => return text_response(StatusCode::OK, "ok"),
        (&Method::GET, "/_mock/requests") => {
            return json_response(StatusCode::OK, &record_json(&shared))
        }
        (&Method::DELETE, "/_mock/requests") => {
            shared.lock_record().clear();
            return text_response(StatusCode::OK, "cleared");
        }
        _ => {}
    }

    shared.count.fetch_add(1, Ordering::Relaxed);
    if shared.config().record {
        let mut record = shared.lock_record();
        if record.len() == RECORD_LIMIT {
            record.pop_front();
        }
        record.push_back(RecordedRequest {
            method: parts.method.to_string(),
            peer,
            path: path.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        });
    }

    let api = Api::from_request(&parts.method, parts.uri.path());
    if api.is_some_and(Api::is_bedrock) {
        // AWS authenticates a request before anything else.
        if let Err(denied) = bedrock::verify(&parts.method, &path, &parts.headers, &body) {
            let api = api.unwrap_or(Api::BedrockConverse);
            return error_response(api, denied.status, &denied.message, Some(denied.error_type));
        }
    }
    let mut plan = Plan::new(&shared.config(), &parts.headers);
    if let Some(fault) = shared.key_fault(&parts.headers) {
        plan.fault = Some(fault);
    }
    let id = shared.ids.fetch_add(1, Ordering::Relaxed);
    // Counts the request as abandoned if the server drops this handler (the client left)
    // before the response head is ready.
    struct Pending(Option<Arc<Shared>>);
    impl Drop for Pending {
        fn drop(&mut self) {
            if let Some(shared) = self.0.take() {
                shared.abandoned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let mut pending = Pending(Some(shared.clone()));
    let mut response = respond(
        &shared,
        api,
        &parts.method,
        parts.uri.path(),
        &body,
        plan,
        id,
    )
    .await;
    pending.0 = None;
    if let Some(request_id) = parts.headers.get("x-request-id") {
        response
            .headers_mut()
            .insert("x-request-id", request_id.clone());
    }
    response
}

async fn respond(
    shared: &Arc<Shared>,
    api: Option<Api>,
    method: &Method,
    path: &str,
    body: &Bytes,
    plan: Plan,
    id: u64,
) -> Response {
    let Some(api) = api else {
        let message = format!("no mock endpoint {method} {path}");
        return error_response(Api::Chat, StatusCode::NOT_FOUND, &message, None);
    };
    if plan.fault == Some(Fault::Stall) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if plan.fault == Some(Fault::ResetBeforeHead) {
        // Unwinding the connection's task drops its socket with nothing written; `resume_unwind`
        // skips the panic hook, so nothing is printed.
        std::panic::resume_unwind(Box::new("injected reset before the head"));
    }
    if !plan.first_byte_delay.is_zero() {
        tokio::time::sleep(plan.first_byte_delay).await;
    }
    if let Some(Fault::Status {
        status,
        retry_after,
    }) = &plan.fault
    {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = error_response(api, status, "injected by x-mock-status", None);
        if let Some(value) = retry_after.as_deref().and_then(|v| v.parse().ok()) {
            response.headers_mut().insert("retry-after", value);
        }
        if let Some(reset) = plan.ratelimit_reset {
            response
                .headers_mut()
                .insert("x-ratelimit-reset-requests", reset);
        }
        return response;
    }
    let request: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(e) => {
                let message = format!("invalid JSON body: {e}");
                return error_response(api, StatusCode::BAD_REQUEST, &message, None);
            }
        }
    };
    let mut answer = content::Answer::new(api, &request, path, body.len(), plan.chunks, id);
    if let Some(model) = &plan.model {
        answer.name_model(model);
    }
    let asked_to_stream = request
        .get("stream")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let stream = api.always_streams() || (asked_to_stream && api.streams());
    let mut response = if !stream {
        match plan.fault {
            Some(Fault::ResetMidStream | Fault::ResetMidEvent) => broken_body(true),
            Some(Fault::StallMidStream) => broken_body(false),
            _ => json_response(StatusCode::OK, &answer.whole()),
        }
    } else if api.is_bedrock() {
        let mut frames: Vec<Bytes> = answer
            .bedrock_events()
            .iter()
            .map(|(event_type, payload)| bedrock::event_frame(event_type, payload))
            .collect();
        if let Some(Fault::EndMidEvent) = plan.fault {
            end_mid_event(&mut frames);
        }
        streamed_response(
            shared.clone(),
            frames,
            plan,
            "application/vnd.amazon.eventstream",
        )
    } else {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut events = answer.events(include_usage);
        match plan.fault {
            Some(Fault::EndWithoutTerminator) => {
                events.pop();
            }
            Some(Fault::EndMidEvent) => end_mid_event(&mut events),
            Some(Fault::MalformedEvents) => {
                let at = events.len() / 2;
                events.insert(at, Bytes::from_static(b"data: {\"choices\": [{\"delta\n\n"));
                events.insert(at, Bytes::from_static(b"this line has no field\n\n"));
                events.insert(at, Bytes::from_static(b"data: \xff\xfe not utf-8\n\n"));
            }
            _ => {}
        }
        streamed_response(shared.clone(), events, plan, "text/event-stream")
    };
    if api.is_bedrock() {
        let headers = response.headers_mut();
        headers.insert("x-amzn-requestid", http::HeaderValue::from(id));
        if api == Api::BedrockInvoke {
            // InvokeModel reports usage in headers, whatever the model's body says.
            headers.insert(
                "x-amzn-bedrock-input-token-count",
                http::HeaderValue::from(answer.input_tokens()),
            );
            headers.insert(
                "x-amzn-bedrock-output-token-count",
                http::HeaderValue::from(answer.output_tokens()),
            );
            headers.insert(
                "x-amzn-bedrock-invocation-latency",
                http::HeaderValue::from_static("1"),
            );
        }
    }
    response
}

/// An error in `api`'s provider shape; Bedrock's also names the error in `x-amzn-ErrorType`
/// (`error_type`, or the one its status stands for).
fn error_response(
    api: Api,
    status: StatusCode,
    message: &str,
    error_type: Option<&'static str>,
) -> Response {
    let mut response = json_response(status, &api.error(status, message));
    if api.is_bedrock() {
        let name = error_type.unwrap_or_else(|| bedrock::error_type(status));
        response
            .headers_mut()
            .insert("x-amzn-errortype", http::HeaderValue::from_static(name));
    }
    response
}

/// Streams `events`, one frame each, `chunk_delay` apart; a reader that leaves early is counted.
fn streamed_response(
    shared: Arc<Shared>,
    events: Vec<Bytes>,
    plan: Plan,
    content_type: &'static str,
) -> Response {
    struct Progress {
        shared: Arc<Shared>,
        events: std::vec::IntoIter<Bytes>,
        sent: usize,
        half: usize,
        delay: Duration,
        fault: Option<Fault>,
        stamp: bool,
        finished: bool,
        /// Half an event went out: the next poll aborts the connection.
        cut: bool,
    }
    impl Drop for Progress {
        fn drop(&mut self) {
            if !self.finished {
                self.shared.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let half = events.len() / 2;
    let progress = Progress {
        shared,
        events: events.into_iter(),
        sent: 0,
        half,
        delay: plan.chunk_delay,
        fault: plan.fault,
        // Only SSE has comment lines; event-stream frames are left as they are.
        stamp: plan.stamp && content_type == "text/event-stream",
        finished: false,
        cut: false,
    };
    let stream = futures_util::stream::unfold(progress, |mut progress| async move {
        if progress.finished {
            return None;
        }
        if progress.sent > 0 && !progress.delay.is_zero() {
            tokio::time::sleep(progress.delay).await;
        }
        if progress.cut {
            // Pending once first, so the half event is flushed before the abort.
            tokio::task::yield_now().await;
            progress.finished = true;
            return Some((Err(std::io::Error::other("injected reset")), progress));
        }
        if progress.sent == progress.half.max(1) {
            match progress.fault {
                Some(Fault::ResetMidEvent) => {
                    let event = progress.events.next()?;
                    progress.cut = true;
                    // Flushed on its own before the abort, as a provider's last packet would be.
                    return Some((Ok(event.slice(..event.len() / 2)), progress));
                }
                Some(Fault::ResetMidStream) => {
                    // Ending with an error makes the server abort the connection mid-body; being
                    // pending once first flushes the events already sent, even with no delay.
                    tokio::task::yield_now().await;
                    progress.finished = true;
                    return Some((Err(std::io::Error::other("injected reset")), progress));
                }
                Some(Fault::StallMidStream) => tokio::time::sleep(Duration::from_secs(3600)).await,
                _ => {}
            }
        }
        let mut event = progress.events.next()?;
        if progress.stamp {
            event = stamped(&event);
        }
        progress.sent += 1;
        // Handing out the last event completes the stream, whether or not it is polled again.
        progress.finished = progress.events.len() == 0;
        Some((Ok::<Bytes, std::io::Error>(event), progress))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .expect("static response parts are valid")
}

/// About half the events, then the first half of the next one (the stream then ends cleanly).
fn end_mid_event(events: &mut Vec<Bytes>) {
    let half = events.len() / 2;
    let cut = events[half].slice(..events[half].len() / 2);
    events.truncate(half);
    events.push(cut);
}

/// `event` preceded by the SSE comment `: sent_ns=<wall-clock ns>` (ignored by SSE readers).
fn stamped(event: &Bytes) -> Bytes {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut out = format!(": sent_ns={now}\n").into_bytes();
    out.extend_from_slice(event);
    Bytes::from(out)
}

/// A non-streamed answer that fails after its head: the connection is aborted (`reset`) or the
/// body never comes, so callers see a 200 whose body does not arrive.
fn broken_body(reset: bool) -> Response {
    let stream = futures_util::stream::once(async move {
        if reset {
            // Pending once, so the head is flushed before the abort.
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Err::<Bytes, _>(std::io::Error::other("injected reset"))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("static response parts are valid")
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(value.to_string()))
        .expect("static response parts are valid")
}

fn text_response(status: StatusCode, text: &'static str) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Body::from(text))
        .expect("static response parts are valid")
}

fn record_json(shared: &Shared) -> serde_json::Value {
    let record = shared.lock_record();
    serde_json::Value::Array(
        record
            .iter()
            .map(|r| {
                let headers: serde_json::Map<String, serde_json::Value> = r
                    .headers
                    .iter()
                    .map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone())))
                    .collect();
                serde_json::json!({
                    "method": r.method,
                    "peer": r.peer.to_string(),
                    "path": r.path,
                    "headers": headers,
                    "body": String::from_utf8_lossy(&r.body),
                    "body_len": r.body.len(),
                })
            })
            .collect(),
    )
}
