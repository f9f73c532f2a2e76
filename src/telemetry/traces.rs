//! OTLP traces: a server span per request, a client span per upstream attempt (so retries,
//! fallbacks and hedges show), OpenTelemetry GenAI attributes, W3C `traceparent` continued
//! from the caller and passed upstream.
//!
//! Export never holds a request: finished spans go into a bounded queue (a full queue drops
//! the span and counts it in `sluice_otlp_spans_dropped_total`), and one thread of their own
//! batches them to the collector. With no `telemetry.otlp`, every call here does nothing.
//!
//! The export thread is woken once per batch, not once per span: it sleeps until the interval
//! is up or a request thread sees a whole batch waiting. A channel that woke it for every span
//! cost each traced request about four futex calls and as many context switches, on cores
//! the request threads need.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    SamplingDecision, SamplingResult, Span as _, SpanContext, SpanKind, Status, TraceContextExt,
    TraceFlags, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;
use sluice_filters::RequestHeader;

use super::otlp_encode::SpanEncoder;
use super::sla::SlaRule;
use crate::policy::schema::OtlpProtocol;

pub use opentelemetry_sdk::trace::Span;

/// The compiled `telemetry.otlp`.
#[derive(Clone, PartialEq)]
pub struct OtlpSettings {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Values may be secrets: never shown.
    pub headers: Vec<(String, String)>,
    pub sampling_ratio: f64,
    pub queue_size: usize,
    pub batch_size: usize,
    pub export_interval: Duration,
    pub timeout: Duration,
    pub service_name: String,
}

impl std::fmt::Debug for OtlpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpSettings")
            .field("protocol", &self.protocol)
            .field(
                "headers",
                &format_args!("<{} redacted>", self.headers.len()),
            )
            .field("sampling_ratio", &self.sampling_ratio)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("cannot start the span export thread: {0}")]
    Thread(std::io::Error),
}

/// Counters for what became of finished spans.
#[derive(Clone)]
pub struct ExportCounters {
    pub dropped: IntCounter,
    pub exported: IntCounter,
    pub failed: IntCounter,
}

/// The process's tracer: on or off for its lifetime (changing `telemetry.otlp` needs a
/// restart).
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Tracer {
    /// Starts exporting to the collector (a thread of its own; call after Pingora's
    /// bootstrap, so a daemonising fork does not lose it).
    pub fn start(
        settings: &OtlpSettings,
        counters: ExportCounters,
    ) -> Result<Self, TraceSetupError> {
        let processor = QueuedExport::start(settings, counters)?;
        let ratio = settings.sampling_ratio.clamp(0.0, 1.0);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_resource(resource(settings))
            .build();
        let tracer = provider.tracer("sluice");
        Ok(Self {
            inner: Some(Arc::new(Inner {
                provider,
                tracer,
                propagator: TraceContextPropagator::new(),
            })),
        })
    }

    /// Exports what is queued; on shutdown.
    pub fn flush(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.provider.force_flush();
        }
    }

    /// The server span of a request, continuing the caller's `traceparent` if it sent one.
    pub fn request_span(
        &self,
        request: &RequestHeader,
        name: String,
        started: SystemTime,
        attributes: Vec<KeyValue>,
    ) -> Option<Span> {
        let inner = self.inner.as_ref()?;
        let parent = inner.propagator.extract(&HeaderReader(request));
        let span = inner
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(started)
            .with_attributes(attributes)
            .start_with_context(&inner.tracer, &parent);
        Some(span)
    }

    /// A client span for an upstream attempt, under the request's span.
    pub fn attempt_span(
        &self,
        parent: &SpanContext,
        name: String,
        attributes: Vec<KeyValue>,
    ) -> Option<Span> {
        let inner = self.inner.as_ref()?;
        let parent = Context::new().with_remote_span_context(parent.clone());
        Some(
            inner
                .tracer
                .span_builder(name)
                .with_kind(SpanKind::Client)
                .with_attributes(attributes)
                .start_with_context(&inner.tracer, &parent),
        )
    }

    /// Writes `traceparent` (and `tracestate`) for `span` into an upstream request.
    /// The headers are those `TraceContextPropagator` writes (`tracestate` too, even empty),
    /// written directly: going through the propagator built a context, formatted the ids
    /// through `Display` and parsed both header names on every attempt (callgrind).
    pub fn inject(&self, span: &SpanContext, request: &mut RequestHeader) {
        if self.inner.is_none() || !span.is_valid() {
            return;
        }
        let _ = request.insert_header(TRACEPARENT, traceparent(span));
        let _ = request.insert_header(TRACESTATE, span.trace_state().header());
    }

    /// An SLA rule broke or healed: a span of its own with the event, always exported (the
    /// sampling ratio thins out requests, not alerts).
    pub fn sla_event(&self, rule: &SlaRule, event: &'static str, why: &str) {
        let Some(inner) = &self.inner else { return };
        let mut span = inner
            .tracer
            .span_builder(format!("sla {}", rule.name))
            .with_kind(SpanKind::Internal)
            .with_sampling_result(SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            })
            .start_with_context(&inner.tracer, &Context::new());
        span.add_event(
            event,
            vec![
                KeyValue::new("sluice.sla.rule", rule.name.to_string()),
                KeyValue::new("sluice.sla.subject", rule.subject.clone()),
                KeyValue::new("sluice.sla.reason", why.to_owned()),
            ],
        );
        if event == "sla.broken" {
            span.set_status(Status::error(why.to_owned()));
        }
        span.end();
    }
}

