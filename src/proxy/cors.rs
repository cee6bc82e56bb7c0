//! [`BrowserCorsLayer`]: CORS for browser MCP clients (the MCP Inspector in a browser), with
//! tower-http's `CorsLayer` (README "HTTP behaviour").
//!
//! **Request.** A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
//! answered here, 204, without a token, and never forwarded; the answer grants only the
//! configured origins. Any other `OPTIONS` is a request like the rest and goes on untouched
//! (tower-http's layer would answer every `OPTIONS` itself).
//!
//! **Response.** Every other response carries `Access-Control-Allow-Origin` for an allowed
//! origin, exposing `WWW-Authenticate` (so that a page can read the challenge of a 401) and
//! `Mcp-Session-Id`.

use std::task::{Context, Poll};

use futures_util::future::{Either, MapOk, TryFutureExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use tower::{Layer, Service};
use tower_http::cors::{self, AllowHeaders, AllowOrigin, Cors, CorsLayer};

/// The MCP session header (MCP "Streamable HTTP" transport).
const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// The MCP protocol version header.
const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct BrowserCorsLayer {
    cors: CorsLayer,
}

impl BrowserCorsLayer {
    /// The rules of `cors.*`: the allowed origins (or any, for `*`) and how long a browser
    /// may keep a preflight's answer. Request headers are allowed as the preflight asks for
    /// them: the origin is what is checked.
    pub fn new(config: &crate::config::Cors) -> Self {
        let origins = if config.allowed_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                config
                    .allowed_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        let cors = CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                header::WWW_AUTHENTICATE,
                MCP_SESSION_ID,
                MCP_PROTOCOL_VERSION,
            ])
            .max_age(config.max_age);
        Self { cors }
    }
}

impl<S: Clone> Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BrowserCors {
            cors: self.cors.layer(inner.clone()),
            plain: inner,
        }
    }
}

/// The service of [`BrowserCorsLayer`].
#[derive(Debug, Clone)]
pub struct BrowserCors<S> {
    cors: Cors<S>,
    /// The same inner service, for `OPTIONS` requests that are not preflights.
    plain: S,
}

type NoContent<B> = fn(Response<B>) -> Response<B>;

/// A preflight is answered with 204 (no content) rather than tower-http's 200.
fn no_content<B>(mut resp: Response<B>) -> Response<B> {
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

/// Whether `req` is a CORS preflight (the Fetch standard's CORS-preflight request).
fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for BrowserCors<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    ResB: Default,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = Either<
        Either<
            MapOk<cors::ResponseFuture<S::Future>, NoContent<ResB>>,
            cors::ResponseFuture<S::Future>,
        >,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        match self.cors.poll_ready(cx)? {
            Poll::Ready(()) => self.plain.poll_ready(cx),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if is_preflight(&req) {
            let done: NoContent<ResB> = no_content;
            Either::Left(Either::Left(self.cors.call(req).map_ok(done)))
        } else if req.method() == Method::OPTIONS {
            Either::Right(self.plain.call(req))
        } else {
            Either::Left(Either::Right(self.cors.call(req)))
        }
    }
}
