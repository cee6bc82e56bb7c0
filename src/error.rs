//! The one place where failures become HTTP responses.
//!
//! Every variant maps to a status, an OAuth error code and a fixed public description; the
//! `match` has no catch-all arm, so a new failure cannot slip through unmapped. Bodies are
//! short fixed JSON: never internal detail, never a token. The layers of the request path
//! answer a request they refuse through one [`Responder`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, Uri, header};
use http_body_util::Full;

use crate::exchange::ExchangeError;
use crate::inbound::InboundError;
use crate::metadata::Resource;
use crate::metrics::{Metrics, RejectReason, UpstreamErrorKind};
pub use crate::response::{Outcome, ResponseBody};

/// Answers the requests that a layer refuses: the status, challenge and body of [`reply`],
/// the `txp_token_rejections_total` count, and the [`Outcome`] for the access log.
#[derive(Debug, Clone)]
pub struct Responder {
    resource: Arc<Resource>,
    metrics: Arc<Metrics>,
}

impl Responder {
    /// A responder whose challenges name `resource`'s metadata, counting into `metrics`.
    pub fn new(resource: Arc<Resource>, metrics: Arc<Metrics>) -> Self {
        Self { resource, metrics }
    }

    /// The response refusing a request (`headers` and `uri` name the resource in the
    /// challenge).
    pub fn deny(&self, denial: &Denial, headers: &HeaderMap, uri: &Uri) -> Response<Full<Bytes>> {
        self.deny_for(None, denial, headers, uri)
    }

    /// As [`Responder::deny`], counting a rejected token for `profile` (its index in the
    /// config; `None` when no profile could be told, e.g. for a request without a token).
    pub fn deny_for(
        &self,
        profile: Option<usize>,
        denial: &Denial,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> Response<Full<Bytes>> {
        let host = headers.get(header::HOST);
        let reply = reply(denial, &self.resource.metadata_url_for(host, uri));
        if let Some(reason) = reply.rejection {
            self.metrics.token_rejections.inc_for(profile, reason);
        }
        response(&reply)
    }

    /// A fixed JSON answer of the proxy's own that is not a refusal of the token (e.g. 405
    /// to `CONNECT`).
    pub fn plain(
        status: StatusCode,
        code: &str,
        description: &str,
        outcome: Outcome,
    ) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(json_error(code, description))));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp.extensions_mut().insert(outcome);
        resp
    }

    /// Replaces the challenge of a backend's response (a backend names its own, in-pod
    /// address) with the proxy's, keeping the status: `resp` answers a request to `uri`
    /// carrying `host`.
    pub fn replace_challenge<B>(
        &self,
        resp: &mut Response<B>,
        host: Option<&HeaderValue>,
        uri: &Uri,
    ) {
        // A response with an outcome is the proxy's own (e.g. a failed exchange), whose
        // challenge is already right.
        if !resp.headers().contains_key(header::WWW_AUTHENTICATE)
            || resp.extensions().get::<Outcome>().is_some()
        {
            return;
        }
        let ours = HeaderValue::from_str(&self.resource.challenge_for(host, uri))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
        // `insert` replaces every value the backend sent.
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, ours);
    }

    /// The metrics refusals are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// Why the proxy answered a request itself instead of forwarding the backend's response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No bearer token at all (RFC 6750 §3.1: no error code).
    MissingToken,
    /// The `Authorization` header is not a well-formed bearer credential.
    MalformedToken,
    /// The token is longer than `inbound.max_token_bytes`.
    TokenTooLarge,
    /// The validator refused the token, or cannot validate right now.
    Inbound(InboundError),
    /// The token exchange failed.
    Exchange(ExchangeError),
    /// The backend could not be reached or did not answer in time.
    Upstream(UpstreamErrorKind),
}

/// A response the proxy produces: status, headers to add, body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub www_authenticate: Option<String>,
    pub retry_after: Option<Duration>,
    pub body: String,
    /// For the access log.
    pub outcome: &'static str,
    /// For `txp_token_rejections_total`.
    pub rejection: Option<RejectReason>,
}