struct HeaderReader<'a>(&'a RequestHeader);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.headers.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers.keys().map(|k| k.as_str()).collect()
    }
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// `00-{trace id}-{span id}-{flags}` (W3C Trace Context version 00, lower-case hex; only the
/// sampled flag is carried), byte for byte what `TraceContextPropagator` writes.
fn traceparent(span: &SpanContext) -> http::HeaderValue {
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let flags = (span.trace_flags() & TraceFlags::SAMPLED).to_u8();
    let hex = |bytes: &[u8], out: &mut [u8]| {
        hex::encode_to_slice(bytes, out).expect("the slice is twice the bytes' length")
    };
    hex(&span.trace_id().to_bytes(), &mut text[3..35]);
    hex(&span.span_id().to_bytes(), &mut text[36..52]);
    hex(&[flags], &mut text[53..55]);
    http::HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value")
}

/// What every exported span is from: the policy's `service_name` (and the SDK's own attributes).
fn resource(settings: &OtlpSettings) -> Resource {
    Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build()
}

/// Where batches of finished spans go.
enum Exporter {
    /// OTLP/HTTP: Sluice's encoder and a plain POST (see `otlp_encode` for why).
    Http(HttpExporter),
    /// OTLP/gRPC: the SDK's tonic exporter.
    Grpc(opentelemetry_otlp::SpanExporter),
}

struct HttpExporter {
    client: reqwest::Client,
    /// `{endpoint}/v1/traces`.
    url: String,
    encoder: SpanEncoder,
}

impl Exporter {
    /// The exporter for the protocol asked; inside the export thread's runtime (gRPC's channel
    /// needs one).
    fn build(settings: &OtlpSettings) -> Result<Self, TraceSetupError> {
        let invalid = |what: String| TraceSetupError::Exporter(what);
        match settings.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(
                    reqwest::header::CONTENT_TYPE,
                    reqwest::header::HeaderValue::from_static("application/x-protobuf"),
                );
                for (name, value) in &settings.headers {
                    let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| invalid(format!("header `{name}`: invalid name")))?;
                    let mut value = reqwest::header::HeaderValue::from_str(value)
                        .map_err(|_| invalid(format!("header `{name}`: invalid value")))?;
                    value.set_sensitive(true);
                    headers.insert(name, value);
                }
                let client = reqwest::Client::builder()
                    .default_headers(headers)
                    .timeout(settings.timeout)
                    .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                Ok(Self::Http(HttpExporter {
                    client,
                    url: format!("{}/v1/traces", settings.endpoint.trim_end_matches('/')),
                    encoder: SpanEncoder::new(&resource(settings)),
                }))
            }
            OtlpProtocol::Grpc => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (name, value) in &settings.headers {
                    let name = tonic::metadata::MetadataKey::from_bytes(
                        name.to_ascii_lowercase().as_bytes(),
                    )
                    .map_err(|e| invalid(e.to_string()))?;
                    let value = value
                        .parse()
                        .map_err(|_| invalid(format!("header `{name}`: invalid value")))?;
                    metadata.insert(name, value);
                }
                let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(settings.endpoint.clone())
                    .with_timeout(settings.timeout)
                    .with_metadata(metadata)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                // The provider hands its resource to processors, not to an exporter that sits
                // behind one: without this, spans left with no `service.name`.
                exporter.set_resource(&resource(settings));
                Ok(Self::Grpc(exporter))
            }
        }
    }

    /// Sends `batch`; the caller clears it after (HTTP keeps the vector's room for the next).
    async fn export(&mut self, batch: &mut Vec<SpanData>) -> Result<(), String> {
        match self {
            Self::Http(http) => {
                let body = http.encoder.encode(batch);
                // `content-type` and the policy's headers are the client's defaults (values
                // marked sensitive: they may be secrets).
                let response = http
                    .client
                    .post(&http.url)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.without_url().to_string())?;
                match response.status() {
                    status if status.is_success() => Ok(()),
                    status => Err(format!("the collector answered {status}")),
                }
            }
            Self::Grpc(exporter) => exporter
                .export(std::mem::take(batch))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    fn shutdown(&mut self) {
        if let Self::Grpc(exporter) = self {
            let _ = exporter.shutdown();
        }
    }
}

