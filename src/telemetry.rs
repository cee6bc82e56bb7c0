//! Traces (README "Traces"): one span per request, with children for the validation, the
//! exchange (the IdP call) and the upstream call, exported over OTLP/HTTP (protobuf).
//!
//! **Off** when `telemetry.otlp_endpoint` is absent: no [`Telemetry`] exists, no layer starts
//! a span, and the request path pays one `Option` test per request and one extension lookup
//! per layer that could start a child.
//!
//! **On**, [`Telemetry::start_request`] continues the client's W3C `traceparent` (W3C Trace
//! Context §3.2; `tracestate` too) or starts a trace, and the request carries a
//! [`RequestTrace`] in its extensions; each layer starts its child from it, and the upstream
//! request and the IdP call carry a `traceparent` naming their span as the parent. The span of
//! the request ends when its response body ends (with the access line).
//!
//! **Export.** A finished span goes into a bounded queue ([`QUEUE_CAPACITY`]) and never waits:
//! when the queue is full (the collector slow or absent) the span is dropped and counted in
//! `txp_trace_spans_dropped_total{reason="queue_full"}`. One task takes the spans out in
//! batches and posts them to `<otlp_endpoint>/v1/traces` with this crate's HTTP client; a
//! failed batch is counted as `export_failed`.
//!
//! **What spans say.** Methods, paths without query, statuses, outcomes, cache results,
//! profile names and rejection reasons: never a token, a secret, a `sub`, or a header value.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use tokio::sync::{mpsc, oneshot};

use crate::config;
use crate::error::Denial;
use crate::exchange::ExchangeError;
use crate::inbound::InboundError;
use crate::metrics::{Label, Metrics, SpanDrop};

/// Finished spans waiting for export, at most: about a second of a busy proxy's spans, a few
/// MiB. Beyond it spans are dropped rather than waited for.
pub const QUEUE_CAPACITY: usize = 4096;
/// Spans in one export request: well under a collector's default request size limit.
pub const MAX_BATCH: usize = 512;
/// Longest a finished span waits for its batch to fill before it is sent.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// One export, retries included: a collector that takes longer is treated as down.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// At shutdown, the spans still queued get this long to be sent.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// The OTLP/HTTP path of traces under the collector's base URL (OTLP specification, "OTLP/HTTP
/// Request").
const TRACES_PATH: &str = "v1/traces";
/// The instrumentation scope of every span.
const SCOPE: &str = "token-exchange-proxy";

/// Why traces cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint: cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("telemetry.otlp_endpoint: cannot build the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// The tracer of a proxy whose `telemetry.otlp_endpoint` is set.
pub struct Telemetry {
    tracer: SdkTracer,
    /// Kept so that the tracer's processor lives as long as the proxy.
    _provider: SdkTracerProvider,
    queue: mpsc::Sender<Queued>,
    /// Profile names for `txp.profile` (empty without named profiles: no attribute).
    profiles: Box<[String]>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// `None` when `config.otlp_endpoint` is absent; else the tracer, with its export task
    /// spawned (needs a tokio runtime). `profiles`: the profiles' names, in config order.
    pub fn start(
        config: &config::Telemetry,
        profiles: &[String],
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Self>>, TelemetryError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let http = reqwest::Client::builder()
            .connect_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(TelemetryError::Client)?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(endpoint))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(TelemetryError::Exporter)?;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(export_loop(exporter, rx, metrics.clone()));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Batcher {
                queue: queue.clone(),
                metrics,
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Some(Arc::new(Self {
            tracer: provider.tracer(SCOPE),
            _provider: provider,
            queue,
            profiles: profiles.into(),
        })))
    }

    /// Starts the span of a request (`SERVER`), the child of the client's `traceparent` when it
    /// sent a valid one.
    pub fn start_request(
        self: &Arc<Self>,
        headers: &HeaderMap,
        method: &Method,
        path: &str,
    ) -> RequestTrace {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(method_name(method))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method_name(method)),
                KeyValue::new("url.path", path.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestTrace {
            cx: parent.with_span(span),
            telemetry: self.clone(),
        }
    }

    /// Sends what is queued now, waiting for it at most `within` (at shutdown).
    pub async fn flush(&self, within: Duration) {
        let (done, sent) = oneshot::channel();
        let flushed = tokio::time::timeout(within, async {
            if self.queue.send(Queued::Flush(done)).await.is_ok() {
                let _ = sent.await;
            }
        })
        .await;
        if flushed.is_err() {
            tracing::warn!("traces: the last spans were not all sent before shutdown");
        }
    }
}

