//! [`StreamLifetimeLayer`]: an event stream ends cleanly, after a complete event, when the
//! client token it was opened with expires, or when the proxy closes its listener
//! (README "HTTP behaviour").
//!
//! **Request.** Nothing changes.
//!
//! **Response.** The response to a `GET` that is `text/event-stream` is watched:
//! - with `inbound.stream_lifetime: token`, from the client token's `exp` plus
//!   `inbound.leeway`: a token revoked or expired at the IdP then stops being honoured by a
//!   long-lived stream too, and the client reconnects with a fresh token (`Last-Event-ID`
//!   passes through, so it resumes where it was);
//! - always, from the moment the listener closes at shutdown, so that clients reconnect to
//!   another replica instead of being cut at `shutdown.timeout`.
//!
//! When either comes, the stream ends at the first event boundary (a blank line, the
//! WHATWG `text/event-stream` format) at or after it; a backend silent mid-event gets
//! [`MID_EVENT_GRACE`] to finish the event before the stream ends anyway. A `POST` response is
//! never cut, whatever its type: it answers one request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::inbound::Principal;
use crate::metrics::{Metrics, StreamEnd};
use crate::shutdown::Trigger;

/// How long a backend that is in the middle of an event may take to finish it once the stream
/// is to end.
pub const MID_EVENT_GRACE: Duration = Duration::from_secs(5);

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct StreamLifetimeLayer {
    settings: Arc<Settings>,
}

#[derive(Debug)]
struct Settings {
    /// Per profile (its index in the config): the `inbound.leeway` past the client token's
    /// `exp` at which its streams end, or `None` when they do not end with the token
    /// (`inbound.stream_lifetime: unlimited`).
    token_bounds: Box<[Option<Duration>]>,
    closing: Trigger,
    metrics: Arc<Metrics>,
}

impl StreamLifetimeLayer {
    /// Streams end with their client token when `bound_to_token` (its `exp` plus `leeway`),
    /// and when `closing` fires; ends are counted in `metrics`.
    pub fn new(
        bound_to_token: bool,
        leeway: Duration,
        closing: Trigger,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::per_profile(vec![bound_to_token.then_some(leeway)], closing, metrics)
    }

    /// As [`StreamLifetimeLayer::new`], with each profile's setting (README "Several
    /// issuers"), in config order: `Some(leeway)` where `inbound.stream_lifetime` is `token`.
    pub fn per_profile(
        token_bounds: Vec<Option<Duration>>,
        closing: Trigger,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            settings: Arc::new(Settings {
                token_bounds: token_bounds.into(),
                closing,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for StreamLifetimeLayer {
    type Service = StreamLifetime<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamLifetime {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// The service of [`StreamLifetimeLayer`].
#[derive(Debug, Clone)]
pub struct StreamLifetime<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for StreamLifetime<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<EventStream<ResB>>;
    type Error = S::Error;
    type Future = WatchedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Only a GET opens a stream that outlives its request.
        let watch = (req.method() == Method::GET).then(|| Watch {
            settings: self.settings.clone(),
            token_end: req.extensions().get::<Principal>().and_then(|p| {
                let leeway = (*self.settings.token_bounds.get(p.profile)?)?;
                Some(p.expires_at?.saturating_add(leeway.as_secs()))
            }),
        });
        WatchedFuture {
            inner: self.inner.call(req),
            watch,
        }
    }
}

/// What a GET's response may need to end its stream.
#[derive(Debug)]
struct Watch {
    settings: Arc<Settings>,
    /// `exp` + leeway of the client token (seconds since the Unix epoch).
    token_end: Option<u64>,
}

pin_project_lite::pin_project! {
    /// The response future of [`StreamLifetime`].
    pub struct WatchedFuture<F> {
        #[pin]
        inner: F,
        watch: Option<Watch>,
    }
}

impl<F, B, E> Future for WatchedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<EventStream<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let is_stream = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            });
        let ending = match this.watch.take() {
            Some(watch) if is_stream => Some(Box::new(Ending::new(watch))),
            _ => None,
        };
        Poll::Ready(Ok(resp.map(|inner| EventStream { inner, ending })))
    }
}

/// Why a stream is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    TokenExpired,
    Shutdown,
}

/// The watch over one event stream.
struct Ending {
    settings: Arc<Settings>,
    /// Fires when the client token's end (plus leeway) comes.
    token_end: Option<Pin<Box<Sleep>>>,
    /// Resolves when the listener closes.
    closing: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Set once the stream is to end; then the deadline for an unfinished event.
    ending: Option<(Reason, Pin<Box<Sleep>>)>,
    /// Where the bytes sent so far stand in the event format.
    scan: Scan,
    /// The stream has ended.
    done: bool,
}

