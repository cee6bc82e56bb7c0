//! [`BearerAuthLayer`]: no request passes without a validated bearer token, except on a
//! public path (README "HTTP behaviour").
//!
//! **Request.** The `Authorization: Bearer` token (RFC 6750 §2.1) is validated by the
//! [`Validator`]; the accepted [`Principal`] goes into the request's extensions, and the
//! header is left as `Bearer <token>`. On a public path (`inbound.public_paths`) no token is
//! asked for and none is let through: `Authorization` and `Proxy-Authorization` are removed
//! and the request is marked [`Public`].
//!
//! **Response.** A refused request is answered here (401 with the RFC 6750 §3 challenge, 403
//! `insufficient_scope`, 503 while the keys are not loaded) and never reaches the inner
//! service. A challenge in the inner service's response is replaced by the proxy's own
//! (`Bearer resource_metadata="…"`, same status): a backend's names its in-pod address.
//!
//! **Recall.** In exchange mode a token seen before is accepted without validating it again
//! while the acceptance its exchanged-token cache entry carries holds ([`Recall`]): one lookup
//! both accepts the token and finds the token to send on.
//!
//! **Profiles.** With several profiles (README "Several issuers") each is a [`Gate`]: its
//! validator and its recall. The token is hashed once; every gate's recall is asked with that
//! digest, and on a miss the token's unverified `iss` picks the one gate whose validator then
//! judges it (an opaque token goes to the gate that introspects). A token whose `iss` no
//! profile names is refused before any key is looked at. Which gate a token was last found
//! or routed in is noted in a small table indexed by its digest ([`Hints`]), and that gate's
//! recall is asked first: a token seen before costs one lookup, not one per profile listed
//! before its own. The table only orders the lookups; every gate is still asked before a
//! token is validated.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response};
use tower::{Layer, Service};

use super::cache::{self, TokenDigest};
use super::claims::reject;
use super::{Principal, Validator, jwt};
use crate::error::{Denial, Responder, ResponseBody};
use crate::metrics::RejectReason;
use crate::telemetry::RequestTrace;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

/// Marks a request on a public path: forwarded without a token (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Public;

/// Acceptances remembered outside the validator, consulted before it.
pub trait Recall: Clone + Send + Sync + 'static {
    /// What a recalled acceptance brings along, put into the request's extensions beside the
    /// [`Principal`].
    type Recalled: Clone + Send + Sync + 'static;

    /// The acceptance of `token`, whose SHA-256 digest is `digest` ([`cache::digest`]),
    /// remembered in key epoch `key_epoch` ([`Validator::key_epoch`]), if one still holds.
    fn recall(
        &self,
        token: &str,
        digest: &TokenDigest,
        key_epoch: u64,
    ) -> impl Future<Output = Option<(Principal, Self::Recalled)>> + Send;
}

/// No acceptances besides the validator's own decision cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRecall;

impl Recall for NoRecall {
    type Recalled = ();

    async fn recall(&self, _: &str, _: &TokenDigest, _: u64) -> Option<(Principal, ())> {
        None
    }
}

impl<R: Recall> Recall for Option<R> {
    type Recalled = R::Recalled;

