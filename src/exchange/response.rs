//! Reading the token endpoint's answer: the success response checked before use
//! (RFC 8693 §2.2.1), and error responses (RFC 6749 §5.2, RFC 8693 §2.2.2, and Microsoft
//! Entra ID's for On-Behalf-Of) sorted by whose fault they are (README "HTTP behaviour").
//!
//! Nothing from the IdP's body reaches the client, and only the `error` code reaches the log,
//! reduced to `[a-z_]` and truncated (`sanitize_code`).

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde::Deserialize;

/// `Retry-After` when the IdP gives none: long enough not to hammer a struggling IdP.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest `Retry-After` honoured (and passed on): an IdP asking for hours would park
/// clients, and the proxy's circuit, for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// The shortest `Retry-After` given (HTTP has whole seconds; zero invites a busy loop).
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The scheme prefix of the header value built from the issued token.
const BEARER: &str = "Bearer ";
/// Longest `error` code written to the log.
const MAX_LOGGED_CODE: usize = 40;

/// RFC 8693 §2.2.1: the response fields the proxy uses.
/// Strings are borrowed from the body where they have no escapes: the token is then copied
/// once, into the exact-size header value that the cache keeps.
#[derive(Deserialize)]
struct SuccessBody<'a> {
    #[serde(borrow)]
    access_token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    issued_token_type: Option<Cow<'a, str>>,
    expires_in: Option<serde_json::Value>,
}

/// A usable exchanged token.
#[derive(Debug)]
pub(crate) struct Issued {
    /// `Bearer <access_token>`, marked sensitive.
    pub(crate) authorization: HeaderValue,
    /// From `expires_in`, else from the issued JWT's `exp`; `None` if neither is known.
    pub(crate) lifetime: Option<Duration>,
}

/// Why a 200 response is unusable (for the log; never contains response content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unusable {
    NotJson,
    NoAccessToken,
    TokenNotHeaderSafe,
    TokenTypeNotBearer,
    IssuedTokenTypeMismatch,
    NoIssuedTokenType,
    BadExpiresIn,
    AlreadyExpired,
    TooLarge,
}

impl Unusable {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Unusable::NotJson => "not a JSON object",
            Unusable::NoAccessToken => "no access_token",
            Unusable::TokenNotHeaderSafe => "access_token has characters not allowed in a header",
            Unusable::TokenTypeNotBearer => "token_type is not Bearer",
            Unusable::IssuedTokenTypeMismatch => "issued_token_type is not the requested one",
            Unusable::NoIssuedTokenType => "no issued_token_type",
            Unusable::BadExpiresIn => "expires_in is not a non-negative number",
            Unusable::AlreadyExpired => "the issued token is already expired",
            Unusable::TooLarge => "the response is too large",
        }
    }
}

/// Checks a 200 response: a non-empty `access_token` that fits in a header, `token_type`
/// Bearer (case-insensitive, RFC 6749 §5.1), `issued_token_type` present and equal to
/// `requested_token_type` (RFC 8693 §2.2.1 makes it required; `None` for On-Behalf-Of, whose
/// answer has none), and a lifetime that has not already run out. The lifetime is the earlier
/// of `expires_in` and the issued JWT's `exp`, whichever are known: an IdP's `expires_in`
/// cannot stretch a token past its own `exp`.
pub(crate) fn parse_success(
    body: &[u8],
    requested_token_type: Option<&str>,
    now: SystemTime,
) -> Result<Issued, Unusable> {
    // serde_json's errors may quote the body; they are dropped, never logged.
    let parsed: SuccessBody<'_> = serde_json::from_slice(body).map_err(|_| Unusable::NotJson)?;
    let token = parsed
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or(Unusable::NoAccessToken)?;
    if !parsed
        .token_type
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    {
        return Err(Unusable::TokenTypeNotBearer);
    }
    if let Some(requested) = requested_token_type {
        match parsed.issued_token_type {
            None => return Err(Unusable::NoIssuedTokenType),
            Some(t) if t != requested => return Err(Unusable::IssuedTokenTypeMismatch),
            Some(_) => {}
        }
    }
    let by_expires_in = match parsed.expires_in {
        Some(v) => Some(expires_in(&v).ok_or(Unusable::BadExpiresIn)?),
        None => None,
    };
    let by_exp = jwt_exp(&token).map(|exp| exp_remaining(exp, now));
    let lifetime = match (by_expires_in, by_exp) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if lifetime.is_some_and(|l| l.is_zero()) {
        return Err(Unusable::AlreadyExpired);
    }
    // RFC 6750 §2.1 b64token is a subset of this; some IdPs issue opaque tokens with other
    // visible characters, so allow all of them, but never a space or a control character.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Unusable::TokenNotHeaderSafe);
    }
    let mut value = Vec::with_capacity(BEARER.len() + token.len());
    value.extend_from_slice(BEARER.as_bytes());
    value.extend_from_slice(token.as_bytes());
    let mut authorization = HeaderValue::from_maybe_shared(Bytes::from(value))
        .map_err(|_| Unusable::TokenNotHeaderSafe)?;
    authorization.set_sensitive(true);
    Ok(Issued {
        authorization,
        lifetime,
    })
}

