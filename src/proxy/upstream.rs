//! The pooled HTTP/1.1 client to the backend, with the one retry a closed keep-alive
//! connection calls for.
//!
//! Backends close idle keep-alive connections on their own schedule (uvicorn after 5 s,
//! gunicorn 2 s, Node 5 s). A connection the backend closes just as the proxy reuses it fails
//! before any response byte arrives. Two defences (README "HTTP behaviour"):
//!
//! 1. idle pooled connections are closed after `upstream.pool_idle_timeout` (default 1 s),
//!    before the backend closes them;
//! 2. a request that still meets such a connection is retried once, on a new connection, when
//!    its body is empty (GET, HEAD, OPTIONS, or any request without a body): nothing of it can
//!    have been processed, and it can be sent again as it was. A request with a body has been
//!    consumed by the first attempt and answers 502.

use std::error::Error as _;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Upstream;
use crate::metrics::UpstreamErrorKind;

/// TCP keep-alive probes on backend connections (a backend host that vanished is noticed).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The body of a request to the backend: the client's, streamed, or none at all (which can be
/// sent again).
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// A request failed on its way to the backend.
pub type UpstreamError = hyper_util::client::legacy::Error;

type HttpClient = Client<HttpConnector, UpstreamBody>;

/// A request on its way to the backend: the first try, and for a request without a body the
/// copy a retry would send.
#[derive(Debug)]
pub struct Attempt {
    first: ResponseFuture,
    again: Option<Request<UpstreamBody>>,
}

/// Connections to the backend: a keep-alive pool, and a client that never reuses a connection,
/// for the retry.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    pooled: HttpClient,
    fresh: HttpClient,
}

impl UpstreamClient {
    /// Builds both clients: connect timeout from the config, `TCP_NODELAY`, idle pooled
    /// connections closed after `upstream.pool_idle_timeout` (zero: none kept).
    pub fn new(config: &Upstream) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(TCP_KEEPALIVE));
        let mut pooled = Client::builder(TokioExecutor::new());
        pooled.pool_timer(TokioTimer::new());
        if config.pool_idle_timeout.is_zero() {
            pooled.pool_max_idle_per_host(0);
        } else {
            pooled.pool_idle_timeout(config.pool_idle_timeout);
        }
        let fresh = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector.clone());
        Self {
            pooled: pooled.build(connector),
            fresh,
        }
    }

    /// The first attempt at `req`, on a pooled connection (nothing is sent before
    /// [`UpstreamClient::complete`] is awaited). Two steps, so that the caller rearranges the
    /// request's parts before its own future begins: only the response future and the copy
    /// for the retry are held across an await.
    pub fn attempt(&self, req: Request<Incoming>) -> Attempt {
        let (parts, body) = req.into_parts();
        if !body.is_end_stream() {
            let req = Request::from_parts(parts, Either::Left(body));
            return Attempt {
                first: self.pooled.request(req),
                again: None,
            };
        }
        let again = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone())
            .version(parts.version)
            .body(Either::Right(Empty::new()));
        let again = again.ok().map(|mut r| {
            *r.headers_mut() = parts.headers.clone();
            r
        });
        let first = Request::from_parts(parts, Either::Right(Empty::new()));
        Attempt {
            first: self.pooled.request(first),
            again,
        }
    }

    /// The response to an [`UpstreamClient::attempt`]: a request without a body that meets a
    /// pooled connection closed before any response byte is sent once more, on a new
    /// connection.
    pub async fn complete(&self, attempt: Attempt) -> Result<Response<Incoming>, UpstreamError> {
        let Attempt { first, again } = attempt;
        match first.await {
            Err(e) if closed_before_response(&e) => match again {
                Some(req) => {
                    tracing::debug!(
                        "backend closed a pooled connection before answering: retrying once on a new connection"
                    );
                    self.fresh.request(req).await
                }
                None => Err(e),
            },
            other => other,
        }
    }
}

/// Whether a failed request met a connection that closed before any byte of a response: the
/// backend closed it (an end of stream or a reset) while the request was on its way.
pub fn closed_before_response(e: &UpstreamError) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut next = e.source();
    while let Some(cause) = next {
        if let Some(h) = cause.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            )
        {
            return true;
        }
        next = cause.source();
    }
    false
}

/// Classifies a failed request to the backend.
pub fn classify(e: &UpstreamError) -> UpstreamErrorKind {
    if e.is_connect() {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Protocol
    }
}
