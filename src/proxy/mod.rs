//! The request path of the proxy listener.
//!
//! [`handle`] reads top to bottom: RFC 9728 metadata → public path? → bearer token →
//! validate → exchange (cached) or pass through → rewrite headers → forward → stream the
//! response back, logging when its body ends.

pub mod body;
pub mod headers;
pub mod metadata;
pub mod upstream;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use crate::config::{Config, Mode};
use crate::error::{self, Denial};
use crate::exchange::Exchanger;
use crate::inbound::Validator;
use crate::metrics::{Metrics, UpstreamErrorKind};
pub use body::{AccessLog, ProxyBody};
pub use headers::ClientIp;

/// Everything the request path needs, shared by all connections.
pub struct AppState {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub validator: Arc<Validator>,
    /// `None` in passthrough mode.
    pub exchanger: Option<Arc<Exchanger>>,
    pub client: upstream::UpstreamClient,
    /// `Host` sent to the backend unless `preserve_host`.
    pub upstream_host: HeaderValue,
    /// `scheme://authority` of the backend.
    upstream_base: String,
    /// `X-Forwarded-Proto`: the scheme of `public_url`, else `http`.
    forwarded_proto: &'static str,
}

impl AppState {
    /// Assembles the state; the validator and exchanger are built by the caller.
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        validator: Arc<Validator>,
        exchanger: Option<Arc<Exchanger>>,
    ) -> Self {
        let client = upstream::UpstreamClient::new(&config.upstream);
        let authority = match config.upstream.url.port() {
            Some(p) => format!(
                "{}:{p}",
                config.upstream.url.host_str().unwrap_or("localhost")
            ),
            None => config
                .upstream
                .url
                .host_str()
                .unwrap_or("localhost")
                .to_owned(),
        };
        let upstream_host = HeaderValue::from_str(&authority)
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let upstream_base = format!("{}://{authority}", config.upstream.url.scheme());
        let forwarded_proto = match config.public_url.as_ref().map(url::Url::scheme) {
            Some("https") => "https",
            _ => "http",
        };
        Self {
            config,
            metrics,
            validator,
            exchanger,
            client,
            upstream_host,
            upstream_base,
            forwarded_proto,
        }
    }

    /// True when `path` falls under one of `inbound.public_paths` (whole segments only) and
    /// carries nothing a backend might normalise into another path (dot segments, encoded
    /// slashes or dots, backslashes).
    pub fn is_public(&self, path: &str) -> bool {
        is_public_path(&self.config.inbound.public_paths, path)
    }
}

/// See [`AppState::is_public`].
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
fn is_plain_path(path: &str) -> bool {
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

/// Handles one request on the proxy listener.
///
/// An `async` block rather than an `async fn`: the future keeps its arguments once, where an
/// `async fn` keeps them twice (as captured and as moved into its body), and hyper and the
/// service layers move this future several times per request.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn's future holds its arguments twice"
)]
pub fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    client: ClientIp,
) -> impl Future<Output = Response<ProxyBody>> + Send {
    async move {
        let mut log = AccessLog::new(
            state.metrics.clone(),
            req.method().clone(),
            req.uri().path(),
        );
        let path = req.uri().path();

        // A tunnel would carry anything past every rule below.
        if req.method() == Method::CONNECT {
            log.outcome = "bad_request";
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                error::json_error("invalid_request", "CONNECT is not supported"),
                log,
            );
        }

        // RFC 9728 metadata: public by definition.
        if metadata::is_metadata_path(path) && matches!(*req.method(), Method::GET | Method::HEAD) {
            let origin =
                metadata::origin(state.config.public_url.as_ref(), req.headers(), req.uri());
            let doc = metadata::document(&state.config.protected_resource, &origin, path);
            log.outcome = "metadata";
            return json_response(StatusCode::OK, doc.to_string(), log);
        }

        // Authenticate unless the path is public.
        let authorization = if state.is_public(path) {
            log.outcome = "public";
            None
        } else {
            match authorize(&state, &req, &mut log).await {
                Ok(value) => Some(value),
                Err(denial) => return deny(&state, &req, &denial, log),
            }
        };

        let Some(upstream_req) = upstream_request(&state, req, &client, authorization) else {
            log.outcome = "bad_request";
            return json_response(
                StatusCode::BAD_REQUEST,
                error::json_error("invalid_request", "bad request target"),
                log,
            );
        };
        forward(&state, upstream_req, log).await
    }
}

