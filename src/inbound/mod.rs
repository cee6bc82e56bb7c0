//! Inbound token validation: decides, for every request, whether the client's bearer token is
//! valid (JWT against the issuer's JWKS; opaque tokens by RFC 7662 introspection).
//!
//! PLACEHOLDER: rejects every token until the validator is implemented.

use std::sync::Arc;

use crate::config::Inbound;
use crate::idp::IdpClient;
use crate::metrics::{Metrics, RejectReason};
use crate::readiness::Readiness;

/// What the proxy knows about a validated client token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`, for the access log.
    pub sub: Option<String>,
    /// The token's `exp` (seconds since the Unix epoch), bounding how long an exchanged token
    /// may be cached.
    pub expires_at: Option<u64>,
}

/// Why a request's token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// 401 `invalid_token` with a short public description.
    #[error("invalid token: {description}")]
    Rejected {
        reason: RejectReason,
        description: &'static str,
    },
    /// 403 `insufficient_scope`: the scopes that are needed (space-separated).
    #[error("insufficient scope")]
    InsufficientScope { scope: String },
    /// The keys (or the introspection endpoint) cannot be reached yet: 503.
    #[error("token validation is not available")]
    Unavailable,
}

/// Validates client tokens.
#[derive(Debug)]
pub struct Validator {
    _config: Inbound,
}

impl Validator {
    /// Builds the validator; registers what `/readyz` waits for.
    pub fn new(
        config: &Inbound,
        _idp: IdpClient,
        _metrics: Arc<Metrics>,
        _readiness: Arc<Readiness>,
    ) -> Self {
        Self {
            _config: config.clone(),
        }
    }

    /// Starts background work (discovery, JWKS loading and refresh).
    pub fn start(self: &Arc<Self>) {}

    /// Validates `token` (the bytes after `Bearer `).
    pub async fn validate(&self, _token: &str) -> Result<Principal, InboundError> {
        Err(InboundError::Rejected {
            reason: RejectReason::Signature,
            description: "token validation is not configured",
        })
    }
}
