//! [`TokenExchangeLayer`]: the client's token never goes further than this layer.
//!
//! **Request.** Runs behind [`crate::inbound::BearerAuthLayer`]. A request carrying a
//! validated [`Principal`] has its `Authorization` replaced by `Bearer <exchanged token>`
//! (RFC 8693, through the [`Exchanger`] and its cache); the [`Exchanged`] token, with its
//! [`CacheStatus`], stays in the request's extensions. A request without a principal (a public path) goes on without any
//! `Authorization` at all: whatever the client sent is removed, so the inner service never
//! sees a client token, whatever the layers above did.
//!
//! **Response.** A failed exchange is answered here (401, 403, 502 or 503, README "HTTP
//! behaviour"); the inner service never sees the request. The acceptance of the token is then
//! kept in the validator's decision cache (no exchanged-token entry carries it now), so that
//! the client's retries cost a lookup rather than a signature check.
//!
//! The [`Recall`] for [`crate::inbound::BearerAuthLayer`]: a token whose cache entry still
//! carries a valid acceptance is accepted and exchanged by one lookup, whose result this layer
//! finds in the request's extensions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, MapOk, TryFutureExt};

use http::header::{self, HeaderValue};
use http::{Request, Response};
use tower::{Layer, Service};

use super::{CacheStatus, Exchanged, Exchanger};
use crate::error::{Denial, Responder, ResponseBody};
use crate::inbound::cache::TokenDigest;
use crate::inbound::{Principal, Recall, Validator, bearer_token};
use crate::telemetry::{ChildSpan, RequestTrace};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct TokenExchangeLayer {
    /// One allocation for everything a call may need: cloned once per request.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Per profile, in config order: its exchanger and its validator.
    profiles: Box<[(Arc<Exchanger>, Arc<Validator>)]>,
    responder: Responder,
    max_token_bytes: usize,
}

impl TokenExchangeLayer {
    /// Exchanges through `exchanger` the tokens `validator` accepted, refusing through
    /// `responder`; `max_token_bytes` as in `inbound.max_token_bytes`.
    pub fn new(
        exchanger: Arc<Exchanger>,
        validator: Arc<Validator>,
        responder: Responder,
        max_token_bytes: usize,
    ) -> Self {
        Self::with_profiles(vec![exchanger], vec![validator], responder, max_token_bytes)
    }

    /// One exchanger and validator per profile (README "Several issuers"), in config order:
    /// a token is exchanged by the exchanger of the profile that accepted it.
    ///
    /// # Panics
    /// When the two lists are empty or differ in length.
    pub fn with_profiles(
        exchangers: Vec<Arc<Exchanger>>,
        validators: Vec<Arc<Validator>>,
        responder: Responder,
        max_token_bytes: usize,
    ) -> Self {
        assert!(
            !exchangers.is_empty() && exchangers.len() == validators.len(),
            "one exchanger and one validator per profile"
        );
        Self {
            shared: Arc::new(Shared {
                profiles: exchangers.into_iter().zip(validators).collect(),
                responder,
                max_token_bytes,
            }),
        }
    }
}

