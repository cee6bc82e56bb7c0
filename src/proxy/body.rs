//! The response body the proxy sends: a backend body streamed frame by frame, or a short
//! fixed body of the proxy's own. Either way, the access log line and the request metrics are
//! written when the body ends (or is dropped), so a long SSE stream logs once, at its end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::metrics::{Metrics, UpstreamErrorKind};

/// Error type of [`ProxyBody`]: the backend's body failed or went silent too long.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("backend body failed")]
    Upstream(#[source] hyper::Error),
    #[error("backend body idle longer than upstream.idle_timeout")]
    Idle,
}

/// The access log record of one request, written once when dropped.
#[derive(Debug)]
pub struct AccessLog {
    pub metrics: Arc<Metrics>,
    pub start: Instant,
    pub method: http::Method,
    /// The path without the query string.
    pub path: String,
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
}

impl AccessLog {
    /// Starts the record for a request received now.
    pub fn new(metrics: Arc<Metrics>, method: http::Method, path: &str) -> Self {
        Self {
            metrics,
            start: Instant::now(),
            method,
            path: path.to_owned(),
            status: 0,
            outcome: "forwarded",
            cache: None,
            sub: None,
            bytes: 0,
            body: "aborted",
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.metrics.request(self.status, elapsed);
        if tracing::enabled!(target: "access", tracing::Level::INFO) {
            crate::logging::access(&crate::logging::AccessRecord {
                method: self.method.as_str(),
                path: &self.path,
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

enum Inner {
    Upstream(Incoming),
    Fixed(Option<Bytes>),
}

/// A response body with end-of-body accounting and an optional idle timeout.
pub struct ProxyBody {
    inner: Inner,
    log: Option<AccessLog>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl ProxyBody {
    /// Streams the backend's body; `idle` bounds the silence between frames.
    pub fn upstream(body: Incoming, log: AccessLog, idle: Option<Duration>) -> Self {
        Self {
            inner: Inner::Upstream(body),
            log: Some(log),
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        }
    }

    /// A fixed body produced by the proxy itself.
    pub fn fixed(bytes: Bytes, log: AccessLog) -> Self {
        Self {
            inner: Inner::Fixed(Some(bytes)),
            log: Some(log),
            idle: None,
        }
    }

    /// A fixed body without accounting (tests, admin).
    pub fn plain(bytes: Bytes) -> Self {
        Self {
            inner: Inner::Fixed(Some(bytes)),
            log: None,
            idle: None,
        }
    }

    fn finish(&mut self, body: &'static str) {
        if let Some(mut log) = self.log.take() {
            log.body = body;
            drop(log);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Fixed(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Upstream(e)))),
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(log)) = (frame.data_ref(), this.log.as_mut()) {
                    log.bytes += data.len() as u64;
                }
                if let Some((d, sleep)) = this.idle.as_mut() {
                    sleep.as_mut().reset(tokio::time::Instant::now() + *d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(log) = &this.log {
                    log.metrics.upstream_errors.inc(UpstreamErrorKind::Protocol);
                }
                this.finish("error");
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish("complete");
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some((_, sleep)) = this.idle.as_mut()
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    if let Some(log) = &this.log {
                        log.metrics.upstream_errors.inc(UpstreamErrorKind::Timeout);
                    }
                    this.finish("idle_timeout");
                    return Poll::Ready(Some(Err(BodyError::Idle)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Fixed(b) => b.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Fixed(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Fixed(None) => SizeHint::with_exact(0),
            Inner::Upstream(b) => b.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Hyper stops polling once `is_end_stream` is true, so a body that ended without a
        // final `None` is complete; anything else was cut short by the client.
        let outcome = if self.is_end_stream() {
            "complete"
        } else {
            "aborted"
        };
        self.finish(outcome);
    }
}