/// Extracts and validates the bearer token, then exchanges it (or passes it through).
/// Returns the `Authorization` value for the backend.
///
/// In exchange mode a token seen before is served from the exchanged-token cache in one
/// lookup: its entry carries the token's acceptance, valid as long as a remembered
/// validation would be ([`Exchanger::cached`]). Anything else is validated, then exchanged.
async fn authorize(
    state: &AppState,
    req: &Request<Incoming>,
    log: &mut AccessLog,
) -> Result<HeaderValue, Denial> {
    let token = bearer_token(req.headers(), state.config.inbound.max_token_bytes)?;
    let exchanger = match (&state.config.mode, &state.exchanger) {
        (Mode::Exchange, Some(exchanger)) => exchanger,
        (Mode::Passthrough, _) | (Mode::Exchange, None) => {
            let principal = Box::pin(state.validator.validate(token))
                .await
                .map_err(Denial::Inbound)?;
            log.sub = principal.sub;
            return passthrough_authorization(req.headers(), token);
        }
    };
    // One SHA-256 over the exchange parameters and the token: the key of its cache entry.
    let key = exchanger.key(token);
    if let Some(hit) = exchanger.cached(&key, state.validator.key_epoch()) {
        log.sub = hit.sub;
        log.cache = Some(hit.cache.as_str());
        return Ok(hit.authorization);
    }
    // The slow paths are boxed: their futures (key fetches, the IdP call) are kilobytes,
    // and inline they would make every request's future that large, cache hits included.
    let principal = Box::pin(state.validator.validate(token))
        .await
        .map_err(Denial::Inbound)?;
    log.sub.clone_from(&principal.sub);
    let exchanged = match Box::pin(exchanger.exchange_keyed(token, &key, &principal)).await {
        Ok(exchanged) => exchanged,
        Err(e) => {
            // No entry carries the acceptance now: keep it where retries will find it.
            Box::pin(state.validator.remember(token, &principal)).await;
            return Err(Denial::Exchange(e));
        }
    };
    log.cache = Some(exchanged.cache.as_str());
    Ok(exchanged.authorization)
}

/// The client's own `Authorization` value for the backend (passthrough mode): the header as
/// received when it is already `Bearer <token>`, else rebuilt in that form.
fn passthrough_authorization(
    headers: &http::HeaderMap,
    token: &str,
) -> Result<HeaderValue, Denial> {
    let canonical = headers.get(header::AUTHORIZATION).filter(|v| {
        let b = v.as_bytes();
        b.len() == token.len() + 7 && b.starts_with(b"Bearer ") && &b[7..] == token.as_bytes()
    });
    let mut v = match canonical {
        Some(v) => v.clone(),
        None => {
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| Denial::MalformedToken)?
        }
    };
    v.set_sensitive(true);
    Ok(v)
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

/// The request for the backend: its target on the upstream, with the headers rewritten
/// (`headers::prepare_request`). `None`: the request target cannot be forwarded.
fn upstream_request(
    state: &AppState,
    req: Request<Incoming>,
    client: &ClientIp,
    authorization: Option<HeaderValue>,
) -> Option<Request<Incoming>> {
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = format!("{}{path_and_query}", state.upstream_base)
        .parse()
        .ok()?;
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    headers::prepare_request(
        &mut parts.headers,
        authorization,
        client,
        original_host,
        state.forwarded_proto,
        &state.upstream_host,
        state.config.upstream.preserve_host,
    );
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    Some(Request::from_parts(parts, body))
}

/// Sends the prepared request to the backend and answers with its response, streamed; the
/// access line is written when that body ends (or at once, for a request that failed).
async fn forward(
    state: &AppState,
    upstream_req: Request<Incoming>,
    mut log: AccessLog,
) -> Response<ProxyBody> {
    let timeout = state.config.upstream.response_header_timeout;
    let result = tokio::time::timeout(timeout, state.client.send(upstream_req)).await;
    let kind = match result {
        Ok(Ok(mut resp)) => {
            headers::strip_hop_by_hop(resp.headers_mut());
            log.status = resp.status().as_u16();
            return resp.map(|b| ProxyBody::upstream(b, log, state.config.upstream.idle_timeout));
        }
        Ok(Err(e)) => {
            let kind = upstream::classify(&e);
            tracing::warn!(error = %e, kind = ?kind, "backend request failed");
            kind
        }
        Err(_) => UpstreamErrorKind::Timeout,
    };
    state.metrics.upstream_errors.inc(kind);
    let reply = error::reply(&Denial::Upstream(kind), "");
    log.outcome = reply.outcome;
    reply_response(&reply, log)
}