impl<S> Layer<S> for TokenExchangeLayer {
    type Service = TokenExchange<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenExchange {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`TokenExchangeLayer`].
#[derive(Debug, Clone)]
pub struct TokenExchange<S> {
    inner: S,
    layer: TokenExchangeLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the inner service's response becomes.
type Passed<B> = fn(Response<B>) -> Response<ResponseBody<B>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for TokenExchange<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    ReqB: Send + 'static,
    ResB: 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future =
        Either<MapOk<S::Future, Passed<ResB>>, BoxFuture<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let passed: Passed<ResB> = |r| r.map(ResponseBody::inner);
        // Found by the recall that accepted the token: nothing left to do (the hot path, with
        // no future of its own).
        if let Some(authorization) = req
            .extensions()
            .get::<Exchanged>()
            .map(|e| e.authorization.clone())
        {
            if let Some(trace) = req.extensions().get::<RequestTrace>() {
                // Traces on: the exchange was a cache hit, found with the validation.
                let mut span = trace.child("exchange", SpanKind::Internal);
                if let Some(p) = req.extensions().get::<Principal>() {
                    span.profile(p.profile);
                }
                span.set(KeyValue::new("txp.cache", CacheStatus::Hit.as_str()));
            }
            swap_in(&mut req, authorization);
            return Either::Left(self.inner.call(req).map_ok(passed));
        }
        let Some(principal) = req.extensions().get::<Principal>().cloned() else {
            // No validated token: none goes on.
            req.headers_mut().remove(header::AUTHORIZATION);
            return Either::Left(self.inner.call(req).map_ok(passed));
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.shared.clone();
        // Traces on (README "Traces"): the exchange's span, parent of the IdP call.
        let mut span = req.extensions().get::<RequestTrace>().map(|t| {
            let mut span = t.child("exchange", SpanKind::Internal);
            span.profile(principal.profile);
            span
        });
        Either::Right(Box::pin(async move {
            let exchanged = match (
                bearer_token(req.headers(), layer.max_token_bytes),
                layer.profiles.get(principal.profile),
            ) {
                (Ok(token), Some((exchanger, validator))) => {
                    let key = exchanger.key(token);
                    let propagation = span.as_ref().map(ChildSpan::propagation);
                    let exchanged = exchanger
                        .exchange_traced(token, &key, &principal, propagation.as_ref())
                        .await;
                    if exchanged.is_err() {
                        // Boxed: its future is large, and only a failure pays for it.
                        Box::pin(validator.remember(token, &principal)).await;
                    }
                    exchanged.map_err(Denial::Exchange)
                }
                // The token that was accepted is gone: never forward without one.
                (Err(denial), _) => Err(denial),
                // Accepted by a validator this layer was not given: nothing to exchange it
                // with, so it goes no further.
                (Ok(_), None) => {
                    tracing::error!(
                        profile = principal.profile,
                        "no exchanger for the profile that accepted the token"
                    );
                    Err(Denial::Inbound(crate::inbound::InboundError::Unavailable))
                }
            };
            if let Some(span) = span.as_mut() {
                match &exchanged {
                    Ok(e) => span.set(KeyValue::new("txp.cache", e.cache.as_str())),
                    Err(denial) => span.deny(denial),
                }
            }
            drop(span);
            match exchanged {
                Ok(exchanged) => {
                    swap_in(&mut req, exchanged.authorization.clone());
                    req.extensions_mut().insert(exchanged);
                    Ok(inner.call(req).await?.map(ResponseBody::inner))
                }
                Err(denial) => {
                    let mut resp = layer.responder.deny_for(
                        Some(principal.profile),
                        &denial,
                        req.headers(),
                        req.uri(),
                    );
                    // The access log names whose token it was.
                    resp.extensions_mut().insert(principal);
                    Ok(resp.map(ResponseBody::own))
                }
            }
        }))
    }
}

/// Puts the exchanged token in place of the client's.
fn swap_in<B>(req: &mut Request<B>, mut authorization: HeaderValue) {
    authorization.set_sensitive(true);
    // `insert` replaces every value the client sent.
    req.headers_mut()
        .insert(header::AUTHORIZATION, authorization);
}

impl Recall for Arc<Exchanger> {
    type Recalled = Exchanged;

    async fn recall(
        &self,
        token: &str,
        digest: &TokenDigest,
        key_epoch: u64,
    ) -> Option<(Principal, Exchanged)> {
        let key = self.key_of(digest);
        let entry = self.recall_entry(&key, key_epoch).await?;
        self.refresh_if_due(&key, token, &entry, tokio::time::Instant::now());
        Some((
            entry.principal(),
            Exchanged::from_entry(entry, CacheStatus::Hit),
        ))
    }
}

#[cfg(test)]
mod tests;