/// `expires_in` as a JSON number (RFC 6749 §5.1), or a string of digits as some IdPs send.
fn expires_in(v: &serde_json::Value) -> Option<Duration> {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(secs) = n.as_u64() {
                Some(Duration::from_secs(secs))
            } else {
                n.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| Duration::from_secs(f as u64))
            }
        }
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok().map(Duration::from_secs),
        _ => None,
    }
}

/// The `exp` of a JWS compact token, read without verification (only to bound caching).
fn jwt_exp(token: &str) -> Option<f64> {
    #[derive(Deserialize)]
    struct Exp {
        exp: Option<f64>,
    }
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None; // JWE: five parts, nothing readable
    }
    let json = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice::<Exp>(&json)
        .ok()?
        .exp
        .filter(|e| e.is_finite())
}

fn exp_remaining(exp: f64, now: SystemTime) -> Duration {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    Duration::try_from_secs_f64(exp - now).unwrap_or(Duration::ZERO)
}

/// Whose fault a failed exchange is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The IdP refused the subject token.
    Subject,
    /// The IdP refused the requested scope.
    Scope,
    /// The IdP asks for a token with more claims (Entra's Conditional Access): the claims
    /// challenge for the client, base64-encoded as in Microsoft's `WWW-Authenticate`.
    Claims(String),
    /// The IdP refused the proxy itself, or the request the proxy is configured to make.
    Client,
    /// The IdP is overloaded or failing (5xx, 429, 408).
    Unavailable,
}

/// Sorts a non-2xx answer (README "HTTP behaviour", exchange outcomes).
///
/// 1. 5xx, 429 and 408 are the IdP's own trouble: `Unavailable`, whatever the body says.
/// 2. 401 and 403 refuse the proxy itself, whatever the code: its client authentication
///    (RFC 6749 §5.2 has `invalid_client` answered with 401). A configuration problem must
///    never send clients into a re-authentication loop, so this is a 502, never a 401.
/// 3. Otherwise a known `error` code decides: `invalid_grant`, `invalid_target`,
///    `invalid_request` (RFC 8693 §2.2.2, RFC 6749 §5.2) → subject; `invalid_scope` → scope;
///    `invalid_client`, `unauthorized_client`, `unsupported_grant_type`, `access_denied` →
///    client. A few widespread non-standard codes are understood too: `invalid_token`,
///    `expired_token`, `token_revoked` → subject; `insufficient_scope`, `scope_escalation` →
///    scope.
/// 4. Anything else (a 400 with an unknown or no code, 404, a redirect) is the proxy's side:
///    `Client` (502). A 400 we cannot read says nothing about the subject, and answering 401
///    would make the client drop a good token and retry in a loop; a 502 shows up in
///    `txp_exchange_requests_total{result="client_error"}` for the operator.
pub(crate) fn classify(status: StatusCode, error_code: Option<&str>) -> Refusal {
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        return Refusal::Unavailable;
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Refusal::Client;
    }
    match error_code {
        Some("invalid_grant" | "invalid_target" | "invalid_request") => Refusal::Subject,
        Some("invalid_token" | "expired_token" | "token_revoked") => Refusal::Subject,
        Some("invalid_scope" | "insufficient_scope" | "scope_escalation") => Refusal::Scope,
        Some(
            "invalid_client" | "unauthorized_client" | "unsupported_grant_type" | "access_denied",
        ) => Refusal::Client,
        _ => Refusal::Client,
    }
}