    async fn recall(
        &self,
        token: &str,
        digest: &TokenDigest,
        key_epoch: u64,
    ) -> Option<(Principal, R::Recalled)> {
        match self {
            Some(r) => r.recall(token, digest, key_epoch).await,
            None => None,
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct BearerAuthLayer<R = NoRecall> {
    /// One allocation for everything a call may need: cloned once per request.
    shared: Arc<Shared<R>>,
}

impl<R> Clone for BearerAuthLayer<R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// One profile's way in: the validator that judges the tokens of its issuer, and the
/// acceptances remembered for them.
#[derive(Debug, Clone)]
pub struct Gate<R = NoRecall> {
    pub validator: Arc<Validator>,
    pub recall: R,
}

#[derive(Debug)]
struct Shared<R> {
    /// One per profile, in config order.
    gates: Box<[Gate<R>]>,
    /// With several gates: where each token was last found.
    hints: Hints,
    responder: Responder,
    public_paths: Arc<[String]>,
    max_token_bytes: usize,
}

impl BearerAuthLayer {
    /// Validates with `validator` (configured with `config`), refusing through `responder`.
    pub fn new(
        validator: Arc<Validator>,
        config: &crate::config::Inbound,
        responder: Responder,
    ) -> Self {
        BearerAuthLayer::with_gates(
            vec![Gate {
                validator,
                recall: NoRecall,
            }],
            config.public_paths.clone(),
            config.max_token_bytes,
            responder,
        )
    }
}

impl<R> BearerAuthLayer<R> {
    /// One gate per profile (README "Several issuers"); requests under `public_paths` pass
    /// without a token, and a token longer than `max_token_bytes` is refused unread.
    ///
    /// # Panics
    /// When `gates` is empty: a proxy without a profile has nothing to accept tokens with.
    pub fn with_gates(
        gates: Vec<Gate<R>>,
        public_paths: Vec<String>,
        max_token_bytes: usize,
        responder: Responder,
    ) -> Self {
        assert!(!gates.is_empty(), "a bearer layer needs at least one gate");
        Self {
            shared: Arc::new(Shared {
                hints: Hints::for_gates(gates.len()),
                gates: gates.into(),
                responder,
                public_paths: public_paths.into(),
                max_token_bytes,
            }),
        }
    }

    /// Consults `recall` before validating, in every gate.
    pub fn recall<R2: Recall>(self, recall: R2) -> BearerAuthLayer<R2> {
        let s = &self.shared;
        BearerAuthLayer {
            shared: Arc::new(Shared {
                hints: Hints::for_gates(s.gates.len()),
                gates: s
                    .gates
                    .iter()
                    .map(|g| Gate {
                        validator: g.validator.clone(),
                        recall: recall.clone(),
                    })
                    .collect(),
                responder: s.responder.clone(),
                public_paths: s.public_paths.clone(),
                max_token_bytes: s.max_token_bytes,
            }),
        }
    }
}

impl<S, R> Layer<S> for BearerAuthLayer<R> {
    type Service = BearerAuth<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`BearerAuthLayer`].
#[derive(Debug)]
pub struct BearerAuth<S, R = NoRecall> {
    inner: S,
    layer: BearerAuthLayer<R>,
}

impl<S: Clone, R> Clone for BearerAuth<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, R, ReqB, ResB> Service<Request<ReqB>> for BearerAuth<S, R>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    R: Recall,
    ReqB: Send + 'static,
    ResB: 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        // The clone that was not driven to readiness stays behind (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.shared.clone();
        // What the proxy's own challenge will need if the backend answers with one.
        let (host, uri) = (req.headers().get(header::HOST).cloned(), req.uri().clone());
        if is_public_path(&layer.public_paths, req.uri().path()) {
            let headers = req.headers_mut();
            headers.remove(header::AUTHORIZATION);
            headers.remove(header::PROXY_AUTHORIZATION);
            req.extensions_mut().insert(Public);
            return Box::pin(async move {
                let mut resp = inner.call(req).await?;
                layer
                    .responder
                    .replace_challenge(&mut resp, host.as_ref(), &uri);
                Ok(resp.map(ResponseBody::inner))
            });
        }
        // Traces on (README "Traces"): the validation's span, recall included.
        let mut span = req
            .extensions()
            .get::<RequestTrace>()
            .map(|t| t.child("validate", SpanKind::Internal));
        Box::pin(async move {
            let accepted = accept(&layer, req.headers()).await;
            if let Some(span) = span.as_mut() {
                match &accepted {
                    Ok((principal, recalled, _)) => {
                        span.profile(principal.profile);
                        let how = if recalled.is_some() {
                            "cached"
                        } else {
                            "validated"
                        };
                        span.set(KeyValue::new("txp.validation", how));
                    }
                    Err((profile, denial)) => {
                        if let Some(p) = profile {
                            span.profile(*p);
                        }
                        span.deny(denial);
                    }
                }
            }
            drop(span);
            let accepted = match accepted {
                Ok(accepted) => accepted,
                Err((profile, denial)) => {
                    let resp = layer
                        .responder
                        .deny_for(profile, &denial, req.headers(), req.uri());
                    return Ok(resp.map(ResponseBody::own));
                }
            };
            let (principal, recalled, canonical) = accepted;
            if let Some(value) = canonical {
                req.headers_mut().insert(header::AUTHORIZATION, value);
            }
            let extensions = req.extensions_mut();
            extensions.insert(principal);
            if let Some(recalled) = recalled {
                extensions.insert(recalled);
            }
            let mut resp = inner.call(req).await?;
            layer
                .responder
                .replace_challenge(&mut resp, host.as_ref(), &uri);
            Ok(resp.map(ResponseBody::inner))
        })
    }
}

/// An acceptance: the principal, what the recall brought along, and the `Authorization`
/// value to put in place when the header was not already `Bearer <token>`.
type Accepted<T> = (Principal, Option<T>, Option<HeaderValue>);

/// Accepts the request's bearer token, by recall or by validation; a refusal names the
/// profile that refused it, if one could be told.
async fn accept<R: Recall>(
    layer: &Shared<R>,
    headers: &http::HeaderMap,
) -> Result<Accepted<R::Recalled>, (Option<usize>, Denial)> {
    let token = bearer_token(headers, layer.max_token_bytes).map_err(|d| (None, d))?;
    let digest = cache::digest(token);
    let hinted = layer.hints.get(&digest);
    let order = hinted
        .into_iter()
        .chain((0..layer.gates.len()).filter(|&i| Some(i) != hinted));
    for i in order {
        let gate = &layer.gates[i];
        let epoch = gate.validator.key_epoch();
        if let Some((principal, recalled)) = gate.recall.recall(token, &digest, epoch).await {
            layer.hints.set(&digest, i);
            return Ok((principal, Some(recalled), None));
        }
    }
    let i = route(&layer.gates, token).map_err(|d| (None, d))?;
    layer.hints.set(&digest, i);
    let gate = &layer.gates[i];
    let profile = Some(gate.validator.profile());
    // Boxed: a validation's future (a decision-cache lookup, then the verification) is
    // larger than the recall's, and the request answered by a recall should not carry, and
    // copy into place, its room.
    let principal = Box::pin(gate.validator.validate_digested(token, digest))
        .await
        .map_err(|e| (profile, Denial::Inbound(e)))?;
    let canonical = canonical_authorization(headers, token).map_err(|d| (profile, d))?;
    Ok((principal, None, canonical))
}

/// Where each token was last found or routed, with several gates: a direct-mapped table
/// indexed by the first two bytes of the token's SHA-256 digest, each slot the index of a gate
/// plus one (0: none). Two tokens sharing a slot only cost each other the order of lookups;
/// an attacker cannot aim at a slot without a preimage of SHA-256. 64 KiB with several
/// profiles, nothing with one.
#[derive(Debug)]
struct Hints(Box<[AtomicU8]>);

impl Hints {
    const SLOTS: usize = 1 << 16;

