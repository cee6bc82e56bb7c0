//! Entry points for the fuzz targets (`fuzz/`, README "Reliability"): each takes arbitrary
//! bytes, runs one parser of untrusted input over them, and checks what that parser promises.
//!
//! Not part of the library's interface: the parsers stay crate-private; these functions only
//! let the fuzz targets and the corpus regression test (`tests/it/fuzz_corpus.rs`) reach them.
//! None may panic on any input, except an `assert!` of a broken promise, which is a bug to fix.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::exchange::response;
use crate::inbound::{introspection, jwks, jwt};

/// The token type the proxy requests by default (RFC 8693 §3).
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// `inbound.max_token_bytes`'s default.
const MAX_TOKEN_BYTES: usize = 8192;
/// A fixed "now" (2026-01-01T00:00:00Z), so that a crash found replays the same way.
const NOW_SECS: u64 = 1_767_225_600;

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: the name is the directory of its corpus under `fuzz/corpus/`.
pub const TARGETS: [(&str, Target); 6] = [
    ("bearer_header", bearer_header),
    ("jwt", jwt),
    ("jwks", jwks),
    ("exchange_response", exchange_response),
    ("introspection_response", introspection_response),
    ("config", config),
];

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_SECS)
}

/// `Authorization` headers (one per line of `data`; a line that is no valid header value is
/// skipped) through the bearer-header parser (RFC 6750 §2.1). A token it returns is a
/// non-empty, trimmed slice of the single header, within the size limit.
pub fn bearer_header(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(header::AUTHORIZATION, v);
        }
    }
    if let Ok(token) = crate::inbound::bearer_token(&headers, MAX_TOKEN_BYTES) {
        assert!(!token.is_empty() && token.len() <= MAX_TOKEN_BYTES);
        assert!(!token.starts_with(' ') && !token.ends_with(' '));
        let value = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        assert!(value.is_some_and(|v| v.windows(token.len()).any(|w| w == token.as_bytes())));
    }
}

/// A compact JWS (`data` as text) split into its segments, and its header, claims and
/// signature decoded, as the validator does before any signature check.
pub fn jwt(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(segments) = jwt::split(&text) {
        let _ = jwt::parse_header(segments.header);
        let _ = jwt::parse_claims(segments.payload);
        let _ = jwt::decode_segment(segments.signature);
    }
    // The segments alone, as a token of one part would reach them.
    let _ = jwt::parse_header(&text);
    let _ = jwt::parse_claims(&text);
}

/// A JWKS document (RFC 7517 §5) turned into the key set the validator uses: never more than
/// [`jwks::MAX_KEYS`] keys.
pub fn jwks(data: &[u8]) {
    if let Ok(doc) = serde_json::from_slice::<jwks::JwkSetDocument>(data) {
        let (set, _skipped) = jwks::KeySet::from_document(&doc);
        assert!(set.len() <= jwks::MAX_KEYS);
    }
}

/// A token-endpoint answer (RFC 8693 §2.2, or Entra's On-Behalf-Of): the first byte picks the
/// HTTP status, the rest is the body (and, read as a header value, a `Retry-After`). A usable
/// token becomes a `Bearer` header value with a lifetime that has not run out; an error code
/// reaches the log only as `[a-z_]`, at most 40 characters; a claims challenge is a bounded
/// header-safe value; a `Retry-After` is clamped to 1–300 s.
pub fn exchange_response(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let status = StatusCode::from_u16(200 + u16::from(first) * 2).unwrap_or(StatusCode::OK);
    // RFC 8693 asks for `issued_token_type`; an On-Behalf-Of answer has none.
    for requested in [Some(ACCESS_TOKEN_TYPE), None] {
        if let Ok(issued) = response::parse_success(body, requested, now()) {
            assert!(issued.authorization.as_bytes().starts_with(b"Bearer "));
            assert!(issued.authorization.as_bytes().len() > b"Bearer ".len());
            assert!(issued.lifetime.is_none_or(|l| !l.is_zero()));
        }
    }
    let code = response::error_code(body);
    if let Some(code) = &code {
        let logged = response::sanitize_code(code);
        assert!(logged.len() <= 40);
        assert!(logged.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    }
    let _ = response::classify(status, code.as_deref());
    // Entra's error answer: a claims challenge goes into `WWW-Authenticate` as base64.
    let entra = response::error_body(body);
    if let response::Refusal::Claims(challenge) = response::classify_obo(status, &entra) {
        assert!(challenge.len() <= response::MAX_CLAIMS_BYTES.div_ceil(3) * 4);
        assert!(HeaderValue::from_str(&challenge).is_ok());
    }
    let retry_after = HeaderValue::from_bytes(body).ok();
    if let Some(d) = response::retry_after_sent(retry_after.as_ref(), now()) {
        assert!((response::MIN_RETRY_AFTER..=response::MAX_RETRY_AFTER).contains(&d));
    }
}

/// An introspection answer (RFC 7662 §2.2): a decision or an error, never a panic.
pub fn introspection_response(data: &[u8]) {
    let _ = introspection::parse_response(data);
}

/// A config file (`data` as YAML) through the loader and the validator; a valid one can be
/// printed back, as `check-config` does.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = crate::config::parse_yaml(text)
        && let Ok(config) = crate::config::validate(raw)
    {
        assert!(serde_yaml_ng::to_string(&config).is_ok());
    }
}