/// Builds the reply for `denial`. `resource_metadata` is the RFC 9728 metadata URL put into
/// every `WWW-Authenticate` challenge.
pub fn reply(denial: &Denial, resource_metadata: &str) -> Reply {
    let invalid = |reason: RejectReason, description: &str| Reply {
        status: StatusCode::UNAUTHORIZED,
        www_authenticate: Some(format!(
            "Bearer error=\"invalid_token\", error_description=\"{description}\", resource_metadata=\"{resource_metadata}\""
        )),
        retry_after: None,
        body: json_error("invalid_token", description),
        outcome: "invalid_token",
        rejection: Some(reason),
    };
    let unavailable = |retry_after: Duration, description: &str, outcome| Reply {
        status: StatusCode::SERVICE_UNAVAILABLE,
        www_authenticate: None,
        retry_after: Some(retry_after),
        body: json_error("temporarily_unavailable", description),
        outcome,
        rejection: None,
    };
    let bad_gateway = |code: &str, description: &str, outcome| Reply {
        status: StatusCode::BAD_GATEWAY,
        www_authenticate: None,
        retry_after: None,
        body: json_error(code, description),
        outcome,
        rejection: None,
    };
    match denial {
        Denial::MissingToken => Reply {
            status: StatusCode::UNAUTHORIZED,
            www_authenticate: Some(format!("Bearer resource_metadata=\"{resource_metadata}\"")),
            retry_after: None,
            body: json_error("unauthorized", "bearer token required"),
            outcome: "unauthenticated",
            rejection: Some(RejectReason::Missing),
        },
        Denial::MalformedToken => invalid(RejectReason::Malformed, "malformed bearer token"),
        Denial::TokenTooLarge => invalid(RejectReason::TooLarge, "token too large"),
        Denial::Inbound(InboundError::Rejected {
            reason,
            description,
        }) => invalid(*reason, description),
        Denial::Inbound(InboundError::InsufficientScope { scope }) => {
            insufficient_scope(scope, resource_metadata)
        }
        Denial::Inbound(InboundError::Unavailable) => unavailable(
            Duration::from_secs(5),
            "token validation unavailable",
            "validation_unavailable",
        ),
        Denial::Exchange(ExchangeError::SubjectRejected) => Reply {
            outcome: "exchange_rejected",
            rejection: None,
            ..invalid(
                RejectReason::Signature,
                "token rejected by the identity provider",
            )
        },
        Denial::Exchange(ExchangeError::ScopeRejected { scope }) => Reply {
            outcome: "exchange_rejected",
            ..insufficient_scope(scope.as_deref().unwrap_or(""), resource_metadata)
        },
        Denial::Exchange(ExchangeError::ClaimsRequired { claims }) => Reply {
            status: StatusCode::UNAUTHORIZED,
            // Base64 has no character that needs quoting.
            www_authenticate: Some(format!(
                "Bearer error=\"insufficient_claims\", claims=\"{claims}\", resource_metadata=\"{resource_metadata}\""
            )),
            retry_after: None,
            body: json_error(
                "insufficient_claims",
                "the identity provider requires more claims (e.g. multi-factor authentication)",
            ),
            outcome: "exchange_rejected",
            rejection: None,
        },
        Denial::Exchange(ExchangeError::ClientRejected) => bad_gateway(
            "bad_gateway",
            "token exchange failed",
            "exchange_client_error",
        ),
        Denial::Exchange(ExchangeError::InvalidResponse) => bad_gateway(
            "bad_gateway",
            "token exchange failed",
            "exchange_invalid_response",
        ),
        Denial::Exchange(ExchangeError::Unavailable { retry_after }) => unavailable(
            *retry_after,
            "identity provider unavailable",
            "exchange_unavailable",
        ),
        Denial::Upstream(UpstreamErrorKind::Connect) => {
            bad_gateway("bad_gateway", "backend unreachable", "upstream_connect")
        }
        Denial::Upstream(UpstreamErrorKind::Protocol) => {
            bad_gateway("bad_gateway", "backend error", "upstream_protocol")
        }
        Denial::Upstream(UpstreamErrorKind::Timeout) => Reply {
            status: StatusCode::GATEWAY_TIMEOUT,
            www_authenticate: None,
            retry_after: None,
            body: json_error("gateway_timeout", "backend did not answer in time"),
            outcome: "upstream_timeout",
            rejection: None,
        },
    }
}