    fn for_gates(gates: usize) -> Self {
        // One gate needs no order; more than 255 do not fit a slot and go in config order.
        let slots = if (2..=255).contains(&gates) {
            Self::SLOTS
        } else {
            0
        };
        Self((0..slots).map(|_| AtomicU8::new(0)).collect())
    }

    fn slot(&self, digest: &TokenDigest) -> Option<&AtomicU8> {
        self.0
            .get(usize::from(u16::from_le_bytes([digest[0], digest[1]])))
    }

    /// The gate `digest`'s token was last found in, if noted.
    fn get(&self, digest: &TokenDigest) -> Option<usize> {
        let hint = self.slot(digest)?.load(Ordering::Relaxed);
        hint.checked_sub(1).map(usize::from)
    }

    /// Notes that `digest`'s token belongs in gate `gate`; written only when it changes, so
    /// that the hot path leaves the slot's cache line shared.
    fn set(&self, digest: &TokenDigest, gate: usize) {
        let (Some(slot), Ok(value)) = (self.slot(digest), u8::try_from(gate + 1)) else {
            return;
        };
        if slot.load(Ordering::Relaxed) != value {
            slot.store(value, Ordering::Relaxed);
        }
    }
}

/// The index of the gate whose validator judges `token`: the only one, or the one of the
/// profile the token's unverified `iss` names (exact match), or for an opaque token the one
/// that introspects. Nothing read here is trusted: the chosen validator verifies all of it.
fn route<R>(gates: &[Gate<R>], token: &str) -> Result<usize, Denial> {
    if gates.len() == 1 {
        return Ok(0);
    }
    let Some(segments) = jwt::split(token) else {
        return gates
            .iter()
            .position(|g| g.validator.introspects())
            .ok_or(Denial::Inbound(reject(
                RejectReason::Malformed,
                "token is not a JWT",
            )));
    };
    #[derive(serde::Deserialize)]
    struct Issuer {
        iss: Option<String>,
    }
    let malformed = |e: jwt::Malformed| Denial::Inbound(reject(RejectReason::Malformed, e.0));
    let claimed =
        jwt::parse_json::<Issuer>(&jwt::decode_segment(segments.payload).map_err(malformed)?)
            .map_err(malformed)?;
    gates
        .iter()
        .position(|g| claimed.iss.as_deref() == Some(g.validator.issuer()))
        .ok_or(Denial::Inbound(reject(
            RejectReason::Issuer,
            "no profile for the token's issuer",
        )))
}

/// `Bearer <token>` when the header said it another way (`bearer  <token> `), else `None`.
fn canonical_authorization(
    headers: &http::HeaderMap,
    token: &str,
) -> Result<Option<HeaderValue>, Denial> {
    let canonical = headers.get(header::AUTHORIZATION).is_some_and(|v| {
        let b = v.as_bytes();
        b.len() == token.len() + 7 && b.starts_with(b"Bearer ") && &b[7..] == token.as_bytes()
    });
    if canonical {
        return Ok(None);
    }
    let mut v =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| Denial::MalformedToken)?;
    v.set_sensitive(true);
    Ok(Some(v))
}