/// `<endpoint>/v1/traces`, the endpoint's own path kept (OTLP specification, "Endpoint URLs
/// for OTLP/HTTP").
pub fn traces_url(endpoint: &url::Url) -> String {
    let base = endpoint.as_str();
    if base.ends_with('/') {
        format!("{base}{TRACES_PATH}")
    } else {
        format!("{base}/{TRACES_PATH}")
    }
}

/// The method as span name and `http.request.method`: no allocation for the common ones.
pub fn method_name(method: &Method) -> Cow<'static, str> {
    const KNOWN: [(Method, &str); 8] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::TRACE, "TRACE"),
    ];
    match KNOWN.iter().find(|(m, _)| m == method) {
        Some((_, name)) => Cow::Borrowed(name),
        // OpenTelemetry HTTP semantic conventions: an unknown method is reported as `_OTHER`.
        None => Cow::Borrowed("_OTHER"),
    }
}

/// The trace of one request: the context holding its span, carried in the request's
/// extensions for the layers to start their children from. Cheap to clone.
#[derive(Clone)]
pub struct RequestTrace {
    cx: Context,
    telemetry: Arc<Telemetry>,
}

impl fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let span = self.cx.span();
        let sc = span.span_context();
        f.debug_struct("RequestTrace")
            .field("trace_id", &sc.trace_id())
            .field("span_id", &sc.span_id())
            .finish()
    }
}

impl RequestTrace {
    /// A child of the request's span, ended when dropped.
    pub fn child(&self, name: &'static str, kind: SpanKind) -> ChildSpan {
        let tracer = &self.telemetry.tracer;
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(tracer, &self.cx);
        ChildSpan {
            span: Box::new(span),
            telemetry: self.telemetry.clone(),
        }
    }

    /// Ends the request's span with what the proxy answered: `status` (0: the client went
    /// away first), the access log's `outcome` and the exchange `cache` result.
    pub fn finish(&self, status: u16, outcome: &'static str, cache: Option<&'static str>) {
        let span = self.cx.span();
        if status > 0 {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        span.set_attribute(KeyValue::new("txp.outcome", outcome));
        if let Some(cache) = cache {
            span.set_attribute(KeyValue::new("txp.cache", cache));
        }
        // OpenTelemetry HTTP semantic conventions: a server span fails on 5xx only.
        if status >= 500 {
            span.set_status(Status::error(outcome));
        }
        span.end();
    }
}

/// A child span of a request; ends when dropped.
///
/// The span is boxed: the request path's futures hold an `Option<ChildSpan>` across their
/// awaits, and with traces off (the usual case) that option should cost them two words, not
/// the 300 bytes of an SDK span that each request's future would copy into place.
pub struct ChildSpan {
    span: Box<opentelemetry_sdk::trace::Span>,
    telemetry: Arc<Telemetry>,
}

impl fmt::Debug for ChildSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use opentelemetry::trace::Span as _;
        f.debug_struct("ChildSpan")
            .field("span_id", &self.span.span_context().span_id())
            .finish()
    }
}

impl ChildSpan {
    /// Sets an attribute.
    pub fn set(&mut self, attribute: KeyValue) {
        use opentelemetry::trace::Span as _;
        self.span.set_attribute(attribute);
    }

    /// `txp.profile`: the name of profile `index`, when profiles are named.
    pub fn profile(&mut self, index: usize) {
        let name = self.telemetry.profiles.get(index).filter(|n| !n.is_empty());
        if let Some(name) = name {
            let name = name.clone();
            self.set(KeyValue::new("txp.profile", name));
        }
    }

    /// Marks the span failed, `error.type` = `kind` (a fixed label, never a message).
    pub fn fail(&mut self, kind: &'static str) {
        use opentelemetry::trace::Span as _;
        self.span.set_attribute(KeyValue::new("error.type", kind));
        self.span.set_status(Status::error(kind));
    }

    /// Marks the span failed with the label of `denial`.
    pub fn deny(&mut self, denial: &Denial) {
        self.fail(denial_kind(denial));
    }

    /// Puts `traceparent` (and `tracestate`, if any) naming this span into `headers`,
    /// replacing what was there (W3C Trace Context §3).
    pub fn inject(&self, headers: &mut HeaderMap) {
        use opentelemetry::trace::Span as _;
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }

    /// The headers [`ChildSpan::inject`] would add, for a request built elsewhere.
    pub fn propagation(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(2);
        self.inject(&mut headers);
        headers
    }
}

/// A fixed label for a refusal: a metric label's value, or `insufficient_scope` and the like.
pub fn denial_kind(denial: &Denial) -> &'static str {
    match denial {
        Denial::MissingToken => "missing",
        Denial::MalformedToken => "malformed",
        Denial::TokenTooLarge => "too_large",
        Denial::Inbound(InboundError::Rejected { reason, .. }) => reason.as_str(),
        Denial::Inbound(InboundError::InsufficientScope { .. }) => "scope",
        Denial::Inbound(InboundError::Unavailable) => "unavailable",
        Denial::Exchange(e) => match e {
            ExchangeError::SubjectRejected => "rejected",
            ExchangeError::ScopeRejected { .. } => "insufficient_scope",
            ExchangeError::ClaimsRequired { .. } => "insufficient_claims",
            ExchangeError::ClientRejected => "client_error",
            ExchangeError::Unavailable { .. } => "unavailable",
            ExchangeError::InvalidResponse => "invalid_response",
        },
        Denial::Upstream(kind) => kind.as_str(),
    }
}

/// What the export queue carries.
// Spans travel unboxed: one allocation fewer per span; a flush request is rare.
#[allow(clippy::large_enum_variant)]
enum Queued {
    Span(SpanData),
    /// Send everything queued before this, then answer.
    Flush(oneshot::Sender<()>),
}

/// The span processor: a finished, sampled span goes into the queue, or is counted as dropped
/// when the queue is full. Never blocks, never allocates beyond the queue's slot.
#[derive(Debug)]
struct Batcher {
    queue: mpsc::Sender<Queued>,
    metrics: Arc<Metrics>,
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(Queued::Span(span)).is_err() {
            self.metrics.spans_dropped.inc(SpanDrop::QueueFull);
        }
    }

    /// Flushing is asynchronous here ([`Telemetry::flush`]); the SDK's synchronous flush
    /// would block a runtime thread.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Takes spans out of the queue in batches of at most [`MAX_BATCH`], each sent once it is
/// full or [`BATCH_DELAY`] after its first span, one export at a time. Ends when every sender
/// is gone.
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queue: mpsc::Receiver<Queued>,
    metrics: Arc<Metrics>,
) {
    let mut export = Export {
        exporter,
        metrics,
        failing: false,
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        let mut flushes = Vec::new();
        match first {
            Queued::Span(span) => batch.push(span),
            Queued::Flush(done) => flushes.push(done),
        }
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while flushes.is_empty() && batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(Queued::Span(span))) => batch.push(span),
                Ok(Some(Queued::Flush(done))) => flushes.push(done),
                Ok(None) | Err(_) => break,
            }
        }
        if !flushes.is_empty() {
            // Everything queued before the flush request goes out now.
            while let Ok(queued) = queue.try_recv() {
                match queued {
                    Queued::Span(span) => batch.push(span),
                    Queued::Flush(done) => flushes.push(done),
                }
                if batch.len() >= MAX_BATCH {
                    export.send(&mut batch).await;
                }
            }
        }
        export.send(&mut batch).await;
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// The exporter and the state of the collector as last seen.
struct Export {
    exporter: opentelemetry_otlp::SpanExporter,
    metrics: Arc<Metrics>,
    /// The last export failed: the next failure is not logged again.
    failing: bool,
}

impl Export {
    /// Sends `batch` (left empty), counting its spans as exported or dropped.
    async fn send(&mut self, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let spans = batch.len() as u64;
        let spans_out = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
        // The exporter bounds its own attempts; this bounds the whole call, whatever it does.
        let sent = tokio::time::timeout(
            EXPORT_TIMEOUT + Duration::from_secs(1),
            self.exporter.export(spans_out),
        )
        .await;
        let error = match sent {
            Ok(Ok(())) => {
                self.metrics
                    .spans_exported
                    .fetch_add(spans, std::sync::atomic::Ordering::Relaxed);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("traces: the OTLP collector accepts spans again");
                }
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        self.metrics
            .spans_dropped
            .add(SpanDrop::ExportFailed, spans);
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(
                %error,
                "traces: export to the OTLP collector failed; spans are dropped (and counted) until it answers"
            );
        }
    }
}

#[cfg(test)]
mod tests;
