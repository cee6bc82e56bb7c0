//! [`AccessLogLayer`]: one access line and the request metrics per request, written when the
//! response body ends (or is dropped), so a long SSE stream logs once, at its end
//! (README "Logs").
//!
//! The outermost layer: it sees every response, the proxy's own refusals included. What the
//! inner layers decided reaches it through the response's extensions: the [`Outcome`] (absent:
//! forwarded, or [`Public`] when the request was on a public path), the [`Principal`] (`sub`)
//! and the [`Exchanged`] token's [`CacheStatus`](crate::exchange::CacheStatus).
//!
//! With traces on (README "Traces") it also starts the request's span ([`RequestTrace`], put
//! into the request's extensions for the inner layers' children) and ends it with the access
//! line, with the same status, outcome and cache result.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use crate::error::Outcome;
use crate::exchange::Exchanged;
use crate::inbound::{Principal, Public};
use crate::metrics::{Metrics, UpstreamErrorKind};
use crate::telemetry::{RequestTrace, Telemetry};

/// The access log record of one request, written once when dropped.
#[derive(Debug)]
pub struct AccessLog {
    pub metrics: Arc<Metrics>,
    pub start: Instant,
    pub method: http::Method,
    /// The request target; only its path (never the query string) is logged.
    pub target: http::uri::PathAndQuery,
    pub status: u16,
    /// What the proxy did: `forwarded`, `public`, `metadata`, `unauthenticated`, …
    pub outcome: &'static str,
    /// `hit`, `miss`, `coalesced` in exchange mode.
    pub cache: Option<&'static str>,
    /// `sub` of the validated client token.
    pub sub: Option<Arc<str>>,
    pub bytes: u64,
    /// `complete`, `aborted` (client went away), `error`, `idle_timeout`.
    pub body: &'static str,
    /// The request's span, ended with the line (traces on).
    pub trace: Option<RequestTrace>,
}

impl AccessLog {
    /// Starts the record for a request to `target` received now.
    pub fn new(
        metrics: Arc<Metrics>,
        method: http::Method,
        target: http::uri::PathAndQuery,
    ) -> Self {
        Self {
            metrics,
            start: Instant::now(),
            method,
            target,
            status: 0,
            outcome: Outcome::FORWARDED.0,
            cache: None,
            sub: None,
            bytes: 0,
            body: "aborted",
            trace: None,
        }
    }

    /// Takes what the layers decided from the response.
    pub(crate) fn note<B>(&mut self, resp: &Response<B>) {
        self.status = resp.status().as_u16();
        let ext = resp.extensions();
        self.outcome = match (ext.get::<Outcome>(), ext.get::<Public>()) {
            (Some(o), _) => o.0,
            (None, Some(Public)) => Outcome::PUBLIC.0,
            (None, None) => Outcome::FORWARDED.0,
        };
        self.cache = ext.get::<Exchanged>().map(|e| e.cache.as_str());
        self.sub = ext.get::<Principal>().and_then(|p| p.sub.clone());
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.metrics.request(self.status, elapsed);
        if let Some(trace) = self.trace.take() {
            trace.finish(self.status, self.outcome, self.cache);
        }
        if tracing::enabled!(target: "access", tracing::Level::INFO) {
            crate::logging::access(&crate::logging::AccessRecord {
                method: self.method.as_str(),
                path: self.target.path(),
                status: self.status,
                duration: elapsed,
                bytes: self.bytes,
                outcome: self.outcome,
                cache: self.cache.unwrap_or("-"),
                sub: self.sub.as_deref().unwrap_or("-"),
                body: self.body,
            });
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct AccessLogLayer {
    metrics: Arc<Metrics>,
    telemetry: Option<Arc<Telemetry>>,
}

impl AccessLogLayer {
    /// Logs, and counts into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            telemetry: None,
        }
    }

    /// Also traces every request through `telemetry` (`None`: no traces).
    pub fn traced(mut self, telemetry: Option<Arc<Telemetry>>) -> Self {
        self.telemetry = telemetry;
        self
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLogService {
            inner,
            metrics: self.metrics.clone(),
            telemetry: self.telemetry.clone(),
        }
    }
}

/// The service of [`AccessLogLayer`].
#[derive(Debug, Clone)]
pub struct AccessLogService<S> {
    inner: S,
    metrics: Arc<Metrics>,
    telemetry: Option<Arc<Telemetry>>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for AccessLogService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body,
{
    type Response = Response<LoggedBody<ResB>>;
    type Error = S::Error;
    type Future = LoggedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        // The request's own target, shared rather than copied.
        let target = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut log = AccessLog::new(self.metrics.clone(), req.method().clone(), target);
        if let Some(telemetry) = &self.telemetry {
            let trace = telemetry.start_request(req.headers(), req.method(), log.target.path());
            req.extensions_mut().insert(trace.clone());
            log.trace = Some(trace);
        }
        LoggedFuture {
            inner: self.inner.call(req),
            log: Some(log),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`AccessLogService`]: a request dropped before its response
    /// (the client went away) still gets its line, with status 0 (`txp_requests_total`
    /// counts it as `aborted`).
    pub struct LoggedFuture<F> {
        #[pin]
        inner: F,
        log: Option<AccessLog>,
    }
}

impl<F, B, E> Future for LoggedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<LoggedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some(mut log) = this.log.take() else {
            // Polled after completion: nothing sensible to answer; keep the contract of
            // `Future` by never finishing twice.
            return Poll::Pending;
        };
        Poll::Ready(result.map(|resp| {
            log.note(&resp);
            resp.map(|body| LoggedBody::new(body, log))
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body that writes its request's access line when it ends.
    pub struct LoggedBody<B: Body> {
        #[pin]
        inner: B,
        log: Option<AccessLog>,
    }

    impl<B: Body> PinnedDrop for LoggedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Hyper stops polling once `is_end_stream` is true, so a body that ended without
            // a final `None` is complete; anything else was cut short by the client.
            if let Some(mut log) = this.log.take() {
                if this.inner.is_end_stream() {
                    log.body = "complete";
                }
                drop(log);
            }
        }
    }
}

impl<B: Body> LoggedBody<B> {
    /// `inner`, writing `log` when it ends.
    pub fn new(inner: B, log: AccessLog) -> Self {
        Self {
            inner,
            log: Some(log),
        }
    }

    fn finish(log: &mut Option<AccessLog>, body: &'static str) {
        if let Some(mut log) = log.take() {
            log.body = body;
            drop(log);
        }
    }
}

impl<B> Body for LoggedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(data), Some(log)) = (frame.data_ref(), this.log.as_mut()) {
                    log.bytes += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let e: Self::Error = e.into();
                let idle = is_idle_timeout(&*e);
                if let Some(log) = this.log.as_ref() {
                    log.metrics.upstream_errors.inc(if idle {
                        UpstreamErrorKind::Timeout
                    } else {
                        UpstreamErrorKind::Protocol
                    });
                }
                Self::finish(this.log, if idle { "idle_timeout" } else { "error" });
                Poll::Ready(Some(Err(e)))
            }
            None => {
                Self::finish(this.log, "complete");
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a body failed because it was silent longer than `upstream.idle_timeout`
/// (tower-http's `TimeoutBody`), looking through the error's sources.
pub(crate) fn is_idle_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(cause) = next {
        if cause.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        next = cause.source();
    }
    false
}