/// The `error` member of an error response (RFC 6749 §5.2), if the body is such JSON.
pub(crate) fn error_code(body: &[u8]) -> Option<String> {
    error_body(body).error
}

/// The members of an error response the proxy reads: RFC 6749 §5.2's `error`, and Entra's
/// `suberror` and `claims` (a Conditional Access claims request, a JSON text).
/// Members of another type than RFC 6749 and Entra give them are read as absent, and never
/// keep the others from being read.
#[derive(Debug, Default)]
pub(crate) struct ErrorBody {
    pub(crate) error: Option<String>,
    pub(crate) suberror: Option<String>,
    /// The claims request as JSON text (Entra sends it as a string; an object is taken too).
    pub(crate) claims: Option<String>,
}

/// The error response in `body`, or nothing read when it is not a JSON object.
pub(crate) fn error_body(body: &[u8]) -> ErrorBody {
    #[derive(Deserialize)]
    struct Raw {
        error: Option<serde_json::Value>,
        suberror: Option<serde_json::Value>,
        claims: Option<serde_json::Value>,
    }
    let Ok(raw) = serde_json::from_slice::<Raw>(body) else {
        return ErrorBody::default();
    };
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    ErrorBody {
        error: text(raw.error),
        suberror: text(raw.suberror),
        claims: match raw.claims {
            Some(v @ serde_json::Value::Object(_)) => Some(v.to_string()),
            other => text(other),
        },
    }
}

/// The longest Conditional Access `claims` passed on to a client; a longer one is not a real
/// claims request, and the answer is then read as if it had none.
pub(crate) const MAX_CLAIMS_BYTES: usize = 4096;

/// Sorts a non-2xx answer to an On-Behalf-Of request (Microsoft Entra ID, README "Microsoft
/// Entra ID"). 5xx, 429, 408, 401 and 403 are read as for any exchange ([`classify`]); then
/// Entra's `suberror` is read before `error`:
/// 1. `consent_required` (as `suberror` or `error`, e.g. AADSTS65001): the user has not
///    consented to the backend's scope → `Scope` (403 `insufficient_scope`);
/// 2. a JSON object in `claims` (Conditional Access: MFA, a compliant device, …) →
///    `Claims` (401 `insufficient_claims`, the claims passed on for the client to ask for);
/// 3. `interaction_required` without claims, and `invalid_grant` → `Subject` (401);
/// 4. the rest as [`classify`].
pub(crate) fn classify_obo(status: StatusCode, body: &ErrorBody) -> Refusal {
    let generic = classify(status, body.error.as_deref());
    if matches!(generic, Refusal::Unavailable)
        || status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
    {
        return generic;
    }
    let (error, suberror) = (body.error.as_deref(), body.suberror.as_deref());
    if suberror == Some("consent_required") || error == Some("consent_required") {
        return Refusal::Scope;
    }
    if let Some(claims) = body.claims.as_deref().filter(|c| is_claims_request(c)) {
        return Refusal::Claims(base64::engine::general_purpose::STANDARD.encode(claims));
    }
    match error {
        Some("interaction_required" | "invalid_grant") => Refusal::Subject,
        _ => generic,
    }
}

/// A claims request worth passing on: a JSON object of bounded size.
fn is_claims_request(claims: &str) -> bool {
    claims.len() <= MAX_CLAIMS_BYTES
        && serde_json::from_str::<serde_json::Value>(claims).is_ok_and(|v| v.is_object())
}

/// An `error` code fit for the log: lower-cased, letters and `_` only, at most 40 of them.
pub(crate) fn sanitize_code(code: &str) -> String {
    code.chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || *c == '_')
        .take(MAX_LOGGED_CODE)
        .collect()
}

/// The IdP's own `Retry-After` (RFC 9110 §10.2.3: delta-seconds or an HTTP-date), clamped to
/// [`MIN_RETRY_AFTER`]..=[`MAX_RETRY_AFTER`]; `None` when it sent none (or none that can be
/// read), and then [`DEFAULT_RETRY_AFTER`] is what clients are told.
pub(crate) fn retry_after_sent(value: Option<&HeaderValue>, now: SystemTime) -> Option<Duration> {
    let parsed = value
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .and_then(|v| {
            if let Ok(secs) = v.parse::<u64>() {
                Some(Duration::from_secs(secs))
            } else {
                let at = httpdate::parse_http_date(v).ok()?;
                // A date in the past means "now"; round up to whole seconds.
                let d = at.duration_since(now).unwrap_or_default();
                Some(Duration::from_secs(
                    d.as_secs() + u64::from(d.subsec_nanos() > 0),
                ))
            }
        });
    parsed.map(|d| d.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER))
}

