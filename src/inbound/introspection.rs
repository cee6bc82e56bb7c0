//! OAuth 2.0 Token Introspection (RFC 7662) for tokens that are not JWTs.
//!
//! The proxy authenticates with `client_secret_basic` (RFC 6749 §2.3.1: client id and secret
//! each form-urlencoded, then joined by `:` and Base64-encoded), or, without a secret file,
//! sends only `client_id` as a public client. Calls are bounded in number so that a flood of
//! invented opaque tokens cannot turn the proxy into an amplifier against the IdP.

use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Semaphore;
use url::Url;

use super::claims::Claims;
use super::jwt;
use crate::config::Introspection;
use crate::idp::{self, IdpClient, basic_authorization};
use crate::secret::SecretFile;

/// An introspection endpoint answers in milliseconds; past this the request is better
/// answered 503 than held.
pub const INTROSPECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls in flight at once; further requests wait (up to the timeout) for a slot.
pub const MAX_CONCURRENT_INTROSPECTIONS: usize = 32;

/// What the endpoint said about a token.
#[derive(Debug)]
pub struct Introspected {
    /// `active` was exactly `true` (RFC 7662 §2.2).
    pub active: bool,
    /// The other members, read like JWT claims.
    pub claims: Claims,
}

/// Why introspection gave no answer. Logged; the client sees 503.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectionError {
    #[error("no introspection endpoint is known (neither configured nor in discovery)")]
    NoEndpoint,
    #[error("too many introspection calls in flight")]
    Busy,
    #[error("the introspection endpoint did not answer in time")]
    Timeout,
    #[error(transparent)]
    Idp(#[from] idp::IdpError),
    #[error("the introspection endpoint refused the proxy's credentials (HTTP {0})")]
    Unauthorized(u16),
    #[error("cannot read the introspection client secret")]
    Secret(#[source] crate::secret::SecretError),
}

/// The `active` member alone; read separately so a non-boolean counts as inactive.
#[derive(Deserialize)]
struct Active {
    #[serde(default)]
    active: serde_json::Value,
}

/// Calls the introspection endpoint.
#[derive(Debug)]
pub struct Introspector {
    endpoint: OnceLock<Url>,
    client_id: String,
    secret: Option<SecretFile>,
    permits: Semaphore,
    timeout: Duration,
}

impl Introspector {
    /// From `inbound.introspection`; the endpoint may come later from discovery.
    pub fn new(config: &Introspection, timeout: Duration) -> Self {
        let endpoint = OnceLock::new();
        if let Some(u) = &config.endpoint {
            let _ = endpoint.set(u.clone());
        }
        Self {
            endpoint,
            client_id: config.client_id.clone(),
            secret: config.client_secret_file.as_ref().map(SecretFile::new),
            permits: Semaphore::new(MAX_CONCURRENT_INTROSPECTIONS),
            timeout,
        }
    }

    /// True until an endpoint is known.
    pub fn needs_endpoint(&self) -> bool {
        self.endpoint.get().is_none()
    }

    /// Sets the endpoint found by discovery (a configured one wins).
    pub fn set_endpoint(&self, url: Url) {
        let _ = self.endpoint.set(url);
    }

    /// Asks the endpoint about `token` (RFC 7662 §2.1).
    pub async fn introspect(
        &self,
        idp: &IdpClient,
        token: &str,
    ) -> Result<Introspected, IntrospectionError> {
        let url = self.endpoint.get().ok_or(IntrospectionError::NoEndpoint)?;
        idp.check_url(url)?;
        let _permit = tokio::time::timeout(self.timeout, self.permits.acquire())
            .await
            .map_err(|_| IntrospectionError::Busy)?
            .map_err(|_| IntrospectionError::Busy)?;
        let mut form: Vec<(&str, &str)> =
            vec![("token", token), ("token_type_hint", "access_token")];
        let mut request = idp
            .http()
            .post(url.clone())
            .timeout(self.timeout)
            .header(http::header::ACCEPT, "application/json");
        match &self.secret {
            Some(file) => {
                let secret = file.get().await.map_err(IntrospectionError::Secret)?;
                request = request.header(
                    http::header::AUTHORIZATION,
                    basic_authorization(&self.client_id, &secret),
                );
            }
            None => form.push(("client_id", &self.client_id)),
        }
        let call = async {
            let resp = request.form(&form).send().await.map_err(|e| {
                if e.is_timeout() {
                    IntrospectionError::Timeout
                } else {
                    idp::IdpError::Transport(e).into()
                }
            })?;
            let status = resp.status();
            if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
                return Err(IntrospectionError::Unauthorized(status.as_u16()));
            }
            if !status.is_success() {
                return Err(idp::IdpError::Status(status.as_u16()).into());
            }
            idp::read_limited(resp)
                .await
                .map_err(IntrospectionError::from)
        };
        let body = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| IntrospectionError::Timeout)??;
        parse_response(&body)
    }
}

/// Reads an introspection response: a JSON object whose `active` is exactly `true` for an
/// active token. Any other `active` value counts as inactive (RFC 7662 §2.2 defines only
/// booleans); a body that is not a JSON object, or known members of the wrong type, make the
/// answer unusable.
pub fn parse_response(body: &[u8]) -> Result<Introspected, IntrospectionError> {
    let invalid = || {
        idp::IdpError::Invalid("the introspection response is not a JSON object with valid members")
    };
    let active: Active = jwt::parse_json(body).map_err(|_| invalid())?;
    let active = active.active == serde_json::Value::Bool(true);
    let claims = if active {
        jwt::parse_json(body).map_err(|_| invalid())?
    } else {
        Claims::default()
    };
    Ok(Introspected { active, claims })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_literal_true_is_active() {
        assert!(
            parse_response(br#"{"active":true,"sub":"a"}"#)
                .expect("ok")
                .active
        );
        for body in [
            &br#"{"active":false}"#[..],
            br#"{"active":"true"}"#,
            br#"{"active":1}"#,
            br#"{}"#,
        ] {
            assert!(!parse_response(body).expect("ok").active);
        }
    }

    #[test]
    fn unusable_responses_are_errors_not_decisions() {
        assert!(parse_response(b"not json").is_err());
        assert!(parse_response(br#"[true]"#).is_err());
        assert!(parse_response(br#"{"active":true,"exp":"soon"}"#).is_err());
    }

    #[test]
    fn claims_of_an_active_token_are_read() {
        let r = parse_response(
            br#"{"active":true,"sub":"bob","aud":["a","b"],"exp":123,"scope":"x y"}"#,
        )
        .expect("ok");
        assert_eq!(r.claims.sub.as_deref(), Some("bob"));
        assert_eq!(r.claims.exp.map(|d| d.0), Some(123));
    }
}