/// A reader of the `text/event-stream` format that knows where events end: at a blank line,
/// that is a line terminator (`\r\n`, `\n` or `\r`) right after another one.
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// The current line has a character that is not a line terminator.
    line_has_text: bool,
    /// The last byte was a `\r`, so a `\n` now belongs to the same terminator.
    after_cr: bool,
    /// The bytes so far end an event (or there are none).
    at_boundary: bool,
}

impl Default for Scan {
    fn default() -> Self {
        Self {
            line_has_text: false,
            after_cr: false,
            at_boundary: true,
        }
    }
}

impl Scan {
    /// Reads one byte; true when it ends an event.
    fn push(&mut self, b: u8) -> bool {
        if b == b'\n' && self.after_cr {
            // The `\n` of a `\r\n`: the terminator was counted at the `\r`.
            self.after_cr = false;
            return false;
        }
        self.after_cr = b == b'\r';
        let ends = if b == b'\n' || b == b'\r' {
            let blank = !self.line_has_text;
            self.line_has_text = false;
            blank
        } else {
            self.line_has_text = true;
            false
        };
        self.at_boundary = ends;
        ends
    }
}

impl Ending {
    fn new(watch: Watch) -> Self {
        let token_end = watch.token_end.map(|end| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let left = Duration::from_secs(end).saturating_sub(now);
            Box::pin(tokio::time::sleep_until(Instant::now() + left))
        });
        let closing = Box::pin(watch.settings.closing.wait());
        Self {
            settings: watch.settings,
            token_end,
            closing,
            ending: None,
            scan: Scan::default(),
            done: false,
        }
    }

    /// Notices whether the stream is to end now: the token's end or the listener's closing.
    fn poll_trigger(&mut self, cx: &mut Context<'_>) {
        if self.ending.is_some() {
            return;
        }
        let reason = if self
            .token_end
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready())
        {
            Reason::TokenExpired
        } else if self.closing.as_mut().poll(cx).is_ready() {
            Reason::Shutdown
        } else {
            return;
        };
        let grace = Box::pin(tokio::time::sleep(MID_EVENT_GRACE));
        self.ending = Some((reason, grace));
    }

    /// Ends the stream, counting why.
    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let reason = match self.ending {
            Some((Reason::TokenExpired, _)) => StreamEnd::TokenExpired,
            Some((Reason::Shutdown, _)) | None => StreamEnd::Shutdown,
        };
        self.settings.metrics.streams_ended.inc(reason);
    }

    /// The length of `data`'s prefix that ends at its first event boundary, given the bytes
    /// sent before it (the `\n` of a `\r\n` that ends it included); `None` if it has none.
    fn boundary_in(&self, data: &[u8]) -> Option<usize> {
        let mut scan = self.scan;
        let at = data.iter().position(|&b| scan.push(b))?;
        let crlf = data[at] == b'\r' && data.get(at + 1) == Some(&b'\n');
        Some(at + 1 + usize::from(crlf))
    }

    /// Records `data` as sent.
    fn sent(&mut self, data: &[u8]) {
        for &b in data {
            self.scan.push(b);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that may be an event stream to end (see the module documentation);
    /// any other body passes as it is.
    pub struct EventStream<B> {
        #[pin]
        inner: B,
        ending: Option<Box<Ending>>,
    }
}

impl<B> Body for EventStream<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let Some(watch) = this.ending.as_deref_mut() else {
            return this.inner.poll_frame(cx);
        };
        if watch.done {
            return Poll::Ready(None);
        }
        watch.poll_trigger(cx);
        if watch.ending.is_some() && watch.scan.at_boundary {
            watch.finish();
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let Some(data) = frame.data_ref() else {
                    return Poll::Ready(Some(Ok(frame)));
                };
                if watch.ending.is_some()
                    && let Some(end) = watch.boundary_in(data)
                {
                    // The rest of the frame belongs to the next event: not sent.
                    let complete = data.slice(..end);
                    watch.sent(&complete);
                    watch.finish();
                    return Poll::Ready(Some(Ok(Frame::data(complete))));
                }
                watch.sent(data);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                if let Some((_, grace)) = watch.ending.as_mut()
                    && grace.as_mut().poll(cx).is_ready()
                {
                    // The backend did not finish its event in time.
                    watch.finish();
                    return Poll::Ready(None);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ending.as_ref().is_some_and(|w| w.done) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.ending {
            // It may end early.
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests;