/// Rounds a wait up to whole seconds (the unit of `Retry-After`), at least one.
pub(crate) fn whole_seconds(d: Duration) -> Duration {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: &str = "urn:ietf:params:oauth:token-type:access_token";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn parse(body: &str) -> Result<Issued, Unusable> {
        parse_success(body.as_bytes(), Some(AT), now())
    }

    fn jwt_with(payload: &str) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn a_good_response_becomes_a_sensitive_bearer_header() {
        let issued = parse(&format!(
            r#"{{"access_token":"abc.def-_~+/=","token_type":"bearer","issued_token_type":"{AT}","expires_in":300}}"#
        ))
        .expect("usable");
        assert_eq!(issued.authorization, "Bearer abc.def-_~+/=");
        assert!(issued.authorization.is_sensitive());
        assert_eq!(issued.lifetime, Some(Duration::from_secs(300)));
    }

    #[test]
    fn json_escapes_in_the_response_are_decoded() {
        // Some IdPs escape `/` (and may escape anything): the header carries the decoded token,
        // and the other fields compare decoded too.
        let issued = parse(
            r#"{"access_token":"a\/b\u002Ec","token_type":"B\u0065arer","issued_token_type":"urn:ietf:params:oauth:token-type:access\u005ftoken"}"#,
        )
        .expect("usable");
        assert_eq!(issued.authorization, "Bearer a/b.c");
        assert!(issued.authorization.is_sensitive());
        assert_eq!(
            parse(&answer("a\\u0020b", "")).expect_err("an escaped space is still a space"),
            Unusable::TokenNotHeaderSafe
        );
    }

    #[test]
    fn unusable_responses_are_refused() {
        let cases = [
            ("not json", Unusable::NotJson),
            ("[]", Unusable::NotJson),
            (r#"{"token_type":"Bearer"}"#, Unusable::NoAccessToken),
            (
                r#"{"access_token":"","token_type":"Bearer"}"#,
                Unusable::NoAccessToken,
            ),
            (r#"{"access_token":"t"}"#, Unusable::TokenTypeNotBearer),
            (
                r#"{"access_token":"t","token_type":"N_A"}"#,
                Unusable::TokenTypeNotBearer,
            ),
            (
                r#"{"access_token":"t","token_type":"DPoP"}"#,
                Unusable::TokenTypeNotBearer,
            ),
            (
                r#"{"access_token":"t","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:id_token"}"#,
                Unusable::IssuedTokenTypeMismatch,
            ),
            (
                r#"{"access_token":"t","token_type":"Bearer","expires_in":300}"#,
                Unusable::NoIssuedTokenType,
            ),
            (
                r#"{"access_token":"t","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","expires_in":-5}"#,
                Unusable::BadExpiresIn,
            ),
            (
                r#"{"access_token":"t","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","expires_in":"soon"}"#,
                Unusable::BadExpiresIn,
            ),
            (
                r#"{"access_token":"t","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","expires_in":0}"#,
                Unusable::AlreadyExpired,
            ),
            (
                r#"{"access_token":"a b","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#,
                Unusable::TokenNotHeaderSafe,
            ),
            (
                r#"{"access_token":"a\r\nX-Injected: 1","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#,
                Unusable::TokenNotHeaderSafe,
            ),
            (
                r#"{"access_token":"tök","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#,
                Unusable::TokenNotHeaderSafe,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(parse(body).map(|_| ()), Err(want), "{body}");
        }
    }

    /// A success body with `fields` besides the ones every good answer has.
    fn answer(token: &str, fields: &str) -> String {
        format!(
            r#"{{"access_token":"{token}","token_type":"Bearer","issued_token_type":"{AT}"{fields}}}"#
        )
    }

    #[test]
    fn lifetime_is_the_earlier_of_expires_in_and_the_issued_jwt_exp() {
        let token = jwt_with(r#"{"sub":"u","exp":1700000120}"#);
        let issued = parse(&answer(&token, "")).expect("usable");
        assert_eq!(issued.lifetime, Some(Duration::from_secs(120)));
        // A shorter expires_in bounds it...
        let issued = parse(&answer(&token, r#","expires_in":"30""#)).expect("usable");
        assert_eq!(issued.lifetime, Some(Duration::from_secs(30)));
        // ...and a longer one cannot stretch the token past its own exp.
        let issued = parse(&answer(&token, r#","expires_in":3600"#)).expect("usable");
        assert_eq!(issued.lifetime, Some(Duration::from_secs(120)));
        // Expired JWT, whatever expires_in says.
        let old = jwt_with(r#"{"exp":1699999999}"#);
        for fields in ["", r#","expires_in":300"#] {
            assert_eq!(
                parse(&answer(&old, fields)).map(|_| ()),
                Err(Unusable::AlreadyExpired),
                "{fields}"
            );
        }
        // Opaque token, or a JWT without exp: unknown (max_ttl decides).
        for t in [
            "opaque-token".to_string(),
            jwt_with(r#"{"sub":"u"}"#),
            "a.!!!.c".into(),
            "a.b.c.d.e".into(),
        ] {
            let issued = parse(&answer(&t, "")).expect("usable");
            assert_eq!(issued.lifetime, None, "{t}");
        }
    }

    #[test]
    fn errors_are_sorted_by_whose_fault_they_are() {
        let s = |n| StatusCode::from_u16(n).expect("status");
        let cases = [
            (400, Some("invalid_grant"), Refusal::Subject),
            (400, Some("invalid_target"), Refusal::Subject),
            (400, Some("invalid_request"), Refusal::Subject),
            (400, Some("token_revoked"), Refusal::Subject),
            (400, Some("invalid_scope"), Refusal::Scope),
            (400, Some("scope_escalation"), Refusal::Scope),
            // 401 and 403 refuse the proxy, whatever the code says.
            (401, Some("token_revoked"), Refusal::Client),
            (401, Some("invalid_grant"), Refusal::Client),
            (403, Some("scope_escalation"), Refusal::Client),
            (403, Some("invalid_scope"), Refusal::Client),
            (400, Some("access_denied"), Refusal::Client),
            (401, Some("invalid_client"), Refusal::Client),
            (400, Some("invalid_client"), Refusal::Client),
            (400, Some("unauthorized_client"), Refusal::Client),
            (400, Some("unsupported_grant_type"), Refusal::Client),
            (401, None, Refusal::Client),
            (403, None, Refusal::Client),
            (403, Some("access_denied"), Refusal::Client),
            (400, Some("something_new"), Refusal::Client),
            (400, None, Refusal::Client),
            (404, None, Refusal::Client),
            (302, None, Refusal::Client),
            (500, Some("invalid_grant"), Refusal::Unavailable),
            (502, None, Refusal::Unavailable),
            (503, None, Refusal::Unavailable),
            (429, Some("slow_down"), Refusal::Unavailable),
            (408, None, Refusal::Unavailable),
        ];
        for (status, code, want) in cases {
            assert_eq!(classify(s(status), code), want, "{status} {code:?}");
        }
    }

    #[test]
    fn error_codes_are_read_and_sanitized_for_the_log() {
        assert_eq!(
            error_code(br#"{"error":"invalid_grant","error_description":"secret stuff"}"#)
                .as_deref(),
            Some("invalid_grant")
        );
        assert_eq!(error_code(b"<html>"), None);
        assert_eq!(
            sanitize_code("Invalid_Grant\r\n<script>\"=1"),
            "invalid_grantscript"
        );
        assert_eq!(sanitize_code(&"a".repeat(500)).len(), 40);
    }

    #[test]
    fn retry_after_is_read_and_clamped() {
        let h = |s: &str| HeaderValue::from_str(s).expect("header");
        let retry_after =
            |v: Option<&HeaderValue>, now| retry_after_sent(v, now).unwrap_or(DEFAULT_RETRY_AFTER);
        assert_eq!(retry_after(Some(&h("7")), now()), Duration::from_secs(7));
        assert_eq!(retry_after(Some(&h("0")), now()), MIN_RETRY_AFTER);
        assert_eq!(retry_after(Some(&h("86400")), now()), MAX_RETRY_AFTER);
        assert_eq!(MAX_RETRY_AFTER, Duration::from_secs(300));
        assert_eq!(retry_after_sent(None, now()), None);
        assert_eq!(
            retry_after_sent(Some(&h("120")), now()),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after(None, now()), DEFAULT_RETRY_AFTER);
        assert_eq!(retry_after(Some(&h("soon")), now()), DEFAULT_RETRY_AFTER);
        let date = httpdate::fmt_http_date(now() + Duration::from_secs(20));
        assert_eq!(retry_after(Some(&h(&date)), now()), Duration::from_secs(20));
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(20));
        assert_eq!(retry_after(Some(&h(&past)), now()), MIN_RETRY_AFTER);
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        assert_eq!(
            whole_seconds(Duration::from_millis(5_001)),
            Duration::from_secs(6)
        );
        assert_eq!(
            whole_seconds(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(whole_seconds(Duration::ZERO), Duration::from_secs(1));
    }

    #[test]
    fn an_on_behalf_of_answer_needs_no_issued_token_type() {
        let body = r#"{"token_type":"Bearer","scope":"api://backend/read","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAi.x.y","refresh_token":"0.AXo"}"#;
        let issued = parse_success(body.as_bytes(), None, now()).expect("usable");
        assert_eq!(issued.authorization, "Bearer eyJ0eXAi.x.y");
        assert_eq!(issued.lifetime, Some(Duration::from_secs(3599)));
        // The same answer to a token exchange lacks what RFC 8693 requires.
        assert_eq!(
            parse(body).expect_err("no issued_token_type"),
            Unusable::NoIssuedTokenType
        );
    }

    /// An Entra error body as Microsoft documents them (error, description with the AADSTS
    /// code, error_codes, timestamp, trace and correlation ids, and what else is given).
    fn entra(error: &str, extra: &str) -> ErrorBody {
        error_body(
            format!(
                r#"{{"error":"{error}","error_description":"AADSTS00000: text. Trace ID: 0 Correlation ID: 0 Timestamp: 2026-11-30 10:00:00Z","error_codes":[0],"timestamp":"2026-11-30 10:00:00Z","trace_id":"0","correlation_id":"0"{extra}}}"#
            )
            .as_bytes(),
        )
    }

    #[test]
    fn entra_answers_are_sorted_suberror_first() {
        let bad = StatusCode::BAD_REQUEST;
        let claims =
            r#"{\"access_token\":{\"capolids\":{\"essential\":true,\"values\":[\"c1\"]}}}"#;
        let cases: [(ErrorBody, Refusal); 8] =
            [
                (
                    entra("invalid_grant", r#","suberror":"consent_required""#),
                    Refusal::Scope,
                ),
                (entra("consent_required", ""), Refusal::Scope),
                (
                    entra(
                        "invalid_grant",
                        &format!(r#","suberror":"consent_required","claims":"{claims}""#),
                    ),
                    Refusal::Scope,
                ),
                (
                    entra("interaction_required", &format!(r#","claims":"{claims}""#)),
                    Refusal::Claims(base64::engine::general_purpose::STANDARD.encode(
                        r#"{"access_token":{"capolids":{"essential":true,"values":["c1"]}}}"#,
                    )),
                ),
                (entra("interaction_required", ""), Refusal::Subject),
                (entra("invalid_grant", ""), Refusal::Subject),
                // A claims member that is no claims request is not passed on.
                (
                    entra("interaction_required", r#","claims":"not json""#),
                    Refusal::Subject,
                ),
                (entra("invalid_client", ""), Refusal::Client),
            ];
        for (body, want) in cases {
            assert_eq!(classify_obo(bad, &body), want, "{body:?}");
        }
        // The IdP's own trouble and refusals of the proxy's client come first.
        let consent = entra("invalid_grant", r#","suberror":"consent_required""#);
        assert_eq!(
            classify_obo(StatusCode::SERVICE_UNAVAILABLE, &consent),
            Refusal::Unavailable
        );
        assert_eq!(
            classify_obo(StatusCode::UNAUTHORIZED, &consent),
            Refusal::Client
        );
    }

    #[test]
    fn error_members_of_another_type_do_not_hide_the_others() {
        let body =
            error_body(br#"{"error":"invalid_grant","suberror":7,"claims":{"id_token":{}}}"#);
        assert_eq!(body.error.as_deref(), Some("invalid_grant"));
        assert_eq!(body.suberror, None);
        assert_eq!(body.claims.as_deref(), Some(r#"{"id_token":{}}"#));
        assert!(error_body(b"<html>").error.is_none());
    }
}