/// A span processor that never makes the request wait: a bounded queue, drained in batches
/// by a thread with its own small runtime (the exporter's HTTP or gRPC client needs one).
struct QueuedExport {
    spans: Arc<SpanQueue>,
    /// The export thread, unparked when a batch is waiting or a command is sent.
    exporter: Thread,
    /// Flush and stop, which the export thread looks for each time it wakes.
    control: Sender<Control>,
    counters: ExportCounters,
    stopped: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Finished spans on their way to the export thread.
struct SpanQueue {
    spans: crossbeam_queue::ArrayQueue<Box<SpanData>>,
    /// Spans waiting that make the export thread worth waking: a batch, or the whole queue
    /// when it is smaller than one.
    wake_at: usize,
    /// A wake-up is asked for and not yet served: one request thread wakes the exporter, the
    /// others that see a full batch meanwhile do not.
    wake_asked: AtomicBool,
    /// Set once the export thread has made its last drain: from then on a span left in the
    /// queue is discarded and counted, by whichever side sees it.
    closed: AtomicBool,
}

/// What became of a span handed to the queue.
#[derive(Debug, PartialEq, Eq)]
enum Queued {
    /// Queued; the export thread is already due to look.
    Waiting,
    /// Queued, and a batch is waiting: this caller wakes the export thread.
    Wake,
    /// The queue is full: the span is dropped.
    Full,
    /// The queue is closed: this span, and any others its caller found left, are dropped.
    Closed { dropped: u64 },
}

impl SpanQueue {
    fn new(capacity: usize, batch_size: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            spans: crossbeam_queue::ArrayQueue::new(capacity),
            wake_at: batch_size.clamp(1, capacity),
            wake_asked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    fn push(&self, span: SpanData) -> Queued {
        if self.closed.load(Ordering::Acquire) {
            return Queued::Closed { dropped: 1 };
        }
        if self.spans.push(Box::new(span)).is_err() {
            return Queued::Full;
        }
        // Pairs with the fence in `close`: either the closer's discard sees this span, or this
        // caller sees the queue closed and discards it, so no span stays queued uncounted.
        fence(Ordering::SeqCst);
        if self.closed.load(Ordering::Relaxed) {
            return Queued::Closed {
                dropped: self.discard(),
            };
        }
        if self.spans.len() >= self.wake_at && !self.wake_asked.swap(true, Ordering::AcqRel) {
            return Queued::Wake;
        }
        Queued::Waiting
    }

    /// Takes the next span; the export thread's side.
    fn pop(&self) -> Option<SpanData> {
        self.spans.pop().map(|span| *span)
    }

    /// Called by the export thread when it wakes, before it drains the queue: a span queued
    /// after this asks for a wake-up again.
    fn awake(&self) {
        self.wake_asked.store(false, Ordering::Release);
    }

    /// Closes the queue once nothing will drain it again; returns how many spans were left.
    fn close(&self) -> u64 {
        self.closed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.discard()
    }

    fn discard(&self) -> u64 {
        std::iter::from_fn(|| self.spans.pop()).count() as u64
    }
}

enum Control {
    Flush(Sender<()>),
    Stop,
}

impl std::fmt::Debug for QueuedExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueuedExport")
    }
}

