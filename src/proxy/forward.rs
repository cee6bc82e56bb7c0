//! [`Forward`]: the innermost service, which sends a request to the backend and streams its
//! response back.
//!
//! **Request.** Method, path, query and body unchanged; hop-by-hop fields and
//! `Proxy-Authorization` removed, `Host` and `X-Forwarded-*` set ([`headers`]). The
//! `Authorization` it finds is the one the layers above left: the exchanged token, the
//! validated client token (passthrough), or none (a public path). `CONNECT` is refused: a
//! tunnel would carry anything past every rule.
//!
//! **Response.** The backend's, streamed, without its hop-by-hop fields; the request's
//! extensions move onto it, so that the access log sees what the layers decided. No response
//! headers within `upstream.response_header_timeout`: 504; the backend unreachable or failing
//! before its headers: 502.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tower::Service;

use super::headers::{self, ClientIp};
use super::upstream::{self, UpstreamClient};
use crate::config::Config;
use crate::error::{self, Denial, Outcome, Responder, ResponseBody};
use crate::metrics::{Label, Metrics, UpstreamErrorKind};
use crate::telemetry::{self, RequestTrace};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

/// What every connection's [`Forward`] shares.
#[derive(Debug)]
pub struct Upstream {
    client: UpstreamClient,
    /// `Host` sent to the backend unless `preserve_host`.
    host: HeaderValue,
    /// `scheme://authority` of the backend.
    base: String,
    /// `X-Forwarded-Proto`: `https` with `tls` (README "HTTPS"), else the scheme of
    /// `public_url`, else `http`.
    forwarded_proto: &'static str,
    preserve_host: bool,
    response_header_timeout: Duration,
    metrics: Arc<Metrics>,
    /// `server.address` and `server.port` of the upstream span (README "Traces").
    server: [KeyValue; 2],
}

impl Upstream {
    /// The backend of `config.upstream`.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        let url = &config.upstream.url;
        let host_name = url.host_str().unwrap_or("localhost");
        let authority = match url.port() {
            Some(p) => format!("{host_name}:{p}"),
            None => host_name.to_owned(),
        };
        let host = HeaderValue::from_str(&authority)
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let forwarded_proto = match config.public_url.as_ref().map(url::Url::scheme) {
            _ if config.tls.is_some() => "https",
            Some("https") => "https",
            _ => "http",
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let server = [
            KeyValue::new("server.address", host_name.to_owned()),
            KeyValue::new("server.port", i64::from(port)),
        ];
        Self {
            server,
            client: UpstreamClient::new(&config.upstream),
            host,
            base: format!("{}://{authority}", url.scheme()),
            forwarded_proto,
            preserve_host: config.upstream.preserve_host,
            response_header_timeout: config.upstream.response_header_timeout,
            metrics,
        }
    }
}

/// Forwards one connection's requests to the backend (see the module documentation).
#[derive(Debug, Clone)]
pub struct Forward {
    upstream: Arc<Upstream>,
    peer: ClientIp,
}

impl Forward {
    /// The service for a connection from `peer`.
    pub fn new(upstream: Arc<Upstream>, peer: ClientIp) -> Self {
        Self { upstream, peer }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Request<Incoming>> for Forward {
    type Response = Response<ResponseBody<Incoming>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        if req.method() == Method::CONNECT {
            let resp = Responder::plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "CONNECT is not supported",
                Outcome::BAD_REQUEST,
            );
            return Box::pin(std::future::ready(Ok(resp.map(ResponseBody::own))));
        }
        let Some((mut upstream_req, extensions)) =
            upstream_request(&self.upstream, req, &self.peer)
        else {
            let resp = Responder::plain(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "bad request target",
                Outcome::BAD_REQUEST,
            );
            return Box::pin(std::future::ready(Ok(resp.map(ResponseBody::own))));
        };
        // Traces on (README "Traces"): the upstream call's span, named by the `traceparent`
        // the backend gets in place of whatever the client sent.
        let mut span = extensions.get::<RequestTrace>().map(|t| {
            let mut span = t.child("upstream", SpanKind::Client);
            span.set(KeyValue::new(
                "http.request.method",
                telemetry::method_name(upstream_req.method()),
            ));
            for attribute in &self.upstream.server {
                span.set(attribute.clone());
            }
            span.inject(upstream_req.headers_mut());
            span
        });
        // Taken before the future: the request's parts are not carried across its awaits.
        let attempt = self.upstream.client.attempt(upstream_req);
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let sent = tokio::time::timeout(
                upstream.response_header_timeout,
                upstream.client.complete(attempt),
            )
            .await;
            let kind = match sent {
                Ok(Ok(mut resp)) => {
                    if let Some(span) = span.as_mut() {
                        let status = i64::from(resp.status().as_u16());
                        span.set(KeyValue::new("http.response.status_code", status));
                    }
                    headers::strip_hop_by_hop(resp.headers_mut());
                    *resp.extensions_mut() = extensions;
                    return Ok(resp.map(ResponseBody::inner));
                }
                Ok(Err(e)) => {
                    let kind = upstream::classify(&e);
                    tracing::warn!(error = %e, kind = ?kind, "backend request failed");
                    kind
                }
                Err(_) => UpstreamErrorKind::Timeout,
            };
            if let Some(span) = span.as_mut() {
                span.fail(kind.as_str());
            }
            upstream.metrics.upstream_errors.inc(kind);
            let mut resp = error::response(&error::reply(&Denial::Upstream(kind), ""));
            let mut all = extensions;
            all.extend(std::mem::take(resp.extensions_mut()));
            *resp.extensions_mut() = all;
            Ok(resp.map(ResponseBody::own))
        })
    }
}

/// The request for the backend, its target on the upstream, with the headers rewritten
/// ([`headers::prepare_request`]), and the extensions taken off it. `None`: the request
/// target cannot be forwarded.
fn upstream_request(
    upstream: &Upstream,
    req: Request<Incoming>,
    peer: &ClientIp,
) -> Option<(Request<Incoming>, http::Extensions)> {
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = format!("{}{path_and_query}", upstream.base).parse().ok()?;
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    headers::prepare_request(
        &mut parts.headers,
        peer,
        original_host,
        upstream.forwarded_proto,
        &upstream.host,
        upstream.preserve_host,
    );
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let extensions = std::mem::take(&mut parts.extensions);
    Some((Request::from_parts(parts, body), extensions))
}
