//! The request path of the proxy listener: one `tower` stack, read top to bottom (README "How
//! a request is handled").
//!
//! | layer | request | response |
//! |---|---|---|
//! | [`AccessLogLayer`] | starts the access line (and, with traces on, the request's span) | writes it (ends the span) when the body ends |
//! | tower-http `SetSensitiveRequestHeaders` | marks `Authorization`, `Proxy-Authorization`, `Cookie` sensitive | |
//! | [`BrowserCorsLayer`] (with `cors`) | answers CORS preflights | `Access-Control-Allow-Origin` for allowed origins |
//! | [`ProtectedResourceLayer`] | answers the RFC 9728 metadata document | |
//! | [`BearerAuthLayer`](crate::inbound::BearerAuthLayer) | validates the bearer token, or answers the challenge | |
//! | [`TokenExchangeLayer`](crate::exchange::TokenExchangeLayer) (exchange mode) | swaps in the exchanged token, or answers the failure | |
//! | [`StreamLifetimeLayer`] | | ends an event stream after a complete event when its token expires or the listener closes |
//! | tower-http `ResponseBodyTimeout` (`upstream.idle_timeout`) | | bounds the silence inside the backend's body |
//! | [`Forward`] | rewrites the headers, sends to the backend | streams its response back |

pub mod access_log;
pub mod cors;
pub mod forward;
pub mod headers;
pub mod stream_lifetime;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use http::{Response, header};
use http_body_util::Either;
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower_http::map_response_body::MapResponseBodyLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::{ResponseBodyTimeoutLayer, TimeoutBody};

pub use access_log::{AccessLog, AccessLogLayer, LoggedBody};
pub use cors::BrowserCorsLayer;
pub use forward::{Forward, Upstream};
pub use headers::ClientIp;
pub use stream_lifetime::StreamLifetimeLayer;

use crate::config::Config;
use crate::error::ResponseBody;
use crate::exchange::{Exchanger, TokenExchangeLayer};
use crate::inbound::BearerAuthLayer;
use crate::metadata::ProtectedResourceLayer;
use crate::protection::Protection;
use crate::shutdown::Drain;

/// Credentials no log line may show, marked before anything else sees the request.
pub const SENSITIVE_HEADERS: [header::HeaderName; 3] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
];

/// The layers of the proxy listener, outermost first; [`Stack`]'s `service(Forward)` gives
/// the service of one connection.
pub type Layers = ServiceBuilder<
    Stack<
        IdleTimeout,
        Stack<
            StreamLifetimeLayer,
            Stack<
                ExchangeOrPassthrough<StreamBody>,
                Stack<
                    BearerAuthLayer<Option<Arc<Exchanger>>>,
                    Stack<
                        ProtectedResourceLayer,
                        Stack<
                            tower::util::Either<BrowserCorsLayer, Identity>,
                            Stack<SetSensitiveRequestHeadersLayer, Stack<AccessLogLayer, Identity>>,
                        >,
                    >,
                >,
            >,
        >,
    >,
>;

/// The layers of the request path (see the module documentation); `drain` tells event
/// streams when the listener closes.
pub fn layers(protection: &Protection, config: &Config, drain: &Drain) -> Layers {
    ServiceBuilder::new()
        .layer(AccessLogLayer::new(protection.metrics.clone()).traced(protection.telemetry.clone()))
        .layer(SetSensitiveRequestHeadersLayer::new(SENSITIVE_HEADERS))
        .option_layer(config.cors.as_ref().map(BrowserCorsLayer::new))
        .layer(ProtectedResourceLayer::new(protection.resource.clone()))
        .layer(protection.bearer_auth())
        .layer(exchange_or_passthrough(protection))
        .layer(StreamLifetimeLayer::per_profile(
            protection
                .guards
                .iter()
                .map(|g| g.stream_bound.then_some(g.leeway))
                .collect(),
            drain.closing.clone(),
            protection.metrics.clone(),
        ))
        .layer(idle_timeout_layer(config.upstream.idle_timeout))
}

/// The exchange layer in exchange mode; in passthrough mode, nothing but the body type the
/// exchange layer would have given. `B` is the response body of the service inside.
pub type ExchangeOrPassthrough<B = StreamBody> =
    tower::util::Either<TokenExchangeLayer, MapResponseBodyLayer<fn(B) -> ResponseBody<B>>>;

/// [`ExchangeOrPassthrough`] for `protection`'s mode: one stack type serves both modes, in
/// front of any service whose response body is `B` (README "Use as a library").
pub fn exchange_or_passthrough<B>(protection: &Protection) -> ExchangeOrPassthrough<B> {
    match protection.token_exchange() {
        Some(layer) => tower::util::Either::Left(layer),
        // Passthrough mode: `Protection` has no exchange-mode state without an exchanger, so
        // the client's token cannot slip through for want of one.
        None => {
            let passed: fn(B) -> ResponseBody<B> = ResponseBody::inner;
            tower::util::Either::Right(MapResponseBodyLayer::new(passed))
        }
    }
}

/// The body [`Forward`] answers with: the backend's, or an error of the proxy's own.
pub type ForwardBody = ResponseBody<hyper::body::Incoming>;

/// [`ForwardBody`], bounded by `upstream.idle_timeout` when one is set.
pub type BackendBody = Either<TimeoutBody<ForwardBody>, ForwardBody>;

/// tower-http's `ResponseBodyTimeout` when `upstream.idle_timeout` is set (the bound is on the
/// silence between two frames, never on the whole body: SSE streams live for minutes); else
/// nothing, and no timer per frame.
pub type IdleTimeout = tower::util::Either<
    Stack<
        ResponseBodyTimeoutLayer,
        MapResponseBodyLayer<fn(TimeoutBody<ForwardBody>) -> BackendBody>,
    >,
    MapResponseBodyLayer<fn(ForwardBody) -> BackendBody>,
>;

fn idle_timeout_layer(idle: Option<Duration>) -> IdleTimeout {
    match idle {
        Some(d) => {
            let bounded: fn(TimeoutBody<ForwardBody>) -> BackendBody = Either::Left;
            tower::util::Either::Left(Stack::new(
                ResponseBodyTimeoutLayer::new(d),
                MapResponseBodyLayer::new(bounded),
            ))
        }
        None => {
            let unbounded: fn(ForwardBody) -> BackendBody = Either::Right;
            tower::util::Either::Right(MapResponseBodyLayer::new(unbounded))
        }
    }
}

/// The response type of the proxy listener.
pub type ProxyResponse = Response<LoggedBody<ResponseBody<ResponseBody<ResponseBody<StreamBody>>>>>;

/// [`BackendBody`], ended early when it is an event stream whose token expired
/// ([`StreamLifetimeLayer`]).
pub type StreamBody = stream_lifetime::EventStream<BackendBody>;

#[cfg(test)]
mod tests;