impl QueuedExport {
    /// Starts the export thread, which builds the exporter inside its own runtime (gRPC's
    /// channel needs one); a setup error comes back before this returns.
    fn start(settings: &OtlpSettings, counters: ExportCounters) -> Result<Self, TraceSetupError> {
        let spans = Arc::new(SpanQueue::new(settings.queue_size, settings.batch_size));
        let (control, commands) = std::sync::mpsc::channel();
        let (ready, setup) = std::sync::mpsc::channel();
        let thread_spans = spans.clone();
        let thread_settings = settings.clone();
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-otlp".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| TraceSetupError::Exporter(format!("no runtime: {e}")));
                let started = runtime.and_then(|runtime| {
                    let exporter = {
                        let _inside = runtime.enter();
                        Exporter::build(&thread_settings)?
                    };
                    Ok((runtime, exporter))
                });
                match started {
                    Ok((runtime, exporter)) => {
                        let _ = ready.send(Ok(()));
                        export_loop(
                            &runtime,
                            exporter,
                            &thread_spans,
                            &commands,
                            &thread_settings,
                            &thread_counters,
                        );
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })
            .map_err(TraceSetupError::Thread)?;
        setup
            .recv()
            .map_err(|_| TraceSetupError::Exporter("the export thread stopped".to_owned()))??;
        Ok(Self {
            spans,
            exporter: thread.thread().clone(),
            control,
            counters,
            stopped: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sends a command and wakes the export thread for it; `false` if the thread is gone.
    fn command(&self, command: Control) -> bool {
        let sent = self.control.send(command).is_ok();
        self.exporter.unpark();
        sent
    }
}

/// The export thread: sleeps until a batch is waiting or the interval is up, then sends what
/// is queued, a batch at a time.
fn export_loop(
    runtime: &tokio::runtime::Runtime,
    mut exporter: Exporter,
    queue: &SpanQueue,
    commands: &Receiver<Control>,
    settings: &OtlpSettings,
    counters: &ExportCounters,
) {
    let batch_size = settings.batch_size.max(1);
    let interval = settings.export_interval;
    let mut batch: Vec<SpanData> = Vec::with_capacity(batch_size);
    let mut due = Instant::now() + interval;
    let export = |exporter: &mut Exporter, batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        match runtime.block_on(exporter.export(batch)) {
            Ok(()) => counters.exported.inc_by(count),
            Err(e) => {
                counters.failed.inc_by(count);
                tracing::debug!("OTLP export of {count} spans failed: {e}");
            }
        }
        batch.clear();
    };
    let drain = |exporter: &mut Exporter, batch: &mut Vec<SpanData>, due: &mut Instant| {
        while let Some(span) = queue.pop() {
            batch.push(span);
            if batch.len() >= batch_size {
                export(exporter, batch);
                *due = Instant::now() + interval;
            }
        }
    };
    loop {
        // Wakes early on an unpark: a batch is waiting, or a command. Spurious wake-ups only
        // cost a look at the queue.
        std::thread::park_timeout(due.saturating_duration_since(Instant::now()));
        queue.awake();
        drain(&mut exporter, &mut batch, &mut due);
        // Every command sent since the last look: unparks coalesce, so one wake-up may be
        // owed several. A flush or stop takes the spans that ended before it.
        loop {
            match commands.try_recv() {
                Ok(Control::Flush(done)) => {
                    drain(&mut exporter, &mut batch, &mut due);
                    export(&mut exporter, &mut batch);
                    let _ = done.send(());
                }
                Ok(Control::Stop) | Err(TryRecvError::Disconnected) => {
                    drain(&mut exporter, &mut batch, &mut due);
                    export(&mut exporter, &mut batch);
                    exporter.shutdown();
                    return;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if Instant::now() >= due {
            export(&mut exporter, &mut batch);
            due = Instant::now() + interval;
        }
    }
}

impl SpanProcessor for QueuedExport {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.stopped.load(Ordering::Acquire) {
            self.counters.dropped.inc();
            return;
        }
        match self.spans.push(span) {
            Queued::Waiting => {}
            Queued::Wake => self.exporter.unpark(),
            Queued::Full => self.counters.dropped.inc(),
            Queued::Closed { dropped } => self.counters.dropped.inc_by(dropped),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (done, wait) = std::sync::mpsc::channel();
        if self.command(Control::Flush(done)) {
            let _ = wait.recv_timeout(Duration::from_secs(5));
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            self.command(Control::Stop);
            if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
                let _ = thread.join();
            }
            // A span whose request passed the `stopped` check just before it was set may
            // land after the thread's last drain.
            self.counters.dropped.inc_by(self.spans.close());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry::trace::{SpanId, TraceId, TraceState};

    use super::*;

    /// What the SDK's propagator writes for a span, header by header.
    fn propagated(span: &SpanContext) -> HashMap<String, String> {
        let mut headers = HashMap::new();
        let context = Context::new().with_remote_span_context(span.clone());
        TraceContextPropagator::new().inject_context(&context, &mut headers);
        headers
    }

    #[test]
    fn traceparent_is_written_as_the_propagator_writes_it() {
        let state = TraceState::from_key_value([("vendor", "x1")]).unwrap();
        for (flags, state) in [
            (TraceFlags::SAMPLED, TraceState::default()),
            (TraceFlags::default(), state),
        ] {
            let span = SpanContext::new(
                TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                true,
                state,
            );
            let want = propagated(&span);
            assert_eq!(traceparent(&span).to_str().unwrap(), want["traceparent"]);
            assert_eq!(span.trace_state().header(), want["tracestate"]);
        }
    }

    fn finished_span(id: u64) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(1),
                SpanId::from(id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "POST /v1/chat/completions".into(),
            start_time: SystemTime::UNIX_EPOCH,
            end_time: SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[test]
    fn the_export_thread_is_woken_once_per_batch_not_per_span() {
        let queue = SpanQueue::new(8, 3);
        let pushed: Vec<Queued> = (1..=5).map(|id| queue.push(finished_span(id))).collect();
        // The third span completes a batch and wakes the thread; until it wakes, more spans
        // do not ask again.
        use Queued::{Waiting, Wake};
        assert_eq!(pushed, [Waiting, Waiting, Wake, Waiting, Waiting]);

        queue.awake();
        let drained: Vec<u64> = std::iter::from_fn(|| queue.pop())
            .map(|span| u64::from_be_bytes(span.span_context.span_id().to_bytes()))
            .collect();
        assert_eq!(
            drained,
            [1, 2, 3, 4, 5],
            "spans leave in the order they came"
        );
        let pushed: Vec<Queued> = (6..=8).map(|id| queue.push(finished_span(id))).collect();
        assert_eq!(
            pushed,
            [Waiting, Waiting, Wake],
            "a wake-up is asked again after one"
        );
    }

    #[test]
    fn a_full_queue_drops_the_span_and_keeps_the_rest() {
        let queue = SpanQueue::new(2, 512);
        assert_eq!(
            queue.wake_at, 2,
            "a queue smaller than a batch wakes when it is full"
        );
        assert_eq!(queue.push(finished_span(1)), Queued::Waiting);
        assert_eq!(queue.push(finished_span(2)), Queued::Wake);
        assert_eq!(queue.push(finished_span(3)), Queued::Full);
        assert_eq!(std::iter::from_fn(|| queue.pop()).count(), 2);
    }

    #[test]
    fn a_closed_queue_counts_every_span_left_in_it_or_pushed_after() {
        let queue = SpanQueue::new(8, 512);
        queue.push(finished_span(1));
        queue.push(finished_span(2));
        assert_eq!(queue.close(), 2, "the spans the last drain missed");
        assert_eq!(queue.push(finished_span(3)), Queued::Closed { dropped: 1 });
        assert!(queue.pop().is_none(), "nothing stays queued once closed");
    }

    #[test]
    fn spans_pushed_while_the_queue_closes_are_each_counted_once() {
        for _ in 0..200 {
            let queue = Arc::new(SpanQueue::new(64, 512));
            let pushers: Vec<_> = (0..2)
                .map(|thread| {
                    let queue = queue.clone();
                    std::thread::spawn(move || {
                        (0..20)
                            .map(|i| match queue.push(finished_span(thread * 100 + i)) {
                                Queued::Closed { dropped } => dropped,
                                Queued::Full => 1,
                                Queued::Waiting | Queued::Wake => 0,
                            })
                            .sum::<u64>()
                    })
                })
                .collect();
            let closed = queue.close();
            let dropped: u64 = pushers.into_iter().map(|p| p.join().unwrap()).sum();
            assert_eq!(closed + dropped, 40);
            assert!(queue.pop().is_none());
        }
    }
}