fn insufficient_scope(scope: &str, resource_metadata: &str) -> Reply {
    let scope = sanitize(scope);
    Reply {
        status: StatusCode::FORBIDDEN,
        www_authenticate: Some(format!(
            "Bearer error=\"insufficient_scope\", scope=\"{scope}\", resource_metadata=\"{resource_metadata}\""
        )),
        retry_after: None,
        body: json_error("insufficient_scope", "insufficient scope"),
        outcome: "insufficient_scope",
        rejection: Some(RejectReason::Scope),
    }
}

/// Keeps only characters allowed in an RFC 6750 `scope` value (§3: %x21 / %x23-5B / %x5D-7E
/// and spaces).
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| *c == ' ' || (c.is_ascii_graphic() && *c != '"' && *c != '\\'))
        .collect()
}

/// `{"error":"…","error_description":"…"}`
pub fn json_error(code: &str, description: &str) -> String {
    serde_json::json!({ "error": code, "error_description": description }).to_string()
}

/// The response for `reply`, its [`Outcome`] among its extensions.
pub fn response(reply: &Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(reply.body.clone())));
    *resp.status_mut() = reply.status;
    apply_headers(reply, resp.headers_mut());
    resp.extensions_mut().insert(Outcome(reply.outcome));
    resp
}

/// Sets the headers of `reply` on a response.
pub fn apply_headers(reply: &Reply, headers: &mut http::HeaderMap) {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(v) = reply
        .www_authenticate
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        headers.insert(header::WWW_AUTHENTICATE, v);
    }
    if let Some(d) = reply.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(d.as_secs().max(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp";

    #[test]
    fn missing_token_challenge_has_no_error_code() {
        let r = reply(&Denial::MissingToken, META);
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.www_authenticate.as_deref(),
            Some(&*format!("Bearer resource_metadata=\"{META}\""))
        );
    }

    #[test]
    fn statuses_follow_the_exchange_outcomes() {
        let cases = [
            (Denial::Exchange(ExchangeError::SubjectRejected), 401),
            (
                Denial::Exchange(ExchangeError::ScopeRejected {
                    scope: Some("a".into()),
                }),
                403,
            ),
            (Denial::Exchange(ExchangeError::ClientRejected), 502),
            (Denial::Exchange(ExchangeError::InvalidResponse), 502),
            (
                Denial::Exchange(ExchangeError::Unavailable {
                    retry_after: Duration::from_secs(7),
                }),
                503,
            ),
            (Denial::Upstream(UpstreamErrorKind::Connect), 502),
            (Denial::Upstream(UpstreamErrorKind::Timeout), 504),
            (Denial::TokenTooLarge, 401),
        ];
        for (d, status) in cases {
            assert_eq!(reply(&d, META).status.as_u16(), status, "{d:?}");
        }
        let r = reply(
            &Denial::Exchange(ExchangeError::Unavailable {
                retry_after: Duration::from_secs(7),
            }),
            META,
        );
        let mut h = http::HeaderMap::new();
        apply_headers(&r, &mut h);
        assert_eq!(h[header::RETRY_AFTER], "7");
    }

    #[test]
    fn scope_challenge_cannot_break_out_of_the_quoted_string() {
        let r = reply(
            &Denial::Inbound(InboundError::InsufficientScope {
                scope: "a\" b\\".into(),
            }),
            META,
        );
        let h = r.www_authenticate.expect("challenge");
        assert!(h.contains("scope=\"a b\""), "{h}");
    }
}