/// Answers a request the proxy refuses.
fn deny(
    state: &AppState,
    req: &Request<Incoming>,
    denial: &Denial,
    mut log: AccessLog,
) -> Response<ProxyBody> {
    let origin = metadata::origin(state.config.public_url.as_ref(), req.headers(), req.uri());
    let resource =
        metadata::resource_for(&state.config.protected_resource, &origin, req.uri().path());
    let reply = error::reply(denial, &metadata::metadata_url(&resource));
    if let Some(reason) = reply.rejection {
        state.metrics.token_rejections.inc(reason);
    }
    log.outcome = reply.outcome;
    reply_response(&reply, log)
}

fn reply_response(reply: &error::Reply, mut log: AccessLog) -> Response<ProxyBody> {
    log.status = reply.status.as_u16();
    let mut resp = Response::new(ProxyBody::fixed(Bytes::from(reply.body.clone()), log));
    *resp.status_mut() = reply.status;
    error::apply_headers(reply, resp.headers_mut());
    resp
}

fn json_response(status: StatusCode, body: String, mut log: AccessLog) -> Response<ProxyBody> {
    log.status = status.as_u16();
    let mut resp = Response::new(ProxyBody::fixed(Bytes::from(body), log));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(v: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(v).expect("value"),
        );
        h
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(
            bearer_token(&auth("Bearer abc.def.ghi"), 100),
            Ok("abc.def.ghi")
        );
        assert_eq!(bearer_token(&auth("bEaReR abc"), 100), Ok("abc"));
    }

    #[test]
    fn bad_authorization_headers_are_classified() {
        assert_eq!(
            bearer_token(&http::HeaderMap::new(), 100),
            Err(Denial::MissingToken)
        );
        let long = format!("Bearer {}", "a".repeat(101));
        for (value, expected) in [
            ("Basic dXNlcg==", Denial::MissingToken),
            ("Bearer", Denial::MalformedToken),
            ("Bearer ", Denial::MalformedToken),
            (long.as_str(), Denial::TokenTooLarge),
        ] {
            assert_eq!(bearer_token(&auth(value), 100), Err(expected), "{value}");
        }
        // The alphabet is the validator's to check (before any cache): these get that far.
        assert_eq!(bearer_token(&auth("Bearer a b"), 100), Ok("a b"));
        assert_eq!(bearer_token(&auth("Bearer a\"b"), 100), Ok("a\"b"));
        let mut two = auth("Bearer a");
        two.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(bearer_token(&two, 100), Err(Denial::MalformedToken));
    }

    #[test]
    fn public_paths_match_whole_segments_only() {
        let p = vec!["/health".to_string(), "/static/".to_string()];
        assert!(is_public_path(&p, "/health"));
        assert!(is_public_path(&p, "/health/live"));
        assert!(!is_public_path(&p, "/healthz-admin"));
        assert!(is_public_path(&p, "/static/app.js"));
        assert!(!is_public_path(&p, "/health/../mcp"));
        assert!(!is_public_path(&[], "/health"));
    }

    #[test]
    fn plain_paths_exclude_traversal_tricks() {
        assert!(is_plain_path("/health/live"));
        assert!(is_plain_path("/health/v1.2/x.json"));
        for tricky in [
            "/health/../admin",
            "/health/./admin",
            "/health/.../admin",
            "/health/%2e%2e/admin",
            "/health%2Fadmin",
            "/health\\admin",
            "/health/..;/mcp",
            "/health/..;jsessionid=1/mcp",
            "/health;x=1/../mcp",
            "/health/.;/mcp",
            "/health/%3b/mcp",
            "/health/%252e%252e/mcp",
            "/health/%00/mcp",
        ] {
            assert!(!is_plain_path(tricky), "{tricky}");
        }
    }

    #[test]
    fn path_parameters_never_make_a_path_public() {
        let p = vec!["/health".to_string()];
        assert!(!is_public_path(&p, "/health/..;/mcp"));
        assert!(!is_public_path(&p, "/health;/mcp"));
        assert!(!is_public_path(&p, "/health/.;/mcp"));
    }
}