/// The token of the request's single `Authorization: Bearer` header (RFC 6750 §2.1; the
/// scheme is case-insensitive, RFC 9110 §11.1).
pub fn bearer_token(headers: &http::HeaderMap, max_bytes: usize) -> Result<&str, Denial> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Denial::MissingToken);
    };
    if values.next().is_some() {
        return Err(Denial::MalformedToken);
    }
    let bytes = value.as_bytes();
    if bytes.len() < 7 || !bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        // Another scheme (Basic, …) carries no bearer token.
        return if bytes.len() >= 6 && bytes[..6].eq_ignore_ascii_case(b"bearer") {
            Err(Denial::MalformedToken)
        } else {
            Err(Denial::MissingToken)
        };
    }
    // `from_utf8` has a fast path for ASCII. The token's alphabet (RFC 6750 b64token) is
    // checked by the validator before anything is decided about it, and only then: a token
    // found in a cache has the bytes of one that passed that check.
    let token = std::str::from_utf8(&bytes[7..])
        .map_err(|_| Denial::MalformedToken)?
        .trim_matches(' ');
    if token.is_empty() {
        return Err(Denial::MalformedToken);
    }
    if token.len() > max_bytes {
        return Err(Denial::TokenTooLarge);
    }
    Ok(token)
}

/// True when `path` falls under one of `prefixes` (`inbound.public_paths`, whole segments
/// only) and carries nothing a backend might normalise into another path
/// ([`is_plain_path`]).
pub fn is_public_path(prefixes: &[String], path: &str) -> bool {
    if prefixes.is_empty() || !is_plain_path(path) {
        return false;
    }
    prefixes.iter().any(|p| {
        path == p
            || (path.starts_with(p.as_str())
                && (p.ends_with('/') || path.as_bytes().get(p.len()) == Some(&b'/')))
    })
}

/// Whether `path` means the same to every backend: no form that a server might normalise
/// into another path. Refused:
/// - dot segments (`.`, `..`, RFC 3986 §5.2.4) and segments of dots only (`...`);
/// - `;` anywhere: path parameters (`/health/..;/mcp`) are dropped by Java servlet
///   containers and some proxies before they resolve `..`, so `..;` walks up a level;
/// - percent-encoded dots, slashes, backslashes, `;`, `%` itself (double encoding) and NUL;
/// - backslashes, which some servers read as slashes.
pub fn is_plain_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    let tricky = ["%2e", "%2f", "%5c", "%3b", "%25", "%00"]
        .iter()
        .any(|t| lower.contains(t))
        || path.contains('\\')
        || path.contains(';')
        || path
            .split('/')
            .any(|seg| !seg.is_empty() && seg.bytes().all(|b| b == b'.'));
    !tricky
}

#[cfg(test)]
mod tests;
