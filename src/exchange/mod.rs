//! RFC 8693 token exchange with a single-flight cache.
//!
//! PLACEHOLDER: every exchange fails until the exchanger is implemented.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::config::{Cache, Exchange};
use crate::idp::IdpClient;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// Where an exchanged token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Coalesced,
}

impl CacheStatus {
    /// As written in the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
        }
    }
}

/// An exchanged token, ready to be sent.
#[derive(Debug, Clone)]
pub struct Exchanged {
    /// `Bearer <token>`, marked sensitive.
    pub authorization: HeaderValue,
    pub cache: CacheStatus,
}

/// Why an exchange failed, split by whose fault it is (SPEC "Exchange outcomes").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The IdP refused the subject token: 401 `invalid_token`.
    #[error("the IdP rejected the subject token")]
    SubjectRejected,
    /// The IdP refused the requested scope: 403 `insufficient_scope`.
    #[error("the IdP rejected the requested scope")]
    ScopeRejected { scope: Option<String> },
    /// The IdP refused the proxy's own credentials: 502.
    #[error("the IdP rejected the proxy's client credentials")]
    ClientRejected,
    /// The IdP is unreachable, slow, or answered 5xx/429: 503 with `Retry-After`.
    #[error("the IdP is unavailable")]
    Unavailable { retry_after: Duration },
    /// The IdP answered 200 with something unusable: 502.
    #[error("the IdP's response was unusable")]
    InvalidResponse,
}

/// Exchanges subject tokens, with a cache.
#[derive(Debug)]
pub struct Exchanger {
    _config: Exchange,
}

impl Exchanger {
    /// Builds the exchanger; registers what `/readyz` waits for.
    pub fn new(
        config: &Exchange,
        _cache: &Cache,
        _idp: IdpClient,
        _metrics: Arc<Metrics>,
        _readiness: Arc<Readiness>,
    ) -> Self {
        Self {
            _config: config.clone(),
        }
    }

    /// Starts background work (token endpoint discovery).
    pub fn start(self: &Arc<Self>) {}

    /// Exchanges `subject` (a validated client token expiring at `subject_expires_at`).
    pub async fn exchange(
        &self,
        _subject: &str,
        _subject_expires_at: Option<u64>,
    ) -> Result<Exchanged, ExchangeError> {
        Err(ExchangeError::Unavailable {
            retry_after: Duration::from_secs(1),
        })
    }

    /// Entries currently cached.
    pub fn entry_count(&self) -> u64 {
        0
    }
}
